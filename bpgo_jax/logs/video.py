"""Video logs: captioned video grids, GIF files (Pillow) and MP4 files (imageio-ffmpeg).

A video sample batch is float `[N, F, H, W, 3]` in [0, 1]. Its grid is one
captioned grid per frame, `[F, H', W', 3]` uint8, tiles in the clips' aspect
ratio. GIF needs nothing beyond Pillow and plays in TensorBoard's image tab,
wandb and any browser. MP4 (H.264) is much smaller and plays at the true
frame rate; it needs the optional `imageio-ffmpeg` package (a wheel with its
own ffmpeg binary), and is skipped when that is not installed.
"""

from __future__ import annotations

import io
import logging
import math
import os
import tempfile
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bpgo_jax.checkpoint.workdir import atomic_write

log = logging.getLogger("bpgo_jax")

DEFAULT_FPS = 16  # Wan2.1's frame rate
_TEXT_H = 40


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] as uint8 (uint8 input is returned unchanged)."""
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames.astype(np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)


def captioned_video(videos: np.ndarray, captions: Sequence[str], *, tile: int = 128) -> np.ndarray:
    """Tiles clips (float `[N, F, H, W, 3]`) with the caption under each: uint8 `[F, H', W', 3]`.

    Tiles are `tile` pixels wide and keep the clips' aspect ratio (even
    heights, so the grid encodes as yuv420p MP4 without resizing).
    """
    videos = np.asarray(videos)
    if videos.ndim != 5 or len(videos) != len(captions):
        raise ValueError(
            f"captioned_video takes [N, F, H, W, 3] clips and N captions, got shape "
            f"{videos.shape} and {len(captions)} captions"
        )
    n, f, h, w = videos.shape[:4]
    tile_h = max(2, 2 * round(tile * h / w / 2))
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    canvas = Image.new("RGB", (cols * tile, rows * (tile_h + _TEXT_H)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, caption in enumerate(captions):
        r, c = divmod(i, cols)
        lines = textwrap.wrap(caption, width=tile // 6)[:3]
        y = r * (tile_h + _TEXT_H) + tile_h + 1
        draw.multiline_text((c * tile + 2, y), "\n".join(lines), fill="black", spacing=1)
    background = np.asarray(canvas)
    out = np.repeat(background[None], f, axis=0)
    pixels = to_uint8(videos)
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = r * (tile_h + _TEXT_H), c * tile
        for t in range(f):
            small = Image.fromarray(pixels[i, t]).resize((tile, tile_h), Image.BILINEAR)
            out[t, top : top + tile_h, left : left + tile] = np.asarray(small)
    return out


def encode_gif(frames: np.ndarray, fps: float = DEFAULT_FPS) -> bytes:
    """uint8 (or float in [0, 1]) `[F, H, W, 3]` frames as a looping GIF.

    GIF delays are in hundredths of a second, so the rate is rounded (16 fps
    plays at 16.7). Pillow merges identical consecutive frames into one
    longer frame.
    """
    images = [Image.fromarray(frame) for frame in to_uint8(frames)]
    buffer = io.BytesIO()
    duration = max(20, int(1000 / fps / 10 + 0.5) * 10)
    images[0].save(
        buffer, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0
    )
    return buffer.getvalue()


def save_gif(path: str | os.PathLike, frames: np.ndarray, fps: float = DEFAULT_FPS) -> None:
    """`frames` as a GIF at `path`, written atomically."""
    atomic_write(path, encode_gif(frames, fps))


def mp4_available() -> bool:
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return False
    return True


def encode_mp4(frames: np.ndarray, fps: float = DEFAULT_FPS) -> bytes:
    """`[F, H, W, 3]` frames as H.264 MP4 bytes (odd sizes are padded by one edge pixel)."""
    import imageio_ffmpeg

    pixels = to_uint8(frames)
    _, h, w, _ = pixels.shape
    pad = ((0, 0), (0, h % 2), (0, w % 2), (0, 0))
    pixels = np.ascontiguousarray(np.pad(pixels, pad, mode="edge"))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # imageio-ffmpeg starts ffmpeg with fork + exec: JAX's warning about forking a
        # multithreaded process concerns children that keep running Python, not this one.
        warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
        path = os.path.join(tmp, "video.mp4")
        writer = imageio_ffmpeg.write_frames(
            path,
            (pixels.shape[2], pixels.shape[1]),
            fps=fps,
            macro_block_size=2,
            ffmpeg_log_level="error",
        )
        writer.send(None)
        for frame in pixels:
            writer.send(frame)
        writer.close()
        return Path(path).read_bytes()


def save_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float = DEFAULT_FPS) -> bool:
    """`frames` as an MP4 at `path` (atomically); False, writing nothing, without imageio-ffmpeg."""
    if not mp4_available():
        return False
    atomic_write(path, encode_mp4(frames, fps))
    return True
