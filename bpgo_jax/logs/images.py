"""Captioned image grids, and the `<tag>_latest.png` files a run keeps of them."""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from bpgo_jax.checkpoint.workdir import atomic_write


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


def save_png(path: str | Path, image: np.ndarray) -> None:
    """A uint8 [H, W, 3] image as a PNG, written atomically (never a torn file)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    atomic_write(path, buffer.getvalue())


class LatestImageWriter:
    """Keeps the newest grid of each tag as WORKDIR/<tag>_latest.png ('/' -> '_')."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        del step, scalars

    def write_images(self, tag: str, grid: np.ndarray, captions: Sequence[str], step: int) -> None:
        del captions, step
        save_png(self.directory / f"{tag.replace('/', '_')}_latest.png", grid)

    def close(self) -> None:
        pass
