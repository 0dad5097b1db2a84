"""Runs `bpgo_jax/cli/embed_prompts.py` (installed as `bpgo-embed-prompts`)."""

from bpgo_jax.cli.embed_prompts import run

if __name__ == "__main__":  # not when a worker process imports this file
    run()
