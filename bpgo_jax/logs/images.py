"""Captioned image grids, and the `<tag>_latest.png` (videos: `.gif`, `.mp4`) files a run
keeps of them."""

from __future__ import annotations

import io
import logging
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from bpgo_jax.checkpoint.paths import store_path
from bpgo_jax.checkpoint.workdir import atomic_write
from bpgo_jax.logs import video

log = logging.getLogger("bpgo_jax")


def captioned_grid(images: np.ndarray, captions: list[str], *, tile: int = 128) -> np.ndarray:
    """Tiles images (float [N, H, W, 3] in [0, 1]) with their caption under each."""
    n = len(images)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    text_h = 40
    canvas = Image.new("RGB", (cols * tile, rows * (tile + text_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (img, caption) in enumerate(zip(images, captions, strict=True)):
        r, c = divmod(i, cols)
        pil = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
        canvas.paste(pil.resize((tile, tile), Image.NEAREST), (c * tile, r * (tile + text_h)))
        lines = textwrap.wrap(caption, width=tile // 6)[:3]
        draw.multiline_text(
            (c * tile + 2, r * (tile + text_h) + tile + 1),
            "\n".join(lines),
            fill="black",
            spacing=1,
        )
    return np.asarray(canvas)


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """A uint8 [H, W, 3] image as a PNG, written atomically (never a torn file)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    atomic_write(path, buffer.getvalue())


def save_sample(directory: str | os.PathLike, stem: str, sample: np.ndarray, fps: float) -> dict:
    """One sample: an image (float [H, W, 3] in [0, 1]) as `stem.png`, a video
    ([F, H, W, 3]) as `stem.gif` and, with imageio-ffmpeg installed, `stem.mp4`.

    Returns the index fields naming what was written: `file` (the PNG or GIF),
    and for a video `frames` and `mp4` (null when not written).
    """
    directory = store_path(directory)
    sample = np.asarray(sample)
    if sample.ndim == 3:
        save_png(directory / f"{stem}.png", video.to_uint8(sample))
        return {"file": f"{stem}.png"}
    if sample.ndim != 4:
        raise ValueError(f"a sample is [H, W, 3] or [F, H, W, 3], got shape {sample.shape}")
    video.save_gif(directory / f"{stem}.gif", sample, fps)
    mp4 = video.save_mp4(directory / f"{stem}.mp4", sample, fps)
    return {"file": f"{stem}.gif", "mp4": f"{stem}.mp4" if mp4 else None, "frames": len(sample)}


class LatestImageWriter:
    """Keeps the newest grid of each tag as WORKDIR/<tag>_latest.png ('/' -> '_'), and of
    each video tag as <tag>_latest.gif and, with imageio-ffmpeg installed, <tag>_latest.mp4."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = store_path(directory)
        self._warned_mp4 = False

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        del step, scalars

    def write_images(self, tag: str, grid: np.ndarray, captions: Sequence[str], step: int) -> None:
        del captions, step
        save_png(self.directory / f"{tag.replace('/', '_')}_latest.png", grid)

    def write_video(
        self, tag: str, frames: np.ndarray, captions: Sequence[str], step: int, fps: float
    ) -> None:
        del captions, step
        stem = self.directory / f"{tag.replace('/', '_')}_latest"
        video.save_gif(stem.with_suffix(".gif"), frames, fps)
        if not video.save_mp4(stem.with_suffix(".mp4"), frames, fps) and not self._warned_mp4:
            self._warned_mp4 = True
            log.info("videos are logged as GIF only: MP4 needs `pip install imageio-ffmpeg`")

    def close(self) -> None:
        pass
