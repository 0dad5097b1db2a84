"""Runs `bpgo_jax/cli/train.py` (installed as `bpgo-train`)."""

from bpgo_jax.cli.train import run

run()
