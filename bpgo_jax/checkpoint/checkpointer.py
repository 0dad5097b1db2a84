"""`Checkpointer`: Orbax checkpoints of a run's device state and host metadata.

See the package docstring (`bpgo_jax.checkpoint`) for what it guarantees.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from bpgo_jax.checkpoint.paths import WorkPath, workdir_path
from bpgo_jax.checkpoint.workdir import refresh_workdir_lock
from bpgo_jax.errors import WorkdirError
from bpgo_jax.runtime import all_processes, any_process

log = logging.getLogger("bpgo_jax")

DAMAGED_SUFFIX = ".damaged"
_TENSORSTORE_SPEC = re.compile(r"\s*\[tensorstore_spec='.*?'\]")
_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")


def _one_line(err: BaseException, limit: int = 400) -> str:
    """The error as one line of at most ~`limit` characters that keeps the OS's
    reason ("No space left on device"): TensorStore appends a long JSON spec
    after it, which is dropped, and a still-long text keeps its head and tail."""
    raw = str(err)
    text = _TENSORSTORE_SPEC.sub("", " ".join(raw.split())) or type(err).__name__
    if len(text) > limit:
        half = (limit - 5) // 2
        text = f"{text[:half]} ... {text[-half:]}"
    reasons = {os.strerror(int(code)) for code in _OS_ERROR_CODE.findall(raw)}
    return "; ".join([text, *sorted(r for r in reasons if r not in text)])


def _abstract(like: Any) -> Any:
    """Shape/dtype/sharding targets for `like`'s arrays; placeholders stay placeholders."""
    return jax.tree.map(
        lambda x: x if x is ocp.PLACEHOLDER else ocp.utils.to_shape_dtype_struct(x), like
    )


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _shapes(tree: Any) -> dict[str, tuple[int, ...] | None]:
    """'a/b/c' -> shape of every array leaf (None for a placeholder)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is ocp.PLACEHOLDER)[0]
    return {
        "/".join(_key_name(k) for k in path): (
            None if leaf is ocp.PLACEHOLDER else tuple(getattr(leaf, "shape", ()))
        )
        for path, leaf in leaves
    }


# Arrays whose per-replica slice is smaller than this are written whole by one replica.
_MIN_REPLICA_SLICE_BYTES = 4 << 20


def _type_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
    """Orbax's handlers, with replica-parallel array writes only where they pay.

    Replica-parallel saving splits a replicated array into one slice per
    replica so that several devices (and hosts) transfer and write it in
    parallel. Each slice is a small program compiled per shape and sharding on
    first use, which for the hundreds of small arrays of a LoRA or a small
    model costs more than the writes. CPU devices share the host's memory, so
    there it gains nothing; elsewhere it is kept for arrays large enough.
    """
    th = ocp.type_handlers
    kept = (int, float, bytes, np.number, np.ndarray, str, type(ocp.PLACEHOLDER))
    arrays = th.ArrayHandler(
        use_replica_parallel=jax.default_backend() != "cpu",
        min_slice_bytes_for_replica_parallel=_MIN_REPLICA_SLICE_BYTES,
    )
    return th.create_type_handler_registry(
        *((t, th.get_type_handler(t)) for t in kept), (jax.Array, arrays)
    )


class Checkpointer:
    """An Orbax `CheckpointManager` over `directory` (one subdirectory per step).

    `keep`: how many checkpoints to keep (>= 1). `use_async`: saves write in
    the background (see the module docstring for when failures surface).
    `read_only`: never creates, renames or deletes anything (tools that only
    read a run's policy). `directory` may be an object-store URL
    (`gs://bucket/run/checkpoints`): Orbax writes there through TensorStore.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int,
        use_async: bool = True,
        read_only: bool = False,
    ):
        if not isinstance(keep, int) or keep < 1:
            raise WorkdirError(
                f"checkpoint.keep={keep!r} must be an integer >= 1 (with fewer Orbax deletes "
                "every checkpoint, the final one included)"
            )
        self.directory = workdir_path(directory)
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=use_async and not read_only,
            create=not read_only,
            read_only=read_only,
        )
        handlers = {
            "state": ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers()),
            "meta": ocp.JsonCheckpointHandler(),
        }
        try:
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_handlers=handlers
            )
        except OSError as err:
            raise WorkdirError(
                f"cannot open checkpoint directory {self.directory}: {_one_line(err)}"
            ) from err
        self._pending: int | None = None  # the step of a save that may still be running

    def latest(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def step_dir(self, step: int) -> WorkPath:
        return self.directory / str(step)

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> None:
        """Starts saving `state` (arrays) and `meta` (JSON) as checkpoint `step`.

        First waits for the previous save and raises if it failed. With
        `use_async` the write continues in the background: call `wait()`
        before relying on it. On an object store the workdir lock's heartbeat
        is refreshed first (a run whose lock was taken over stops here).
        """
        if self.read_only:
            raise WorkdirError(f"{self.directory} was opened read-only; cannot save")
        self.wait()
        refresh_workdir_lock(self.directory)
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta))
        try:
            self._manager.save(step, args=args, force=force)
        except Exception as err:
            raise self._save_error(step, err) from err
        self._pending = step

    def wait(self) -> None:
        """Blocks until the running save (if any) is written; raises `WorkdirError`
        naming its step directory when it failed."""
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            if step is None:
                raise
            raise self._save_error(step, err) from err

    def _save_error(self, step: int, err: BaseException) -> WorkdirError:
        return WorkdirError(
            f"checkpoint {step} could not be written to {self.step_dir(step)}: "
            f"{_one_line(err)} (older checkpoints in {self.directory} are kept)"
        )

    # --------------------------------------------------------------- restore
    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """Checkpoint `step` on the shapes, dtypes and shardings of the arrays in `like`."""
        abstract = _abstract(like)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out.state, dict(out.meta)

    def restore_latest(self, like: Any) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest readable checkpoint, or None when there is none.

        A checkpoint that fails to restore is damaged unless its stored arrays
        do not fit `like` (then this run's state has another structure: raised,
        nothing moved). Damaged checkpoints newer than the one restored are
        logged and moved aside as `<step>.damaged`. When none is readable,
        raises `WorkdirError` naming the directory and moves nothing.

        In a multi-process run each process reads its own shards, so a damaged
        file may fail on one process only: a checkpoint counts as readable when
        it restored on every process (`runtime.all_processes`), and all of them
        resume from the same one.
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        damaged: list[tuple[int, str]] = []
        for step in steps:
            error = None
            try:
                state, meta = self.restore(step, like)
            except Exception as err:
                error = err
            if all_processes(error is None):
                for bad, _ in damaged:
                    self._move_aside(bad)
                return step, state, meta
            self._raise_if_mismatched(step, like)
            reason = "unreadable on another process" if error is None else _one_line(error, 200)
            log.warning("checkpoint %s is damaged: %s", self.step_dir(step), reason)
            damaged.append((step, reason))
        if damaged:
            listed = "; ".join(f"{self.step_dir(s)}: {r}" for s, r in damaged)
            raise WorkdirError(
                f"no readable checkpoint in {self.directory} ({listed}); move the directory "
                "aside to start afresh"
            )
        return None

    def _raise_if_mismatched(self, step: int, like: Any) -> None:
        """Raises when checkpoint `step`'s stored tree does not fit `like`."""
        try:
            stored = self._manager.item_metadata(step)["state"]
        except Exception:
            return  # unreadable metadata: a damaged checkpoint, not a mismatch
        stored = getattr(stored, "tree", stored)
        if stored is None:
            return
        want, have = _shapes(like), _shapes(stored)
        diffs = [
            f"{name}: stored {have.get(name, 'nothing')}, expected {shape}"
            for name, shape in sorted(want.items())
            if shape is not None and have.get(name) != shape
        ]
        extra = sorted(set(have) - set(want))
        diffs += [f"{name}: stored, not expected" for name in extra]
        if diffs:
            shown = "; ".join(diffs[:3]) + (
                f"; ... ({len(diffs)} in all)" if len(diffs) > 3 else ""
            )
            raise WorkdirError(
                f"checkpoint {self.step_dir(step)} does not fit this run's state ({shown}); "
                "was it written with another model or optimiser config?"
            )

    def _move_aside(self, step: int) -> None:
        """Process 0 renames; every process then reloads (or raises) alike."""
        if self.read_only:
            return
        source = self.step_dir(step)
        failure = ""
        if jax.process_index() == 0:
            target = source.with_name(source.name + DAMAGED_SUFFIX)
            n = 1
            while target.exists():
                target = source.with_name(f"{source.name}{DAMAGED_SUFFIX}-{n}")
                n += 1
            try:
                source.rename(target)
                log.warning("moved damaged checkpoint %s aside to %s", source, target)
            except OSError as err:
                failure = _one_line(err)
        if any_process(bool(failure)):  # also the barrier before the others reload
            raise WorkdirError(f"cannot move damaged {source} aside: {failure or 'see process 0'}")
        self._manager.reload()

    # ----------------------------------------------------------------- close
    def close(self) -> None:
        """Waits for the running save (raising if it failed) and releases Orbax's threads."""
        try:
            self.wait()
        finally:
            self._manager.close()
