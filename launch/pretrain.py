"""Runs `bpgo_jax/cli/pretrain.py` (installed as `bpgo-pretrain`)."""

from bpgo_jax.cli.pretrain import run

if __name__ == "__main__":  # not when a worker process imports this file
    run()
