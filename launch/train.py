"""Runs `bpgo_jax/cli/train.py` (installed as `bpgo-train`)."""

from bpgo_jax.cli.train import run

if __name__ == "__main__":  # not when a worker process imports this file
    run()
