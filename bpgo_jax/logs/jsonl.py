"""metrics.jsonl: one JSON object per line, the file users plot from.

Values are plain JSON: arrays of one element become numbers, larger ones
lists, and non-finite floats null (JSON has no NaN). A resumed run first
drops the rows of the epochs (or steps) it is about to compute again
(`truncate_jsonl`), so the file holds what an uninterrupted run writes.

On an object store (a `gs://` workdir) an object cannot be appended to: the
writer keeps the file's lines in memory (read back once, after the resume's
truncation) and writes the whole object after each row. The object is one
PUT, so a reader sees the rows up to one epoch or the next, never a torn
line; the same `metrics.jsonl` is read back on resume and by users. A row
costs a write of the whole file: a few kB per epoch, trivial beside an
epoch's compute.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from bpgo_jax.checkpoint.paths import is_remote, store_path
from bpgo_jax.checkpoint.workdir import atomic_write
from bpgo_jax.errors import WorkdirError

log = logging.getLogger("bpgo_jax")


def jsonable(value: Any) -> Any:
    """Plain JSON values; non-finite floats become null (JSON has no NaN)."""
    if isinstance(value, np.ndarray | jax.Array):
        value = np.asarray(value)
        value = value.item() if value.size == 1 else value.tolist()
    if isinstance(value, np.floating | np.integer | np.bool_):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {k: jsonable(v) for k, v in value.items()}
    return value


class JsonlWriter:
    """Appends each record as one line of `path` (the record carries its own epoch/step);
    on an object store rewrites the whole object from the lines it holds."""

    def __init__(self, path: str | os.PathLike):
        self.path = store_path(path)
        self._remote = is_remote(self.path)
        self._lines: list[str] | None = None  # object stores: the file's lines so far

    def reload(self) -> None:
        """Forgets the lines held for an object store (the file was rewritten elsewhere)."""
        self._lines = None

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        del step  # the row's own "epoch" / "samples_seen" / "step" fields index it
        line = json.dumps({k: jsonable(v) for k, v in scalars.items()}) + "\n"
        if self._remote:
            if self._lines is None:
                self._lines = _read_lines(self.path)
            self._lines.append(line)
            atomic_write(self.path, "".join(self._lines))
            return
        try:
            with open(self.path, "a") as f:
                f.write(line)
        except OSError as err:
            raise WorkdirError(f"cannot append to {self.path}: {err.strerror or err}") from err

    def write_images(self, tag: str, grid: np.ndarray, captions: Sequence[str], step: int) -> None:
        del tag, grid, captions, step

    def write_video(
        self, tag: str, frames: np.ndarray, captions: Sequence[str], step: int, fps: float
    ) -> None:
        del tag, frames, captions, step, fps

    def close(self) -> None:
        pass


def _read_lines(path) -> list[str]:
    """The lines of `path`, each ending in a newline ([] when there is no file)."""
    try:
        text = path.read_text() if path.exists() else ""
    except OSError as err:
        raise WorkdirError(f"cannot read {path}: {err.strerror or err}") from err
    return [line + "\n" for line in text.splitlines()]


def truncate_jsonl(path: str | os.PathLike, value: int, *, key: str = "epoch") -> None:
    """Keeps the rows of `path` whose `key` is < `value` (rows without it stay).

    Rewritten atomically (a temporary file in the same directory, then
    `os.replace`; on an object store one whole-object write). A line that is
    not a JSON object (the torn last line of a killed run) is dropped with a
    warning.
    """
    path = store_path(path)
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep, torn = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            index = json.loads(line).get(key, -1)
            kept = index is None or index < value
        except (ValueError, AttributeError, TypeError):
            torn += 1
            continue
        if kept:
            keep.append(line)
    if torn:
        log.warning("%s: dropped %d line(s) that are not JSON objects", path, torn)
    if len(keep) != len(lines):
        atomic_write(path, "".join(line + "\n" for line in keep))
