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

A workdir may be an object-store URL (`gs://bucket/run`, see
`bpgo_jax.checkpoint.paths`). There an object PUT is atomic, so `atomic_write`
is one whole-object write, an append rewrites the object, and the lock is a
lock object created only if absent (`ObjectStoreLock`), with a heartbeat.
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
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import filelock
import ml_collections

from bpgo_jax.checkpoint.paths import WorkPath, filesystem, is_remote, workdir_path
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


def prepare_workdir(workdir: str | os.PathLike) -> WorkPath:
    """Creates `workdir` and checks it is a writable directory; returns its absolute path
    (`paths.workdir_path`: a `pathlib.Path`, or an `epath.Path` for an object-store URL).

    Raises `WorkdirError` naming the path when it is a file, cannot be created,
    or refuses a write (read-only, permissions, a full disk, a missing bucket).
    """
    path = workdir_path(workdir)
    if is_remote(path):
        return _prepare_remote(path)
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


def _prepare_remote(path: WorkPath) -> WorkPath:
    """An object store has no directories to create: a probe object is written and removed."""
    filesystem(path)  # the store's fsspec client is installed
    try:
        if path.is_file():
            raise WorkdirError(f"workdir {path} exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{socket.gethostname()}-{os.getpid()}"
        probe.write_bytes(b"bpgo-jax")
        probe.unlink()
    except WorkdirError:
        raise
    except Exception as err:  # noqa: BLE001 (the store's client errors are not all OSError)
        raise WorkdirError(f"workdir {path} is not writable: {_store_reason(err)}") from err
    return path


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes `data` to `path` through a temporary file in the same directory and
    `os.replace`, so a kill or a full disk leaves the old file or the new one,
    never a mix. On an object store one whole-object write, which is atomic
    there. Raises `WorkdirError` naming the path when the write fails."""
    payload = data.encode() if isinstance(data, str) else data
    if is_remote(path):
        remote = workdir_path(path)
        try:
            remote.write_bytes(payload)
        except Exception as err:  # noqa: BLE001 (the store's client errors are not all OSError)
            raise WorkdirError(f"cannot write {remote}: {_store_reason(err)}") from err
        return
    path = Path(path)
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


def export_files(export_dir: str | os.PathLike, source: WorkPath, names: Sequence[str]) -> None:
    """Copies the files `names` of folder `source` into `export_dir`, a local folder
    (created when missing) or an object-store URL, each written whole (`atomic_write`)."""
    target = workdir_path(export_dir)
    if not is_remote(target):
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise WorkdirError(f"cannot create export folder {target}: {_reason(err)}") from err
    for name in names:
        atomic_write(target / name, (source / name).read_bytes())


def append_text(path: str | os.PathLike, text: str) -> None:
    """Appends `text` to `path`. An object cannot be appended to: on an object store
    the object is read and written back whole (for small, rarely appended files)."""
    if is_remote(path):
        remote = workdir_path(path)
        try:
            old = remote.read_text() if remote.exists() else ""
        except Exception as err:  # noqa: BLE001
            raise WorkdirError(f"cannot read {remote}: {_store_reason(err)}") from err
        atomic_write(remote, old + text)
        return
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError as err:
        raise WorkdirError(f"cannot write {path}: {_reason(err)}") from err


def _store_reason(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


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
        try:
            atomic_write(self._owner, json.dumps(_owner_record()) + "\n")
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


# How often a held object-store lock rewrites its heartbeat, and how old a
# heartbeat must be before another run may take the lock over. The margin
# covers a stalled host and clock differences between hosts.
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


def _lock_owner(data: bytes) -> dict[str, Any]:
    """A lock object's owner record; {} for a torn or foreign object (no heartbeat, so stale)."""
    try:
        owner = json.loads(data)
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


class ObjectStoreLock:
    """The lock of an object-store workdir: the object `WORKDIR/.lock`, created only if
    absent, holding its owner (host, pid, command, a random token) and a heartbeat time.

    There is no flock on an object store and a killed run leaves its lock
    object behind, so the lock lives by its heartbeat: a background thread
    rewrites it every `heartbeat_s`, and so does each checkpoint save
    (`refresh_workdir_lock`). A lock whose heartbeat is older than
    `stale_after_s` is taken over with a warning; a fresher one refuses the
    run with the same one line as a local lock.

    The create-only write is GCS's `ifGenerationMatch=0` precondition (gcsfs
    `pipe_file(mode="create")`): of two runs starting at once, one gets a
    precondition failure. Stores whose client has no such precondition fall
    back to a check before the write; either way the lock is read back, and
    a run that finds another's token in it at a heartbeat (its own heartbeat
    was stale and another run took over) stops with `WorkdirError` at its next
    checkpoint instead of writing into the other run's workdir. On GCS each
    heartbeat write is also conditional on the generation it read, so a
    takeover between that read and the write is never overwritten.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        stale_after_s: float = STALE_AFTER_S,
        heartbeat_s: float = HEARTBEAT_S,
    ):
        self.workdir = workdir_path(workdir)
        self.path = self.workdir / LOCK_FILE
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.lost: str | None = None  # why the lock was lost, once it was
        self._owner: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._io = threading.Lock()  # the heartbeat thread and the run refresh one at a time

    @property
    def held(self) -> bool:
        return self._owner is not None

    def acquire(self) -> ObjectStoreLock:
        """Takes the lock, or raises `WorkdirError` naming the run holding it."""
        current = self._read()
        if current is not None:
            age = time.time() - _heartbeat(current)
            if age < self.stale_after_s:
                raise self._in_use(current, age)
            log.warning(
                "taking over the lock %s of %s: its heartbeat is %.0f s old (a lock not "
                "refreshed for %.0f s is stale)",
                self.path,
                _owner_text(current),
                age,
                self.stale_after_s,
            )
            self._delete()
        owner = {**_owner_record(), "token": uuid.uuid4().hex, "heartbeat": time.time()}
        try:
            self._create(owner)
        except FileExistsError:
            current = self._read() or {}
            raise self._in_use(current, time.time() - _heartbeat(current)) from None
        stored = self._read() or {}
        if stored.get("token") != owner["token"]:  # another run's create-only write won
            raise self._in_use(stored, time.time() - _heartbeat(stored))
        self._owner = owner
        _HELD[str(self.workdir)] = self
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._beat, name=f"lock heartbeat {self.workdir}", daemon=True
        )
        self._thread.start()
        return self

    def refresh(self) -> None:
        """Rewrites the heartbeat; raises `WorkdirError` when another run took the lock over.

        On GCS the rewrite is conditional on the generation that was read
        (`ifGenerationMatch`), so a takeover between the read and the write
        fails the write instead of being overwritten."""
        if self._owner is None:
            return
        with self._io:
            if self.lost is None:
                current, generation = self._read_versioned()
                if current is None or current.get("token") != self._owner["token"]:
                    self.lost = (
                        f"taken over by {_owner_text(current)}"
                        if current
                        else "its lock object was removed"
                    )
                else:
                    self._owner["heartbeat"] = time.time()
                    if not self._write(self._owner, generation):
                        self.lost = f"taken over by {_owner_text(self._read())}"
        if self.lost is not None:
            raise WorkdirError(
                f"{self.workdir} is no longer locked by this run ({self.lost}; the heartbeat "
                f"of {self.path} was not refreshed for {self.stale_after_s:.0f} s); stopping so "
                "that two runs do not write the same workdir"
            )

    def release(self) -> None:
        if self._owner is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _HELD.pop(str(self.workdir), None)
        with self._io:
            current = self._read()
            if current is not None and current.get("token") == self._owner["token"]:
                self._delete()
        self._owner = None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.refresh()
            except WorkdirError as err:
                log.error("%s", err)
                return
            except Exception as err:  # noqa: BLE001 (a network error: the next beat retries)
                log.warning("cannot refresh the heartbeat of %s: %s", self.path, err)

    def _in_use(self, owner: Mapping[str, Any], age: float) -> WorkdirError:
        return WorkdirError(
            f"{self.workdir} is in use by {_owner_text(owner)}, heartbeat {max(age, 0):.0f} s ago "
            f"(taken over after {self.stale_after_s:.0f} s without one); wait for it to "
            "finish, stop it, or choose another --workdir"
        )

    # The store, through fsspec: caches are bypassed, another host may have written.
    def _read(self) -> dict[str, Any] | None:
        fs, key = filesystem(self.path)
        try:
            fs.invalidate_cache(key)
            data = fs.cat_file(key)
        except FileNotFoundError:
            return None
        except Exception as err:  # noqa: BLE001
            raise WorkdirError(f"cannot read the lock {self.path}: {_store_reason(err)}") from err
        return _lock_owner(data)

    def _create(self, owner: Mapping[str, Any]) -> None:
        fs, key = filesystem(self.path)
        try:
            fs.pipe_file(key, json.dumps(owner).encode(), mode="create")
        except FileExistsError:
            raise
        except Exception as err:  # noqa: BLE001
            raise WorkdirError(f"cannot lock {self.path}: {_store_reason(err)}") from err

    def _read_versioned(self) -> tuple[dict[str, Any] | None, str | None]:
        """The lock's owner and, on GCS, the generation of the object it was read from
        (one request: the media download reports the generation in a header)."""
        fs, key = filesystem(self.path)
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        if "gs" not in protocols:  # other stores: no generation to match
            return self._read(), None
        bucket, name, _ = fs.split_path(key)
        try:
            headers, data = fs.call("GET", "b/{}/o/{}", bucket, name, alt="media")
        except FileNotFoundError:
            return None, None
        except Exception as err:  # noqa: BLE001
            raise WorkdirError(f"cannot read the lock {self.path}: {_store_reason(err)}") from err
        generation = {k.lower(): v for k, v in headers.items()}.get("x-goog-generation")
        return _lock_owner(data), generation

    def _write(self, owner: Mapping[str, Any], generation: str | None = None) -> bool:
        """Writes the lock; with a GCS `generation`, only if the object still has it.
        Returns False when that precondition failed (another run rewrote the lock)."""
        data = json.dumps(owner).encode()
        if generation is None:
            atomic_write(self.path, data)
            return True
        fs, key = filesystem(self.path)
        bucket, name, _ = fs.split_path(key)
        # A multipart upload, as gcsfs makes its create-only writes (ifGenerationMatch=0).
        meta = json.dumps({"name": name, "contentType": "application/json"})
        body = (
            f'--==0==\nContent-Type: application/json; charset=UTF-8\n\n{meta}\n'
            "--==0==\nContent-Type: application/json\n\n"
        ).encode() + data + b"\n--==0==--"
        try:
            fs.call(
                "POST",
                f"{fs._location}/upload/storage/v1/b/{bucket}/o",
                uploadType="multipart",
                ifGenerationMatch=generation,
                headers={"Content-Type": 'multipart/related; boundary="==0=="'},
                data=body,
            )
        except FileExistsError:  # HTTP 412: the precondition failed
            return False
        except Exception as err:  # noqa: BLE001
            raise WorkdirError(f"cannot write the lock {self.path}: {_store_reason(err)}") from err
        finally:
            fs.invalidate_cache(key)
        return True

    def _delete(self) -> None:
        fs, key = filesystem(self.path)
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(key)
        fs.invalidate_cache(key)

    def __enter__(self) -> ObjectStoreLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# The object-store locks this process holds, by workdir: checkpoint saves refresh them.
_HELD: dict[str, ObjectStoreLock] = {}


def refresh_workdir_lock(directory: str | os.PathLike) -> None:
    """Refreshes the heartbeat of the object-store lock this process holds on a workdir
    containing `directory` (a no-op for local workdirs and other processes).

    Raises `WorkdirError` when another run has taken that lock over.
    """
    if not _HELD or not is_remote(directory):
        return
    target = str(workdir_path(directory)).rstrip("/") + "/"
    for workdir, lock in list(_HELD.items()):
        if target.startswith(workdir.rstrip("/") + "/"):
            lock.refresh()


def _owner_record() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def _heartbeat(owner: Mapping[str, Any]) -> float:
    value = owner.get("heartbeat")
    return float(value) if isinstance(value, int | float) else 0.0


def _owner_text(owner: Mapping[str, Any] | None) -> str:
    try:
        return f"pid {owner['pid']} on host {owner['host']} (started {owner['started']})"
    except (KeyError, TypeError):
        return "another process (its lock names no owner)"


def workdir_lock(workdir: str | os.PathLike) -> WorkdirLock | ObjectStoreLock:
    """The lock of `workdir`: a flock for a local directory, a lock object on an object store."""
    return ObjectStoreLock(workdir) if is_remote(workdir) else WorkdirLock(workdir)


@contextlib.contextmanager
def lock_workdir(
    workdir: str | os.PathLike,
) -> Iterator[WorkdirLock | ObjectStoreLock | None]:
    """Holds the workdir lock for the `with` block (process 0 only; others get None)."""
    if not _is_writer():
        yield None
        return
    with workdir_lock(workdir) as lock:
        yield lock


# ------------------------------------------------------------- the run config
def has_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds an Orbax step directory (an integer name)."""
    directory = workdir_path(directory)
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
    workdir = workdir_path(workdir)
    path = workdir / CONFIG_FILE
    new = config_record(config)
    if not path.exists():
        if _is_writer():
            atomic_write(path, json.dumps(new, indent=1, sort_keys=True) + "\n")
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # gcsfs's errors are OSErrors too
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
    append_text(workdir / CONFIG_HISTORY_FILE, json.dumps(entry, sort_keys=True) + "\n")
    atomic_write(path, json.dumps(new, indent=1, sort_keys=True) + "\n")
