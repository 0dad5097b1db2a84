"""The interface every metrics backend implements (JSONL, TensorBoard, wandb, PNG/GIF files)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

# Fields that index a metrics row rather than measure something; the first
# one present is the row's step (RL rows: samples_seen; pre-training: step).
INDEX_KEYS = ("samples_seen", "step", "epoch")


def row_step(record: Mapping[str, Any]) -> int:
    """The step a row is plotted at: its first index field, else 0."""
    for key in INDEX_KEYS:
        if record.get(key) is not None:
            return int(record[key])
    return 0


class MetricsWriter(Protocol):
    """One backend of `RunLogger`; only process 0 builds any."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One metrics row (plain JSON values; non-numeric ones are a backend's to skip)."""

    def write_images(self, tag: str, grid: np.ndarray, captions: Sequence[str], step: int) -> None:
        """A captioned grid (uint8 [H, W, 3]) and the captions of its tiles."""

    def write_video(
        self, tag: str, frames: np.ndarray, captions: Sequence[str], step: int, fps: float
    ) -> None:
        """A captioned video grid (uint8 [F, H, W, 3]) played at `fps` frames per second."""

    def close(self) -> None:
        """Flushes and releases the backend."""
