"""Conditioning embedders and patching of the flow DiTs, as diffusers has them (channels last).

- `TimestepEmbedding` / `TextProjection`: diffusers' `TimestepEmbedding` and
  `PixArtAlphaTextProjection` MLPs (`linear_1`, `linear_2`).
- `TimestepTextEmbedding`: `CombinedTimestepTextProjEmbeddings` (SD3, FLUX
  schnell) and, with `guidance=True`, `CombinedTimestepGuidanceTextProjEmbeddings`
  (FLUX dev). Timesteps are embedded by `models.layers.timestep_embedding`
  with diffusers' `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`
  (Wan's `condition_embedder` uses the same convention at its `freq_dim`).
  FLUX feeds `t * 1000` and `guidance * 1000`, SD3 its 0-1000 timesteps; the
  caller scales.
- `patchify` / `unpatchify`: `[B, *spatial, C]` <-> `[B, tokens, patch * C]`.
  `channels_first=True` is FLUX's 2x2 packing (`_pack_latents`: feature index
  `c * 4 + dy * 2 + dx`); `channels_first=False` the patch-major order of SD3's
  and Wan's output unpatchify (`(dy * p + dx) * C + c`).
- `patch_conv` + `conv_tokens`: a strided-conv patch embedding (SD3's
  `pos_embed.proj` 2-D, Wan's `patch_embedding` 3-D) flattened to tokens in
  row-major (frame, row, col) order, as torch's `flatten(2).transpose(1, 2)`.
- `PatchEmbed`: SD3's `pos_embed` (conv + fixed, centre-cropped sin-cos
  table). The table is a constant, not a parameter: a checkpoint's
  `pos_embed.pos_embed` buffer must be skipped by the loader's rename.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bpgo_jax.models.dit import posembed
from bpgo_jax.models.layers import activation, timestep_embedding

Dtype = Any
TIME_FREQ_DIM = 256  # channels of the sinusoidal timestep embedding (FLUX, SD3, Wan)
_TEXT_ACTIVATIONS = {"gelu_tanh": "gelu_pytorch_tanh", "silu": "silu", "silu_fp32": "silu"}


class TimestepEmbedding(nn.Module):
    """diffusers `TimestepEmbedding`: `linear_1`, activation, `linear_2` (+ post activation)."""

    features: int
    act_fn: str = "silu"
    out_features: int | None = None
    post_act_fn: str | None = None
    bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda n, name: nn.Dense(n, use_bias=self.bias, dtype=self.dtype, name=name)
        x = activation(self.act_fn)(dense(self.features, "linear_1")(x))
        x = dense(self.out_features or self.features, "linear_2")(x)
        return activation(self.post_act_fn)(x) if self.post_act_fn else x


class TextProjection(nn.Module):
    """diffusers `PixArtAlphaTextProjection`: `linear_1`, act (`gelu_tanh`, `silu`), `linear_2`."""

    hidden_size: int
    out_features: int | None = None
    act_fn: str = "gelu_tanh"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.act_fn not in _TEXT_ACTIVATIONS:
            raise ValueError(f"act_fn={self.act_fn!r} is not one of {tuple(_TEXT_ACTIVATIONS)}")
        h = nn.Dense(self.hidden_size, dtype=self.dtype, name="linear_1")(x)
        if self.act_fn == "silu_fp32":
            h = jax.nn.silu(h.astype(jnp.float32)).astype(h.dtype)
        else:
            h = activation(_TEXT_ACTIVATIONS[self.act_fn])(h)
        return nn.Dense(self.out_features or self.hidden_size, dtype=self.dtype, name="linear_2")(h)


class TimestepTextEmbedding(nn.Module):
    """`(timestep [B], pooled text [B, P][, guidance [B]]) -> conditioning [B, dim]`.

    diffusers' `CombinedTimestep[Guidance]TextProjEmbeddings` (named
    `time_text_embed` in FLUX and SD3): submodules `timestep_embedder`,
    `guidance_embedder` (with `guidance`), `text_embedder`.
    """

    dim: int
    guidance: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, timestep: jax.Array, pooled: jax.Array, guidance: jax.Array | None = None
    ) -> jax.Array:
        def embed(t: jax.Array, name: str) -> jax.Array:
            t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (pooled.shape[0],))
            proj = timestep_embedding(t, TIME_FREQ_DIM).astype(self.dtype)
            return TimestepEmbedding(self.dim, dtype=self.dtype, name=name)(proj)

        emb = embed(timestep, "timestep_embedder")
        if self.guidance:
            if guidance is None:
                raise ValueError("this embedding has a guidance embedder: pass guidance")
            emb = emb + embed(guidance, "guidance_embedder")
        elif guidance is not None:
            raise ValueError("guidance given to an embedding without a guidance embedder")
        text = TextProjection(self.dim, act_fn="silu", dtype=self.dtype, name="text_embedder")
        return emb + text(pooled.astype(self.dtype))


# ---------------------------------------------------------------- patches


def patchify(x: jax.Array, patch: Sequence[int], *, channels_first: bool) -> jax.Array:
    """`[B, *spatial, C] -> [B, prod(spatial / patch), prod(patch) * C]`, tokens row-major."""
    patch = tuple(patch)
    b, *spatial, c = x.shape
    if len(spatial) != len(patch) or any(s % p for s, p in zip(spatial, patch, strict=True)):
        raise ValueError(f"latent {x.shape} does not split into {patch} patches")
    grid = [s // p for s, p in zip(spatial, patch, strict=True)]
    n = len(patch)
    x = x.reshape(b, *[d for g, p in zip(grid, patch, strict=True) for d in (g, p)], c)
    grid_axes = [1 + 2 * i for i in range(n)]
    patch_axes = [2 + 2 * i for i in range(n)]
    chan = 1 + 2 * n
    order = [chan, *patch_axes] if channels_first else [*patch_axes, chan]
    x = x.transpose(0, *grid_axes, *order)
    return x.reshape(b, math.prod(grid), math.prod(patch) * c)


def unpatchify(
    tokens: jax.Array, grid: Sequence[int], patch: Sequence[int], *, channels_first: bool
) -> jax.Array:
    """The inverse of `patchify`: `[B, prod(grid), prod(patch) * C] -> [B, *(grid * patch), C]`."""
    grid, patch = tuple(grid), tuple(patch)
    b, length, features = tokens.shape
    if length != math.prod(grid) or features % math.prod(patch):
        raise ValueError(f"tokens {tokens.shape} do not fit grid {grid} of {patch} patches")
    c = features // math.prod(patch)
    n = len(patch)
    inner = (c, *patch) if channels_first else (*patch, c)
    x = tokens.reshape(b, *grid, *inner)
    chan = 1 + n if channels_first else 1 + 2 * n
    first_patch = 2 + n if channels_first else 1 + n
    axes = [0]
    for i in range(n):
        axes += [1 + i, first_patch + i]
    x = x.transpose(*axes, chan)
    return x.reshape(b, *[g * p for g, p in zip(grid, patch, strict=True)], c)


def patch_conv(
    features: int, patch: Sequence[int], name: str, *, bias: bool = True, dtype: Dtype = jnp.float32
) -> nn.Conv:
    """torch `ConvNd(kernel_size=patch, stride=patch)` on channels-last input."""
    patch = tuple(patch)
    return nn.Conv(
        features, patch, strides=patch, padding="VALID", use_bias=bias, dtype=dtype, name=name
    )


def conv_tokens(x: jax.Array) -> jax.Array:
    """`[B, *grid, D] -> [B, prod(grid), D]` (row-major over the grid)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


class PatchEmbed(nn.Module):
    """SD3's `PatchEmbed` on `[B, H, W, C]` latents -> `[B, (H/p)(W/p), embed_dim]`.

    `proj` conv plus the fixed sin-cos table of `posembed`: with
    `pos_embed_max_size` the centre crop of that square table (SD3, SD3.5),
    else the table of the latent's own grid. `base_size` is diffusers'
    `height // patch_size` of the config's `sample_size`.
    """

    embed_dim: int
    patch_size: int
    base_size: int
    pos_embed_max_size: int | None = None
    interpolation_scale: float = 1.0
    bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, latents: jax.Array) -> jax.Array:
        p = self.patch_size
        _, height, width, _ = latents.shape
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} must be a multiple of patch {p}")
        conv = patch_conv(self.embed_dim, (p, p), "proj", bias=self.bias, dtype=self.dtype)
        tokens = conv_tokens(conv(latents.astype(self.dtype)))
        gh, gw = height // p, width // p
        if self.pos_embed_max_size:
            table = posembed.cropped_sincos_2d(
                self.embed_dim,
                self.pos_embed_max_size,
                gh,
                gw,
                base_size=self.base_size,
                interpolation_scale=self.interpolation_scale,
            )
        else:
            table = posembed.sincos_2d(
                self.embed_dim,
                (gh, gw),
                base_size=self.base_size,
                interpolation_scale=self.interpolation_scale,
            )
        return (tokens.astype(jnp.float32) + table[None]).astype(self.dtype)
