"""JPEG compressibility / incompressibility: DDPO's classic host-side rewards.

The reward is the JPEG file size in kB (quality 95), negated for
compressibility. It needs a real encoder, so it runs on the host in numpy.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import ml_collections
import numpy as np
from PIL import Image

from bpgo_jax.rewards.base import Reward, register


def jpeg_kilobytes(images: np.ndarray, quality: int = 95) -> np.ndarray:
    """Sizes in kB of `images` (float [B, H, W, 3] in [0, 1]) saved as JPEG."""
    pixels = (np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
    sizes = []
    for img in pixels:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return np.asarray(sizes, np.float32)


def _factory(sign: float):
    def build(cfg: ml_collections.ConfigDict) -> Reward:
        quality = int(cfg.get("quality", 95))

        def fn(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict]):
            del prompts, metadata
            return sign * jpeg_kilobytes(images, quality)

        return Reward(name="jpeg", jittable=False, fn=fn)

    return build


register("jpeg_compressibility")(_factory(-1.0))
register("jpeg_incompressibility")(_factory(1.0))
