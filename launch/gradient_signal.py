"""Runs `bpgo_jax/cli/gradient_signal.py` (installed as `bpgo-gradient-signal`)."""

from bpgo_jax.cli.gradient_signal import run

run()
