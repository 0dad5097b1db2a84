"""Runs `bpgo_jax/cli/convert_videoclip_xl.py` (installed as `bpgo-convert-videoclip-xl`)."""

from bpgo_jax.cli.convert_videoclip_xl import run

if __name__ == "__main__":  # not when a worker process imports this file
    run()
