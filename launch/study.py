"""Runs `bpgo_jax/cli/study.py` (installed as `bpgo-study`)."""

from bpgo_jax.cli.study import run

if __name__ == "__main__":  # not when a worker process imports this file
    run()
