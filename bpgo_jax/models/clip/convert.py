"""Streams transformers-named tensors into a Flax parameter tree, leaf by leaf.

The target tree comes from `jax.eval_shape` of the module's init, so every
name and shape is checked against the model we will actually run: unknown,
missing and mis-shaped tensors fail with their checkpoint names. Each tensor
is converted on the host (torch Linear `[out, in]` -> `[in, out]`, Conv OIHW
-> HWIO), cast, and placed at once (on its sharding when `sharding_fn` is
given), so peak host memory is one tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bpgo_jax.models.clip.weights import TensorReader

Path = tuple[str, ...]
ShardingFn = Callable[[Path, tuple[int, ...]], jax.sharding.Sharding]

_WEIGHT_LEAVES = ("kernel", "scale", "embedding")  # what a torch `.weight` becomes


def expected_shapes(module: nn.Module, *example_inputs: jax.Array, method: Any = None) -> dict:
    """Flat `{path: ShapeDtypeStruct}` of the module's params, without allocating them."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *example_inputs, method=method))[
        "params"
    ]
    return traverse_util.flatten_dict(shapes)


def hf_path(key: str) -> Path:
    """`text_model.encoder.layers.3.fc1.weight` -> `(..., "layers_3", "fc1", "weight")`."""
    out: list[str] = []
    for part in key.split("."):
        if part.isdigit() and out and out[-1] == "layers":
            out[-1] = f"layers_{part}"
        else:
            out.append(part)
    return tuple(out)


def hf_key(path: Path) -> str:
    """Inverse of `hf_path` + leaf renaming, for error messages."""
    parts = [p.replace("layers_", "layers.") if p.startswith("layers_") else p for p in path]
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


def to_flax_layout(arr: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and arr.ndim == 2:  # torch Linear [out, in]
        return arr.T
    if leaf == "kernel" and arr.ndim == 4:  # torch Conv OIHW -> flax HWIO
        return arr.transpose(2, 3, 1, 0)
    return arr


def place(arr: np.ndarray, path: Path, dtype: Any, sharding_fn: ShardingFn | None) -> jax.Array:
    arr = np.asarray(arr.astype(jnp.dtype(dtype), copy=False), order="C")  # keeps 0-d shapes
    if sharding_fn is None:
        return jax.device_put(arr)
    return jax.device_put(arr, sharding_fn(path, arr.shape))


def load_params(
    reader: TensorReader,
    expected: dict,
    *,
    skip: Sequence[str] = (),
    rename: Callable[[str], str] = lambda key: key,
    dtype: Any = jnp.float32,
    sharding_fn: ShardingFn | None = None,
) -> dict:
    """Fills `expected` from `reader`.

    `rename` maps checkpoint names to the names of `expected` (as `hf_key`
    spells them); renamed keys starting with a `skip` prefix are ignored.
    """
    params: dict[Path, jax.Array] = {}
    for key in reader:
        name = rename(key)
        if name.endswith("position_ids") or name.startswith(tuple(skip)):
            continue  # old checkpoints saved the position_ids buffer; other towers
        path = _resolve(hf_path(name), expected)
        if path is None:
            raise ValueError(f"unexpected tensor {key!r} in {reader.source}")
        arr = to_flax_layout(reader.get(key), path[-1])
        want = tuple(expected[path].shape)
        if arr.shape != want:
            raise ValueError(
                f"tensor {key!r} in {reader.source} has shape {arr.shape} after conversion, "
                f"expected {want}"
            )
        params[path] = place(arr, path, dtype, sharding_fn)
    missing = [hf_key(p) for p in expected if p not in params]
    if missing:
        raise ValueError(f"missing tensor(s) {', '.join(missing)} in {reader.source}")
    return traverse_util.unflatten_dict(params)
