"""diffusers' `WanTransformer3DModel` (Wan2.1 / Wan2.2) in Flax linen, channels last.

    module, params = load_wan_transformer("Wan2.1-T2V-1.3B-Diffusers")
    v = module.apply({"params": params}, latents, timestep, text)      # [B, F, H, W, C]
    v = module.apply({"params": params}, latents, t, text, clip_image)  # Wan2.1 I2V

Inputs: latents `[B, F, H, W, C]`, the 0-1000 `timestep` (`1000 * sigma`)
as `[B]` or per token `[B, L]` (Wan2.2 TI2V: `expanded_timesteps`), UMT5
states `[B, L_text, text_dim]` and, for the 2.1 I2V / FLF2V image branch,
CLIP ViT-H penultimate states `[B, 257, image_dim]` (FLF2V: both frames'
states concatenated, `[B, pos_embed_seq_len, image_dim]`). diffusers
prepends the image states to the text and splits them off again inside the
attention at "all but the last 512 tokens"; here they are a separate input,
so the text may have any length.

The network: a strided Conv3d `patch_embedding`; `condition_embedder` (the
sinusoidal timestep through `time_embedder`, one shared `time_proj` to 6 x
width, a GELU-tanh `text_embedder`, the image embedder LayerNorm -> GELU MLP
-> LayerNorm); `num_layers` identical `WanTransformerBlock`s scanned in one
`Stack` named `blocks` (parameters `blocks/stacked/...`, filled from the
checkpoint's `blocks.<i>.*` by `weights.read_stacked_params`), each adding
its learned `scale_shift_table` `[1, 6, D]` to the time projection:
modulated LayerNorm -> self-attention with RMS q-k norms across heads and 3D
RoPE (`attn1`), affine LayerNorm -> cross-attention to the text (+ image
keys / values, `attn2`), modulated LayerNorm -> GELU-tanh FFN (`ffn`), with
gates; then `scale_shift_table` `[1, 2, D]` plus the time embedding modulates
`norm_out`, and `proj_out` + unpatchify give `[B, F, H, W, out_channels]`.

Precision follows diffusers' `_keep_in_fp32_modules`: the time embedder,
every norm, the modulation and the gated residual sums run in float32 (the
parameters themselves have the loader's dtype); the rest in the module dtype.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bpgo_jax.errors import WeightsError
from bpgo_jax.models import weights
from bpgo_jax.models.dit import (
    Attention,
    FeedForward,
    LayerNorm,
    TextProjection,
    TimestepEmbedding,
    axis_table,
    conv_tokens,
    layer_normalize,
    modulate,
    patch_conv,
    scale_shift_table_init,
    table_modulation,
    unpatchify,
    wan_axes_dims,
)
from bpgo_jax.models.layers import timestep_embedding
from bpgo_jax.models.scan import Stack
from bpgo_jax.models.wan.config import QK_NORM, WanConfig, wan_config_from_dict

Dtype = Any
Rope = tuple[jax.Array, jax.Array]
ROPE_THETA = 10_000.0
IMAGE_EPS = 1e-5  # the image embedder's FP32LayerNorms keep torch's default eps
EXPERTS = ("transformer", "transformer_2")  # Wan2.2 A14B: high-noise, then low-noise expert


def wan_rope(cfg: WanConfig, grid: tuple[int, int, int]) -> Rope:
    """`(cos, sin)` `[f * h * w, head_dim]` of a patch grid, diffusers' `WanRotaryPosEmbed`.

    Each axis' table (`dit.axis_table`, float64 on the host, cast to float32)
    is broadcast over the grid on the device: the compiled program holds
    `f + h + w` rows of constants, not one row per token (32,760 at 81 frames).
    """
    dims = wan_axes_dims(cfg.attention_head_dim)
    tables = [axis_table(d, np.arange(n), ROPE_THETA) for d, n in zip(dims, grid, strict=True)]
    shape = (*grid, cfg.attention_head_dim)

    def full(which: int) -> jax.Array:
        parts = []
        for axis, table in enumerate(tables):
            t = jnp.asarray(table[which])
            view = [1, 1, 1, t.shape[-1]]
            view[axis] = t.shape[0]
            parts.append(jnp.broadcast_to(t.reshape(view), (*grid, t.shape[-1])))
        return jnp.concatenate(parts, axis=-1).reshape(math.prod(grid), shape[-1])

    return full(0), full(1)


def first_frame_mask(latent_shape: tuple[int, ...]) -> np.ndarray:
    """Wan2.2 TI2V's `first_frame_mask` `[F, H, W]`: 0 on the conditioning first latent frame
    (kept clean, timestep 0), 1 on the frames being denoised."""
    mask = np.ones(tuple(int(s) for s in latent_shape[:3]), np.float32)
    mask[0] = 0.0
    return mask


def expanded_timesteps(timestep: jax.Array, mask: jax.Array, cfg: WanConfig) -> jax.Array:
    """Wan2.2's `expand_timesteps`: per-token timesteps `[B, L]` from `timestep` `[B]`.

    `mask` `[F, H, W]` (or `[B, F, H, W]`) is the latent's first-frame mask
    (`first_frame_mask`; all ones for text-to-video); each token takes
    `mask * t` at its patch's first latent pixel, as the pipelines'
    `(mask[0][0][:, ::2, ::2] * t).flatten()` does for patches (1, 2, 2).
    """
    mask = jnp.asarray(mask, jnp.float32)
    pt, ph, pw = cfg.patch_size
    per_token = mask[..., ::pt, ::ph, ::pw]
    per_token = per_token.reshape(*per_token.shape[:-3], -1)
    return jnp.asarray(timestep, jnp.float32).reshape(-1, 1) * per_token


class WanImageEmbedding(nn.Module):
    """diffusers `WanImageEmbedding`: (+ `pos_embed`) -> `norm1` -> GELU MLP `ff` -> `norm2`."""

    dim: int
    pos_embed_seq_len: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array) -> jax.Array:
        width = image.shape[-1]
        x = image.astype(self.dtype)
        if self.pos_embed_seq_len is not None:
            table = self.param(
                "pos_embed", nn.initializers.zeros, (1, self.pos_embed_seq_len, width)
            )
            x = x + table.astype(self.dtype)
        norm = lambda name: LayerNorm(IMAGE_EPS, affine=True, dtype=self.dtype, name=name)
        x = norm("norm1")(x)
        x = FeedForward(self.dim, width, "gelu", dtype=self.dtype, name="ff")(x)
        return norm("norm2")(x)


class WanTimeTextImageEmbedding(nn.Module):
    """diffusers `WanTimeTextImageEmbedding`: `(t, text, image) -> (temb, proj, text, image)`.

    `t` is `[B]` or `[B, L]`; `temb` `[B(, L), D]`, `proj` `[B(, L), 6 * D]`.
    """

    dim: int
    freq_dim: int
    pos_embed_seq_len: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, timestep: jax.Array, text: jax.Array, image: jax.Array | None):
        t = jnp.asarray(timestep, jnp.float32)
        sinusoid = timestep_embedding(t.reshape(-1), self.freq_dim).reshape(*t.shape, -1)
        temb = TimestepEmbedding(self.dim, dtype=jnp.float32, name="time_embedder")(sinusoid)
        temb = temb.astype(self.dtype)
        proj = nn.Dense(6 * self.dim, dtype=self.dtype, name="time_proj")(nn.silu(temb))
        text = TextProjection(self.dim, act_fn="gelu_tanh", dtype=self.dtype, name="text_embedder")(
            text.astype(self.dtype)
        )
        if image is not None:
            image = WanImageEmbedding(
                self.dim, self.pos_embed_seq_len, self.dtype, name="image_embedder"
            )(image)
        return temb, proj, text, image


class WanTransformerBlock(nn.Module):
    """diffusers `WanTransformerBlock`: `x [B, L, D] -> x`, given text, time projection, RoPE.

    `temb` is the shared time projection `[B, 6, D]` (or `[B, L, 6, D]` per
    token); `image` the embedded image states or None.
    """

    dim: int
    heads: int
    head_dim: int
    ffn_dim: int
    cross_attn_norm: bool = True
    eps: float = 1e-6
    attention: str = "auto"
    dtype: Dtype = jnp.float32

    def _attention(self, name: str) -> Attention:
        return Attention(
            self.heads,
            self.head_dim,
            out_dim=self.dim,
            qk_norm=QK_NORM,
            eps=self.eps,
            attention=self.attention,
            dtype=self.dtype,
            name=name,
        )

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array,
        temb: jax.Array,
        rope: Rope,
        image: jax.Array | None,
    ) -> jax.Array:
        table = self.param("scale_shift_table", scale_shift_table_init, (1, 6, self.dim))
        shift, scale, gate, c_shift, c_scale, c_gate = table_modulation(table, temb)
        dtype = x.dtype
        normed = modulate(layer_normalize(x, self.eps), shift, scale).astype(dtype)
        attn = self._attention("attn1")(normed, rope=rope)
        x = (x.astype(jnp.float32) + attn * gate).astype(dtype)
        if self.cross_attn_norm:
            normed = LayerNorm(self.eps, affine=True, dtype=dtype, name="norm2")(x)
        else:
            normed = x
        x = x + self._attention("attn2")(normed, context, image_context=image)
        normed = modulate(layer_normalize(x, self.eps), c_shift, c_scale).astype(dtype)
        ff = FeedForward(self.dim, self.ffn_dim, "gelu-approximate", dtype=self.dtype, name="ffn")
        out = ff(normed)
        return (x.astype(jnp.float32) + out.astype(jnp.float32) * c_gate).astype(dtype)


class WanTransformer3DModel(nn.Module):
    """`(latents [B, F, H, W, C], timestep [B] | [B, L], text [B, L_t, text_dim][, image])`
    -> `[B, F, H, W, out_channels]` in the module's dtype (see the module docstring).

    `attention` is the kernel (`models.attention`), `remat` the `model.remat`
    policy of the block stack.
    """

    cfg: WanConfig
    dtype: Dtype = jnp.float32
    attention: str = "auto"
    remat: str = "none"

    def _check(self, latents, timestep, text, image) -> tuple[int, int, int]:
        cfg = self.cfg
        if latents.ndim != 5 or latents.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"latents {latents.shape} must be [B, F, H, W, {cfg.in_channels}] (channels last)"
            )
        grid = cfg.grid(latents.shape[1:4])
        tokens = math.prod(grid)
        shape = tuple(np.shape(timestep))
        if shape not in ((latents.shape[0],), (latents.shape[0], tokens)):
            raise ValueError(
                f"timestep {shape} must be [B] = ({latents.shape[0]},) or per token [B, L] = "
                f"({latents.shape[0]}, {tokens}) for the {grid} patch grid"
            )
        if text.ndim != 3 or text.shape[-1] != cfg.text_dim:
            raise ValueError(f"text states {text.shape} must be [B, L, {cfg.text_dim}]")
        if cfg.has_image_branch != (image is not None):
            raise ValueError(
                "this Wan transformer has an image branch (I2V): pass the CLIP image states"
                if cfg.has_image_branch
                else "image states given to a Wan transformer without an image branch"
            )
        if image is not None:
            want = cfg.pos_embed_seq_len
            if image.ndim != 3 or image.shape[-1] != cfg.image_dim:
                raise ValueError(f"image states {image.shape} must be [B, L, {cfg.image_dim}]")
            if want is not None and image.shape[1] != want:
                raise ValueError(
                    f"image states {image.shape} must have pos_embed_seq_len={want} tokens "
                    "(FLF2V: the first and last frames' states, concatenated)"
                )
        return grid

    @nn.compact
    def __call__(
        self,
        latents: jax.Array,
        timestep: jax.Array,
        encoder_hidden_states: jax.Array,
        encoder_hidden_states_image: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.cfg
        grid = self._check(latents, timestep, encoder_hidden_states, encoder_hidden_states_image)
        dim = cfg.inner_dim
        conv = patch_conv(dim, cfg.patch_size, "patch_embedding", dtype=self.dtype)
        x = conv_tokens(conv(latents.astype(self.dtype)))
        temb, proj, text, image = WanTimeTextImageEmbedding(
            dim, cfg.freq_dim, cfg.pos_embed_seq_len, self.dtype, name="condition_embedder"
        )(timestep, encoder_hidden_states, encoder_hidden_states_image)
        proj = proj.reshape(*proj.shape[:-1], 6, dim)
        block_args = dict(
            dim=dim,
            heads=cfg.num_attention_heads,
            head_dim=cfg.attention_head_dim,
            ffn_dim=cfg.ffn_dim,
            cross_attn_norm=cfg.cross_attn_norm,
            eps=cfg.eps,
            attention=self.attention,
            dtype=self.dtype,
        )
        x = Stack(WanTransformerBlock, cfg.num_layers, block_args, remat=self.remat, name="blocks")(
            x, text, proj, wan_rope(cfg, grid), image
        )
        table = self.param("scale_shift_table", scale_shift_table_init, (1, 2, dim))
        shift, scale = table_modulation(table, temb[..., None, :])
        x = modulate(layer_normalize(x, cfg.eps), shift, scale).astype(self.dtype)
        x = nn.Dense(
            cfg.out_channels * math.prod(cfg.patch_size), dtype=self.dtype, name="proj_out"
        )(x)
        return unpatchify(x, grid, cfg.patch_size, channels_first=False)


def example_inputs(cfg: WanConfig) -> tuple[Any, ...]:
    """Inputs for init / eval_shape: one patch, one text token (and image token(s))."""
    image = None
    if cfg.has_image_branch:
        image = jnp.zeros((1, cfg.pos_embed_seq_len or 1, cfg.image_dim), jnp.float32)
    return (
        jnp.zeros((1, *cfg.patch_size, cfg.in_channels), jnp.float32),
        jnp.zeros((1,), jnp.float32),
        jnp.zeros((1, 1, cfg.text_dim), jnp.float32),
        image,
    )


def wan_rename(key: str) -> str | None:
    """The checkpoint's names are the module's; `norm_added_q` tensors, which diffusers'
    Wan attention has no use for (`_keys_to_ignore_on_load_unexpected`), are skipped."""
    return None if ".norm_added_q." in f".{key}" else key


def _config(config: WanConfig | Mapping[str, Any]) -> WanConfig:
    return config if isinstance(config, WanConfig) else wan_config_from_dict(dict(config))


def wan_transformer(
    config: WanConfig | Mapping[str, Any],
    *,
    dtype: Any = jnp.float32,
    attention: str = "auto",
    remat: str = "none",
) -> WanTransformer3DModel:
    """The module of a config (a `WanConfig` or a diffusers `config.json` dict)."""
    return WanTransformer3DModel(_config(config), dtype, attention, remat)


def init_wan_transformer(
    config: WanConfig | Mapping[str, Any],
    rng: jax.Array,
    *,
    dtype: Any = jnp.float32,
    attention: str = "auto",
    remat: str = "none",
) -> tuple[WanTransformer3DModel, dict]:
    """`(module, params)` with random weights (drawn on the host; for tests and benchmarks)."""
    from bpgo_jax.models.sd.pipeline import random_params

    module = wan_transformer(config, dtype=dtype, attention=attention, remat=remat)
    return module, random_params(module, rng, dtype, *example_inputs(module.cfg))


def transformer_folder(folder: str, expert: str = "transformer") -> str:
    """The `config.json` + safetensors folder of `expert` in a Wan pipeline folder, or
    `folder` itself when it is a transformer folder (and `expert` is the first)."""
    if expert not in EXPERTS:
        raise ValueError(f"expert={expert!r} is not one of {EXPERTS}")
    sub = os.path.join(folder, expert)
    if os.path.isdir(sub):
        return sub
    if expert == EXPERTS[0] and os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    if not os.path.isdir(folder):
        raise WeightsError(f"missing folder {folder} (a Wan diffusers pipeline folder)")
    what = "Wan2.2 A14B's low-noise expert" if expert == EXPERTS[1] else "the transformer"
    raise WeightsError(f"missing folder {sub} ({what}, a WanTransformer3DModel)")


def load_wan_transformer(
    folder: str,
    *,
    expert: str = "transformer",
    dtype: Any = jnp.float32,
    sharding_fn: weights.ShardingFn | None = None,
    variant: str | None = None,
    attention: str = "auto",
    remat: str = "none",
) -> tuple[WanTransformer3DModel, dict]:
    """A Wan diffusers folder's `expert` (`transformer/`, or Wan2.2's `transformer_2/`) ->
    `(module, params)`.

    `folder` is a pipeline folder or a transformer folder itself. Each tensor
    is cast to `dtype` and placed on `sharding_fn((expert, *path), shape)` as
    it is read; the blocks' per-index tensors are stacked on their devices.
    """
    sub = transformer_folder(folder, expert)
    raw = weights.read_json(os.path.join(sub, "config.json"))
    try:
        cfg = wan_config_from_dict(raw)
    except ValueError as err:
        raise WeightsError(f"{sub}/config.json: {err}") from None
    module = WanTransformer3DModel(cfg, dtype, attention, remat)
    expected = weights.expected_shapes(module, *example_inputs(cfg))
    with weights.open_tensors(sub, variant) as reader:
        params = weights.read_stacked_params(
            reader,
            expected,
            rename=wan_rename,
            prefix=(expert,),
            dtype=dtype,
            sharding_fn=sharding_fn,
        )
    return module, params
