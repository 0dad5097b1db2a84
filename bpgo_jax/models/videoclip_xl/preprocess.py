"""VideoCLIP-XL's frame sampling and pixel preprocessing, in jnp so rewards run inside jit.

The reference reads uint8 frames with OpenCV, resizes each to 224 x 224 with
`cv2.resize` (bilinear, half-pixel centres, no antialiasing) and normalises
`x / 255` with the ImageNet mean/std. Here frames are float32 in [0, 1] (a
decoder's output), resized with `jax.image.resize(method="linear",
antialias=False)`, the same filter, without the uint8 rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_frames(total: int, count: int = 8) -> np.ndarray:
    """The reference's pick, `frames[::total // count][:count]`: `count` indices.

    Clips shorter than `count` frames (where the reference's step is 0 and it
    fails) repeat frames instead: index `k * total // count`.
    """
    if total < 1 or count < 1:
        raise ValueError(f"cannot pick {count} frames of a {total}-frame clip")
    k = np.arange(count)
    idx = k * (total // count) if total >= count else k * total // count
    return idx.astype(np.int32)


def preprocess_video(videos: jax.Array, image_size: int) -> jax.Array:
    """float `[B, T, H, W, 3]` in [0, 1] -> normalised float32 `[B, T, S, S, 3]`."""
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"videos must be [B, T, H, W, 3], got shape {videos.shape}")
    b, t, h, w, c = videos.shape
    x = videos.astype(jnp.float32)
    if (h, w) != (image_size, image_size):
        shape = (b, t, image_size, image_size, c)
        x = jax.image.resize(x, shape, method="linear", antialias=False)
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    return (x - mean) / jnp.asarray(IMAGENET_STD, jnp.float32)
