"""Pre-trains the built-in generator with the rectified-flow loss; see configs/pretrain.py.

    python launch/pretrain.py --config=configs/pretrain.py --workdir=workdirs/pretrain \
        --cpu_devices=2

Writes WORKDIR/pretrain_metrics.jsonl (loss every `log_every` steps, held-out
oracle accuracy at every evaluation), checkpoints/ (an Orbax checkpoint and
the EMA weights step_N.msgpack at every evaluation), and the shipped pick as
generator.msgpack + generator.json + samples.png (also into `export_dir` when
set). Re-running with the same --workdir resumes from its latest checkpoint
and ends with the weights an uninterrupted run gives; a workdir is locked
against a second run, and resuming with a config that changes results is
refused unless --allow_config_change is given.
"""

from __future__ import annotations

import json
import sys

from absl import flags
from ml_collections import config_flags

from bpgo_jax import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pre-training config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints, weights.")
_ALLOW_CHANGE = flags.DEFINE_boolean(
    "allow_config_change",
    False,
    "Resume a workdir whose config.json differs in fields that change results.",
)
_CACHE = runtime.define_compile_cache_flag()
_CPU_DEVICES = runtime.define_cpu_devices_flag(
    "N must divide train.batch_size and eval.batch_size."
)
flags.adopt_module_key_flags(runtime)  # list them in --help
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    runtime.start(_CPU_DEVICES.value, _CACHE.value, log_info=True)
    import jax

    from bpgo_jax import pretrain

    print(f"data-parallel over {jax.device_count()} {jax.devices()[0].platform} device(s)")
    info = pretrain.train(
        _CONFIG.value,
        _WORKDIR.value,
        command=" ".join(["python", *sys.argv]),
        allow_config_change=_ALLOW_CHANGE.value,
    )
    print(json.dumps({k: info[k] for k in ("steps", "final_loss", "heldout_oracle_accuracy")}))


def run() -> None:
    runtime.run(main, __doc__)


if __name__ == "__main__":
    run()
