"""Runs the method study of `config.study`: tuning on the dev sets, then seeds on the test sets.

    python launch/study.py --config=configs/study.py \
        --outdir=docs/study_powered/shipped_reward --dry_run
    python launch/study.py --config=configs/study.py --outdir=docs/study_powered/shipped_reward

Each run lives in OUTDIR/PHASE/METHOD/POINT/seed_N and is finished once its
result.json is written; re-running the command skips finished runs and
resumes an interrupted one from its checkpoint, so a study can be completed
over several sittings (`--max_runs=N` stops after N runs). After the runs
(and on an interruption) OUTDIR/study.json, study.md, study.png and
study_rewards.png are rebuilt from every finished run, naming the runs still
missing. `--dry_run` prints the run list and the estimated time left;
`--summary_only` rebuilds the summary without running anything. A finished
run whose config differs from the study's (a changed setting, or a field the
code added since) is trained again, which the trainer refuses for a run with
a checkpoint; `--allow_config_change` keeps such runs instead and resumes
unfinished ones.
"""

from pathlib import Path

from absl import flags
from ml_collections import config_flags

from bpgo_jax import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Study config.", lock_config=False)
_OUTDIR = flags.DEFINE_string("outdir", None, "Output directory.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the run list and time estimate; run nothing.")
_SUMMARY_ONLY = flags.DEFINE_bool(
    "summary_only", False, "Rebuild the summary from the finished runs; run nothing."
)
_MAX_RUNS = flags.DEFINE_integer("max_runs", None, "Stop after this many runs (default: all).")
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Keep finished runs, and resume unfinished ones, whose config differs from the study's.",
)
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
    from bpgo_jax import study

    config, outdir = _CONFIG.value, Path(_OUTDIR.value)
    if _DRY_RUN.value:
        print(study.describe_plan(config, outdir, _ALLOW_CHANGE.value))
        return
    if _SUMMARY_ONLY.value:
        study.check_study(config)
        study.write_summary(config, outdir, _ALLOW_CHANGE.value)
        print((outdir / "study.md").read_text())
        return
    runtime.enable_compile_cache(_CACHE.value)
    study.run_study(
        config,
        outdir,
        _CACHE.value,
        max_runs=_MAX_RUNS.value,
        allow_config_change=_ALLOW_CHANGE.value,
    )
    print((outdir / "study.md").read_text())


def run() -> None:
    runtime.run(main, __doc__)


if __name__ == "__main__":
    run()
