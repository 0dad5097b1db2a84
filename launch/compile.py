"""Runs `bpgo_jax/cli/compile.py` (installed as `bpgo-compile`)."""

from bpgo_jax.cli.compile import run

if __name__ == "__main__":  # not when a worker process imports this file
    run()
