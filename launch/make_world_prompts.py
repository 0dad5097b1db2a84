"""Runs `bpgo_jax/cli/make_world_prompts.py` (installed as `bpgo-make-world-prompts`)."""

from bpgo_jax.cli.make_world_prompts import run

if __name__ == "__main__":  # not when a worker process imports this file
    run()
