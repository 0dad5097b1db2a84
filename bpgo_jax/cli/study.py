"""Runs every method of `config.study` over its seeds and summarises them.

    python launch/study.py --config=configs/study.py --outdir=runs/study

Writes OUTDIR/study.json (every run's metrics), OUTDIR/study.png (training
reward and held-out oracle accuracy against samples: seed mean and min-max
band) and OUTDIR/study.md (final scores and samples-to-threshold). Runs are
resumable: each lives in OUTDIR/METHOD/seed_N.
"""

import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from bpgo_jax import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Study config.", lock_config=False)
_OUTDIR = flags.DEFINE_string("outdir", None, "Output directory.")
_CACHE = runtime.define_compile_cache_flag()
_CPU_DEVICES = runtime.define_cpu_devices_flag(
    "Per run: study.workers x cpu_devices should not exceed the cores."
)
flags.adopt_module_key_flags(runtime)  # list them in --help
flags.mark_flags_as_required(["config", "outdir"])


def main(argv):
    del argv
    runtime.set_cpu_devices(_CPU_DEVICES.value)  # spawned workers inherit it
    runtime.quiet_absl()
    runtime.enable_compile_cache(_CACHE.value)
    from bpgo_jax.config import ConfigError
    from bpgo_jax.study import run_study

    try:
        run_study(_CONFIG.value, Path(_OUTDIR.value), _CACHE.value)
    except ConfigError as err:
        sys.exit(f"error: {err}")


def run() -> None:
    runtime.run(main, __doc__)


if __name__ == "__main__":
    run()
