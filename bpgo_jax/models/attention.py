"""One attention function for every model: cuDNN flash on GPU, Pallas splash on TPU, XLA else.

`attention(q, k, v, mask=, bias=, causal=, scale=, implementation=)` takes and
returns `[B, L, H, D]` (heads before head dim, as the projections produce
them) and is what the SD UNet, the CLIP towers and the DiTs call;
`implementation` is `config.model.attention`:

- "xla": `jax.nn.dot_product_attention(implementation="xla")`, softmax in
  float32; runs everywhere, and is what CPU runs and tests use.
- "cudnn": cuDNN flash attention through `jax.nn.dot_product_attention(
  implementation="cudnn")`, GPU only. It computes in bfloat16 (float32
  inputs are cast, the output cast back); head dims must be multiples of 8
  up to 128 (256 from Hopper on).
- "splash": the Pallas TPU splash-attention kernel, TPU only. Sequences are
  padded to its block size and head dims to a multiple of 128 (zeros: the
  scores and the kept outputs are unchanged); padded and masked keys are
  excluded through segment ids. Under a mesh context (`jax.set_mesh`) the
  kernel runs per batch shard in a `shard_map`; without one, GSPMD cannot
  partition it.
- "auto": cuDNN on GPU when the inputs are bfloat16/float16 and the head
  dim fits, splash on TPU, XLA otherwise.

A kernel asked for on a backend it does not run on is a `ConfigError`. A call
that an available kernel cannot take (cuDNN: head dim 512 of the SD VAE;
splash: a full `[B, H, Lq, Lk]` mask, or an additive `bias` such as T5's
relative positions) runs on XLA instead, logged once.
Every output is tagged `checkpoint_name(out, ATTENTION_OUT)`, which
`model.remat="names"` saves (see `models/scan.py`).
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from bpgo_jax.errors import ConfigError
from bpgo_jax.models.scan import ATTENTION_OUT, ATTENTION_RESIDUALS
from bpgo_jax.parallel.mesh import BATCH_AXES

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
_NEEDS = {"cudnn": "gpu", "splash": "tpu"}
_LANES = 128  # TPU vector lanes: splash's block and head-dim granularity
_MAX_BLOCK = 512  # splash block size for long sequences


def check_implementation(implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"model.attention={implementation!r} is not one of {IMPLEMENTATIONS}")


def resolve(implementation: str, backend: str | None = None, *, interpret: bool = False) -> str:
    """The kernel family (`xla`, `cudnn`, `splash`) that `implementation` means on `backend`.

    `backend` defaults to `jax.default_backend()`; `interpret=True` runs the
    splash kernel through the Pallas interpreter (any backend; tests).
    """
    check_implementation(implementation)
    backend = backend or jax.default_backend()
    if implementation == "auto":
        return {"gpu": "cudnn", "tpu": "splash"}.get(backend, "xla")
    need = _NEEDS.get(implementation)
    if need and backend != need and not (implementation == "splash" and interpret):
        raise ConfigError(
            f"model.attention={implementation!r} needs a {need.upper()}, but this run's "
            f"backend is {backend!r}: use 'auto' or 'xla'"
        )
    return implementation


@functools.cache
def _log_once(message: str) -> None:
    log.info(message)


def _cudnn_max_head_dim() -> int:
    capability = getattr(jax.devices()[0], "compute_capability", "0.0")
    major = int(str(capability).split(".")[0] or 0)
    return 256 if major >= 9 else 128


def _cudnn_reason(q: jax.Array, k: jax.Array, mask: jax.Array | None, bias) -> str | None:
    """Why cuDNN flash attention cannot take this call, or None."""
    d = q.shape[-1]
    if d % 8 or d > _cudnn_max_head_dim():
        return f"head dim {d} (cuDNN needs a multiple of 8 up to {_cudnn_max_head_dim()})"
    if (mask is not None or bias is not None) and (q.shape[1] % 2 or k.shape[1] % 2):
        return f"a mask or bias with odd sequence lengths {q.shape[1]}, {k.shape[1]}"
    return None


def _splash_reason(q: jax.Array, k: jax.Array, mask: jax.Array | None, bias) -> str | None:
    if bias is not None:
        return "an additive bias"
    if mask is not None and mask.ndim != 2:
        return f"a {mask.ndim}-D mask (splash takes key masks [B, Lk] and causal masks)"
    if k.shape[2] != q.shape[2]:
        return f"{k.shape[2]} key heads for {q.shape[2]} query heads"
    return None


def _key_mask_4d(mask: jax.Array | None) -> jax.Array | None:
    if mask is None or mask.ndim == 4:
        return mask
    return mask[:, None, None, :]


def _check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, mask, bias) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention takes [B, L, H, D] arrays, got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if bias is not None and bias.ndim != 4:
        raise ValueError(f"bias must be 4-D [B|1, H|1, Lq, Lk], got {bias.shape}")
    if mask is not None:
        if mask.dtype != jnp.bool_:
            raise ValueError(f"attention mask must be boolean (True = attend), got {mask.dtype}")
        if mask.ndim == 2 and mask.shape != (k.shape[0], k.shape[1]):
            raise ValueError(f"key mask {mask.shape} does not match keys [B, Lk] = {k.shape[:2]}")
        if mask.ndim not in (2, 4):
            raise ValueError(f"mask must be [B, Lk] or [B|1, H|1, Lq, Lk], got {mask.shape}")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    causal: bool = False,
    scale: float | None = None,
    implementation: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """Scaled dot-product attention `[B, Lq, H, D] x [B, Lk, H|Hk, D] -> [B, Lq, H, D]`.

    `mask` is boolean (True = attend): a key mask `[B, Lk]` or one that
    broadcasts to `[B, H, Lq, Lk]`; `bias` is added to the logits and
    broadcasts to `[B, H, Lq, Lk]` (4-D). `scale` defaults to `1/sqrt(D)`;
    T5 passes 1. The output has q's dtype. See the module docstring for
    `implementation`.
    """
    _check_inputs(q, k, v, mask, bias)
    kernel = resolve(implementation, interpret=interpret)
    half = q.dtype in (jnp.bfloat16, jnp.float16)
    if kernel == "cudnn" and implementation == "auto" and not half:
        kernel = "xla"  # auto keeps float32 models in float32
    reason = {"cudnn": _cudnn_reason, "splash": _splash_reason}.get(kernel, lambda *_: None)(
        q, k, mask, bias
    )
    if reason:
        _log_once(f"attention: {kernel} cannot take {reason}; this call runs on XLA")
        kernel = "xla"
    if kernel == "cudnn":
        out = _cudnn(q, k, v, mask, bias, causal, scale)
    elif kernel == "splash":
        out = _splash(q, k, v, mask, causal, scale, interpret)
    else:
        out = jax.nn.dot_product_attention(
            q,
            k,
            v,
            bias=bias,
            mask=_key_mask_4d(mask),
            is_causal=causal,
            scale=scale,
            implementation="xla",
        )
    return checkpoint_name(out, ATTENTION_OUT)


def _cudnn(q, k, v, mask, bias, causal: bool, scale: float | None) -> jax.Array:
    dtype = q.dtype
    compute = dtype if dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16

    def full(a):  # cuDNN takes masks and biases of the full [.., Lq, Lk] shape
        return None if a is None else jnp.broadcast_to(a, (*a.shape[:2], q.shape[1], k.shape[1]))

    out = jax.nn.dot_product_attention(
        q.astype(compute),
        k.astype(compute),
        v.astype(compute),
        bias=None if bias is None else full(bias).astype(compute),
        mask=full(_key_mask_4d(mask)),
        is_causal=causal,
        scale=scale,
        implementation="cudnn",
    )
    return out.astype(dtype)


# ---------------------------------------------------------------- splash (TPU)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def splash_block(length: int) -> int:
    """Splash block size for a sequence: the padded length up to 512, else 512."""
    return min(_MAX_BLOCK, _round_up(length, _LANES))


def _splash_kernel(heads: int, lq: int, lk: int, bq: int, bkv: int, causal: bool, interpret: bool):
    """A new kernel per trace: its mask tables are arrays of the trace that builds it."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    base = sa.CausalMask((lq, lk)) if causal else sa.FullMask((lq, lk))
    blocks = sa.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    return sa.make_splash_mha(
        sa.MultiHeadMask([base] * heads),
        block_sizes=blocks,
        head_shards=1,
        q_seq_shards=1,
        residual_checkpoint_name=ATTENTION_RESIDUALS,
        interpret=interpret,
    )


def _splash(q, k, v, mask, causal: bool, scale: float | None, interpret: bool) -> jax.Array:
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, lq, h, d = q.shape
    lk = k.shape[1]
    bq, bkv = splash_block(lq), splash_block(lk)
    lq_p, lk_p, d_p = _round_up(lq, bq), _round_up(lk, bkv), _round_up(d, _LANES)
    scale = 1.0 / math.sqrt(d) if scale is None else scale

    def heads_first(x: jax.Array, length: int) -> jax.Array:  # [B, L, H, D] -> [B, H, Lp, Dp]
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, d_p - d)))

    qh = heads_first((q * scale).astype(q.dtype), lq_p)
    kh, vh = heads_first(k, lk_p), heads_first(v, lk_p)
    segments = None
    if mask is not None or lk_p != lk:  # padded / masked keys get segment 1, queries 0
        valid = jnp.ones((b, lk), bool) if mask is None else mask
        valid = jnp.pad(valid, ((0, 0), (0, lk_p - lk)))
        segments = (jnp.zeros((b, lq_p), jnp.int32), (~valid).astype(jnp.int32))
    kernel = _splash_kernel(h, lq_p, lk_p, bq, bkv, causal, interpret)

    def run(qh, kh, vh, segments):
        if segments is None:
            return jax.vmap(kernel)(qh, kh, vh)
        ids = sa.SegmentIds(*segments)
        return jax.vmap(lambda q_, k_, v_, s: kernel(q_, k_, v_, segment_ids=s))(qh, kh, vh, ids)

    out = _per_batch_shard(run, b)(qh, kh, vh, segments)
    return jnp.swapaxes(out[:, :, :lq, :d], 1, 2).astype(q.dtype)


def _per_batch_shard(fn, batch: int):
    """`fn` under a `shard_map` over the context mesh's batch axes, when there is one.

    A Pallas kernel is opaque to GSPMD; per-shard calls keep each device on its
    own slice of the batch. Without a mesh context, or with a batch the batch
    axes do not divide, `fn` runs as is.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or batch % int(np.prod([mesh.shape[a] for a in axes])):
        return fn
    spec = P(axes)
    return jax.shard_map(fn, in_specs=(spec, spec, spec, spec), out_specs=spec, check_vma=False)
