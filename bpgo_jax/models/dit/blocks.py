"""The attention and feed-forward layers of the flow DiTs, with diffusers' parameter names.

`Attention` covers every attention of FLUX, SD3 / SD3.5 and Wan:

- self-attention: `attn(x, rope=...)` (FLUX single-stream with
  `out_dim=None`: no output projection; SD3.5's `attn2`; Wan's `attn1`);
- joint attention (`joint=True`): `attn(x, context, rope=...)` projects the
  context with `add_{q,k,v}_proj` (norms `norm_added_{q,k}`) and attends over
  the concatenation, `[context; x]` (FLUX, `context_first=True`) or `[x;
  context]` (SD3); returns `(x_out, context_out)`, `context_out` through
  `to_add_out`, or None where `context_out_dim=None` (SD3's last block,
  `context_pre_only`);
- cross-attention: `attn(x, context)` (Wan's `attn2`: keys and values from
  the context through `to_k` / `to_v`), plus Wan2.1 I2V's image branch:
  `attn(x, text, image_context=image)` adds a second attention over
  `add_{k,v}_proj(image)` (norm `norm_added_k`) before `to_out_0`.

Rotary tables `rope=(cos, sin)` (`dit.rope`) rotate queries and keys after
their norms, over the whole (joint) sequence. The kernel is
`models.attention.attention` with the module's `attention` choice.

Under a mesh with a `context` axis (sequence parallelism) the tokens of both
layers are split over it (`parallel.mesh.shard_tokens`): each shard's queries
attend to the keys and values gathered whole over it, the exact attention;
without one nothing changes.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bpgo_jax.models.attention import attention
from bpgo_jax.models.dit.norms import QKNorm
from bpgo_jax.models.dit.rope import apply_rope
from bpgo_jax.models.layers import activation
from bpgo_jax.parallel.mesh import gather_tokens, shard_tokens

Dtype = Any
Rope = tuple[jax.Array, jax.Array] | None


class GELU(nn.Module):
    """diffusers `GELU`: `proj`, then exact ("gelu") or tanh ("gelu-approximate") GELU."""

    features: int
    activation_fn: str = "gelu-approximate"
    bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.activation_fn not in ("gelu", "gelu-approximate"):
            raise ValueError(
                f"activation_fn={self.activation_fn!r} is not 'gelu' or 'gelu-approximate'"
            )
        h = nn.Dense(self.features, use_bias=self.bias, dtype=self.dtype, name="proj")(x)
        return activation(self.activation_fn)(h)


class FeedForward(nn.Module):
    """diffusers `FeedForward` with a GELU projection: `net_0/proj`, GELU, `net_2`.

    `activation_fn` "gelu-approximate" (FLUX, SD3, Wan) or "gelu"; `inner_dim`
    defaults to 4 x the input width, `dim_out` to the input width.
    """

    dim_out: int | None = None
    inner_dim: int | None = None
    activation_fn: str = "gelu-approximate"
    bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inner = self.inner_dim or 4 * x.shape[-1]
        h = GELU(inner, self.activation_fn, self.bias, self.dtype, name="net_0")(shard_tokens(x))
        width = self.dim_out or x.shape[-1]
        out = nn.Dense(width, use_bias=self.bias, dtype=self.dtype, name="net_2")(h)
        return shard_tokens(out)


class Attention(nn.Module):
    """Multi-head attention of the DiTs on `[B, L, C]` tokens (see the module docstring).

    `out_dim`: width of `to_out_0` (None: no output projection, the heads'
    `[B, L, heads * dim_head]` are returned). `qk_norm`: a `dit.norms.QK_NORMS`
    kind or None. `bias` / `out_bias` / `added_bias`: biases of `to_{q,k,v}`,
    of the output projections, of `add_*_proj`.
    """

    heads: int
    dim_head: int
    out_dim: int | None
    qk_norm: str | None = "rms_norm"
    eps: float = 1e-6
    bias: bool = True
    out_bias: bool = True
    joint: bool = False
    context_first: bool = True
    context_out_dim: int | None = None
    added_bias: bool = True
    attention: str = "auto"
    dtype: Dtype = jnp.float32

    def _norm(self, name: str, x: jax.Array) -> jax.Array:
        if self.qk_norm is None:
            return x
        return QKNorm(self.qk_norm, self.eps, dtype=self.dtype, name=name)(x)

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.heads, self.dim_head)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        *,
        rope: Rope = None,
        mask: jax.Array | None = None,
        image_context: jax.Array | None = None,
    ):
        inner = self.heads * self.dim_head
        dense = functools.partial(nn.Dense, inner, use_bias=self.bias, dtype=self.dtype)
        added = functools.partial(nn.Dense, inner, use_bias=self.added_bias, dtype=self.dtype)
        attend = functools.partial(attention, mask=mask, implementation=self.attention)
        cross = context is not None and not self.joint
        if cross and rope is not None:
            raise ValueError("rotary tables apply to self / joint attention, not cross-attention")
        if self.joint and context is None:
            raise ValueError("joint attention needs a context")
        if image_context is not None and not cross:
            raise ValueError("image_context is the image branch of a cross-attention")
        x = shard_tokens(x)
        kv_in = context if cross else x
        q = self._norm("norm_q", self._heads(dense(name="to_q")(x)))
        k = self._norm("norm_k", self._heads(dense(name="to_k")(kv_in)))
        v = self._heads(dense(name="to_v")(kv_in))
        n_ctx = 0
        if self.joint:
            cq = self._norm("norm_added_q", self._heads(added(name="add_q_proj")(context)))
            ck = self._norm("norm_added_k", self._heads(added(name="add_k_proj")(context)))
            cv = self._heads(added(name="add_v_proj")(context))
            n_ctx = context.shape[1]
            join = lambda a, c: jnp.concatenate([c, a] if self.context_first else [a, c], axis=1)
            q, k, v = join(q, cq), join(k, ck), join(v, cv)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # Local queries, keys and values whole: exact attention over a split sequence.
        q, k, v = shard_tokens(q), gather_tokens(k), gather_tokens(v)
        out = attend(q, k, v).astype(x.dtype)
        if image_context is not None:
            ik = self._norm("norm_added_k", self._heads(added(name="add_k_proj")(image_context)))
            iv = self._heads(added(name="add_v_proj")(image_context))
            ik, iv = gather_tokens(ik), gather_tokens(iv)
            out = out + attention(q, ik, iv, implementation=self.attention).astype(x.dtype)
        out = shard_tokens(out.reshape(*out.shape[:2], inner))
        if self.joint:
            if self.context_first:
                ctx_out, out = out[:, :n_ctx], out[:, n_ctx:]
            else:
                out, ctx_out = out[:, : x.shape[1]], out[:, x.shape[1] :]
        if self.out_dim is not None:
            out = nn.Dense(self.out_dim, use_bias=self.out_bias, dtype=self.dtype, name="to_out_0")(
                out
            )
        if not self.joint:
            return out
        if self.context_out_dim is None:
            return out, None
        ctx = nn.Dense(
            self.context_out_dim, use_bias=self.out_bias, dtype=self.dtype, name="to_add_out"
        )(ctx_out)
        return out, ctx
