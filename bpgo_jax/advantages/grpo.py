"""Group-relative (GRPO) advantages: the z-score of each reward within its group.

A group whose rewards are all equal carries no learning signal. In float32 its
mean can differ from the values by an ulp, so a plain z-score would turn that
rounding noise into advantages of size ~1; such groups are set to exactly 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

STD_MODES = ("group", "global")
# A spread below this fraction of max(1, |mean|) is float rounding, not signal.
ZERO_STD_RTOL = 1e-6


def check_rewards(rewards: jax.Array, name: str = "rewards") -> jax.Array:
    """float32 view of a [num_groups, group_size] reward array."""
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim != 2:
        raise ValueError(f"{name} must have shape [num_groups, group_size], got {r.shape}")
    return r


def group_stats(rewards: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-group mean, population std (ddof=0) and zero-spread mask, all [N, 1]."""
    mean = jnp.mean(rewards, axis=1, keepdims=True)
    std = jnp.sqrt(jnp.mean(jnp.square(rewards - mean), axis=1, keepdims=True))
    flat = std < ZERO_STD_RTOL * jnp.maximum(1.0, jnp.abs(mean))
    return mean, std, flat


def zero_std_groups(rewards: jax.Array) -> jax.Array:
    """Bool [N]: groups whose rewards are all equal up to float rounding."""
    return group_stats(check_rewards(rewards))[2][:, 0]


def grpo_advantages(
    rewards: jax.Array,
    *,
    std: str = "group",
    eps: float = 1e-8,
    clip: float | None = None,
) -> jax.Array:
    """Advantages [N, G] = (R - group mean) / (scale + eps), optionally clipped to +-clip.

    std="group" divides by each group's own std (DanceGRPO, BPGO); std="global"
    divides by the std of the whole batch (Flow-GRPO), which keeps small but
    real within-group differences small instead of blowing them up to unit
    scale. Zero-spread groups give exactly 0 in both modes, and so does a batch
    whose global std is zero.
    """
    if std not in STD_MODES:
        raise ValueError(f"std must be one of {STD_MODES}, got {std!r}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be positive or None, got {clip!r}")
    r = check_rewards(rewards)
    mean, group_std, flat = group_stats(r)
    if std == "group":
        scale = group_std
    else:
        g_mean = jnp.mean(r)
        scale = jnp.sqrt(jnp.mean(jnp.square(r - g_mean)))
        flat = flat | (scale < ZERO_STD_RTOL * jnp.maximum(1.0, jnp.abs(g_mean)))
    safe_scale = jnp.where(flat, 1.0, scale)
    adv = jnp.where(flat, 0.0, (r - mean) / (safe_scale + eps))
    if clip is not None:
        adv = jnp.clip(adv, -clip, clip)
    return adv
