"""Fixed 2D sin-cos position embeddings (SD3's `PatchEmbed`), computed on the host.

diffusers builds the grid in float32, the frequencies and the sines in
float64, and casts the table to float32; so does this module. SD3 stores a
`pos_embed_max_size`^2 table and crops its centre to the latent's patch
grid: `cropped_sincos_2d` computes only the cropped rows (the full SD3.5
table would be 192^2 x 2432 values).
"""

from __future__ import annotations

import numpy as np


def sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """diffusers `get_1d_sincos_pos_embed_from_grid`: `[M] -> [M, embed_dim]`, sines first."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim={embed_dim} must be even")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.outer(np.asarray(pos, np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _grid(n: int, base_size: float, interpolation_scale: float) -> np.ndarray:
    """diffusers' float32 grid `arange(n) / (n / base_size) / interpolation_scale`."""
    return (
        np.arange(n, dtype=np.float32) / np.float32(n / base_size) / np.float32(interpolation_scale)
    )


def _table(grid_h: np.ndarray, grid_w: np.ndarray, embed_dim: int) -> np.ndarray:
    """Row-major (h, w) tokens: the first half embeds the w coordinate, the second h."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim={embed_dim} must be even")
    w = np.broadcast_to(grid_w[None, :], (grid_h.size, grid_w.size))
    h = np.broadcast_to(grid_h[:, None], (grid_h.size, grid_w.size))
    emb = np.concatenate([sincos_1d(embed_dim // 2, w), sincos_1d(embed_dim // 2, h)], axis=1)
    return emb.astype(np.float32)


def sincos_2d(
    embed_dim: int,
    grid_size: int | tuple[int, int],
    *,
    base_size: float = 16,
    interpolation_scale: float = 1.0,
) -> np.ndarray:
    """diffusers `get_2d_sincos_pos_embed`: `[gh * gw, embed_dim]` float32, tokens row-major."""
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    return _table(
        _grid(gh, base_size, interpolation_scale),
        _grid(gw, base_size, interpolation_scale),
        embed_dim,
    )


def cropped_sincos_2d(
    embed_dim: int,
    max_size: int,
    height: int,
    width: int,
    *,
    base_size: float,
    interpolation_scale: float = 1.0,
) -> np.ndarray:
    """The centre `height x width` of the `max_size`^2 table (SD3's `cropped_pos_embed`)."""
    if height > max_size or width > max_size:
        raise ValueError(
            f"patch grid {height}x{width} exceeds pos_embed_max_size={max_size} "
            f"(at most {max_size} patches per side)"
        )
    full = _grid(max_size, base_size, interpolation_scale)
    top, left = (max_size - height) // 2, (max_size - width) // 2
    return _table(full[top : top + height], full[left : left + width], embed_dim)
