"""Norms and adaptive modulation of the flow DiTs (FLUX, SD3 / SD3.5, Wan), as diffusers has them.

Statistics are computed in float32 whatever the compute dtype; outputs are
cast to the module's `dtype`. Parameter names follow diffusers (`linear`,
`norm/scale` for a torch `norm.weight`), so checkpoints load by the generic
rename of `models/weights.py`. Chunk orders matter and differ by module:

- `AdaLayerNormZero` (FLUX / SD3 double blocks): (shift, scale, gate) for
  attention, then (shift, scale, gate) for the MLP.
- `AdaLayerNormZeroSingle` (FLUX single blocks): (shift, scale, gate).
- `AdaLayerNormContinuous` (FLUX / SD3 `norm_out`, SD3's last context norm):
  (scale, shift), the reverse.
- `SD35AdaLayerNormZeroX` (SD3.5 dual attention): the six of AdaLN-Zero,
  then (shift, scale, gate) of the second attention.
- Wan's learned tables (`scale_shift_table` + projected time embedding):
  (shift, scale, gate, c_shift, c_scale, c_gate) in its blocks, (shift,
  scale) at the output; see `table_modulation`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
QK_NORMS = (None, "rms_norm", "layer_norm", "rms_norm_across_heads", "layer_norm_across_heads")


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """`x / sqrt(mean(x^2) + eps)` over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def layer_normalize(x: jax.Array, eps: float) -> jax.Array:
    """Zero mean, unit variance over the last axis (two-pass variance), in float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(var + eps)


def _ones(key, shape, dtype=jnp.float32):
    return jnp.ones(shape, dtype)


def _affine(module: nn.Module, y: jax.Array, use_scale: bool, use_bias: bool) -> jax.Array:
    """`y * scale (+ bias)` with the parameters created on `module` (torch's weight / bias)."""
    d = y.shape[-1]
    if use_scale:
        y = y * module.param("scale", _ones, (d,)).astype(jnp.float32)
    if use_bias:
        y = y + module.param("bias", nn.initializers.zeros, (d,)).astype(jnp.float32)
    return y


class RMSNorm(nn.Module):
    """diffusers `RMSNorm` / `torch.nn.RMSNorm` over the last axis; `scale` is torch's `weight`."""

    eps: float = 1e-6
    use_scale: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _affine(self, rms_normalize(x, self.eps), self.use_scale, False).astype(self.dtype)


class LayerNorm(nn.Module):
    """`torch.nn.LayerNorm(dim, eps, elementwise_affine, bias)` over the last axis.

    Without `affine` it has no parameters (the DiTs' modulated norms).
    """

    eps: float = 1e-6
    affine: bool = False
    bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = _affine(self, layer_normalize(x, self.eps), self.affine, self.affine and self.bias)
        return y.astype(self.dtype)


class QKNorm(nn.Module):
    """A query / key norm (diffusers `qk_norm`) on `[B, L, H, D]` heads.

    `kind`: "rms_norm" / "layer_norm" normalise each head over D (parameters
    `[D]`: FLUX, SD3.5); "rms_norm_across_heads" / "layer_norm_across_heads"
    normalise over all H * D channels at once (parameters `[H * D]`: Wan).
    The attention names them `norm_q`, `norm_k`, `norm_added_q`, `norm_added_k`.
    """

    kind: str
    eps: float = 1e-6
    affine: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind not in QK_NORMS[1:]:
            raise ValueError(f"qk_norm={self.kind!r} is not one of {QK_NORMS}")
        shape = x.shape
        if self.kind.endswith("_across_heads"):
            x = x.reshape(*shape[:-2], shape[-2] * shape[-1])
        if self.kind.startswith("rms_norm"):
            y = _affine(self, rms_normalize(x, self.eps), self.affine, False)
        else:
            y = _affine(self, layer_normalize(x, self.eps), self.affine, self.affine)
        return y.astype(self.dtype).reshape(shape)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """`x * (1 + scale) + shift`; `[B, D]` shifts / scales broadcast over the tokens of `x`."""
    if shift.ndim == x.ndim - 1:
        shift, scale = shift[:, None], scale[:, None]
    return x * (1 + scale) + shift


def _chunks(emb: jax.Array, n: int) -> list[jax.Array]:
    return jnp.split(emb, n, axis=-1)


class AdaLayerNormZero(nn.Module):
    """diffusers `AdaLayerNormZero`.

    `(x, emb) -> (modulated x, gate_msa, shift_mlp, scale_mlp, gate_mlp)`.
    """

    eps: float = 1e-6
    bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array):
        d = x.shape[-1]
        emb = nn.Dense(6 * d, use_bias=self.bias, dtype=self.dtype, name="linear")(nn.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _chunks(emb, 6)
        x = modulate(LayerNorm(self.eps, dtype=self.dtype)(x), shift_msa, scale_msa)
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroSingle(nn.Module):
    """diffusers `AdaLayerNormZeroSingle`: `(x, emb) -> (modulated x, gate)`."""

    eps: float = 1e-6
    bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array):
        d = x.shape[-1]
        emb = nn.Dense(3 * d, use_bias=self.bias, dtype=self.dtype, name="linear")(nn.silu(emb))
        shift, scale, gate = _chunks(emb, 3)
        return modulate(LayerNorm(self.eps, dtype=self.dtype)(x), shift, scale), gate


class SD35AdaLayerNormZeroX(nn.Module):
    """diffusers `SD35AdaLayerNormZeroX` (SD3.5's dual-attention blocks).

    `(x, emb) -> (x for attn, gate_msa, shift_mlp, scale_mlp, gate_mlp, x for attn2, gate_msa2)`:
    both attention inputs modulate the same normalised `x`.
    """

    eps: float = 1e-6
    bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array):
        d = x.shape[-1]
        emb = nn.Dense(9 * d, use_bias=self.bias, dtype=self.dtype, name="linear")(nn.silu(emb))
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift2, scale2, gate2) = (
            _chunks(emb, 9)
        )
        normed = LayerNorm(self.eps, dtype=self.dtype)(x)
        return (
            modulate(normed, shift_msa, scale_msa),
            gate_msa,
            shift_mlp,
            scale_mlp,
            gate_mlp,
            modulate(normed, shift2, scale2),
            gate2,
        )


class AdaLayerNormContinuous(nn.Module):
    """diffusers `AdaLayerNormContinuous`: `linear(silu(cond))` chunked as **(scale, shift)**.

    `norm_type` "layer_norm" or "rms_norm"; with `affine` the norm has its own
    parameters under `norm` (FLUX and SD3 use `affine=False`, eps 1e-6).
    """

    eps: float = 1e-5
    affine: bool = True
    bias: bool = True
    norm_type: str = "layer_norm"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        d = x.shape[-1]
        emb = nn.Dense(2 * d, use_bias=self.bias, dtype=self.dtype, name="linear")(
            nn.silu(cond).astype(self.dtype)
        )
        scale, shift = _chunks(emb, 2)
        if self.norm_type == "layer_norm":
            norm = LayerNorm(self.eps, self.affine, self.bias, self.dtype, name="norm")
        elif self.norm_type == "rms_norm":
            norm = RMSNorm(self.eps, self.affine, self.dtype, name="norm")
        else:
            raise ValueError(f"norm_type={self.norm_type!r} is not 'layer_norm' or 'rms_norm'")
        return modulate(norm(x), shift, scale)


def table_modulation(table: jax.Array, emb: jax.Array) -> list[jax.Array]:
    """Wan's modulation: `(table + emb)` split into its `n` rows, in float32.

    `table` is a block's learned `scale_shift_table` `[1, n, D]`; `emb` the
    projected time embedding `[B, n, D]` (one timestep per sample) or
    `[B, L, n, D]` (per-token timesteps, Wan2.2 TI2V). Returns `n` arrays of
    `[B, 1, D]` or `[B, L, D]`, ready for `modulate` against `[B, L, D]` tokens.
    """
    n = table.shape[-2]
    if emb.ndim == 4:
        rows = table.astype(jnp.float32)[None] + emb.astype(jnp.float32)
        return [r[..., 0, :] for r in jnp.split(rows, n, axis=-2)]
    rows = table.astype(jnp.float32) + emb.astype(jnp.float32)
    return jnp.split(rows, n, axis=-2)


def scale_shift_table_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Wan's `torch.randn(1, n, dim) / dim**0.5`."""
    return jax.random.normal(key, shape, dtype) / jnp.sqrt(shape[-1]).astype(dtype)
