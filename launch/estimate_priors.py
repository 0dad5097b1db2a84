"""Runs `bpgo_jax/cli/estimate_priors.py` (installed as `bpgo-estimate-priors`)."""

from bpgo_jax.cli.estimate_priors import run

if __name__ == "__main__":  # not when a worker process imports this file
    run()
