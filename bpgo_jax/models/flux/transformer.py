"""diffusers' `FluxTransformer2DModel` (FLUX.1 dev / schnell) in Flax linen, on packed tokens.

    module, params = load_transformer("FLUX.1-dev/transformer")
    rope = flux_rope(module.cfg, text_len, h // 2, w // 2)
    out = module.apply({"params": params}, tokens, text, pooled, sigma, guidance, rope)

Inputs are the pipeline's: 2x2-packed latent tokens `[B, h/2 * w/2, 64]`
(`dit.patchify(..., channels_first=True)`), T5 states `[B, L, 4096]`, CLIP-L's
pooled output `[B, 768]`, the noise level `sigma` in [0, 1] (the pipeline's
`timestep / 1000`; the model embeds `1000 * sigma`, in its compute dtype as
diffusers does) and, for dev, the guidance value (embedded as `1000 * g`).
Rotary tables cover `[text; image]`: text ids are all 0, image token (0,
row, col) of the packed grid (`dit.flux_ids`).

The 19 double-stream blocks (`transformer_blocks`: separate image / text
AdaLN-Zero and feed-forwards, joint attention over `[text; image]` with
per-head RMS q-k norms) and the 38 single-stream blocks
(`single_transformer_blocks`: AdaLN-Zero-single, attention and MLP side by
side, one fused `proj_out`) are two scanned `Stack`s, so parameters live under
`transformer_blocks/stacked/...` with a leading layer axis and
`weights.read_stacked_params` fills them from the checkpoint's
`transformer_blocks.{i}.*` tensors. The single blocks carry the concatenated
`[text; image]` sequence from the first to the last; diffusers splits and
re-joins it around every block, which changes no value.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bpgo_jax.errors import WeightsError
from bpgo_jax.models import weights
from bpgo_jax.models.dit import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    AdaLayerNormZeroSingle,
    Attention,
    FeedForward,
    LayerNorm,
    TimestepTextEmbedding,
    flux_ids,
    modulate,
    rope_tables,
)
from bpgo_jax.models.flux.config import FluxConfig, flux_config_from_dict
from bpgo_jax.models.layers import activation
from bpgo_jax.models.scan import Stack

Dtype = Any
Rope = tuple[Any, Any]
ROPE_THETA = 10_000.0
_EPS = 1e-6  # every FLUX norm (AdaLN, q-k RMS norms, norm_out)
MLP_RATIO = 4.0  # single-stream blocks' MLP width / model width (fixed in diffusers)


def flux_rope(cfg: FluxConfig, text_len: int, height: int, width: int) -> Rope:
    """`(cos, sin)` `[text_len + height * width, head_dim]` for a packed `height x width` grid.

    Host numpy in float64, cast to float32 (`dit.rope_tables`): constants of a
    compiled program, fixed by the shapes.
    """
    return rope_tables(flux_ids(text_len, height, width), cfg.axes_dims_rope, ROPE_THETA)


class FluxTransformerBlock(nn.Module):
    """A double-stream block: `(text, image) -> (text, image)`."""

    dim: int
    heads: int
    head_dim: int
    attention: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, carry: tuple[jax.Array, jax.Array], temb: jax.Array, rope: Rope):
        context, x = carry
        ada = lambda name: AdaLayerNormZero(_EPS, dtype=self.dtype, name=name)
        norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada("norm1")(x, temb)
        norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = ada("norm1_context")(
            context, temb
        )
        attn_out, ctx_out = Attention(
            self.heads,
            self.head_dim,
            out_dim=self.dim,
            qk_norm="rms_norm",
            eps=_EPS,
            joint=True,
            context_first=True,
            context_out_dim=self.dim,
            attention=self.attention,
            dtype=self.dtype,
            name="attn",
        )(norm_x, norm_c, rope=rope)

        def mlp(h, attn, gate_attn, shift, scale, gate, name):
            h = h + gate_attn[:, None] * attn
            normed = modulate(LayerNorm(_EPS, dtype=self.dtype)(h), shift, scale)
            ff = FeedForward(dim_out=self.dim, dtype=self.dtype, name=name)(normed)
            return h + gate[:, None] * ff

        x = mlp(x, attn_out, gate_msa, shift_mlp, scale_mlp, gate_mlp, "ff")
        context = mlp(
            context, ctx_out, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp, "ff_context"
        )
        return context, x


class FluxSingleTransformerBlock(nn.Module):
    """A single-stream block on the joint `[text; image]` tokens."""

    dim: int
    heads: int
    head_dim: int
    attention: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, temb: jax.Array, rope: Rope) -> jax.Array:
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)
        normed, gate = AdaLayerNormZeroSingle(_EPS, dtype=self.dtype, name="norm")(h, temb)
        mlp = activation("gelu-approximate")(dense(int(self.dim * MLP_RATIO), "proj_mlp")(normed))
        attn = Attention(
            self.heads,
            self.head_dim,
            out_dim=None,  # diffusers' pre_only attention: proj_out mixes the heads
            qk_norm="rms_norm",
            eps=_EPS,
            attention=self.attention,
            dtype=self.dtype,
            name="attn",
        )(normed, rope=rope)
        out = dense(self.dim, "proj_out")(jnp.concatenate([attn, mlp], axis=-1))
        return h + gate[:, None] * out


class FluxTransformer2DModel(nn.Module):
    """`(tokens, text, pooled, sigma, guidance | None, rope) -> velocity tokens [B, L_img, out]`.

    See the module docstring for the inputs. `attention` is the kernel
    (`models.attention`), `remat` the `model.remat` policy of both stacks.
    The output is in the compute dtype.
    """

    cfg: FluxConfig
    dtype: Dtype = jnp.float32
    attention: str = "auto"
    remat: str = "none"

    @nn.compact
    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        pooled_projections: jax.Array,
        timestep: jax.Array,
        guidance: jax.Array | None = None,
        rope: Rope | None = None,
    ) -> jax.Array:
        cfg = self.cfg
        if rope is None:
            raise ValueError("pass the rotary tables: flux_rope(cfg, text_len, h // 2, w // 2)")
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)
        if self.cfg.guidance_embeds and guidance is None:
            raise ValueError("this FLUX transformer embeds guidance (dev): pass guidance")
        if not self.cfg.guidance_embeds and guidance is not None:
            raise ValueError("this FLUX transformer has no guidance embedder (schnell)")
        text_len, image_len = encoder_hidden_states.shape[1], hidden_states.shape[1]
        if np.shape(rope[0])[-2] != text_len + image_len:
            raise ValueError(
                f"rope tables cover {np.shape(rope[0])[-2]} tokens, the inputs "
                f"{text_len} text + {image_len} image"
            )
        x = dense(cfg.inner_dim, "x_embedder")(hidden_states.astype(self.dtype))
        # diffusers: `timestep.to(hidden_states.dtype) * 1000`, likewise the guidance.
        scale = lambda v: jnp.asarray(v).astype(self.dtype) * 1000
        temb = TimestepTextEmbedding(
            cfg.inner_dim, guidance=cfg.guidance_embeds, dtype=self.dtype, name="time_text_embed"
        )(
            scale(timestep),
            pooled_projections.astype(self.dtype),
            None if guidance is None else scale(guidance),
        )
        context = dense(cfg.inner_dim, "context_embedder")(encoder_hidden_states.astype(self.dtype))
        block_args = dict(
            dim=cfg.inner_dim,
            heads=cfg.num_attention_heads,
            head_dim=cfg.attention_head_dim,
            attention=self.attention,
            dtype=self.dtype,
        )
        rope = (jnp.asarray(rope[0], jnp.float32), jnp.asarray(rope[1], jnp.float32))
        context, x = Stack(
            FluxTransformerBlock,
            cfg.num_layers,
            block_args,
            remat=self.remat,
            name="transformer_blocks",
        )((context, x), temb, rope)
        joint = Stack(
            FluxSingleTransformerBlock,
            cfg.num_single_layers,
            block_args,
            remat=self.remat,
            name="single_transformer_blocks",
        )(jnp.concatenate([context, x], axis=1), temb, rope)
        x = joint[:, text_len:]
        x = AdaLayerNormContinuous(_EPS, affine=False, dtype=self.dtype, name="norm_out")(x, temb)
        return dense(cfg.patch_size**2 * cfg.out_dim, "proj_out")(x)


def transformer_inputs(cfg: FluxConfig) -> tuple[Any, ...]:
    """Example inputs for init / eval_shape: one text and one image token."""
    return (
        jnp.zeros((1, 1, cfg.in_channels), jnp.float32),
        jnp.zeros((1, 1, cfg.joint_attention_dim), jnp.float32),
        jnp.zeros((1, cfg.pooled_projection_dim), jnp.float32),
        jnp.zeros((1,), jnp.float32),
        jnp.zeros((1,), jnp.float32) if cfg.guidance_embeds else None,
        flux_rope(cfg, 1, 1, 1),
    )


def load_transformer(
    folder: str,
    *,
    dtype: Any = jnp.float32,
    sharding_fn: weights.ShardingFn | None = None,
    variant: str | None = None,
    attention: str = "auto",
    remat: str = "none",
) -> tuple[FluxTransformer2DModel, dict]:
    """A diffusers `transformer/` folder (config.json + safetensors, sharded or not) ->
    `(module, params)`. Each tensor is cast to `dtype` and placed on
    `sharding_fn(("transformer", *path), shape)` as it is read (per-index
    block tensors on their layer's slice of the stacked tensor's sharding)."""
    raw = weights.read_json(os.path.join(folder, "config.json"))
    try:
        cfg = flux_config_from_dict(raw)
    except ValueError as err:
        raise WeightsError(f"{folder}/config.json: {err}") from None
    module = FluxTransformer2DModel(cfg, dtype, attention, remat)
    with weights.open_tensors(folder, variant) as reader:
        params = weights.read_stacked_params(
            reader,
            weights.expected_shapes(module, *transformer_inputs(cfg)),
            prefix=("transformer",),
            dtype=dtype,
            sharding_fn=sharding_fn,
        )
    return module, params
