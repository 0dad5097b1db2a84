"""Runs `bpgo_jax/cli/estimate_priors.py` (installed as `bpgo-estimate-priors`)."""

from bpgo_jax.cli.estimate_priors import run

run()
