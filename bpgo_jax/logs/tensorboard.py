"""TensorBoard event files (tensorboardX): scalars against samples seen, image grids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bpgo_jax.logs.writer import INDEX_KEYS


class TensorBoardWriter:
    """WORKDIR/tensorboard: every numeric field except the row's index fields."""

    def __init__(self, logdir: str | Path):
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(logdir))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for key, value in scalars.items():
            if isinstance(value, int | float) and key not in INDEX_KEYS:
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def write_images(self, tag: str, grid: np.ndarray, captions: Sequence[str], step: int) -> None:
        self._tb.add_image(tag, grid, step, dataformats="HWC")
        self._tb.add_text(tag + "/prompts", "\n\n".join(captions), step)

    def close(self) -> None:
        self._tb.close()
