"""Runs `bpgo_jax/cli/train_reward_model.py` (installed as `bpgo-train-reward-model`)."""

from bpgo_jax.cli.train_reward_model import run

if __name__ == "__main__":  # not when a worker process imports this file
    run()
