"""Runs `bpgo_jax/cli/gradient_signal.py` (installed as `bpgo-gradient-signal`)."""

from bpgo_jax.cli.gradient_signal import run

if __name__ == "__main__":  # not when a worker process imports this file
    run()
