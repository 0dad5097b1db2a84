"""Runs `bpgo_jax/cli/compile.py` (installed as `bpgo-compile`)."""

from bpgo_jax.cli.compile import run

run()
