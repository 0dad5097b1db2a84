"""CLIP text and vision transformers in Flax linen, numerically matching transformers.

Submodule names mirror the transformers state-dict names (`text_model`,
`encoder/layers_3/self_attn/q_proj`, `pre_layrnorm`, ...) so that weight
conversion is a mechanical rename (see `loaders.py`). Images enter as NHWC
(the JAX convention), already resized and normalised (see `preprocess.py`).
Every module takes `attention`, the kernel of `models.attention` ("auto":
cuDNN / splash where they run, XLA on CPU).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bpgo_jax.models.attention import attention
from bpgo_jax.models.clip.config import ClipConfig, TextConfig, VisionConfig
from bpgo_jax.models.layers import activation

Dtype = Any


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (transformers layout)."""

    num_heads: int
    causal: bool
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        shape = (b, n, self.num_heads, d // self.num_heads)
        dense = functools.partial(nn.Dense, d, dtype=self.dtype)
        q = dense(name="q_proj")(x).reshape(shape)
        k = dense(name="k_proj")(x).reshape(shape)
        v = dense(name="v_proj")(x).reshape(shape)
        # Scale 1/sqrt(head_dim); softmax in float32 whatever the compute dtype.
        out = attention(q, k, v, causal=self.causal, implementation=self.attention)
        return dense(name="out_proj")(out.reshape(b, n, d))


class Mlp(nn.Module):
    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)
        h = activation(self.hidden_act)(h)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block."""

    cfg: TextConfig | VisionConfig
    causal: bool
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ln = functools.partial(nn.LayerNorm, epsilon=self.cfg.layer_norm_eps, dtype=self.dtype)
        attn = Attention(
            self.cfg.num_attention_heads, self.causal, self.dtype, self.attention, name="self_attn"
        )
        x = x + attn(ln(name="layer_norm1")(x))
        mlp = Mlp(self.cfg.intermediate_size, self.cfg.hidden_act, self.dtype, name="mlp")
        return x + mlp(ln(name="layer_norm2")(x))


class Encoder(nn.Module):
    cfg: TextConfig | VisionConfig
    causal: bool
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(
        self, x: jax.Array, output_hidden_states: bool = False
    ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, ...]]:
        """With `output_hidden_states`, also transformers' `hidden_states`: the
        input and every layer's output (`[-2]` is the penultimate layer's)."""
        hidden = [x]
        for i in range(self.cfg.num_hidden_layers):
            layer = EncoderLayer(
                self.cfg, self.causal, self.dtype, self.attention, name=f"layers_{i}"
            )
            x = layer(x)
            hidden.append(x)
        return (x, tuple(hidden)) if output_hidden_states else x


class TextEmbeddings(nn.Module):
    cfg: TextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        n = input_ids.shape[-1]
        if n > self.cfg.max_position_embeddings:
            raise ValueError(
                f"input_ids length {n} exceeds max_position_embeddings="
                f"{self.cfg.max_position_embeddings}"
            )
        d = self.cfg.hidden_size
        tok = nn.Embed(self.cfg.vocab_size, d, dtype=self.dtype, name="token_embedding")
        pos = nn.Embed(
            self.cfg.max_position_embeddings, d, dtype=self.dtype, name="position_embedding"
        )
        return tok(input_ids) + pos(jnp.arange(n))[None]


class TextTransformer(nn.Module):
    """`input_ids [B, L] -> (last_hidden_state [B, L, D], pooled [B, D])`, and with
    `output_hidden_states` also the per-layer states (see `Encoder`), which
    SDXL / SD3 read at the penultimate layer, before the final layer norm."""

    cfg: TextConfig
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, input_ids: jax.Array, output_hidden_states: bool = False) -> tuple:
        x = TextEmbeddings(self.cfg, self.dtype, name="embeddings")(input_ids)
        encoder = Encoder(self.cfg, True, self.dtype, self.attention, name="encoder")
        x, hidden = encoder(x, output_hidden_states=True)
        x = nn.LayerNorm(
            epsilon=self.cfg.layer_norm_eps, dtype=self.dtype, name="final_layer_norm"
        )(x)
        if self.cfg.eos_token_id is None:  # EOT has the largest id in the CLIP vocabulary
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:  # first EOS: padding may reuse the EOS id
            eos_pos = jnp.argmax((input_ids == self.cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(x, eos_pos[:, None, None], axis=1)[:, 0]
        return (x, pooled, hidden) if output_hidden_states else (x, pooled)


class VisionEmbeddings(nn.Module):
    cfg: VisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.cfg
        if pixels.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(
                f"pixel_values shape {pixels.shape} does not match the model's "
                f"[B, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}]"
            )
        p, d = cfg.patch_size, cfg.hidden_size
        patches = nn.Conv(
            d,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            name="patch_embedding",
        )(pixels.astype(self.dtype))
        b = patches.shape[0]
        patches = patches.reshape(b, -1, d)
        cls = self.param("class_embedding", nn.initializers.normal(1.0), (d,))
        cls = jnp.broadcast_to(cls.astype(patches.dtype), (b, 1, d))
        pos = nn.Embed(cfg.num_positions, d, dtype=self.dtype, name="position_embedding")
        return jnp.concatenate([cls, patches], axis=1) + pos(jnp.arange(cfg.num_positions))[None]


class VisionTransformer(nn.Module):
    """`pixel_values [B, H, W, C] -> (last_hidden_state [B, N+1, D], pooled [B, D])`.

    `output_hidden_states=True` appends transformers' `hidden_states` (the
    pre-layernormed embeddings, then each layer's output): `[-2]` is what
    WanImageToVideoPipeline's `encode_image` feeds Wan2.1 I2V's image branch."""

    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, pixels: jax.Array, output_hidden_states: bool = False) -> tuple:
        ln = functools.partial(nn.LayerNorm, epsilon=self.cfg.layer_norm_eps, dtype=self.dtype)
        x = VisionEmbeddings(self.cfg, self.dtype, name="embeddings")(pixels)
        x = ln(name="pre_layrnorm")(x)  # sic: the transformers name
        encoder = Encoder(self.cfg, False, self.dtype, self.attention, name="encoder")
        x, hidden = encoder(x, output_hidden_states=True)
        pooled = ln(name="post_layernorm")(x[:, 0])
        return (x, pooled, hidden) if output_hidden_states else (x, pooled)


def _projection(width: int, dtype: Dtype, name: str) -> nn.Dense:
    return nn.Dense(width, use_bias=False, dtype=dtype, name=name)


class CLIPTextModel(nn.Module):
    """transformers `CLIPTextModel`, or `CLIPTextModelWithProjection` when `with_projection`.

    Returns `(last_hidden_state, pooled)`; with a projection `pooled` is the
    projected `text_embeds` (what SDXL's second encoder and SD3 feed the
    denoiser). `output_hidden_states=True` appends transformers'
    `hidden_states` tuple (embeddings, then each layer's output).
    """

    cfg: TextConfig
    with_projection: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, input_ids: jax.Array, output_hidden_states: bool = False) -> tuple:
        out = TextTransformer(self.cfg, self.dtype, self.attention, name="text_model")(
            input_ids, output_hidden_states
        )
        last, pooled = out[:2]
        if self.with_projection:
            pooled = _projection(self.cfg.projection_dim, self.dtype, "text_projection")(pooled)
        return (last, pooled, *out[2:])


class CLIPVisionModel(nn.Module):
    """transformers `CLIPVisionModel` / `CLIPVisionModelWithProjection` (`image_embeds`)."""

    cfg: VisionConfig
    with_projection: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, pixels: jax.Array, output_hidden_states: bool = False) -> tuple:
        """`(last_hidden_state, pooled or image_embeds[, hidden_states])`."""
        tower = VisionTransformer(self.cfg, self.dtype, self.attention, name="vision_model")
        hidden, pooled, states = tower(pixels, output_hidden_states=True)
        if self.with_projection:
            pooled = _projection(self.cfg.projection_dim, self.dtype, "visual_projection")(pooled)
        return (hidden, pooled, states) if output_hidden_states else (hidden, pooled)


def l2_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPModel(nn.Module):
    """transformers `CLIPModel`: both towers, projections and `logit_scale`.

    Use `method="get_text_features"` / `"get_image_features"` for one tower.
    """

    cfg: ClipConfig
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    def setup(self):
        self.text_model = TextTransformer(self.cfg.text, self.dtype, self.attention)
        self.vision_model = VisionTransformer(self.cfg.vision, self.dtype, self.attention)
        self.text_projection = _projection(self.cfg.projection_dim, self.dtype, None)
        self.visual_projection = _projection(self.cfg.projection_dim, self.dtype, None)
        init = nn.initializers.constant(self.cfg.logit_scale_init_value)
        self.logit_scale = self.param("logit_scale", init, ())

    def get_text_features(self, input_ids: jax.Array) -> jax.Array:
        return self.text_projection(self.text_model(input_ids)[1])

    def get_image_features(self, pixels: jax.Array) -> jax.Array:
        return self.visual_projection(self.vision_model(pixels)[1])

    def __call__(self, input_ids: jax.Array, pixels: jax.Array) -> dict[str, jax.Array]:
        text = l2_normalize(self.get_text_features(input_ids))
        image = l2_normalize(self.get_image_features(pixels))
        logits_per_text = jnp.exp(self.logit_scale.astype(jnp.float32)) * text @ image.T
        return {
            "logits_per_image": logits_per_text.T,
            "logits_per_text": logits_per_text,
            "text_embeds": text,
            "image_embeds": image,
        }
