"""Runs `bpgo_jax/cli/evaluate_generator.py` (installed as `bpgo-evaluate-generator`)."""

from bpgo_jax.cli.evaluate_generator import run

if __name__ == "__main__":  # not when a worker process imports this file
    run()
