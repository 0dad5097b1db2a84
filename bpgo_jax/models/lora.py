"""Low-rank adapters for any Flax linen parameter tree.

A LoRA tree mirrors the base tree but only at targeted kernels, where the
kernel leaf is replaced by `{"lora_a": [in, r], "lora_b": [r, out]}`. Targets
are regexes fully matched against '/'-joined paths (the same spelling as the
mesh sharding rules), e.g. `.*/attn[12]/to_(q|k|v|out_0)/kernel`. Dense
kernels `[in, out]`, 1x1 conv kernels `[1, 1, in, out]` and Flax attention
(DenseGeneral) kernels are eligible: query/key/value `[in, heads, head_dim]`
and the output projection `out` `[heads, head_dim, out]`, adapted as the
matrices `[in, heads*head_dim]` and `[heads*head_dim, out]`.
`B = 0` at init, so the merged model equals the base model exactly until the
first update; the base stays frozen and only the factors receive gradients.

Kernels of scanned stacks (a `stacked` path segment, e.g.
`transformer_blocks/stacked/attn/to_q/kernel` of shape `[layers, in, out]`,
see `models/scan.py`) are judged and adapted per layer: their factors carry
the same leading layer axes (`[layers, in, r]`, `[layers, r, out]`), so every
layer has its own adapter and the scan slices them with the kernels.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bpgo_jax.models.scan import num_layer_axes

Params = Any

# Attention projections of a diffusers-named UNet (what DDPO / Flow-GRPO adapt).
SD_ATTENTION_TARGETS = (r".*/attn[12]/(to_q|to_k|to_v|to_out_0)/kernel",)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...] = SD_ATTENTION_TARGETS


def spec_from_config(cfg: Mapping[str, Any] | None, default_targets: Sequence[str]):
    """`config.model.lora` = {rank, alpha (absent or 0: rank), targets (empty:
    `default_targets`)} -> LoraSpec, or None when absent or rank 0 (full fine-tuning)."""
    if not cfg or not cfg.get("rank", 0):
        return None
    targets = tuple(cfg.get("targets", None) or default_targets)
    return LoraSpec(int(cfg["rank"]), float(cfg.get("alpha", None) or cfg["rank"]), targets)


def _layer_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """A kernel's shape without the leading layer axes of a stacked path."""
    return tuple(shape)[num_layer_axes(path) :]


def _eligible(path: tuple[str, ...], leaf: Any) -> bool:
    shape = _layer_shape(path, tuple(np.shape(leaf)))
    return path[-1] == "kernel" and (
        len(shape) in (2, 3) or (len(shape) == 4 and shape[:2] == (1, 1))
    )


def _in_out(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, int]:
    """The kernel as a matrix: 3-D attention kernels contract over their head axes."""
    if len(shape) == 3:
        if len(path) > 1 and path[-2] == "out":
            return shape[0] * shape[1], shape[2]
        return shape[0], shape[1] * shape[2]
    return shape[-2], shape[-1]


def target_paths(base_params: Params, targets: Sequence[str]) -> list[tuple[str, ...]]:
    """Eligible kernel paths matched by `targets`; a regex matching none is an error."""
    if not targets:
        raise ValueError("LoRA targets is empty")
    flat = traverse_util.flatten_dict(base_params)
    chosen: set[tuple[str, ...]] = set()
    for pattern in targets:
        regex = re.compile(pattern)
        hits = [
            p for p, leaf in flat.items() if _eligible(p, leaf) and regex.fullmatch("/".join(p))
        ]
        if not hits:
            raise ValueError(
                f"LoRA target {pattern!r} matches no Dense, attention or 1x1-conv kernel path "
                f"(paths look like {'/'.join(next(iter(flat)))!r})"
            )
        chosen.update(hits)
    return sorted(chosen)


def init_lora(
    base_params: Params, *, rank: int, alpha: float, targets: Sequence[str], rng: jax.Array
) -> Params:
    """Factors for every targeted kernel: `A ~ N(0, 1/rank^2)`, `B = 0` (float32).

    `alpha` is accepted so init and merge read the same config; the factors
    themselves do not depend on it (the scale `alpha/rank` is applied in `merge`).
    """
    if rank < 1:
        raise ValueError(f"LoRA rank={rank} must be >= 1")
    if alpha <= 0:
        raise ValueError(f"LoRA alpha={alpha} must be > 0")
    flat = traverse_util.flatten_dict(base_params)
    out: dict[tuple[str, ...], jax.Array] = {}
    for i, path in enumerate(target_paths(base_params, targets)):
        shape = tuple(np.shape(flat[path]))
        lead = shape[: num_layer_axes(path)]
        d_in, d_out = _in_out(path, _layer_shape(path, shape))
        key = jax.random.fold_in(rng, i)
        out[(*path, "lora_a")] = jax.random.normal(key, (*lead, d_in, rank), jnp.float32) / rank
        out[(*path, "lora_b")] = jnp.zeros((*lead, rank, d_out), jnp.float32)
    return traverse_util.unflatten_dict(out)


def split_params(
    base: Params, frozen: Params, spec: LoraSpec | None, rng: jax.Array, *, key: str = "unet"
) -> tuple[Params, Params]:
    """`(trainable, frozen)`: `base` (the denoiser's weights, stored under `key`: "unet" or
    "transformer") is trainable, or LoRA factors over it frozen."""
    if spec is None:
        return {key: base}, dict(frozen)
    factors = init_lora(base, rank=spec.rank, alpha=spec.alpha, targets=spec.targets, rng=rng)
    return {"lora": factors}, {**frozen, key: base}


def unet_params(
    trainable: Params, frozen: Params, spec: LoraSpec | None, *, key: str = "unet"
) -> Params:
    """The denoiser weights to run: `trainable[key]`, or the LoRA-merged `frozen[key]`."""
    if spec is None:
        return trainable[key]
    merged = merge(frozen[key], trainable["lora"], alpha=spec.alpha, rank=spec.rank)
    # Materialise the merged kernels: left fusible, XLA folds the merge into
    # the consuming convs/matmuls differently in the rollout (forward only)
    # and in the update (forward + backward), and the on-policy ratio drifts
    # from 1 by float rounding.
    return jax.lax.optimization_barrier(merged)


def merge(base_params: Params, lora_params: Params, *, alpha: float, rank: int) -> Params:
    """`W + (alpha / rank) * A @ B` at every adapted kernel (jittable, keeps W's dtype)."""
    scale = alpha / rank
    flat = dict(traverse_util.flatten_dict(base_params))
    factors = traverse_util.flatten_dict(lora_params)
    for path in sorted({p[:-1] for p in factors}):
        if path not in flat:
            raise ValueError(f"LoRA factor for {'/'.join(path)} has no base kernel")
        w = flat[path]
        a, b = factors[(*path, "lora_a")], factors[(*path, "lora_b")]
        # Batched over a stacked kernel's layer axes.
        delta = (scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))).reshape(w.shape)
        flat[path] = (w.astype(jnp.float32) + delta).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def num_params(lora_params: Params) -> int:
    """Number of trainable LoRA scalars."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(lora_params)))
