"""Streams diffusers-named tensors into a Flax parameter tree, one tensor at a time.

The target names and shapes come from `jax.eval_shape` of the module's init,
so every checkpoint tensor is checked against the network we will run.
Names: `down_blocks.0.attentions.1.to_out.0.weight` ->
`down_blocks_0/attentions_1/to_out_0/kernel` (a list index joins the name
before it). Layouts: torch Linear `[out, in]` -> `[in, out]`, Conv OIHW ->
HWIO, norm `weight` -> `scale`. Each converted tensor is cast and placed on
its device(s) at once, so the host holds one tensor, never the whole model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bpgo_jax.models.clip.weights import TensorReader

Path = tuple[str, ...]
ShardingFn = Callable[[Path, tuple[int, ...]], jax.sharding.Sharding]

_WEIGHT_LEAVES = ("kernel", "scale", "embedding")
# Pre-0.14 diffusers VAE attention names (still in many hub checkpoints).
_DEPRECATED_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_NOT_AN_INDEX = {"linear_1", "linear_2"}  # real names ending in _<digit>


def expected_shapes(module: nn.Module, *inputs: Any) -> dict[Path, jax.ShapeDtypeStruct]:
    """Flat `{path: ShapeDtypeStruct}` of the module's params, without allocating them."""
    tree = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))["params"]
    return traverse_util.flatten_dict(tree)


def flax_path(key: str) -> Path:
    """diffusers state-dict key -> Flax path (leaf still named `weight` / `bias`)."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] in _DEPRECATED_ATTN and "attentions" in parts:
        parts = parts[:-2] + _DEPRECATED_ATTN[parts[-2]].split(".") + parts[-1:]
    out: list[str] = []
    for part in parts:
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def diffusers_key(path: Path) -> str:
    """Inverse of `flax_path` (for error messages)."""
    parts = []
    for part in path:
        m = re.fullmatch(r"(.+)_(\d+)", part)
        parts.append(f"{m[1]}.{m[2]}" if m and part not in _NOT_AN_INDEX else part)
    if parts[-1] in _WEIGHT_LEAVES:
        parts[-1] = "weight"
    return ".".join(parts)


def _resolve(path: Path, expected: dict) -> Path | None:
    if path[-1] == "weight":
        for leaf in _WEIGHT_LEAVES:
            if path[:-1] + (leaf,) in expected:
                return path[:-1] + (leaf,)
        return None
    return path if path in expected else None


def to_flax_layout(arr: np.ndarray, leaf: str, want: tuple[int, ...]) -> np.ndarray:
    """torch layout -> flax layout; also bridges Linear <-> 1x1 conv checkpoints."""
    if leaf != "kernel":
        return arr
    if len(want) == 2 and arr.ndim == 4 and arr.shape[2:] == (1, 1):
        arr = arr[:, :, 0, 0]  # a 1x1 conv saved where the model has a Linear
    if len(want) == 4 and arr.ndim == 2 and want[:2] == (1, 1):
        arr = arr[:, :, None, None]  # a Linear saved where the model has a 1x1 conv
    if arr.ndim == 2:
        return arr.T
    if arr.ndim == 4:
        return arr.transpose(2, 3, 1, 0)
    return arr


def place(arr: np.ndarray, path: Path, dtype: Any, sharding_fn: ShardingFn | None) -> jax.Array:
    arr = np.ascontiguousarray(arr.astype(jnp.dtype(dtype), copy=False))
    if sharding_fn is None:
        return jax.device_put(arr)
    return jax.device_put(arr, sharding_fn(path, arr.shape))


def load_params(
    reader: TensorReader,
    expected: dict[Path, Any],
    *,
    prefix: Path = (),
    dtype: Any = jnp.float32,
    sharding_fn: ShardingFn | None = None,
) -> dict:
    """Fills `expected` from `reader`; `prefix` is prepended to paths given to `sharding_fn`."""
    params: dict[Path, jax.Array] = {}
    for key in reader:
        path = _resolve(flax_path(key), expected)
        if path is None:
            raise ValueError(f"unexpected tensor {key!r} in {reader.source}")
        want = tuple(expected[path].shape)
        arr = to_flax_layout(reader.get(key), path[-1], want)
        if arr.shape != want:
            raise ValueError(
                f"tensor {key!r} in {reader.source} has shape {tuple(reader.shape(key))} "
                f"({arr.shape} after conversion), the model config expects {want}"
            )
        params[path] = place(arr, prefix + path, dtype, sharding_fn)
    missing = [diffusers_key(p) for p in expected if p not in params]
    if missing:
        raise ValueError(f"missing tensor(s) {', '.join(missing)} in {reader.source}")
    return traverse_util.unflatten_dict(params)
