"""TensorBoard event files (tensorboardX): scalars against samples seen, image grids, videos.

Videos are animated GIFs in an image summary, which TensorBoard's image tab
plays: tensorboardX's `add_video` writes the same summary but encodes the
GIF with moviepy, a heavy dependency this avoids (Pillow encodes it here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bpgo_jax.logs.video import encode_gif
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
        self._tb.flush()

    def close(self) -> None:
        self._tb.close()
