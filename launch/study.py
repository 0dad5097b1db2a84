"""Runs `bpgo_jax/cli/study.py` (installed as `bpgo-study`)."""

from bpgo_jax.cli.study import run

run()
