"""Runs `bpgo_jax/cli/evaluate_generator.py` (installed as `bpgo-evaluate-generator`)."""

from bpgo_jax.cli.evaluate_generator import run

run()
