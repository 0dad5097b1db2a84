r"""Post-trains a generator with BPGO or a GRPO-family baseline.

    python launch/train.py --config=configs/image.py --workdir=runs/image
    python launch/train.py --config=configs/image.py --workdir=runs/x \
        --config.advantage.method=grpo --config.train.num_epochs=40

Re-running with the same --workdir resumes from its latest checkpoint (a
changed config is refused unless --allow_config_change). SIGTERM saves a
checkpoint and exits with code 75 (requeue and re-run to resume). On a
multi-core CPU add --cpu_devices=N (N cores) to use them all.

A multi-process job (a TPU pod's hosts, GPU nodes) runs the same command in
every process with --distributed (TPU pods, SLURM, Open MPI, GKE: detected)
or, elsewhere, the set-up spelt out (the same --workdir, on a shared disk):

    python launch/train.py --config=configs/image.py --workdir=W \
        --coordinator=HOST0:1234 --num_processes=2 --process_id=I

Process 0 writes the metrics and images; every process writes its shards of
each checkpoint. SIGTERM to any process stops all of them after the same
epoch, with one checkpoint, each exiting with code 75.
"""

from absl import flags
from ml_collections import config_flags

from bpgo_jax import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and images.")
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume although the config differs from the one the workdir was trained with "
    "(the differences are logged and recorded in WORKDIR/config_history.jsonl).",
)
_CACHE = runtime.define_compile_cache_flag()
_CPU_DEVICES = runtime.define_cpu_devices_flag(
    "N must divide sample.batch_size and train.micro_batch_size."
)
_DISTRIBUTED = runtime.define_distributed_flags()
flags.adopt_module_key_flags(runtime)  # list them in --help
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    runtime.start(_CPU_DEVICES.value, _CACHE.value, _DISTRIBUTED, log_info=True)
    from bpgo_jax.train import train

    train(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CHANGE.value)


def run() -> None:
    runtime.run(main, __doc__)


if __name__ == "__main__":
    run()
