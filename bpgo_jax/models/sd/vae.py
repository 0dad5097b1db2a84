"""diffusers' `AutoencoderKL` (the SD VAE) in Flax linen, NHWC.

`vae.apply(v, images, method="encode") -> (mean, logvar)` of the latent
Gaussian; `vae.apply(v, latents, method="decode") -> images` in about
[-1, 1]. Scaling by `scaling_factor` is the caller's job, as in diffusers.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bpgo_jax.models.layers import activation
from bpgo_jax.models.sd.config import VAEConfig
from bpgo_jax.models.sd.layers import (
    Downsample2D,
    ResnetBlock2D,
    SpatialSelfAttention,
    Upsample2D,
    conv,
    group_norm,
)

Dtype = Any
_EPS = 1e-6  # every VAE norm uses 1e-6


class VAEMidBlock(nn.Module):
    """`UNetMidBlock2D` without time embedding: resnet, (attention), resnet."""

    cfg: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        ch = cfg.block_out_channels[-1]

        def resnet(name):
            return ResnetBlock2D(
                ch, cfg.norm_num_groups, _EPS, cfg.act_fn, dtype=self.dtype, name=name
            )

        x = resnet("resnets_0")(x)
        if cfg.mid_block_add_attention:
            x = SpatialSelfAttention(cfg.norm_num_groups, _EPS, self.dtype, name="attentions_0")(x)
        return resnet("resnets_1")(x)


class ResnetStack(nn.Module):
    """`DownEncoderBlock2D` / `UpDecoderBlock2D`: resnets, then a down- or upsampler."""

    cfg: VAEConfig
    channels: int
    num_layers: int
    resample: str | None  # "down" | "up" | None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        for j in range(self.num_layers):
            x = ResnetBlock2D(
                self.channels,
                cfg.norm_num_groups,
                _EPS,
                cfg.act_fn,
                dtype=self.dtype,
                name=f"resnets_{j}",
            )(x)
        if self.resample == "down":
            x = Downsample2D(self.channels, 0, self.dtype, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample2D(self.channels, self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    cfg: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        chans = cfg.block_out_channels
        x = conv(chans[0], 3, "conv_in", self.dtype)(x)
        for i, ch in enumerate(chans):
            down = "down" if i < len(chans) - 1 else None
            x = ResnetStack(
                cfg, ch, cfg.layers_per_block, down, self.dtype, name=f"down_blocks_{i}"
            )(x)
        x = VAEMidBlock(cfg, self.dtype, name="mid_block")(x)
        x = group_norm(cfg.norm_num_groups, _EPS, "conv_norm_out", self.dtype)(x)
        return conv(2 * cfg.latent_channels, 3, "conv_out", self.dtype)(activation(cfg.act_fn)(x))


class Decoder(nn.Module):
    cfg: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.cfg
        chans = tuple(reversed(cfg.block_out_channels))
        x = conv(chans[0], 3, "conv_in", self.dtype)(z)
        x = VAEMidBlock(cfg, self.dtype, name="mid_block")(x)
        for i, ch in enumerate(chans):
            up = "up" if i < len(chans) - 1 else None
            x = ResnetStack(
                cfg, ch, cfg.layers_per_block + 1, up, self.dtype, name=f"up_blocks_{i}"
            )(x)
        x = group_norm(cfg.norm_num_groups, _EPS, "conv_norm_out", self.dtype)(x)
        return conv(cfg.out_channels, 3, "conv_out", self.dtype)(activation(cfg.act_fn)(x))


class AutoencoderKL(nn.Module):
    """Encoder + quant convs + decoder; `__call__` (encode, decode the mean) exists for init."""

    cfg: VAEConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.cfg
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        lat = cfg.latent_channels
        self.quant_conv = conv(2 * lat, 1, None, self.dtype) if cfg.use_quant_conv else None
        self.post_quant_conv = conv(lat, 1, None, self.dtype) if cfg.use_post_quant_conv else None

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images `[B, H, W, C]` in [-1, 1] -> latent mean and clamped log-variance (float32)."""
        h = self.encoder(images.astype(self.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents `[B, h, w, latent_channels]` -> images (float32, ~[-1, 1])."""
        z = latents.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def decode_images(self, latents: jax.Array) -> jax.Array:
        """Latents as the sampler holds them (scaled, shifted) -> images in [0, 1]."""
        z = latents.astype(jnp.float32) / self.cfg.scaling_factor
        if self.cfg.shift_factor is not None:
            z = z + self.cfg.shift_factor
        return jnp.clip((self.decode(z) + 1.0) / 2.0, 0.0, 1.0)

    def __call__(self, images: jax.Array) -> jax.Array:
        mean, _ = self.encode(images)
        return self.decode(mean)
