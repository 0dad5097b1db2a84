"""A small pixel-space text-conditional UNet: the built-in model family.

Small enough to pre-train and post-train on a laptop CPU, yet the same kind of
network as the real ones (ResNet blocks with timestep embedding, cross-attention
to a transformer text encoder), so the engine is exercised as it will be with
Stable Diffusion. Images are their own latents: `decode` maps [-1, 1] to [0, 1].
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from bpgo_jax.errors import ConfigError
from bpgo_jax.models import lora as lora_lib
from bpgo_jax.models.interface import DiffusionModel
from bpgo_jax.models.layers import timestep_embedding
from bpgo_jax.models.text import HashTokenizer, TextEncoder

Params = Any


class ResBlock(nn.Module):
    channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        groups = min(8, self.channels)
        h = nn.silu(nn.GroupNorm(groups, dtype=self.dtype)(x))
        h = nn.Conv(self.channels, (3, 3), dtype=self.dtype)(h)
        h = h + nn.Dense(self.channels, dtype=self.dtype)(nn.silu(temb))[:, None, None]
        h = nn.silu(nn.GroupNorm(groups, dtype=self.dtype)(h))
        h = nn.Conv(self.channels, (3, 3), dtype=self.dtype)(h)
        if x.shape[-1] != self.channels:
            x = nn.Conv(self.channels, (1, 1), dtype=self.dtype, name="skip")(x)
        return x + h


class CrossAttention(nn.Module):
    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, context_mask: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        groups = min(8, c)
        h = nn.GroupNorm(groups, dtype=self.dtype)(x).reshape(b, hh * ww, c)
        h = h + nn.MultiHeadDotProductAttention(self.heads, dtype=self.dtype, name="self_attn")(
            h, h
        )
        mask = nn.make_attention_mask(jnp.ones((b, hh * ww), bool), context_mask)
        h = h + nn.MultiHeadDotProductAttention(self.heads, dtype=self.dtype, name="cross_attn")(
            nn.LayerNorm(dtype=self.dtype)(h), context.astype(self.dtype), mask=mask
        )
        return x + nn.Dense(c, dtype=self.dtype, name="proj_out")(h).reshape(b, hh, ww, c)


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
    """[B, H, W, C] -> [B, H/p, W/p, p*p*C]: each p x p pixel patch becomes one position."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
    """The inverse of `space_to_depth`."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, p, p, c // (p * p)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c // (p * p))


class TinyUNet(nn.Module):
    """UNet over NHWC images; cross-attention at the resolutions in `attn_levels`.

    `patch` > 1 runs the network on p x p pixel patches (space-to-depth in,
    depth-to-space out, as U-ViT and DiT patchify): the full-resolution level,
    the costliest per channel, disappears, so the same compute buys wider
    layers where objects and their relations are drawn.
    """

    channels: Sequence[int] = (32, 64, 64)
    attn_levels: Sequence[int] = (1, 2)
    heads: int = 4
    out_channels: int = 3
    dtype: jnp.dtype = jnp.float32
    patch: int = 1

    @nn.compact
    def __call__(self, x, t, context, context_mask):
        temb = timestep_embedding(t, self.channels[0])
        temb = nn.Dense(4 * self.channels[0], dtype=self.dtype)(temb)
        temb = nn.Dense(4 * self.channels[0], dtype=self.dtype)(nn.silu(temb))
        pooled = (context * context_mask[..., None]).sum(1) / jnp.maximum(
            context_mask.sum(1, keepdims=True), 1
        )
        temb = temb + nn.Dense(4 * self.channels[0], dtype=self.dtype, name="text_pool")(pooled)

        if self.patch > 1:
            x = space_to_depth(x, self.patch)
        h = nn.Conv(self.channels[0], (3, 3), dtype=self.dtype, name="conv_in")(
            x.astype(self.dtype)
        )
        skips = []
        for level, ch in enumerate(self.channels):
            h = ResBlock(ch, self.dtype, name=f"down_{level}")(h, temb)
            if level in self.attn_levels:
                h = CrossAttention(self.heads, self.dtype, name=f"down_attn_{level}")(
                    h, context, context_mask
                )
            skips.append(h)
            if level < len(self.channels) - 1:
                h = nn.Conv(ch, (3, 3), strides=(2, 2), dtype=self.dtype, name=f"pool_{level}")(h)
        h = ResBlock(self.channels[-1], self.dtype, name="mid_0")(h, temb)
        h = CrossAttention(self.heads, self.dtype, name="mid_attn")(h, context, context_mask)
        h = ResBlock(self.channels[-1], self.dtype, name="mid_1")(h, temb)
        for level in reversed(range(len(self.channels))):
            ch = self.channels[level]
            if level < len(self.channels) - 1:
                b, hh, ww, c = h.shape
                h = jax.image.resize(h, (b, 2 * hh, 2 * ww, c), "nearest")
                h = nn.Conv(c, (3, 3), dtype=self.dtype, name=f"upsample_{level}")(h)
            h = jnp.concatenate([h, skips[level]], axis=-1)
            h = ResBlock(ch, self.dtype, name=f"up_{level}")(h, temb)
            if level in self.attn_levels:
                h = CrossAttention(self.heads, self.dtype, name=f"up_attn_{level}")(
                    h, context, context_mask
                )
        h = nn.silu(nn.GroupNorm(min(8, self.channels[0]), dtype=self.dtype)(h))
        out = nn.Conv(
            self.out_channels * self.patch**2,
            (3, 3),
            kernel_init=nn.initializers.zeros,
            name="conv_out",
        )(h)
        if self.patch > 1:
            out = depth_to_space(out, self.patch)
        return out.astype(jnp.float32)


# Every attention projection of the UNet (self- and cross-attention, q/k/v/out).
TINY_ATTENTION_TARGETS = (r".*attn_\d+/(self|cross)_attn/(query|key|value|out)/kernel",)


def with_lora(
    cfg: ml_collections.ConfigDict, trainable: Params, frozen: Params, rng: jax.Array
) -> tuple[Params, Params]:
    """Full parameters -> LoRA factors over the frozen UNet, if `cfg.lora.rank > 0`."""
    spec = lora_lib.spec_from_config(cfg.get("lora", None), TINY_ATTENTION_TARGETS)
    return lora_lib.split_params(trainable["unet"], frozen, spec, rng)


def check_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ConfigError unless the resolution divides into patches, then halves per level."""
    patch = cfg.get("patch", 1)
    if not (isinstance(patch, int) and patch >= 1):
        raise ConfigError(f"model.patch={patch!r} must be an integer >= 1")
    factor = patch * 2 ** (len(cfg.channels) - 1)
    if cfg.resolution % factor:
        raise ConfigError(
            f"model.resolution={cfg.resolution} must be a multiple of model.patch * "
            f"2**(len(model.channels) - 1) = {factor}"
        )


@functools.lru_cache(maxsize=16)
def _jitted_init(text: TextEncoder, unet: TinyUNet, latent_shape: tuple[int, ...]):
    """`rng -> ({"unet"}, {"text"})` full parameters, jitted (run op by op, the init
    compiles ~300 tiny programs, ~15 s on CPU) once per architecture (the modules
    compare by their fields): another build of the same model in the process, a
    resumed or repeated run's, reuses the compiled program."""

    def init(rng):
        k_text, k_unet = jax.random.split(rng)
        tokens = jnp.zeros((1, text.max_length), jnp.int32).at[:, 0].set(1)
        text_params = text.init(k_text, tokens)["params"]
        hidden = text.apply({"params": text_params}, tokens)
        unet_params = unet.init(
            k_unet, jnp.zeros((1, *latent_shape)), jnp.zeros((1,)), hidden, tokens != 0
        )["params"]
        # The text encoder trains with the UNet during pre-training; during RL
        # post-training it is frozen like a real model's CLIP.
        return {"unet": unet_params}, {"text": text_params}

    return jax.jit(init)


def tiny_model(cfg: ml_collections.ConfigDict) -> DiffusionModel:
    """Builds the built-in model from `config.model` (see configs/image.py).

    `init` always returns the full parameters ({"unet"} trainable, {"text"}
    frozen), the layout of shipped weights; with `config.model.lora.rank > 0`,
    `with_lora` turns them into LoRA factors over a frozen UNet, and `predict`
    accepts either form.
    """
    check_config(cfg)
    lora = lora_lib.spec_from_config(cfg.get("lora", None), TINY_ATTENTION_TARGETS)
    dtype = jnp.bfloat16 if cfg.get("dtype", "float32") == "bfloat16" else jnp.float32
    tokenizer = HashTokenizer(cfg.vocab_size, cfg.max_length)
    text = TextEncoder(
        cfg.vocab_size, cfg.max_length, cfg.text_width, cfg.text_depth, cfg.heads, dtype
    )
    unet = TinyUNet(
        tuple(cfg.channels), tuple(cfg.attn_levels), cfg.heads, 3, dtype, cfg.get("patch", 1)
    )
    size = cfg.resolution
    latent_shape = (size, size, 3)

    def encode_text(frozen, tokens):
        return {"hidden": text.apply({"params": frozen["text"]}, tokens), "mask": tokens != 0}

    def predict(trainable, frozen, x, t, cond):
        adapted = "lora" in trainable  # else full parameters (pre-training, shipped weights)
        if adapted and lora is None:
            raise ValueError("LoRA parameters given, but config.model.lora.rank is 0")
        params = lora_lib.unet_params(trainable, frozen, lora if adapted else None)
        return unet.apply({"params": params}, x, t, cond["hidden"], cond["mask"])

    def decode(frozen, latents):
        del frozen
        return jnp.clip((latents.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)

    return DiffusionModel(
        name="tiny_unet",
        latent_shape=latent_shape,
        prediction_type=cfg.prediction_type,
        tokenize=tokenizer,
        encode_text=encode_text,
        predict=predict,
        decode=decode,
        init=_jitted_init(text, unet, latent_shape),
        scheduler_config=cfg.get("scheduler", None) and dict(cfg.scheduler),
    )
