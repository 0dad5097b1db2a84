"""Run logs: metrics.jsonl, TensorBoard scalars and captioned image grids.

Only process 0 writes. Each epoch is one JSON line in `WORKDIR/metrics.jsonl`,
the file users plot from; TensorBoard gets the same scalars plus image grids
whose tiles carry their prompts.
"""

from __future__ import annotations

import json
import logging
import math
import textwrap
from pathlib import Path

import jax
import numpy as np
from PIL import Image, ImageDraw

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


class RunLogger:
    def __init__(self, workdir: str | Path, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.workdir = Path(workdir)
        self._tb = None
        if self.enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

    def metrics(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: _jsonable(v) for k, v in record.items()}
        with open(self.workdir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            step = int(record.get("samples_seen", record.get("epoch", 0)))
            for key, value in clean.items():
                if isinstance(value, int | float) and key not in ("epoch", "samples_seen"):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def images(self, tag: str, images: np.ndarray, captions: list[str], step: int) -> None:
        if not self.enabled:
            return
        grid = captioned_grid(images, captions)
        Image.fromarray(grid).save(self.workdir / f"{tag.replace('/', '_')}_latest.png")
        if self._tb is not None:
            self._tb.add_image(tag, grid, step, dataformats="HWC")
            self._tb.add_text(tag + "/prompts", "\n\n".join(captions), step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _jsonable(value):
    """Plain JSON values; non-finite floats become null (JSON has no NaN)."""
    if isinstance(value, np.ndarray | jax.Array):
        value = np.asarray(value)
        value = value.item() if value.size == 1 else value.tolist()
    if isinstance(value, np.floating | np.integer):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def truncate_metrics_after(path: Path, epoch: int) -> None:
    """Drops lines of epochs >= `epoch` (written after the checkpoint we resume from)."""
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("epoch", -1) < epoch
    ]
    path.write_text("".join(line + "\n" for line in keep))
