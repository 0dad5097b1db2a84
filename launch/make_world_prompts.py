"""Runs `bpgo_jax/cli/make_world_prompts.py` (installed as `bpgo-make-world-prompts`)."""

from bpgo_jax.cli.make_world_prompts import run

run()
