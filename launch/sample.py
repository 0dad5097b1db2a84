"""Runs `bpgo_jax/cli/sample.py` (installed as `bpgo-sample`)."""

from bpgo_jax.cli.sample import run

run()
