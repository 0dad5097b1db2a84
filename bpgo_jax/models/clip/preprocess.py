"""CLIP image preprocessing in jnp, so rewards can score decoded images inside jit.

Same geometry as transformers' `CLIPImageProcessor`: resize the shorter side
to `image_size` (the longer to `int(image_size * long / short)`), center crop,
normalise with the CLIP mean/std. Difference: PIL resamples 8-bit images with
its own bicubic filter and rounds to uint8; here `jax.image.resize` (Keys
bicubic, a = -0.5, antialiased when downsampling, as PIL) works in float and we
clip to [0, 1] where PIL would saturate. Expect differences of a few 1e-3 in
pixel values, not bit-exactness.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """transformers' `get_resize_output_image_size` for `{"shortest_edge": size}`."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def preprocess_images(
    images: jax.Array,
    image_size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> jax.Array:
    """float `[B, H, W, 3]` in [0, 1] -> normalised float32 `[B, S, S, 3]` pixel values."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3], got shape {images.shape}")
    b, h, w, c = images.shape
    x = images.astype(jnp.float32)
    nh, nw = resized_shape(h, w, image_size)
    if (nh, nw) != (h, w):
        x = jax.image.resize(x, (b, nh, nw, c), method="bicubic", antialias=True)
        x = jnp.clip(x, 0.0, 1.0)
    top, left = (nh - image_size) // 2, (nw - image_size) // 2
    x = x[:, top : top + image_size, left : left + image_size]
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
