"""Runs `bpgo_jax/cli/embed_prompts.py` (installed as `bpgo-embed-prompts`)."""

from bpgo_jax.cli.embed_prompts import run

run()
