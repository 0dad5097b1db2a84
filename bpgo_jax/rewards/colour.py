"""Saturation: a jittable pixel-statistics reward that runs inside the rollout.

Useful as a fast, dependency-free reward for smoke tests and as a component
that penalises washed-out images in a weighted composition.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from bpgo_jax.rewards.base import Reward, register


def saturation(images: jax.Array) -> jax.Array:
    """Mean HSV saturation (max - min) / max per image, in [0, 1]."""
    hi = images.max(axis=-1)
    lo = images.min(axis=-1)
    sat = jnp.where(hi > 1e-6, (hi - lo) / jnp.maximum(hi, 1e-6), 0.0)
    return sat.mean(axis=(1, 2))


@register("saturation")
def _build(cfg: ml_collections.ConfigDict) -> Reward:
    del cfg
    return Reward(
        name="saturation", jittable=True, fn=lambda params, images, aux: saturation(images)
    )
