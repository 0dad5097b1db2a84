"""Runs `bpgo_jax/cli/convert_videoclip_xl.py` (installed as `bpgo-convert-videoclip-xl`)."""

from bpgo_jax.cli.convert_videoclip_xl import run

run()
