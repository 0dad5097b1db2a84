"""Orbax checkpoints of a whole run: device state plus host-side metadata.

The device state (the RL `TrainState`, the pre-training `PretrainState`, or
any pytree of arrays) is saved asynchronously; the host metadata (epoch or
step, data position, counters, trackers) goes beside it as JSON. Restoring
takes the target shardings from an abstract state, so a run can resume on
another mesh shape; leaves of the target that are `orbax.checkpoint.PLACEHOLDER`
are not read.

Nothing written is lost silently:

- `keep` < 1 is refused (Orbax would delete every checkpoint, the final one too).
- A save that fails (a full disk, an unwritable directory) raises one-line
  `WorkdirError` naming the step directory at the next `wait()`, `save()` or
  `close()`. Saves overlap the next epoch's compute, so a loop calls
  `wait()` once per epoch, just before writing that epoch's metrics row:
  by then the save has normally finished, and a failed save stops the run
  before any row is written past the last good checkpoint. Older
  checkpoints are never deleted for a save that failed.
- `restore_latest` falls back from a damaged checkpoint (truncated or missing
  files, an empty metadata file) to the newest readable one, and moves the
  damaged ones aside as `<step>.damaged` (not deleted; Orbax ignores them,
  and later saves of that step do not collide).

The workdir helpers (directory checks, the lock, the run's config record)
live in `bpgo_jax.checkpoint.workdir`, the path type of local and
object-store (`gs://`) workdirs in `bpgo_jax.checkpoint.paths`; both are
re-exported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bpgo_jax.checkpoint.paths import WorkPath, is_remote, workdir_path
from bpgo_jax.checkpoint.workdir import (
    RUN_NEUTRAL_FIELDS,
    ObjectStoreLock,
    WorkdirLock,
    append_text,
    atomic_write,
    check_run_config,
    config_record,
    export_files,
    has_checkpoint,
    lock_workdir,
    prepare_workdir,
    refresh_workdir_lock,
    workdir_lock,
)

if TYPE_CHECKING:
    from bpgo_jax.checkpoint.checkpointer import Checkpointer

__all__ = [
    "RUN_NEUTRAL_FIELDS",
    "Checkpointer",
    "ObjectStoreLock",
    "WorkPath",
    "WorkdirLock",
    "append_text",
    "atomic_write",
    "check_run_config",
    "config_record",
    "export_files",
    "has_checkpoint",
    "is_remote",
    "lock_workdir",
    "prepare_workdir",
    "refresh_workdir_lock",
    "workdir_lock",
    "workdir_path",
]


def __getattr__(name: str) -> Any:
    # Orbax takes seconds to import: only code that checkpoints pays for it.
    if name == "Checkpointer":
        from bpgo_jax.checkpoint.checkpointer import Checkpointer

        return Checkpointer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
