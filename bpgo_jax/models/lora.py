"""Low-rank adapters for any Flax linen parameter tree.

A LoRA tree mirrors the base tree but only at targeted kernels, where the
kernel leaf is replaced by `{"lora_a": [in, r], "lora_b": [r, out]}`. Targets
are regexes fully matched against '/'-joined paths (the same spelling as the
mesh sharding rules), e.g. `.*/attn[12]/to_(q|k|v|out_0)/kernel`. Dense
kernels `[in, out]` and 1x1 conv kernels `[1, 1, in, out]` are eligible.
`B = 0` at init, so the merged model equals the base model exactly until the
first update; the base stays frozen and only the factors receive gradients.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Params = Any

# Attention projections of a diffusers-named UNet (what DDPO / Flow-GRPO adapt).
SD_ATTENTION_TARGETS = (r".*/attn[12]/(to_q|to_k|to_v|to_out_0)/kernel",)


def _eligible(path: tuple[str, ...], leaf: Any) -> bool:
    shape = tuple(np.shape(leaf))
    return path[-1] == "kernel" and (len(shape) == 2 or (len(shape) == 4 and shape[:2] == (1, 1)))


def _in_out(shape: tuple[int, ...]) -> tuple[int, int]:
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
                f"LoRA target {pattern!r} matches no Dense or 1x1-conv kernel path "
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
        d_in, d_out = _in_out(tuple(np.shape(flat[path])))
        key = jax.random.fold_in(rng, i)
        out[(*path, "lora_a")] = jax.random.normal(key, (d_in, rank), jnp.float32) / rank
        out[(*path, "lora_b")] = jnp.zeros((rank, d_out), jnp.float32)
    return traverse_util.unflatten_dict(out)


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
        delta = (scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))).reshape(w.shape)
        flat[path] = (w.astype(jnp.float32) + delta).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def num_params(lora_params: Params) -> int:
    """Number of trainable LoRA scalars."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(lora_params)))
