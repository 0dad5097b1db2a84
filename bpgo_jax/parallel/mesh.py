"""Device mesh and the sharding rules declared in `config.mesh`.

Batch arrays are split over all batch axes (`data` and `fsdp`); the optional
`context` axis (sequence parallelism) splits no batch: inside the DiT blocks
the tokens of each sample are split over it (`shard_tokens`), and attention
gathers keys and values over it (`gather_tokens`). Parameters are placed by
the first regex rule that matches their '/'-joined path. A rule's spec names
one mesh axis (or None) per array dimension; "fsdp_auto" shards the
largest dimension divisible by the fsdp size, which is what fully-sharded data
parallelism wants for large models and harmless for small ones.

Stacked (scanned) parameters, whose paths hold a `stacked` segment
(`transformer_blocks/stacked/attn/to_q/kernel`, `[layers, in, out]`; see
`models/scan.py`), are matched by the same rules, which then apply to the
per-layer dims: the leading layer axis is never sharded, so each scan step
reads its layer's shards without communication.

Model code finds the mesh in the trace's context (`jax.set_mesh`, or `on_mesh`
around a function that is jitted): the Pallas kernels of `models.attention`
run in a `shard_map` over it, and the token constraints apply only under a
mesh with a `context` axis; without one, model code traces as on one device.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bpgo_jax.models.scan import num_layer_axes

BATCH_AXES = ("data", "fsdp")
CONTEXT_AXIS = "context"  # sequence parallelism: tokens of a sample split over it
MESH_AXES = (*BATCH_AXES, CONTEXT_AXIS)


def make_mesh(shape: Sequence[int], axes: Sequence[str] = BATCH_AXES, devices=None) -> Mesh:
    """A mesh of `shape` (one -1 entry takes the remaining devices), laid out on
    the hardware by `device_grid`."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != len(axes):
        raise ValueError(f"mesh.shape {tuple(shape)} and mesh.axes {tuple(axes)} differ in length")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh.shape {tuple(shape)} has more than one -1")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        if len(devices) % known:
            raise ValueError(f"mesh.shape {tuple(shape)} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"mesh.shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
            f"{len(devices)} are available"
        )
    return Mesh(device_grid(shape, devices), tuple(axes))


def device_grid(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
    """`devices` as an array of `shape` whose neighbours along the last axes are
    neighbours on the chips' interconnect.

    `mesh_utils.create_device_mesh` orders TPU chips by their physical torus
    (and GPUs by their global id); CPU devices keep their order. Devices of
    several TPU slices (multi-slice, `device.slice_index`) are split by
    `create_hybrid_device_mesh`: the slices, joined by the slower data-centre
    network, go along the first axis (`data`: one gradient all-reduce per
    update), each slice's chips along the rest.
    """
    from jax.experimental import mesh_utils

    shape = tuple(int(s) for s in shape)
    slices = sorted({getattr(d, "slice_index", 0) or 0 for d in devices})
    if len(slices) > 1:
        if shape[0] % len(slices):
            raise ValueError(
                f"mesh.shape {shape}: the devices span {len(slices)} slices, which go along "
                f"its first axis ({shape[0]} does not divide into them)"
            )
        per_slice = (shape[0] // len(slices), *shape[1:])
        dcn = (len(slices),) + (1,) * (len(shape) - 1)
        return mesh_utils.create_hybrid_device_mesh(
            per_slice, dcn, devices, allow_split_physical_axes=True
        )
    try:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, AssertionError):
        if len(devices) == jax.device_count():
            raise
        # A subset (`mesh.num_devices`) that is not a block of the torus: in order.
        return np.asarray(devices).reshape(shape)


def on_mesh(fn: Callable, mesh: Mesh | None) -> Callable:
    """`fn` traced inside `mesh`'s context (its abstract mesh), for `jax.jit(on_mesh(fn, mesh))`.

    Model code reads the mesh of the trace's context (`jax.sharding.get_abstract_mesh`):
    splash attention partitions its kernel over it, `shard_tokens` splits tokens over its
    `context` axis. A function jitted without it traces as for one device, and a Pallas
    kernel left to GSPMD does not compile for several chips. `mesh=None`: `fn` itself.
    """
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced


def _sizes(mesh) -> dict[str, int]:
    return {a: int(mesh.shape[a]) for a in mesh.axis_names}


def dividing_batch_axes(batch: int, mesh=None) -> tuple[str, ...]:
    """The batch axes (in order, of size > 1) whose running product divides `batch`: how a
    batch of that size is split. `mesh` defaults to the trace's context mesh."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty:
        return ()
    sizes, axes, product = _sizes(mesh), [], 1
    for axis in BATCH_AXES:
        size = sizes.get(axis, 1)
        if size > 1 and batch % (product * size) == 0:
            axes.append(axis)
            product *= size
    return tuple(axes)


def context_size(mesh=None) -> int:
    """Size of the `context` axis of `mesh` (default: the trace's context mesh); 1 without."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return 1 if mesh.empty else _sizes(mesh).get(CONTEXT_AXIS, 1)


def _token_constraint(x: jax.Array, seq: str | None) -> jax.Array:
    if context_size() == 1:
        return x
    batch = dividing_batch_axes(x.shape[0]) or None
    return jax.lax.with_sharding_constraint(x, P(batch, seq, *([None] * (x.ndim - 2))))


def shard_tokens(x: jax.Array) -> jax.Array:
    """`[B, L, ...]` tokens split over the context mesh's `context` axis along L (and B over
    the batch axes that divide it); unchanged without a `context` axis."""
    return _token_constraint(x, CONTEXT_AXIS)


def gather_tokens(x: jax.Array) -> jax.Array:
    """`[B, L, ...]` whole along L on every `context` shard (attention's keys and values);
    unchanged without a `context` axis."""
    return _token_constraint(x, None)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def num_batch_shards(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over every batch axis, the rest replicated."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def path_string(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def spec_for(name: str, shape: tuple[int, ...], mesh: Mesh, rules) -> P:
    """The first matching rule's spec; a stacked tensor's layer axes stay unsharded."""
    lead = min(num_layer_axes(name), len(shape))
    inner = _layer_spec(name, tuple(shape)[lead:], mesh, rules)
    return P(*([None] * lead), *inner) if lead and len(inner) else inner


def _layer_spec(name: str, shape: tuple[int, ...], mesh: Mesh, rules) -> P:
    for pattern, spec in rules:
        if not re.fullmatch(pattern, name):
            continue
        if spec == "fsdp_auto":
            size = mesh.shape.get("fsdp", 1)
            dims = [d for d in np.argsort(shape)[::-1] if shape[d] % size == 0]
            if size == 1 or not dims:
                return P()
            out = [None] * len(shape)
            out[int(dims[0])] = "fsdp"
            return P(*out)
        spec = tuple(spec)[: len(shape)]
        for dim, axis in enumerate(spec):
            if axis is not None and shape[dim] % mesh.shape[axis]:
                raise ValueError(
                    f"mesh rule {pattern!r} shards dim {dim} of {name} {shape} over "
                    f"{axis!r} ({mesh.shape[axis]} devices), which does not divide it"
                )
        return P(*spec)
    return P()


def tree_shardings(tree: Any, mesh: Mesh, rules) -> Any:
    """NamedSharding for every leaf of `tree` by the config's rules."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec_for(path_string(path), np.shape(x), mesh, rules)),
        tree,
    )


def param_sharding_fn(mesh: Mesh, rules):
    """`sharding_fn(path, shape)` for weight loaders: each tensor goes straight to
    the sharding the rules give its '/'-joined path (same names as `tree_shardings`)."""
    return lambda path, shape: NamedSharding(
        mesh, spec_for("/".join(map(str, path)), tuple(shape), mesh, rules)
    )
