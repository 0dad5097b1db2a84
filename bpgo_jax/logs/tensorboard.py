"""TensorBoard event files (tensorboardX): scalars against samples seen, image grids, videos.

Videos are animated GIFs in an image summary, which TensorBoard's image tab
plays: tensorboardX's `add_video` writes the same summary but encodes the
GIF with moviepy, a heavy dependency this avoids (Pillow encodes it here).

On an object-store workdir (`gs://`) the event file is written to a local
temporary directory and uploaded whole to WORKDIR/tensorboard after each
flush (once per metrics row), through the workdir's own client (gcsfs).
tensorboardX's own `gs://` writer is not used: it needs google-cloud-storage
credentials of its own, and uploads again, outside the run, whenever its
writer object is garbage-collected. Each run (and each resume) writes its own
`events.out.tfevents.*` file, so uploads never overwrite another run's.

Where PyTorch is installed, importing tensorboardX imports it too (2.7 s of
start-up, docs/performance.md), only so that its writer accepts torch
tensors; this writer passes numpy arrays, so torch is kept out of that import.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bpgo_jax.checkpoint.paths import is_remote, workdir_path
from bpgo_jax.checkpoint.workdir import atomic_write
from bpgo_jax.logs.video import encode_gif
from bpgo_jax.logs.writer import INDEX_KEYS


@contextlib.contextmanager
def _torch_unimportable() -> Iterator[None]:
    """Inside, `import torch` raises ImportError (which tensorboardX expects where torch
    is missing), unless torch is imported already: then its cost is paid anyway."""
    if "torch" in sys.modules:
        yield
        return
    sys.modules["torch"] = None
    try:
        yield
    finally:
        del sys.modules["torch"]


def _summary_writer_class() -> type:
    """tensorboardX's `SummaryWriter`, imported without importing PyTorch."""
    with _torch_unimportable():
        from tensorboardX import SummaryWriter
    return SummaryWriter


class TensorBoardWriter:
    """WORKDIR/tensorboard: every numeric field except the row's index fields."""

    def __init__(self, logdir: str | os.PathLike):
        SummaryWriter = _summary_writer_class()
        self._remote = workdir_path(logdir) if is_remote(logdir) else None
        self._local: tempfile.TemporaryDirectory | None = None
        self._uploaded: dict[str, int] = {}  # event file -> size when last uploaded
        if self._remote is not None:
            self._local = tempfile.TemporaryDirectory(prefix="bpgo-tensorboard-")
            logdir = self._local.name
        self._tb = SummaryWriter(os.fspath(logdir))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for key, value in scalars.items():
            if isinstance(value, int | float) and key not in INDEX_KEYS:
                self._tb.add_scalar(key, value, step)
        self._flush()

    def write_images(self, tag: str, grid: np.ndarray, captions: Sequence[str], step: int) -> None:
        self._tb.add_image(tag, grid, step, dataformats="HWC")
        self._tb.add_text(tag + "/prompts", "\n\n".join(captions), step)

    def write_video(
        self, tag: str, frames: np.ndarray, captions: Sequence[str], step: int, fps: float
    ) -> None:
        from tensorboardX.proto.summary_pb2 import Summary

        _, height, width, _ = frames.shape
        image = Summary.Image(
            height=height, width=width, colorspace=3, encoded_image_string=encode_gif(frames, fps)
        )
        summary = Summary(value=[Summary.Value(tag=tag, image=image)])
        self._tb._get_file_writer().add_summary(summary, step)  # what add_video does
        self._tb.add_text(tag + "/prompts", "\n\n".join(captions), step)
        self._flush()

    def _flush(self) -> None:
        self._tb.flush()
        self._upload()

    def _upload(self) -> None:
        """Uploads each local event file that grew since its last upload (object stores)."""
        if self._remote is None or self._local is None:
            return
        for file in sorted(Path(self._local.name).iterdir()):
            size = file.stat().st_size
            if file.is_file() and self._uploaded.get(file.name) != size:
                atomic_write(self._remote / file.name, file.read_bytes())
                self._uploaded[file.name] = size

    def close(self) -> None:
        self._tb.close()
        try:
            self._upload()
        finally:
            if self._local is not None:
                self._local.cleanup()
                self._local = None
