"""diffusers' `UNet2DConditionModel` (SD 1.x / 2.x) in Flax linen, on NHWC latents.

`UNet2DConditionModel(cfg).apply({"params": p}, x, t, context)` returns the
network output (epsilon or v, as the scheduler config says) in the compute
dtype's precision, as float32. Parameter names follow the diffusers state dict
(`down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k/kernel`), so the
converter renames mechanically and LoRA targets read like diffusers' names.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bpgo_jax.models.layers import activation, timestep_embedding
from bpgo_jax.models.sd.config import UNetConfig
from bpgo_jax.models.sd.layers import (
    Attention,
    Downsample2D,
    ResnetBlock2D,
    Upsample2D,
    conv,
    group_norm,
)

Dtype = Any


class GEGLU(nn.Module):
    """`proj` to 2 x `features`, then value * gelu(gate) (exact erf GELU)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(2 * self.features, dtype=self.dtype, name="proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers `FeedForward(activation_fn="geglu")`: `net_0` (GEGLU) then `net_2`."""

    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = GEGLU(self.mult * self.dim, self.dtype, name="net_0")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(h)


class TimestepEmbedding(nn.Module):
    """`linear_1`, activation, `linear_2` (+ optional post activation)."""

    features: int
    act_fn: str
    post_act_fn: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
        x = nn.Dense(self.features, dtype=self.dtype, name="linear_2")(activation(self.act_fn)(x))
        return activation(self.post_act_fn)(x) if self.post_act_fn else x


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, feed-forward; pre-LayerNorm residuals."""

    dim: int
    heads: int
    dim_head: int
    only_cross_attention: bool = False
    upcast: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        def ln(name):
            return nn.LayerNorm(1e-5, dtype=self.dtype, use_fast_variance=False, name=name)

        def attn(name):
            return Attention(
                self.heads,
                self.dim_head,
                self.dim,
                self.upcast,
                self.dtype,
                self.attention,
                name=name,
            )

        ctx1 = context if self.only_cross_attention else None
        x = x + attn("attn1")(ln("norm1")(x), ctx1)
        x = x + attn("attn2")(ln("norm2")(x), context)
        return x + FeedForward(self.dim, dtype=self.dtype, name="ff")(ln("norm3")(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, projection in (1x1 conv for SD1, linear for SD2), blocks, projection out."""

    heads: int
    dim_head: int
    num_layers: int
    groups: int
    use_linear_projection: bool
    only_cross_attention: bool = False
    upcast: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head
        y = group_norm(self.groups, 1e-6, "norm", self.dtype)(x)
        if self.use_linear_projection:
            y = nn.Dense(inner, dtype=self.dtype, name="proj_in")(y.reshape(b, h * w, c))
        else:
            y = conv(inner, 1, "proj_in", self.dtype)(y).reshape(b, h * w, inner)
        for i in range(self.num_layers):
            y = BasicTransformerBlock(
                inner,
                self.heads,
                self.dim_head,
                self.only_cross_attention,
                self.upcast,
                self.dtype,
                self.attention,
                name=f"transformer_blocks_{i}",
            )(y, context)
        if self.use_linear_projection:
            y = nn.Dense(c, dtype=self.dtype, name="proj_out")(y).reshape(b, h, w, c)
        else:
            y = conv(c, 1, "proj_out", self.dtype)(y.reshape(b, h, w, inner))
        return y + x


def _transformer(
    cfg: UNetConfig, channels: int, block: int, dtype: Dtype, name: str, attention: str
):
    heads = cfg.num_heads[block]
    return Transformer2DModel(
        heads=heads,
        dim_head=channels // heads,
        num_layers=cfg.transformer_layers_per_block[block],
        groups=cfg.norm_num_groups,
        use_linear_projection=cfg.use_linear_projection,
        only_cross_attention=cfg.only_cross_attention[block],
        upcast=cfg.upcast_attention,
        dtype=dtype,
        attention=attention,
        name=name,
    )


def _resnet(cfg: UNetConfig, channels: int, dtype: Dtype, name: str, scale: float = 1.0):
    return ResnetBlock2D(
        channels, cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn, scale, dtype, name=name
    )


class DownBlock(nn.Module):
    """`CrossAttnDownBlock2D` (with attention) or `DownBlock2D`; returns the skip outputs."""

    cfg: UNetConfig
    index: int
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, temb, context):
        cfg, i = self.cfg, self.index
        ch = cfg.block_out_channels[i]
        with_attn = cfg.down_block_types[i] == "CrossAttnDownBlock2D"
        skips = []
        for j in range(cfg.layers_per_block[i]):
            x = _resnet(cfg, ch, self.dtype, f"resnets_{j}")(x, temb)
            if with_attn:
                x = _transformer(cfg, ch, i, self.dtype, f"attentions_{j}", self.attention)(
                    x, context
                )
            skips.append(x)
        if i < len(cfg.block_out_channels) - 1:
            x = Downsample2D(ch, cfg.downsample_padding, self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """`UNetMidBlock2DCrossAttn`: resnet, transformer, resnet."""

    cfg: UNetConfig
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, temb, context):
        cfg = self.cfg
        ch, last = cfg.block_out_channels[-1], len(cfg.block_out_channels) - 1
        scale = cfg.mid_block_scale_factor
        x = _resnet(cfg, ch, self.dtype, "resnets_0", scale)(x, temb)
        x = _transformer(cfg, ch, last, self.dtype, "attentions_0", self.attention)(x, context)
        return _resnet(cfg, ch, self.dtype, "resnets_1", scale)(x, temb)


class UpBlock(nn.Module):
    """`CrossAttnUpBlock2D` or `UpBlock2D`: each resnet eats one skip (last first)."""

    cfg: UNetConfig
    index: int  # position among up blocks (0 = lowest resolution)
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, skips, temb, context):
        cfg, i = self.cfg, self.index
        n = len(cfg.block_out_channels)
        down = n - 1 - i  # the down block this one mirrors (reversed per-block settings)
        ch = cfg.block_out_channels[down]
        with_attn = cfg.up_block_types[i] == "CrossAttnUpBlock2D"
        skips = list(skips)
        for j in range(cfg.layers_per_block[down] + 1):
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = _resnet(cfg, ch, self.dtype, f"resnets_{j}")(x, temb)
            if with_attn:
                x = _transformer(cfg, ch, down, self.dtype, f"attentions_{j}", self.attention)(
                    x, context
                )
        if i < n - 1:
            x = Upsample2D(ch, self.dtype, name="upsamplers_0")(x)
        return x


class UNet2DConditionModel(nn.Module):
    """`(sample [B,H,W,C], timesteps [B] or scalar, context [B,L,D]) -> [B,H,W,C_out]`.

    `attention` is the attention kernel (`config.model.attention`, see `models.attention`).
    """

    cfg: UNetConfig
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, context: jax.Array) -> jax.Array:
        cfg = self.cfg
        factor = 2**cfg.num_upsamplers
        if sample.shape[1] % factor or sample.shape[2] % factor:
            raise ValueError(
                f"latent size {sample.shape[1:3]} must be a multiple of {factor} for this UNet"
            )
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        b = sample.shape[0]
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (b,))
        ch0 = cfg.block_out_channels[0]
        temb_dim = cfg.time_embedding_dim or 4 * ch0
        emb = timestep_embedding(
            t, ch0, flip_sin_to_cos=cfg.flip_sin_to_cos, downscale_freq_shift=cfg.freq_shift
        ).astype(self.dtype)
        emb = TimestepEmbedding(
            temb_dim, cfg.act_fn, cfg.timestep_post_act, self.dtype, name="time_embedding"
        )(emb)
        if cfg.time_embedding_act_fn:
            emb = activation(cfg.time_embedding_act_fn)(emb)
        context = context.astype(self.dtype)

        x = conv(ch0, cfg.conv_in_kernel, "conv_in", self.dtype)(sample.astype(self.dtype))
        skips = [x]
        for i in range(len(cfg.block_out_channels)):
            down = DownBlock(cfg, i, self.dtype, self.attention, name=f"down_blocks_{i}")
            x, res = down(x, emb, context)
            skips.extend(res)
        if cfg.mid_block_type is not None:
            x = MidBlock(cfg, self.dtype, self.attention, name="mid_block")(x, emb, context)
        for i in range(len(cfg.block_out_channels)):
            n = cfg.layers_per_block[-1 - i] + 1
            up = UpBlock(cfg, i, self.dtype, self.attention, name=f"up_blocks_{i}")
            x = up(x, skips[-n:], emb, context)
            skips = skips[:-n]
        x = group_norm(cfg.norm_num_groups, cfg.norm_eps, "conv_norm_out", self.dtype)(x)
        x = activation(cfg.act_fn)(x)
        x = conv(cfg.out_channels, cfg.conv_out_kernel, "conv_out", self.dtype)(x)
        return x.astype(jnp.float32)
