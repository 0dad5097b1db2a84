"""Runs `bpgo_jax/cli/pretrain.py` (installed as `bpgo-pretrain`)."""

from bpgo_jax.cli.pretrain import run

run()
