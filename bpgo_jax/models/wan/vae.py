"""The Wan2.1 / Wan2.2 video VAE (diffusers' `AutoencoderKLWan`) in Flax, channels last.

Videos are `[B, F, H, W, C]` in [-1, 1]; latents `[B, f, h, w, z_dim]`.

Causal chunks. Every 3x3x3 convolution is causal in time: it sees the frames
before it through a cache of its own last 2 input frames (zeros before the
first). diffusers' `_encode` runs frame 0 alone, then chunks of 4 frames,
`_decode` one latent frame at a time, carrying those caches (`feat_cache`);
the temporal down- and upsamplers skip their time convolution on the first
chunk, which is why `1 + 4k` frames encode to `1 + k` latent frames and
decode back. Without the cache the real model's encoder does no temporal
downsampling at all, so these semantics are the model. Here each chunk
method takes and returns the cache as an explicit pytree (`None`: first
chunk), and `encode` / `decode` run the first chunk, then the rest in one
`lax.scan` with the cache as carry: the program does not grow with the
frame count, and only one chunk's activations are live at a time.

Wan2.2's variant (`is_residual`) adds parameter-free shortcuts around each
down / up block (`AvgDown3D`: space-and-time to channels, averaged;
`DupUp3D`: the reverse, duplicated) and folds 2x2 pixels into channels
before the encoder (`patch_size=2`).

Submodule names mirror diffusers' state-dict names (`down_blocks_3/resample_1`,
`mid_block/attentions_0/to_qkv`), so `models.weights` converts checkpoints
by its generic rename; the norms' `gamma` `[C, 1, 1(, 1)]` becomes `scale` `[C]`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bpgo_jax.errors import WeightsError
from bpgo_jax.models import weights
from bpgo_jax.models.attention import attention
from bpgo_jax.models.wan.vae_config import (
    CHUNK,
    VAE_CLASS,
    WanVAEConfig,
    latent_frames,
    wan_vae_config_from_dict,
)

Dtype = Any
Params = Any
Cache = Any  # nested dicts of arrays mirroring the module tree; None before the first chunk
CACHE_T = 2  # frames a causal 3x3x3 convolution keeps of its input (its time padding)
_NORM_EPS = 1e-12  # torch F.normalize's


def _sub(cache: Cache, name: str) -> Cache:
    return None if cache is None else cache[name]


def _conv(features: int, kernel: int | tuple[int, ...], name: str, dtype: Dtype, **kw) -> nn.Conv:
    """A Conv2d (2-tuple kernel) or Conv3d whose spatial padding is torch's `(k - 1) // 2`."""
    kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
    spatial = tuple(((k - 1) // 2, (k - 1) // 2) for k in kernel[-2:])
    padding = kw.pop("padding", ((0, 0),) * (len(kernel) - 2) + spatial)
    return nn.Conv(features, kernel, padding=padding, dtype=dtype, name=name, **kw)


def causal(conv: nn.Module, x: jax.Array, cache: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """`WanCausalConv3d` with its cache: the conv (no time padding) sees the previous
    chunk's last `CACHE_T` input frames (zeros before the first), then keeps its own."""
    if cache is None:
        cache = jnp.zeros((x.shape[0], CACHE_T, *x.shape[2:]), x.dtype)
    full = jnp.concatenate([cache, x], axis=1)
    return conv(full), full[:, -CACHE_T:]


class RMSNorm(nn.Module):
    """`WanRMS_norm`: `x / max(||x||, 1e-12) * sqrt(C) * scale` over channels, in float32."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
        normalized = (xf / jnp.maximum(norm, _NORM_EPS)).astype(x.dtype)
        return normalized * float(np.sqrt(c)) * scale.astype(x.dtype)


class ResidualBlock(nn.Module):
    """`WanResidualBlock`: (norm, SiLU, causal conv) x 2 plus a 1x1x1 shortcut."""

    out_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        h = x
        if x.shape[-1] != self.out_dim:
            h = _conv(self.out_dim, 1, "conv_shortcut", self.dtype)(x)
        x = nn.silu(RMSNorm(self.dtype, name="norm1")(x))
        x, c1 = causal(_conv(self.out_dim, 3, "conv1", self.dtype), x, _sub(cache, "conv1"))
        x = nn.silu(RMSNorm(self.dtype, name="norm2")(x))
        x, c2 = causal(_conv(self.out_dim, 3, "conv2", self.dtype), x, _sub(cache, "conv2"))
        return x + h, {"conv1": c1, "conv2": c2}


class AttentionBlock(nn.Module):
    """`WanAttentionBlock`: one-head self-attention within each frame, residual."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        y = RMSNorm(self.dtype, name="norm")(x)
        qkv = nn.Dense(3 * c, dtype=self.dtype, name="to_qkv")(y).reshape(b * t, h * w, 3 * c)
        q, k, v = (a[:, :, None, :] for a in jnp.split(qkv, 3, axis=-1))
        out = attention(q, k, v)[:, :, 0, :].reshape(b, t, h, w, c)
        return x + nn.Dense(c, dtype=self.dtype, name="proj")(out)


class Resample(nn.Module):
    """`WanResample`: 2x spatial up / down per frame; the 3d modes also 2x in time.

    `upsample3d`'s time conv doubles the channels into two frames per frame,
    `downsample3d`'s is a stride-2 conv over the previous chunk's last frame
    and this one's; both are skipped on the first chunk (`cache is None`).
    """

    dim: int
    mode: str  # upsample2d | upsample3d | downsample2d | downsample3d
    upsample_out_dim: int | None = None  # default dim // 2, diffusers' Wan2.1 decoder
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        new: dict[str, jax.Array] = {}
        if self.mode == "upsample3d":
            time_conv = _conv(2 * self.dim, (3, 1, 1), "time_conv", self.dtype)
            if cache is None:
                new["time_conv"] = jnp.zeros((x.shape[0], CACHE_T, *x.shape[2:]), x.dtype)
            else:
                y, new["time_conv"] = causal(time_conv, x, cache["time_conv"])
                b, t, h, w, c = x.shape  # channels [0:c] are each frame's first output frame
                y = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5)
                x = y.reshape(b, 2 * t, h, w, c)
        if self.mode.startswith("upsample"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest-exact, factor 2
            out = self.upsample_out_dim or self.dim // 2
            x = _conv(out, (3, 3), "resample_1", self.dtype)(x)
        else:
            pad = ((0, 1), (0, 1))  # ZeroPad2d((0, 1, 0, 1)): right and bottom
            x = _conv(self.dim, (3, 3), "resample_1", self.dtype, strides=(2, 2), padding=pad)(x)
        if self.mode == "downsample3d":
            time_conv = _conv(self.dim, (3, 1, 1), "time_conv", self.dtype, strides=(2, 1, 1))
            if cache is not None:
                x, last = time_conv(jnp.concatenate([cache["time_conv"], x], axis=1)), x[:, -1:]
            else:
                last = x[:, -1:]
            new["time_conv"] = last
        return x, new


def avg_down(x: jax.Array, out_channels: int, factor_t: int, factor_s: int) -> jax.Array:
    """`AvgDown3D`: `factor_t x factor_s^2` blocks to channels (front-padded in time),
    averaged in groups down to `out_channels`."""
    pad = (-x.shape[1]) % factor_t
    x = jnp.pad(x, ((0, 0), (pad, 0), (0, 0), (0, 0), (0, 0)))
    b, t, h, w, c = x.shape
    t, h, w = t // factor_t, h // factor_s, w // factor_s
    x = x.reshape(b, t, factor_t, h, factor_s, w, factor_s, c).transpose(0, 1, 3, 5, 7, 2, 4, 6)
    x = x.reshape(b, t, h, w, out_channels, -1)
    return x.mean(axis=-1)


def dup_up(x: jax.Array, out_channels: int, factor_t: int, factor_s: int, first: bool) -> jax.Array:
    """`DupUp3D`, the inverse layout of `avg_down` with repeated channels; on the first
    chunk only the last of the `factor_t` frames is kept."""
    b, t, h, w, c = x.shape
    x = jnp.repeat(x, out_channels * factor_t * factor_s * factor_s // c, axis=-1)
    x = x.reshape(b, t, h, w, out_channels, factor_t, factor_s, factor_s)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4)
    x = x.reshape(b, t * factor_t, h * factor_s, w * factor_s, out_channels)
    return x[:, factor_t - 1 :] if first else x


class MidBlock(nn.Module):
    """`WanMidBlock`: residual block, attention, residual block."""

    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        x, c0 = ResidualBlock(self.dim, self.dtype, name="resnets_0")(x, _sub(cache, "resnets_0"))
        x = AttentionBlock(self.dtype, name="attentions_0")(x)
        x, c1 = ResidualBlock(self.dim, self.dtype, name="resnets_1")(x, _sub(cache, "resnets_1"))
        return x, {"resnets_0": c0, "resnets_1": c1}


class ResidualDownBlock(nn.Module):
    """Wan2.2's `WanResidualDownBlock`: residual blocks and a downsampler, plus `avg_down`."""

    out_dim: int
    num_res_blocks: int
    temporal: bool
    down: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        shortcut = avg_down(x, self.out_dim, 2 if self.temporal else 1, 2 if self.down else 1)
        new = {}
        for j in range(self.num_res_blocks):
            name = f"resnets_{j}"
            x, new[name] = ResidualBlock(self.out_dim, self.dtype, name=name)(x, _sub(cache, name))
        if self.down:
            mode = "downsample3d" if self.temporal else "downsample2d"
            resample = Resample(self.out_dim, mode, dtype=self.dtype, name="downsampler")
            x, new["downsampler"] = resample(x, _sub(cache, "downsampler"))
        return x + shortcut, new


class UpBlock(nn.Module):
    """`WanUpBlock` (Wan2.1) or, `residual`, Wan2.2's `WanResidualUpBlock` with `dup_up`."""

    out_dim: int
    num_res_blocks: int
    mode: str | None  # upsample2d | upsample3d | None
    residual: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        x_in, new = x, {}
        for j in range(self.num_res_blocks + 1):
            name = f"resnets_{j}"
            x, new[name] = ResidualBlock(self.out_dim, self.dtype, name=name)(x, _sub(cache, name))
        if self.mode is not None:
            name = "upsampler" if self.residual else "upsamplers_0"
            out = self.out_dim if self.residual else None
            x, new[name] = Resample(self.out_dim, self.mode, out, self.dtype, name=name)(
                x, _sub(cache, name)
            )
            if self.residual:
                factor_t = 2 if self.mode == "upsample3d" else 1
                x = x + dup_up(x_in, self.out_dim, factor_t, 2, first=cache is None)
        return x, new


class Encoder3d(nn.Module):
    """`WanEncoder3d` on one chunk; its output has `2 * z_dim` channels (mean, logvar)."""

    cfg: WanVAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        cfg, dt = self.cfg, self.dtype
        dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
        last = len(cfg.dim_mult) - 1
        new: dict[str, Cache] = {}
        x, new["conv_in"] = causal(_conv(dims[0], 3, "conv_in", dt), x, _sub(cache, "conv_in"))
        index, scale = 0, 1.0
        for i, out_dim in enumerate(dims[1:]):
            if cfg.is_residual:
                name = f"down_blocks_{i}"
                block = ResidualDownBlock(
                    out_dim,
                    cfg.num_res_blocks,
                    temporal=i != last and cfg.temperal_downsample[i],
                    down=i != last,
                    dtype=dt,
                    name=name,
                )
                x, new[name] = block(x, _sub(cache, name))
                continue
            for _ in range(cfg.num_res_blocks):
                name = f"down_blocks_{index}"
                x, new[name] = ResidualBlock(out_dim, dt, name=name)(x, _sub(cache, name))
                index += 1
                if scale in cfg.attn_scales:
                    x = AttentionBlock(dt, name=f"down_blocks_{index}")(x)
                    index += 1
            if i != last:
                name = f"down_blocks_{index}"
                mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
                x, new[name] = Resample(out_dim, mode, dtype=dt, name=name)(x, _sub(cache, name))
                index += 1
                scale /= 2.0
        x, new["mid_block"] = MidBlock(dims[-1], dt, name="mid_block")(x, _sub(cache, "mid_block"))
        x = nn.silu(RMSNorm(dt, name="norm_out")(x))
        conv_out = _conv(2 * cfg.z_dim, 3, "conv_out", dt)
        x, new["conv_out"] = causal(conv_out, x, _sub(cache, "conv_out"))
        return x, new


class Decoder3d(nn.Module):
    """`WanDecoder3d` on one latent frame (`temporal_factor` frames out, 1 on the first)."""

    cfg: WanVAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        cfg, dt = self.cfg, self.dtype
        mult = cfg.dim_mult
        dims = [cfg.decoder_dim * u for u in (mult[-1], *mult[::-1])]
        last = len(mult) - 1
        new: dict[str, Cache] = {}
        x, new["conv_in"] = causal(_conv(dims[0], 3, "conv_in", dt), x, _sub(cache, "conv_in"))
        x, new["mid_block"] = MidBlock(dims[0], dt, name="mid_block")(x, _sub(cache, "mid_block"))
        for i, out_dim in enumerate(dims[1:]):
            mode = None
            if i != last:
                mode = "upsample3d" if cfg.temperal_upsample[i] else "upsample2d"
            name = f"up_blocks_{i}"
            block = UpBlock(out_dim, cfg.num_res_blocks, mode, cfg.is_residual, dt, name=name)
            x, new[name] = block(x, _sub(cache, name))
        x = nn.silu(RMSNorm(dt, name="norm_out")(x))
        conv_out = _conv(cfg.out_channels, 3, "conv_out", dt)
        x, new["conv_out"] = causal(conv_out, x, _sub(cache, "conv_out"))
        return x, new


def patchify(x: jax.Array, p: int) -> jax.Array:
    """`[B, F, H, W, C] -> [B, F, H/p, W/p, C*p*p]`, channel `c*p*p + pw*p + ph` (diffusers')."""
    if p == 1:
        return x
    b, f, h, w, c = x.shape
    if h % p or w % p:
        raise ValueError(f"video height {h} and width {w} must be multiples of patch_size {p}")
    x = x.reshape(b, f, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 6, 5, 3)
    return x.reshape(b, f, h // p, w // p, c * p * p)


def unpatchify(x: jax.Array, p: int) -> jax.Array:
    """The inverse of `patchify`."""
    if p == 1:
        return x
    b, f, h, w, cpp = x.shape
    x = x.reshape(b, f, h, w, cpp // (p * p), p, p).transpose(0, 1, 2, 6, 3, 5, 4)
    return x.reshape(b, f, h * p, w * p, cpp // (p * p))


class AutoencoderKLWan(nn.Module):
    """Encoder, quant convs, decoder; chunk by chunk (see the module docstring).

    `encode_chunk` / `decode_chunk` are the per-chunk steps that `encode` and
    `decode` below scan; `__call__` runs two chunks each way, so `init` and
    `weights.expected_shapes` see every parameter.
    """

    cfg: WanVAEConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        z = self.cfg.z_dim
        self.encoder = Encoder3d(self.cfg, self.dtype)
        self.decoder = Decoder3d(self.cfg, self.dtype)
        self.quant_conv = _conv(2 * z, 1, "quant_conv", self.dtype)
        self.post_quant_conv = _conv(z, 1, "post_quant_conv", self.dtype)

    def encode_chunk(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """Patchified frames (1 for the first chunk, `cache=None`, then 4) -> the posterior's
        `[mean, logvar]` channels of their latent frames, and the new cache."""
        h, cache = self.encoder(x.astype(self.dtype), cache)
        return self.quant_conv(h), cache

    def decode_chunk(self, z: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """One latent frame `[B, 1, h, w, z_dim]` -> its (patchified) frames, the new cache."""
        return self.decoder(self.post_quant_conv(z.astype(self.dtype)), cache)

    def __call__(self, video: jax.Array) -> jax.Array:
        x = patchify(video, self.cfg.patch)
        h0, cache = self.encode_chunk(x[:, :1], None)
        self.encode_chunk(x[:, 1 : 1 + CHUNK], cache)
        z = h0[..., : self.cfg.z_dim]
        y0, cache = self.decode_chunk(z, None)
        y1, _ = self.decode_chunk(z, cache)
        return unpatchify(jnp.concatenate([y0, y1], axis=1), self.cfg.patch)


def example_inputs(cfg: WanVAEConfig) -> tuple[jax.Array]:
    """The smallest video that runs every parameter (init, `expected_shapes`)."""
    s = cfg.spatial_factor
    return (jnp.zeros((1, 1 + CHUNK, s, s, cfg.pixel_channels), jnp.float32),)


# ---------------------------------------------------------------- chunked encode / decode


def _chunked(
    step: Callable[[jax.Array, Cache], tuple[jax.Array, Cache]], x: jax.Array, size: int
) -> jax.Array:
    """`step` on frame 0 (cache None), then on chunks of `size` frames in one `lax.scan`
    carrying the cache; the outputs concatenated along time."""
    first, cache = step(x[:, :1], None)
    b, f = x.shape[:2]
    n = (f - 1) // size
    if n == 0:
        return first
    chunks = x[:, 1:].reshape(b, n, size, *x.shape[2:]).swapaxes(0, 1)

    def body(carry: Cache, chunk: jax.Array) -> tuple[Cache, jax.Array]:
        out, carry = step(chunk, carry)
        return carry, out

    _, outs = jax.lax.scan(body, cache, chunks)
    outs = outs.swapaxes(0, 1).reshape(b, -1, *outs.shape[3:])
    return jnp.concatenate([first, outs], axis=1)


def _per_batch_chunk(fn: Callable[[jax.Array], Any], x: jax.Array, size: int | None) -> Any:
    """`fn(x)` over the batch `size` samples at a time (`lax.map`), or at once."""
    b = x.shape[0]
    if size is None or size >= b:
        return fn(x)
    if b % size:
        raise ValueError(f"batch {b} is not a multiple of batch_chunk={size}")
    out = jax.lax.map(fn, x.reshape(b // size, size, *x.shape[1:]))
    return jax.tree.map(lambda a: a.reshape(b, *a.shape[2:]), out)


def _check_channels(x: jax.Array, channels: int, what: str) -> None:
    if x.ndim != 5 or x.shape[-1] != channels:
        raise ValueError(f"{what} {x.shape} must be [B, F, H, W, {channels}] (channels last)")


def encode(
    vae: AutoencoderKLWan, params: Params, video: jax.Array, *, batch_chunk: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """Video `[B, 1 + 4k, H, W, 3]` in [-1, 1] -> the posterior's mean and log-variance
    (clipped to [-30, 20]), float32 `[B, 1 + k, H/s, W/s, z_dim]`, unnormalized.

    The mean is the latent the Wan pipelines use (`sample_mode="argmax"`).
    `batch_chunk` encodes that many videos at a time (memory).
    """
    cfg = vae.cfg
    _check_channels(video, cfg.pixel_channels, "video")
    latent_frames(cfg, video.shape[1])
    step = lambda x, cache: vae.apply({"params": params}, x, cache, method="encode_chunk")

    def run(v: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = _chunked(step, patchify(v.astype(vae.dtype), cfg.patch), CHUNK).astype(jnp.float32)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    return _per_batch_chunk(run, video, batch_chunk)


def decode(
    vae: AutoencoderKLWan, params: Params, latents: jax.Array, *, batch_chunk: int | None = None
) -> jax.Array:
    """Unnormalized latents `[B, f, h, w, z_dim]` -> video `[B, 1 + (f - 1) * 4, H, W, 3]`,
    float32 clipped to [-1, 1]; one latent frame at a time, `batch_chunk` videos at a time."""
    cfg = vae.cfg
    _check_channels(latents, cfg.z_dim, "latents")
    step = lambda z, cache: vae.apply({"params": params}, z, cache, method="decode_chunk")

    def run(z: jax.Array) -> jax.Array:
        out = unpatchify(_chunked(step, z.astype(vae.dtype), 1), cfg.patch)
        return jnp.clip(out.astype(jnp.float32), -1.0, 1.0)

    return _per_batch_chunk(run, latents, batch_chunk)


def _stats(cfg: WanVAEConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel latent mean and `1 / std`, as the Wan pipelines compute them (float32)."""
    mean = np.asarray(cfg.latents_mean, np.float32)
    return mean, np.float32(1.0) / np.asarray(cfg.latents_std, np.float32)


def normalize_latents(cfg: WanVAEConfig, latents: jax.Array) -> jax.Array:
    """VAE latents -> the transformer's: `(z - mean) * (1 / std)` per channel."""
    mean, inv_std = _stats(cfg)
    return (latents.astype(jnp.float32) - mean) * inv_std


def denormalize_latents(cfg: WanVAEConfig, latents: jax.Array) -> jax.Array:
    """The inverse of `normalize_latents`, in the pipelines' form `z / (1 / std) + mean`."""
    mean, inv_std = _stats(cfg)
    return latents.astype(jnp.float32) / inv_std + mean


def decode_frames(
    vae: AutoencoderKLWan, params: Params, latents: jax.Array, *, batch_chunk: int | None = None
) -> jax.Array:
    """Normalized latents (as the sampler holds them) -> frames `[B, F, H, W, 3]` in [0, 1]."""
    video = decode(vae, params, denormalize_latents(vae.cfg, latents), batch_chunk=batch_chunk)
    return jnp.clip(video / 2.0 + 0.5, 0.0, 1.0)


def decode_frames_uint8(
    vae: AutoencoderKLWan, params: Params, latents: jax.Array, *, batch_chunk: int | None = None
) -> jax.Array:
    """`decode_frames` as uint8 `round(255 x)` (the pipelines' PIL / video-file frames)."""
    frames = decode_frames(vae, params, latents, batch_chunk=batch_chunk)
    return jnp.round(frames * 255.0).astype(jnp.uint8)


# ---------------------------------------------------------------- loading


def _vae_folder(folder: str) -> str:
    """`folder` itself (config.json) or a pipeline folder's `vae/` (checked in model_index)."""
    folder = os.fspath(folder)
    sub = os.path.join(folder, "vae")
    if os.path.isfile(os.path.join(sub, "config.json")):
        if os.path.isfile(os.path.join(folder, "model_index.json")):
            weights.check_pipeline_index(folder, {"vae": VAE_CLASS}, "a Wan pipeline")
        return sub
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise WeightsError(
            f"missing file {os.path.join(folder, 'config.json')} (or {sub}/config.json): "
            "not a Wan VAE folder or a pipeline folder with one"
        )
    return folder


def _rename(key: str) -> str:
    """Checkpoint key -> the module's torch name: the norms' `gamma` is their `weight`."""
    return key[: -len("gamma")] + "weight" if key.endswith(".gamma") else key


def load_wan_vae(
    folder: str,
    *,
    dtype: Any = jnp.float32,
    sharding_fn: weights.ShardingFn | None = None,
    variant: str | None = None,
) -> tuple[AutoencoderKLWan, Params, WanVAEConfig]:
    """A diffusers Wan VAE folder (`config.json` + safetensors), or a pipeline folder with
    one in `vae/` -> `(module, params, config)`; `sharding_fn` paths start with "vae"."""
    folder = _vae_folder(folder)
    where = os.path.join(folder, "config.json")
    raw = weights.read_json(where)
    try:
        cfg = wan_vae_config_from_dict(raw)
    except ValueError as err:
        raise WeightsError(f"{where}: {err}") from None
    vae = AutoencoderKLWan(cfg, dtype)
    expected = weights.expected_shapes(vae, *example_inputs(cfg))
    with weights.open_tensors(folder, variant) as reader:
        view = weights.TensorView(reader, reader.source)
        for key in reader:
            view.add(_rename(key), key, _flat if key.endswith(".gamma") else None)
        params = weights.read_params(
            view, expected, prefix=("vae",), dtype=dtype, sharding_fn=sharding_fn
        )
    return vae, params, cfg


def _flat(arr: np.ndarray) -> np.ndarray:
    return arr.reshape(-1)
