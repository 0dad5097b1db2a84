"""N-axis rotary position embeddings: FLUX's (text, h, w) ids and Wan's (t, h, w) grid.

Tables are computed on the host in float64 from integer-valued position ids,
as diffusers does (`get_1d_rotary_pos_embed(use_real=True,
repeat_interleave_real=True)` per axis, concatenated), then cast to float32:
positions are static for a resolution, so the tables are constants of the
compiled program. Each axis `i` owns `axes_dims[i]` consecutive channels of
a head; channels rotate in interleaved pairs `(2j, 2j+1)`, the convention of
diffusers' FLUX (`apply_rotary_emb(use_real_unbind_dim=-1)`) and of Wan's
attention processor, which compute the same rotation in float32.

FLUX: `axes_dims=(16, 56, 56)`, theta 10000, `flux_ids(text_len, h, w)` (text
tokens at 0, image token (0, row, col) of the 2x2-packed latent grid), q/k
order `[text; image]`. Wan: `wan_axes_dims(head_dim)` (t gets the rest of
`head_dim - 2 * 2 * (head_dim // 6)`), `grid_ids(frames, h, w)` of the patch grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

RopeTables = tuple[np.ndarray, np.ndarray]  # (cos, sin), each [L, head_dim] float32

FLUX_AXES_DIMS = (16, 56, 56)


def axis_table(dim: int, pos: np.ndarray, theta: float = 10_000.0) -> RopeTables:
    """One axis: `[L] -> (cos, sin)` of `[L, dim]`, each angle repeated for its channel pair."""
    if dim % 2:
        raise ValueError(f"rotary axis dim {dim} must be even")
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = np.outer(np.asarray(pos, np.float64), freqs)
    cos = np.repeat(np.cos(angles), 2, axis=1).astype(np.float32)
    sin = np.repeat(np.sin(angles), 2, axis=1).astype(np.float32)
    return cos, sin


def rope_tables(ids: np.ndarray, axes_dims: Sequence[int], theta: float = 10_000.0) -> RopeTables:
    """Ids `[L, n_axes]` -> `(cos, sin)` of `[L, sum(axes_dims)]` (FLUX's `FluxPosEmbed`)."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] != len(axes_dims):
        raise ValueError(f"ids {ids.shape} must be [L, {len(axes_dims)}] for axes_dims {axes_dims}")
    # diffusers takes ids.float() first: positions are float32 values, widened to float64.
    pos = ids.astype(np.float32)
    tables = [axis_table(d, pos[:, i], theta) for i, d in enumerate(axes_dims)]
    return np.concatenate([t[0] for t in tables], 1), np.concatenate([t[1] for t in tables], 1)


def flux_ids(text_len: int, height: int, width: int) -> np.ndarray:
    """FLUX's `[txt_ids; img_ids]`: `text_len` zero rows, then (0, row, col) of the packed grid."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    image = np.stack([np.zeros_like(rows), rows, cols], axis=-1).reshape(-1, 3)
    return np.concatenate([np.zeros((text_len, 3), image.dtype), image]).astype(np.float32)


def grid_ids(*sizes: int) -> np.ndarray:
    """Row-major ids of an N-D patch grid: `grid_ids(f, h, w)` is `[f*h*w, 3]` of (t, row, col)."""
    axes = np.meshgrid(*[np.arange(n) for n in sizes], indexing="ij")
    return np.stack(axes, axis=-1).reshape(-1, len(sizes))


def wan_axes_dims(head_dim: int) -> tuple[int, int, int]:
    """Wan's (t, h, w) split of a head (`WanRotaryPosEmbed`): h = w = 2 * (head_dim // 6)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates `x` `[B, L, H, D]` by tables `[L, D]` or `[B, L, D]` in float32, in x's dtype."""
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    cos = jnp.asarray(cos, jnp.float32)[:, :, None, :]
    sin = jnp.asarray(sin, jnp.float32)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    pairs = x32.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (x32 * cos + rotated * sin).astype(x.dtype)
