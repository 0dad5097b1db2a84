"""The run directory: checked before any model work, locked for the run's lifetime,
and bound to the config it was trained with.

A workdir holds everything a run writes (checkpoints, metrics, images,
weights), so three things must not happen to it: a second process writing
into it at the same time (`lock_workdir`), a resume with a config that
changes results going unnoticed (`check_run_config`), and a file left half
written by a kill or a full disk (`atomic_write`). `prepare_workdir`
turns a workdir that is a file, read-only or on a full disk into one line
naming the path before minutes of compilation are spent.

Only process 0 of a multi-host run takes the lock and writes `config.json`;
every process checks the config.
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import json
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import filelock
import ml_collections

from bpgo_jax.errors import WorkdirError

log = logging.getLogger("bpgo_jax")

CONFIG_FILE = "config.json"
CONFIG_HISTORY_FILE = "config_history.jsonl"
LOCK_FILE = ".lock"
OWNER_FILE = ".lock.owner"

# Fields of a post-training config that may change between a run and its
# resume: they change how the run is laid out, logged or stopped, not the
# numbers it computes. `fnmatch` patterns over dotted field names.
#   train.num_epochs     extending (or shortening) a run; no schedule depends on it
#   train.accumulate     host or scan gradient accumulation: the same sums
#   log.*, checkpoint.*  what is written and how often (checkpoint.every/keep/use_async)
#   distributed.*        how processes find each other
#   mesh.*               the device layout; checkpoints restore onto any mesh
#                        (numbers agree up to float rounding)
#   eval.every           how often the held-out evaluation runs
#   prompts.on_too_long  whether over-long prompts warn or fail; the cut is the same
RUN_NEUTRAL_FIELDS: tuple[str, ...] = (
    "train.num_epochs",
    "train.accumulate",
    "log.*",
    "checkpoint.*",
    "distributed.*",
    "mesh.*",
    "eval.every",
    "prompts.on_too_long",
)


def prepare_workdir(workdir: str | Path) -> Path:
    """Creates `workdir` and checks it is a writable directory; returns its absolute path.

    Raises `WorkdirError` naming the path when it is a file, cannot be created,
    or refuses a write (read-only, permissions, a full disk).
    """
    path = Path(workdir).absolute()
    if path.exists() and not path.is_dir():
        raise WorkdirError(f"workdir {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WorkdirError(f"cannot create workdir {path}: {_reason(err)}") from err
    try:
        with tempfile.TemporaryFile(dir=path, prefix=".write-test-") as f:
            f.write(b"bpgo-jax")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise WorkdirError(f"workdir {path} is not writable: {_reason(err)}") from err
    return path


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Writes `data` to `path` through a temporary file in the same directory and
    `os.replace`, so a kill or a full disk leaves the old file or the new one,
    never a mix. Raises `WorkdirError` naming the path when the write fails."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    tmp = None
    try:
        # mkstemp's file is private (0600); the result keeps the old file's mode.
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise WorkdirError(f"cannot write {path}: {_reason(err)}") from err


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


def _is_writer() -> bool:
    import jax

    return jax.process_index() == 0


# ------------------------------------------------------------------ the lock
class WorkdirLock:
    """An exclusive OS lock on `WORKDIR/.lock`, with the holder in `.lock.owner`.

    The lock is `filelock`'s (flock on POSIX): the OS drops it when the
    holding process dies, so a killed run never blocks the next one. The
    owner file only names the holder in the refusal message; it is never
    trusted on its own (a stale one from a killed run is overwritten).
    """

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self._lock = filelock.FileLock(str(self.workdir / LOCK_FILE))
        self._owner = self.workdir / OWNER_FILE

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def acquire(self) -> WorkdirLock:
        """Takes the lock at once, or raises `WorkdirError` naming the process holding it."""
        try:
            self._lock.acquire(timeout=0)
        except filelock.Timeout:
            raise WorkdirError(
                f"{self.workdir} is in use by {self._describe_owner()}; wait for it to finish, "
                "stop it, or choose another --workdir"
            ) from None
        except OSError as err:
            raise WorkdirError(f"cannot lock {self.workdir / LOCK_FILE}: {_reason(err)}") from err
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        try:
            atomic_write(self._owner, json.dumps(owner) + "\n")
        except WorkdirError:
            self._lock.release()
            raise
        return self

    def release(self) -> None:
        if not self._lock.is_locked:
            return
        # The owner file goes first, while the lock is still held: removing it
        # after the release could delete the next holder's.
        with contextlib.suppress(OSError):
            self._owner.unlink()
        self._lock.release()

    def _describe_owner(self) -> str:
        try:
            owner = json.loads(self._owner.read_text())
            return f"pid {owner['pid']} on host {owner['host']} (started {owner['started']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process (its owner file is missing or unreadable)"

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def lock_workdir(workdir: str | Path) -> Iterator[WorkdirLock | None]:
    """Holds the workdir lock for the `with` block (process 0 only; others get None)."""
    if not _is_writer():
        yield None
        return
    with WorkdirLock(workdir) as lock:
        yield lock


# ------------------------------------------------------------- the run config
def has_checkpoint(directory: str | Path) -> bool:
    """Whether `directory` holds an Orbax step directory (an integer name)."""
    directory = Path(directory)
    return directory.is_dir() and any(p.name.isdigit() and p.is_dir() for p in directory.iterdir())


def config_record(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """The config as plain JSON values (tuples become lists), as config.json stores it."""
    data = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    return json.loads(json.dumps(data, sort_keys=True, default=str))


def config_differences(
    old: Mapping[str, Any], new: Mapping[str, Any]
) -> list[tuple[str, Any, Any]]:
    """(dotted field, old value, new value) of every leaf that differs, sorted by field."""
    missing = object()
    flat_old, flat_new = _flatten(old), _flatten(new)
    out = []
    for key in sorted(flat_old.keys() | flat_new.keys()):
        a, b = flat_old.get(key, missing), flat_new.get(key, missing)
        if a != b or type(a) is not type(b):
            out.append((key, "<unset>" if a is missing else a, "<unset>" if b is missing else b))
    return out


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _is_neutral(field: str, neutral: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(field, pattern) for pattern in neutral)


def _describe(changes: Sequence[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{field} {a!r} -> {b!r}" for field, a, b in changes)


def check_run_config(
    workdir: str | Path,
    config: ml_collections.ConfigDict | Mapping[str, Any],
    *,
    allow_change: bool,
    neutral: Sequence[str] = RUN_NEUTRAL_FIELDS,
    checkpoints: str = "checkpoints",
) -> None:
    """Binds `workdir` to `config`: WORKDIR/config.json is written on the first start
    and compared on every resume.

    A resume (the workdir holds a checkpoint under `checkpoints`) whose config
    differs in a field not matched by `neutral` is refused with one line
    listing the fields, unless `allow_change`; then the differences are
    logged as a warning. Whenever the config differs, the new one replaces
    config.json and the old one is appended to config_history.jsonl. A
    workdir without a checkpoint has nothing to resume and takes the new
    config (a run that failed before its first checkpoint can be fixed and
    re-run).
    """
    workdir = Path(workdir)
    path = workdir / CONFIG_FILE
    new = config_record(config)
    if not path.exists():
        if _is_writer():
            atomic_write(path, json.dumps(new, indent=1, sort_keys=True) + "\n")
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise WorkdirError(
            f"{path} is unreadable ({err}); move it aside to start the run's config record anew"
        ) from err
    changes = config_differences(old, new)
    if not changes:
        return
    resuming = has_checkpoint(workdir / checkpoints)
    relevant = [c for c in changes if not _is_neutral(c[0], neutral)]
    if resuming and relevant:
        if not allow_change:
            raise WorkdirError(
                f"{workdir} was trained with a different config: {_describe(relevant)} "
                "(pass --allow_config_change to resume anyway)"
            )
        log.warning("resuming %s with a changed config: %s", workdir, _describe(relevant))
    elif relevant:
        log.info("%s has no checkpoint yet: its config.json is replaced", workdir)
    if not _is_writer():
        return
    entry = {
        "replaced": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "changes": [field for field, _, _ in changes],
        "config": old,
    }
    try:
        with (workdir / CONFIG_HISTORY_FILE).open("a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
    except OSError as err:
        raise WorkdirError(f"cannot write {workdir / CONFIG_HISTORY_FILE}: {_reason(err)}") from err
    atomic_write(path, json.dumps(new, indent=1, sort_keys=True) + "\n")
