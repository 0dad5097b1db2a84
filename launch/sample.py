"""Runs `bpgo_jax/cli/sample.py` (installed as `bpgo-sample`)."""

from bpgo_jax.cli.sample import run

if __name__ == "__main__":  # not when a worker process imports this file
    run()
