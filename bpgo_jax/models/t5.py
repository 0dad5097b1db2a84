"""T5 v1.1 and UMT5 encoders in Flax, loaded from transformers `save_pretrained` folders.

    module, params = load_t5("flux/text_encoder_2")
    states = module.apply({"params": params}, input_ids, attention_mask)  # [B, L, d_model]

One implementation serves both: T5 computes its relative position bias in
block 0 and reuses it in every block; UMT5 (`model_type: "umt5"`, Wan's text
encoder) gives every block its own bias table. Otherwise they are the same
encoder: attention logits are NOT scaled by 1/sqrt(d_kv) (the scale is folded
into the initialisation), the layer norm is RMS-style (no mean, no bias) and
computed in float32, and the feed-forward is gated (`gated-gelu`: tanh GELU,
transformers' `gelu_new`) for v1.1 and UMT5, plain for the original T5.
The residual stream stays float32 whatever the compute dtype (transformers
keeps T5's `wo` in float32 for the same reason: bf16/fp16 activations of the
large checkpoints overflow or drift otherwise).

Submodule names mirror the transformers state dict (`encoder/block_3/layer_1/
DenseReluDense/wi_0`, `shared`), so loading is `weights.read_params` with a
rename rule for the tied embedding (`shared.weight` / `encoder.embed_tokens.weight`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bpgo_jax.errors import WeightsError
from bpgo_jax.models import weights
from bpgo_jax.models.attention import attention
from bpgo_jax.models.layers import activation

Dtype = Any

MODEL_TYPES = ("t5", "umt5")
# transformers' T5Config / UMT5Config defaults where they differ (save_pretrained
# may leave default-valued keys out of config.json).
_TYPE_DEFAULTS = {
    "t5": dict(vocab_size=32128, d_ff=2048, num_layers=6, num_heads=8, feed_forward_proj="relu"),
    "umt5": dict(
        vocab_size=250112, d_ff=1024, num_layers=8, num_heads=6, feed_forward_proj="gated-gelu"
    ),
}
# Module names ending in `_<digit>` that are not list indices (for messages).
NOT_AN_INDEX = frozenset({"wi_0", "wi_1"})


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The encoder half of a transformers `T5Config` / `UMT5Config` (hashable: a module field)."""

    model_type: str = "t5"
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} is not one of {MODEL_TYPES}")
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(
                f"feed_forward_proj={self.feed_forward_proj!r} is not 'ACT' or 'gated-ACT'"
            )
        activation(self.dense_act_fn)  # an unknown activation fails here, by name

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        # transformers maps "gated-gelu" to the tanh approximation (T5 v1.1's).
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @property
    def bias_every_layer(self) -> bool:
        """UMT5: each block has its own relative attention bias; T5: block 0's is shared."""
        return self.model_type == "umt5"


def t5_config_from_dict(raw: dict[str, Any]) -> T5Config:
    """A transformers `config.json` dict (T5 or UMT5), with the defaults of its model type."""
    model_type = raw.get("model_type") or "t5"
    if model_type not in MODEL_TYPES:
        raise ValueError(f"config model_type={model_type!r} is not one of {MODEL_TYPES}")
    names = {f.name for f in dataclasses.fields(T5Config)}
    kw = {**_TYPE_DEFAULTS[model_type], **{k: v for k, v in raw.items() if k in names}}
    kw = {k: v for k, v in kw.items() if v is not None}
    kw["model_type"] = model_type
    return T5Config(**kw)


def relative_position_buckets(
    relative_position: np.ndarray, num_buckets: int, max_distance: int, bidirectional: bool = True
) -> np.ndarray:
    """transformers' `_relative_position_bucket` on the host, in the same float32 arithmetic.

    Half the buckets (per direction) are exact offsets, the rest logarithmic up
    to `max_distance`. Offsets 16, 32 and 64 of T5-XXL's table lie exactly on
    bin boundaries, where another order of operations (or float64) could round
    the other way, so the arithmetic follows transformers' step by step.
    """
    rel = np.asarray(relative_position, np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    ratio = np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact)
    scaled = (np.log(ratio) / np.float32(math.log(max_distance / max_exact))) * np.float32(
        num_buckets - max_exact
    )
    large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
    return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias, in float32; returns float32."""

    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
        return scale.astype(jnp.float32) * x


def _attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array,
    mask: jax.Array | None,
    implementation: str = "auto",
) -> jax.Array:
    """Unscaled softmax attention with T5's additive position bias, `[B, L, H, D]` in and out.

    Through `models.attention` (`implementation` is its choice): cuDNN takes
    the bias on GPU; the splash kernel cannot, so on TPU these calls run on XLA.
    """
    return attention(q, k, v, bias=bias, mask=mask, scale=1.0, implementation=implementation)


class T5Attention(nn.Module):
    """Self-attention; the block that owns a bias table computes `position_bias [1, H, L, L]`."""

    cfg: T5Config
    has_relative_attention_bias: bool
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None, position_bias: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        b, n, _ = x.shape
        inner = cfg.num_heads * cfg.d_kv
        dense = lambda width, name: nn.Dense(width, use_bias=False, dtype=self.dtype, name=name)
        q, k, v = (dense(inner, name)(x).reshape(b, n, cfg.num_heads, cfg.d_kv) for name in "qkv")
        if self.has_relative_attention_bias:
            position_bias = self.compute_bias(n)
        elif position_bias is None:
            raise ValueError("a T5 block without a bias table needs block 0's position_bias")
        out = _attention(q, k, v, position_bias, mask, self.attention)
        return dense(cfg.d_model, "o")(out.reshape(b, n, inner)), position_bias

    def compute_bias(self, length: int) -> jax.Array:
        cfg = self.cfg
        table = nn.Embed(
            cfg.relative_attention_num_buckets,
            cfg.num_heads,
            dtype=jnp.float32,
            name="relative_attention_bias",
        )
        # Buckets of every offset key - query in (-L, L), gathered into [L, L].
        offsets = np.arange(-(length - 1), length)
        by_offset = relative_position_buckets(
            offsets, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        )
        pos = jnp.arange(length)
        buckets = jnp.asarray(by_offset)[pos[None, :] - pos[:, None] + length - 1]
        return jnp.transpose(table(buckets), (2, 0, 1))[None]  # [1, H, L, L]


class T5SelfAttentionLayer(nn.Module):
    cfg: T5Config
    has_relative_attention_bias: bool
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, mask, position_bias):
        h = T5LayerNorm(self.cfg.layer_norm_epsilon, name="layer_norm")(x).astype(self.dtype)
        attn = T5Attention(
            self.cfg,
            self.has_relative_attention_bias,
            self.dtype,
            self.attention,
            name="SelfAttention",
        )
        out, position_bias = attn(h, mask, position_bias)
        return x + out.astype(jnp.float32), position_bias


class DenseReluDense(nn.Module):
    """The feed-forward projections (transformers' name, whatever the activation)."""

    cfg: T5Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        cfg = self.cfg
        dense = lambda width, name: nn.Dense(width, use_bias=False, dtype=self.dtype, name=name)
        act = activation(cfg.dense_act_fn)
        if cfg.is_gated:
            h = act(dense(cfg.d_ff, "wi_0")(h)) * dense(cfg.d_ff, "wi_1")(h)
        else:
            h = act(dense(cfg.d_ff, "wi")(h))
        return dense(cfg.d_model, "wo")(h)


class T5FeedForwardLayer(nn.Module):
    cfg: T5Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = T5LayerNorm(self.cfg.layer_norm_epsilon, name="layer_norm")(x).astype(self.dtype)
        out = DenseReluDense(self.cfg, self.dtype, name="DenseReluDense")(h)
        return x + out.astype(jnp.float32)


class T5Block(nn.Module):
    cfg: T5Config
    has_relative_attention_bias: bool
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, mask, position_bias):
        x, position_bias = T5SelfAttentionLayer(
            self.cfg, self.has_relative_attention_bias, self.dtype, self.attention, name="layer_0"
        )(x, mask, position_bias)
        return T5FeedForwardLayer(self.cfg, self.dtype, name="layer_1")(x), position_bias


class T5Stack(nn.Module):
    cfg: T5Config
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        position_bias = None
        for i in range(self.cfg.num_layers):
            own_bias = i == 0 or self.cfg.bias_every_layer
            block = T5Block(self.cfg, own_bias, self.dtype, self.attention, name=f"block_{i}")
            x, position_bias = block(x, mask, position_bias)
        return T5LayerNorm(self.cfg.layer_norm_epsilon, name="final_layer_norm")(x)


class T5EncoderModel(nn.Module):
    """transformers `T5EncoderModel` / `UMT5EncoderModel`.

    `input_ids [B, L]` int, optional `attention_mask [B, L]` (1 = token,
    0 = padding: padded keys are not attended to; padded positions still get
    outputs, as in transformers) -> `last_hidden_state [B, L, d_model]` float32.
    `attention` is the kernel (`models.attention`).
    """

    cfg: T5Config
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        embed = nn.Embed(self.cfg.vocab_size, self.cfg.d_model, dtype=self.dtype, name="shared")
        x = embed(input_ids).astype(jnp.float32)
        mask = None
        if attention_mask is not None:
            mask = jnp.asarray(attention_mask) > 0  # [B, L]: the keys to attend to
        return T5Stack(self.cfg, self.dtype, self.attention, name="encoder")(x, mask)


def example_inputs() -> tuple[jax.Array]:
    return (jnp.zeros((1, 1), jnp.int32),)


def t5_rename(keys) -> weights.Rename:
    """The encoder's tensors out of a T5 / UMT5 checkpoint.

    The token embedding is tied: a checkpoint holds `shared.weight`,
    `encoder.embed_tokens.weight` or both (then `shared` is read, once); the
    decoder and LM head of a full seq2seq checkpoint are skipped.
    """
    has_shared = "shared.weight" in keys

    def rename(key: str) -> str | None:
        if key.startswith(("decoder.", "lm_head.")):
            return None
        if key == "encoder.embed_tokens.weight":
            return None if has_shared else "shared.weight"
        return key

    return rename


def load_t5(
    folder: str,
    *,
    dtype: Any = jnp.float32,
    sharding_fn: weights.ShardingFn | None = None,
    variant: str | None = None,
    attention: str = "auto",
) -> tuple[T5EncoderModel, dict]:
    """A transformers T5 / UMT5 folder (config.json + safetensors) -> `(module, params)`.

    Tensors are cast to `dtype` and placed one by one on `sharding_fn(path,
    shape)` (paths as in the returned tree: `("encoder", "block_0", ...)`).
    `attention` is the module's kernel (`models.attention`).
    """
    raw = weights.read_json(os.path.join(folder, "config.json"))
    try:
        cfg = t5_config_from_dict(raw)
    except ValueError as err:
        raise WeightsError(f"{folder}/config.json: {err}") from None
    module = T5EncoderModel(cfg, dtype=dtype, attention=attention)
    expected = weights.expected_shapes(module, *example_inputs())
    with weights.open_tensors(folder, variant) as reader:
        params = weights.read_params(
            reader,
            expected,
            rename=t5_rename(reader),
            not_an_index=NOT_AN_INDEX,
            dtype=dtype,
            sharding_fn=sharding_fn,
        )
    return module, params
