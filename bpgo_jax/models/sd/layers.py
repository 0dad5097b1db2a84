"""Building blocks shared by the SD UNet and VAE, numerically matching diffusers (NHWC).

Submodule names mirror diffusers' state-dict names (`conv1`, `time_emb_proj`,
`to_out_0`, ...) so weight conversion is a mechanical rename. Convolutions
use explicit torch-style padding: flax's "SAME" pads stride-2 convolutions
asymmetrically, which would shift every downsampled feature map.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bpgo_jax.models.attention import attention
from bpgo_jax.models.layers import activation

Dtype = Any


def conv(features: int, kernel: int, name: str, dtype: Dtype, stride: int = 1, padding=None):
    """torch `Conv2d(k, stride, padding=(k-1)//2)` unless `padding` (flax pairs) is given."""
    pad = (kernel - 1) // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding if padding is not None else ((pad, pad), (pad, pad)),
        dtype=dtype,
        name=name,
    )


def group_norm(groups: int, eps: float, name: str, dtype: Dtype) -> nn.GroupNorm:
    # Two-pass variance: E[x^2] - E[x]^2 loses digits on large activations.
    return nn.GroupNorm(groups, epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D` (time_embedding_norm="default"); `temb=None` for the VAE."""

    out_channels: int
    groups: int
    eps: float
    act_fn: str = "silu"
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        act = activation(self.act_fn)
        h = act(group_norm(self.groups, self.eps, "norm1", self.dtype)(x))
        h = conv(self.out_channels, 3, "conv1", self.dtype)(h)
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(act(temb))
            h = h + t[:, None, None, :]
        h = act(group_norm(self.groups, self.eps, "norm2", self.dtype)(h))
        h = conv(self.out_channels, 3, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv; `padding=0` is the VAE's variant (pad right/bottom by one)."""

    channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.padding
        pads = ((0, 1), (0, 1)) if p == 0 else ((p, p), (p, p))
        return conv(self.channels, 3, "conv", self.dtype, stride=2, padding=pads)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.channels, 3, "conv", self.dtype)(x)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    heads: int,
    upcast: bool,
    implementation: str = "auto",
) -> jax.Array:
    """Multi-head scaled dot-product attention on `[B, T, heads * dim_head]` projections.

    `implementation` is `models.attention`'s (`config.model.attention`).
    """
    split = lambda a: a.reshape(*a.shape[:2], heads, a.shape[-1] // heads)
    dtype = q.dtype
    q, k, v = split(q), split(k), split(v)
    if upcast:
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    out = attention(q, k, v, implementation=implementation).astype(dtype)
    return out.reshape(*out.shape[:2], -1)


class Attention(nn.Module):
    """diffusers `Attention` (q/k/v/out projections, scale 1/sqrt(dim_head)) on `[B, T, C]`.

    `upcast` runs the attention itself in float32 (diffusers' `upcast_attention`,
    needed by SD2.1 in half precision; an explicit "cudnn" kernel still runs
    in bfloat16). `attention` picks the kernel (`models.attention`).
    """

    heads: int
    dim_head: int
    out_dim: int
    upcast: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        dense = functools.partial(
            nn.Dense, self.heads * self.dim_head, use_bias=False, dtype=self.dtype
        )
        q, k, v = dense(name="to_q")(x), dense(name="to_k")(context), dense(name="to_v")(context)
        out = attend(q, k, v, self.heads, self.upcast, self.attention)
        return nn.Dense(self.out_dim, dtype=self.dtype, name="to_out_0")(out)


class SpatialSelfAttention(nn.Module):
    """The VAE mid-block attention: GroupNorm, one head over all channels, residual.

    Its kernel is always "auto": one head of 512 channels is beyond cuDNN's
    flash kernel, so on GPU it runs on XLA, and the frozen decoder needs no choice.
    """

    groups: int
    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = group_norm(self.groups, self.eps, "group_norm", self.dtype)(x).reshape(b, h * w, c)
        dense = functools.partial(nn.Dense, c, dtype=self.dtype)
        q, k, v = dense(name="to_q")(y), dense(name="to_k")(y), dense(name="to_v")(y)
        # Softmax in float32 as diffusers' `upcast_softmax=True` does for this block.
        y = dense(name="to_out_0")(attend(q, k, v, 1, upcast=True))
        return x + y.reshape(b, h, w, c)
