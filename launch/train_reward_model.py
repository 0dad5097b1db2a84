"""Runs `bpgo_jax/cli/train_reward_model.py` (installed as `bpgo-train-reward-model`)."""

from bpgo_jax.cli.train_reward_model import run

run()
