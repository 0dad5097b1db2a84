"""One attention function for every model: cuDNN flash on GPU, Pallas splash on TPU, blocked
XLA on CPU.

`attention(q, k, v, mask=, bias=, causal=, scale=, implementation=)` takes and
returns `[B, L, H, D]` (heads before head dim, as the projections produce
them) and is what the SD UNet, the CLIP towers and the DiTs call;
`implementation` is `config.model.attention`:

- "xla": `jax.nn.dot_product_attention(implementation="xla")`, softmax in
  float32; runs everywhere.
- "blocked": the same arithmetic (logits and softmax in float32) in a loop
  over groups of heads whose logits fit in `BLOCK_LOGITS` floats, so that
  each group's softmax stays in the CPU's caches, with a flash-style
  backward: only the logsumexp is kept, the probabilities are recomputed,
  and every matrix product is laid out as XLA:CPU's fast kernels take it
  (transposed-left products run on a slow generic loop there): faster than
  "xla" on CPU forward and backward, and it never holds the whole softmax
  (docs/performance.md). An additive `bias` runs on "xla".
- "cudnn": cuDNN flash attention through `jax.nn.dot_product_attention(
  implementation="cudnn")`, GPU only. It computes in bfloat16 (float32
  inputs are cast, the output cast back); head dims must be multiples of 8
  up to 128 (256 from Hopper on).
- "splash": the Pallas TPU splash-attention kernel, TPU only. Sequences are
  padded to its block size and head dims to a multiple of 128 (zeros: the
  scores and the kept outputs are unchanged); padded and masked keys are
  excluded through segment ids. GSPMD cannot partition the kernel: under a
  mesh context (`jax.set_mesh`, `parallel.mesh.on_mesh`) it runs in a
  `shard_map` over the batch, the queries over a `context` axis (keys and
  values gathered) and the heads (`splash_layout`); traced without a mesh it
  compiles for one device only.
- "auto": cuDNN on GPU when the inputs are bfloat16/float16 and the head
  dim fits (XLA otherwise), splash on TPU, blocked on CPU.

A kernel asked for on a backend it does not run on is a `ConfigError`. A call
that an available kernel cannot take (cuDNN: head dim 512 of the SD VAE;
splash: a full `[B, H, Lq, Lk]` mask, or an additive `bias` such as T5's
relative positions; blocked: a `bias`) runs on XLA instead, logged once.
Every output is tagged `checkpoint_name(out, ATTENTION_OUT)`, which
`model.remat="names"` saves (see `models/scan.py`).
"""

from __future__ import annotations

import dataclasses
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
from bpgo_jax.parallel import mesh as mesh_lib

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "xla", "blocked", "cudnn", "splash")
_NEEDS = {"cudnn": "gpu", "splash": "tpu"}
_LANES = 128  # TPU vector lanes: splash's block and head-dim granularity
_MAX_BLOCK = 512  # splash block size for long sequences
# Logits per block of the "blocked" kernel (4 MB of float32; the block-size measurement
# is in docs/performance.md).
BLOCK_LOGITS = 2**20


def check_implementation(implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"model.attention={implementation!r} is not one of {IMPLEMENTATIONS}")


def resolve(implementation: str, backend: str | None = None, *, interpret: bool = False) -> str:
    """The kernel (`xla`, `blocked`, `cudnn`, `splash`) that `implementation` means on `backend`.

    `backend` defaults to `jax.default_backend()`; `interpret=True` runs the
    splash kernel through the Pallas interpreter (any backend; tests).
    """
    check_implementation(implementation)
    backend = backend or jax.default_backend()
    if implementation == "auto":
        return {"gpu": "cudnn", "tpu": "splash", "cpu": "blocked"}.get(backend, "xla")
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


def _blocked_reason(q: jax.Array, k: jax.Array, mask: jax.Array | None, bias) -> str | None:
    return "an additive bias" if bias is not None else None


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
    reasons = {"cudnn": _cudnn_reason, "splash": _splash_reason, "blocked": _blocked_reason}
    reason = reasons.get(kernel, lambda *_: None)(q, k, mask, bias)
    if reason:
        _log_once(f"attention: {kernel} cannot take {reason}; this call runs on XLA")
        kernel = "xla"
    if kernel == "cudnn":
        out = _cudnn(q, k, v, mask, bias, causal, scale)
    elif kernel == "splash":
        out = _splash(q, k, v, mask, causal, scale, interpret)
    elif kernel == "blocked":
        out = blocked(q, k, v, mask=_key_mask_4d(mask), causal=causal, scale=scale)
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


# ---------------------------------------------------------------- blocked (CPU)


def heads_per_block(batch: int, heads: int, lq: int, lk: int, budget: int = BLOCK_LOGITS) -> int:
    """The most heads (a divisor of `heads`, at least 1) whose logits for the whole batch fit
    in `budget` floats."""
    fits = [g for g in range(1, heads + 1) if heads % g == 0 and batch * g * lq * lk <= budget]
    return max(fits, default=1)


def _masked(logits: jax.Array, keep: jax.Array | None) -> jax.Array:
    """`jax.nn.dot_product_attention`'s masking: dropped logits become a large negative."""
    if keep is None:
        return logits
    return jnp.where(keep, logits, -0.7 * float(jnp.finfo(logits.dtype).max))


def _block_forward(q, k, v, keep, scale: float):
    """One block, `[B, G, L, D]` layouts: output and the logsumexp of each query's logits.

    The scale goes onto the queries and the normalisation onto the outputs, both far
    smaller than the logits: two passes over the largest array fewer."""
    q = q * jnp.asarray(scale, q.dtype)
    logits = _masked(jnp.einsum("bgtd,bgsd->bgts", q, k, preferred_element_type=jnp.float32), keep)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    unnormalized = jnp.exp(logits - peak)
    total = jnp.sum(unnormalized, axis=-1, keepdims=True)
    out = jnp.einsum(
        "bgts,bgsd->bgtd", unnormalized.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return (out / total).astype(v.dtype), (peak + jnp.log(total))[..., 0]


def _block_backward(q, k, v, keep, out, lse, d_out, scale: float):
    """The flash backward of one block, in the key-major layout `[B, G, Lk, Lq]` so that every
    product but the last contracts the right operand's last or first axis as XLA:CPU's
    fast kernels want; the last needs one explicit transpose, kept as one by a barrier
    (XLA would otherwise fold it back into a slow transposed-left product)."""
    f32 = jnp.float32
    q_scaled = q * jnp.asarray(scale, q.dtype)
    keep_t = None if keep is None else jnp.swapaxes(keep, -1, -2)
    logits_t = jnp.einsum("bgsd,bgtd->bgst", k, q_scaled, preferred_element_type=f32)
    probs_t = jnp.exp(_masked(logits_t, keep_t) - lse[:, :, None, :])
    d_v = jnp.einsum("bgst,bgtd->bgsd", probs_t.astype(d_out.dtype), d_out)
    d_probs_t = jnp.einsum("bgsd,bgtd->bgst", v, d_out, preferred_element_type=f32)
    delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1)  # [B, G, Lq]
    d_logits_t = probs_t * (d_probs_t - delta[:, :, None, :])
    if keep_t is not None:
        d_logits_t = jnp.where(keep_t, d_logits_t, 0.0)
    d_k = jnp.einsum("bgst,bgtd->bgsd", d_logits_t.astype(q.dtype), q_scaled)
    d_logits = jax.lax.optimization_barrier(jnp.swapaxes(d_logits_t, -1, -2))
    d_q = jnp.einsum("bgts,bgsd->bgtd", d_logits.astype(k.dtype), k, preferred_element_type=f32)
    return (d_q * scale).astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)


def blocked(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    causal: bool = False,
    scale: float | None = None,
    budget: int = BLOCK_LOGITS,
) -> jax.Array:
    """The "blocked" kernel: `[B, L, H, D]` in and out; `mask` boolean and broadcasting to
    `[B, H, Lq, Lk]` (True = attend). Heads go in blocks of `heads_per_block` through a
    `lax.map` (one block: no loop); the batch stays whole in each block, so a
    batch-sharded call stays sharded."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    if k.shape[2] != h:  # grouped-query attention: each key head serves h // hk query heads
        k, v = (jnp.repeat(a, h // k.shape[2], axis=2) for a in (k, v))
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    group = heads_per_block(b, h, lq, lk, budget)
    blocks = h // group
    keep = mask
    if causal:
        lower = jnp.tril(jnp.ones((lq, lk), bool))
        keep = lower[None, None] if keep is None else keep & lower
    mapped_keep = keep is not None and keep.shape[1] == h and blocks > 1

    def to_blocks(x: jax.Array) -> jax.Array:  # [B, L, H, D] -> [blocks, B, group, L, D]
        x = x.reshape(x.shape[0], x.shape[1], blocks, group, x.shape[3])
        return x.transpose(2, 0, 3, 1, 4)

    def keep_blocks(m: jax.Array) -> jax.Array:  # [B|1, H, Lq|1, Lk] -> [blocks, B|1, group, ..]
        return m.reshape(m.shape[0], blocks, group, *m.shape[2:]).swapaxes(0, 1)

    def over_blocks(fn, keep, *xs):
        """`fn(*block_xs, keep)` on every block of `xs` (`[blocks, ...]` each), outputs
        stacked the same way; the keep mask is mapped with the heads or shared."""
        if blocks == 1:
            return jax.tree.map(lambda x: x[None], fn(*(x[0] for x in xs), keep))
        if mapped_keep:
            return jax.lax.map(lambda a: fn(*a[:-1], a[-1]), (*xs, keep_blocks(keep)))
        return jax.lax.map(lambda a: fn(*a, keep), xs)

    def forward(q_, k_, v_, keep_):
        return _block_forward(q_, k_, v_, keep_, scale)

    @jax.custom_vjp
    def run(qb, kb, vb, keep):
        return over_blocks(forward, keep, qb, kb, vb)[0]

    def run_forward(qb, kb, vb, keep):
        out, lse = over_blocks(forward, keep, qb, kb, vb)
        out = checkpoint_name(out, ATTENTION_OUT)
        return out, (qb, kb, vb, keep, out, checkpoint_name(lse, ATTENTION_RESIDUALS))

    def run_backward(residuals, d_out):
        qb, kb, vb, keep, out, lse = residuals

        def backward(q_, k_, v_, out_, lse_, d_out_, keep_):
            return _block_backward(q_, k_, v_, keep_, out_, lse_, d_out_, scale)

        return (*over_blocks(backward, keep, qb, kb, vb, out, lse, d_out), None)

    run.defvjp(run_forward, run_backward)
    out = run(to_blocks(q), to_blocks(k), to_blocks(v), keep)  # [blocks, B, group, Lq, D]
    return out.transpose(1, 3, 0, 2, 4).reshape(b, lq, h, d)


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


@dataclasses.dataclass(frozen=True)
class SplashLayout:
    """How a splash call is split over the context mesh: the mesh axes of its batch, of its
    heads and of its queries' sequence (`seq`: keys and values are then gathered whole
    on each of its shards). Axes in none of them compute the whole call on each device."""

    batch: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    seq: str | None = None

    def shards(self, axes: tuple[str, ...]) -> int:
        mesh = jax.sharding.get_abstract_mesh()
        return int(np.prod([mesh.shape[a] for a in axes]))

    def spec(self, *, queries: bool) -> P:
        """The `[B, H, L, D]` spec of queries / outputs (`queries`) or of keys and values."""
        return P(self.batch or None, self.heads or None, self.seq if queries else None, None)


def splash_layout(batch: int, heads: int, lq: int, causal: bool) -> SplashLayout | None:
    """The split of a splash call under the context mesh, or None without a mesh of several
    devices (the kernel then runs as is).

    A Pallas kernel is opaque to GSPMD, which cannot partition it, so every call
    runs in a `shard_map`. The batch goes over the batch axes whose running
    product divides it (`mesh.dividing_batch_axes`); the queries over `context`
    when the mesh has it, the call is not causal (a shard's mask would depend on
    its offset) and each shard gets at least one 128-query block; the heads over
    the remaining axes whose running product divides them. A call whose batch
    the batch axes do not divide (classifier-free guidance's negative prompt, an
    evaluation of one prompt, a VAE decode) is thus split over its heads, which
    costs no communication for inputs already replicated and spreads the work;
    axes left over (heads that do not divide) compute the call on each device.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    batch_axes = mesh_lib.dividing_batch_axes(batch, mesh)
    ctx = mesh_lib.context_size(mesh)
    seq = mesh_lib.CONTEXT_AXIS if ctx > 1 and not causal and lq >= ctx * _LANES else None
    head_axes, product = [], 1
    for axis in mesh.axis_names:
        size = mesh.shape[axis]
        if size > 1 and axis not in batch_axes and axis != seq and heads % (product * size) == 0:
            head_axes.append(axis)
            product *= size
    return SplashLayout(batch_axes, tuple(head_axes), seq)


def _splash(q, k, v, mask, causal: bool, scale: float | None, interpret: bool) -> jax.Array:
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, lq, h, d = q.shape
    lk = k.shape[1]
    layout = splash_layout(b, h, lq, causal)
    seq_shards = layout.shards((layout.seq,)) if layout and layout.seq else 1
    heads = h // layout.shards(layout.heads) if layout else h
    # Queries split over `context` are padded so that each shard holds whole blocks.
    bq, bkv = splash_block(-(-lq // seq_shards)), splash_block(lk)
    lq_p, lk_p, d_p = _round_up(lq, bq * seq_shards), _round_up(lk, bkv), _round_up(d, _LANES)
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

    def run(qh, kh, vh, segments):
        # Built in the trace of its shard: its mask tables are arrays of that trace.
        kernel = _splash_kernel(heads, qh.shape[2], lk_p, bq, bkv, causal, interpret)
        if segments is None:
            return jax.vmap(kernel)(qh, kh, vh)
        ids = sa.SegmentIds(*segments)
        return jax.vmap(lambda q_, k_, v_, s: kernel(q_, k_, v_, segment_ids=s))(qh, kh, vh, ids)

    if layout is not None:
        q_spec, kv_spec = layout.spec(queries=True), layout.spec(queries=False)
        segment_specs = (P(q_spec[0], q_spec[2]), P(kv_spec[0], None))  # [B, L] ids
        run = jax.shard_map(
            run,
            in_specs=(q_spec, kv_spec, kv_spec, segment_specs if segments is not None else None),
            out_specs=q_spec,
            check_vma=False,
        )
    out = run(qh, kh, vh, segments)
    return jnp.swapaxes(out[:, :, :lq, :d], 1, 2).astype(q.dtype)
