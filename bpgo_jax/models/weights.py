"""Checkpoint weights into Flax parameter trees: the one loading layer of every model.

Two formats are read, and a file that is neither fails by name and reason:
- safetensors (diffusers, transformers, OpenCLIP checkpoints) through the
  numpy API, tensor by tensor: a file, a folder, a sharded folder
  (`*.safetensors.index.json`) or a diffusers `variant` (`*.fp16.safetensors`).
  bfloat16 and float8 tensors, which numpy cannot hold, are read from the file
  bytes as `ml_dtypes` arrays. torch is never imported.
- msgpack params files (`flax.serialization`; the built-in models), also
  written here (`write_msgpack`).
Pickle checkpoints (`.bin`, `.pt`, `.ckpt`, ...) are refused: unpickling runs
arbitrary code.

`read_params` fills the flat tree that `expected_shapes` (`jax.eval_shape` of
the module's init) describes. A torch name becomes a Flax path: a list index
joins the name before it and `weight` becomes the `kernel`, `scale` or
`embedding` the module has (`down_blocks.0.attentions.1.to_out.0.weight` ->
`down_blocks_0/attentions_1/to_out_0/kernel`), after a model family's
`rename` rule has mapped its checkpoint's spelling onto the module's. Layouts
become Flax's (Linear `[out, in]` -> `[in, out]`; Conv `[O, I, *K]` ->
`[*K, I, O]` for 1-, 2- and 3-D kernels, e.g. OIHW -> HWIO, OIDHW -> DHWIO).
Unknown, missing and mis-shaped tensors fail naming the checkpoint key and
its file. Each tensor is cast and placed on `sharding_fn(path, shape)` as
soon as it is read, so the host holds one tensor, never the whole model; a
tensor split over devices is read by slice (memory-mapped), each distinct
slice once, and only the slices this process's devices hold, so the hosts of
a pod share the reading of an fsdp-sharded model.
`read_stacked_params` does the same for modules with scanned stacks
(`models/scan.py`), stacking per-index tensors into `.../stacked/...` ones.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pathlib
import re
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np
from flax import serialization, traverse_util
from safetensors import SafetensorError, safe_open

from bpgo_jax.errors import WeightsError
from bpgo_jax.models.scan import STACKED

Path = tuple[str, ...]
ShardingFn = Callable[[Path, tuple[int, ...]], jax.sharding.Sharding]
# A checkpoint key -> its name in the module's torch spelling, or None to skip it.
Rename = Callable[[str], str | None]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONVERT_HINT = (
    "convert it once to safetensors: `.save_pretrained(dst, safe_serialization=True)` for a "
    "diffusers / transformers model (`.from_single_file(ckpt)` reads an original SD .ckpt), "
    "`safetensors.torch.save_file(state_dict, dst)` for a torch state dict"
)
# Names ending in `_<digit>` that are not list indices (diffusers' TimestepEmbedding).
NOT_AN_INDEX = frozenset({"linear_1", "linear_2"})
_WEIGHT_LEAVES = ("kernel", "scale", "embedding")  # what a torch `.weight` becomes
_FILE_BASES = ("diffusion_pytorch_model", "model")  # diffusers' and transformers' file names
_VARIANT_FILE = re.compile(r"(diffusion_pytorch_model|model)(-\d+-of-\d+)?\.[^.]+\.safetensors")
_RAW_DTYPES = {  # safetensors dtypes numpy lacks
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}
_DTYPES = {  # every safetensors dtype, for reading slices from the file's bytes
    **_RAW_DTYPES,
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_LISTED = 8  # missing names listed in one message


# ---------------------------------------------------------------- files


def refuse_pickle(path: str) -> NoReturn:
    raise WeightsError(
        f"refusing pickle checkpoint {path} (unpickling can run arbitrary code); {CONVERT_HINT}"
    )


def is_pickle_data(path: str) -> bool:
    """True for torch.save output (a zip with a `data.pkl`) or a bare pickle stream."""
    with open(path, "rb") as f:
        head = f.read(2)
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode, protocol 2-5
        return True
    if zipfile.is_zipfile(path):
        with contextlib.suppress(zipfile.BadZipFile), zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    return False


def read_json(path: str) -> dict[str, Any]:
    """A checkpoint's JSON side file (config, index)."""
    if not os.path.isfile(path):
        raise WeightsError(f"missing file {path}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise WeightsError(f"{path} is not valid JSON ({err})") from None


def prefixed(sharding_fn: ShardingFn | None, name: str) -> ShardingFn | None:
    """`sharding_fn` for one component of a pipeline: its paths get `name` in front."""
    if sharding_fn is None:
        return None
    return lambda path, shape: sharding_fn((name, *path), shape)


def check_pipeline_index(folder: str, components: dict[str, str], family: str) -> None:
    """`folder/model_index.json` lists every component with the class it must have."""
    index = read_json(os.path.join(folder, "model_index.json"))
    for name, cls in components.items():
        entry = index.get(name)
        if not entry or entry[0] is None or entry[1] is None:
            raise WeightsError(f"{folder}/model_index.json has no {name!r} component")
        if entry[1] != cls:
            raise WeightsError(
                f"{folder}/model_index.json: {name} is a {entry[1]!r}, expected {cls!r} "
                f"(pipeline {index.get('_class_name')!r} is not {family})"
            )


def _shards(index: str) -> list[str]:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise WeightsError(f"{index} has no 'weight_map': not a safetensors index")
    folder = os.path.dirname(index)
    files = [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
    for file in files:
        if not os.path.isfile(file):
            raise WeightsError(f"missing file {file} (listed in {index})")
    return files


def _is_variant_file(name: str) -> bool:
    """`diffusion_pytorch_model.fp16.safetensors`, `model-00001-of-00002.fp16.safetensors`, ..."""
    return _VARIANT_FILE.fullmatch(name) is not None


def safetensors_files(path: str, variant: str | None = None) -> list[str]:
    """The `.safetensors` file(s) of a checkpoint file or diffusers / transformers folder.

    A folder holds `<base>[.<variant>].safetensors` or a sharded
    `<base>.safetensors.index[.<variant>].json`, base `diffusion_pytorch_model`
    or `model`; without a variant, a folder's only other index or only other
    (non-variant) `.safetensors` file is taken too.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        if path.endswith(PICKLE_SUFFIXES):  # content is sniffed only if safe_open fails
            refuse_pickle(path)
        if not path.endswith(".safetensors"):
            raise WeightsError(f"checkpoint {path} is not a .safetensors file")
        return [path]
    if not os.path.isdir(path):
        raise WeightsError(f"checkpoint {path} does not exist")
    suffix = f".{variant}" if variant else ""
    for base in _FILE_BASES:
        index = os.path.join(path, f"{base}.safetensors.index{suffix}.json")
        if os.path.isfile(index):
            return _shards(index)
        single = os.path.join(path, f"{base}{suffix}.safetensors")
        if os.path.isfile(single):
            return [single]
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.safetensors")))
    if not variant:
        indexes = glob.glob(os.path.join(path, "*.safetensors.index.json"))
        if len(indexes) == 1:
            return _shards(indexes[0])
        plain = [name for name in found if not _is_variant_file(name)]
        if len(plain) == 1:
            return [os.path.join(path, plain[0])]
    pickles = sorted(p for p in os.listdir(path) if p.endswith(PICKLE_SUFFIXES))
    if pickles:
        refuse_pickle(os.path.join(path, pickles[0]))
    extra = f" (found {found}; pass variant=...)" if found else ""
    raise WeightsError(
        f"missing file {os.path.join(path, _FILE_BASES[0])}{suffix}.safetensors or "
        f"{_FILE_BASES[1]}{suffix}.safetensors (or a sharded *.safetensors.index{suffix}.json)"
        f"{extra}"
    )


class Tensors(Protocol):
    """What `read_params` reads: names, `get(name) -> np.ndarray` in torch layout, and
    where a name comes from (for messages)."""

    source: str

    def __iter__(self) -> Iterator[str]: ...

    def __contains__(self, name: str) -> bool: ...

    def get(self, name: str) -> np.ndarray: ...

    def describe(self, name: str) -> str: ...


class TensorReader:
    """Name -> numpy tensor over the safetensors file(s) of one checkpoint (see `open_tensors`)."""

    def __init__(self, handles: Mapping[str, tuple[str, Any]], source: str):
        self._handles = dict(handles)  # tensor name -> (file path, safe_open handle)
        self._headers: dict[str, tuple[int, dict]] = {}  # file -> (data start, JSON header)
        self.source = source

    def __iter__(self) -> Iterator[str]:
        return iter(self._handles)

    def __contains__(self, name: str) -> bool:
        return name in self._handles

    def file(self, name: str) -> str:
        return self._entry(name)[0]

    def describe(self, name: str) -> str:
        return f"{name!r} in {self.file(name)}"

    def shape(self, name: str) -> tuple[int, ...]:
        """Without reading the data."""
        return tuple(self._entry(name)[1].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        path, handle = self._entry(name)
        dtype = handle.get_slice(name).get_dtype()
        if dtype in _RAW_DTYPES:
            return self._from_bytes(path, name, _RAW_DTYPES[dtype])
        return handle.get_tensor(name)

    def read_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """`get(name)[index]`, reading only the bytes the slice covers (a memory map)."""
        path, _ = self._entry(name)
        start, header = self._header(path)
        entry = header[name]
        shape = tuple(entry["shape"])
        if entry["dtype"] not in _DTYPES:
            raise WeightsError(f"tensor {name!r} in {path} has dtype {entry['dtype']}")
        if not shape:
            return self.get(name)
        begin, _ = entry["data_offsets"]
        data = np.memmap(
            path, dtype=_DTYPES[entry["dtype"]], mode="r", offset=start + begin, shape=shape
        )
        return np.array(data[index])

    def _entry(self, name: str) -> tuple[str, Any]:
        if name not in self._handles:
            raise WeightsError(f"missing tensor {name!r} in {self.source}")
        return self._handles[name]

    def _header(self, path: str) -> tuple[int, dict]:
        """A file's data start and JSON header: 8-byte header size, header, then the data."""
        if path not in self._headers:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                self._headers[path] = (8 + size, json.loads(f.read(size)))
        return self._headers[path]

    def _from_bytes(self, path: str, name: str, dtype: Any) -> np.ndarray:
        start, header = self._header(path)
        begin, end = header[name]["data_offsets"]
        with open(path, "rb") as f:
            f.seek(start + begin)
            data = f.read(end - begin)
        return np.frombuffer(data, dtype=dtype).reshape(header[name]["shape"])


class TensorView:
    """Tensors derived from a reader's: `get(name)` is `fn(reader.get(stored))`.

    For checkpoints whose tensors need more than a rename (fused q/k/v to
    split, a projection stored transposed): the view shows them under the
    module's torch names, and messages still name the stored tensor and file.
    """

    def __init__(self, reader: TensorReader, source: str):
        self.reader = reader
        self.source = source
        self._items: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray] | None]] = {}

    def add(
        self, name: str, stored: str, fn: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> None:
        self._items[name] = (stored, fn)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def get(self, name: str) -> np.ndarray:
        if name not in self._items:
            raise WeightsError(f"missing tensor {name!r} in {self.source}")
        stored, fn = self._items[name]
        arr = self.reader.get(stored)
        return arr if fn is None else fn(arr)

    def describe(self, name: str) -> str:
        stored = self._items[name][0]
        return f"{name!r} (stored as {stored!r}) in {self.reader.file(stored)}"


def _open_safetensors(file: str) -> Any:
    try:
        return safe_open(file, framework="np")
    except (SafetensorError, OSError) as err:
        if is_pickle_data(file):
            refuse_pickle(file)
        raise WeightsError(f"{file} is not a readable safetensors file ({err})") from None


@contextlib.contextmanager
def open_tensors(path: str, variant: str | None = None) -> Iterator[TensorReader]:
    """Opens a checkpoint (file or folder, see `safetensors_files`) to read tensor by tensor."""
    files = safetensors_files(path, variant)
    with contextlib.ExitStack() as stack:
        handles: dict[str, tuple[str, Any]] = {}
        for file in files:
            handle = stack.enter_context(_open_safetensors(file))
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                if name in handles:
                    raise WeightsError(f"tensor {name!r} is in both {handles[name][0]} and {file}")
                handles[name] = (file, handle)
        yield TensorReader(handles, os.fspath(path))


# ---------------------------------------------------------------- names and layouts


def expected_shapes(module: nn.Module, *inputs: Any, method: Any = None) -> dict[Path, Any]:
    """Flat `{path: ShapeDtypeStruct}` of the module's params, without allocating them."""
    init = lambda: module.init(jax.random.key(0), *inputs, method=method)
    return traverse_util.flatten_dict(jax.eval_shape(init)["params"])


def flax_path(name: str) -> Path:
    """torch name -> Flax path, leaf still `weight` / `bias`: `a.0.b` -> `(a_0, b)`."""
    out: list[str] = []
    for part in name.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def torch_name(path: Path, not_an_index: frozenset[str] = NOT_AN_INDEX) -> str:
    """The inverse of `flax_path` plus leaf renaming, for messages."""
    parts = []
    for part in path:
        stem, _, index = part.rpartition("_")
        parts.append(
            f"{stem}.{index}" if stem and index.isdigit() and part not in not_an_index else part
        )
    if parts[-1] in _WEIGHT_LEAVES:
        parts[-1] = "weight"
    return ".".join(parts)


def _resolve(path: Path, expected: Mapping[Path, Any]) -> Path | None:
    if path[-1] == "weight":
        for leaf in _WEIGHT_LEAVES:
            if path[:-1] + (leaf,) in expected:
                return path[:-1] + (leaf,)
        return None
    return path if path in expected else None


def to_flax_layout(arr: np.ndarray, leaf: str, want: tuple[int, ...]) -> np.ndarray:
    """torch layout -> Flax layout; also bridges Linear <-> 1x1 conv checkpoints."""
    if leaf != "kernel":
        return arr
    if len(want) == 2 and arr.ndim == 4 and arr.shape[2:] == (1, 1):
        arr = arr[:, :, 0, 0]  # a 1x1 conv saved where the model has a Linear (SD1 vs SD2)
    if len(want) == 4 and arr.ndim == 2 and want[:2] == (1, 1):
        arr = arr[:, :, None, None]  # a Linear saved where the model has a 1x1 conv
    if arr.ndim == 2:  # Linear [out, in]
        return arr.T
    if arr.ndim >= 3:  # ConvNd [O, I, *K] -> [*K, I, O]
        return arr.transpose(*range(2, arr.ndim), 1, 0)
    return arr


def flax_axes(leaf: str, ndim: int) -> tuple[int, ...]:
    """The torch axes in the order `to_flax_layout` puts them (for a `want` of `ndim` axes)."""
    if leaf != "kernel" or ndim < 2:
        return tuple(range(ndim))
    return (*range(2, ndim), 1, 0)


def torch_shape(leaf: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch-layout shape of a Flax parameter (inverse of `to_flax_layout`)."""
    if leaf != "kernel" or len(flax_shape) < 2:
        return flax_shape
    return (flax_shape[-1], flax_shape[-2], *flax_shape[:-2])


def place(arr: np.ndarray, path: Path, dtype: Any, sharding_fn: ShardingFn | None) -> jax.Array:
    """Cast on the host, then onto its device(s); 0-d tensors keep their shape.

    With a sharding, each process places only the shards its own devices hold,
    sliced from the host tensor (`jax.make_array_from_callback`): in a
    multi-process run every process has read the whole tensor, and a
    `device_put` of a global sharding may send the whole of it to every
    device before slicing.
    """
    sharding = None if sharding_fn is None else sharding_fn(path, tuple(arr.shape))
    return _place_on(arr, dtype, sharding)


def _place_on(arr: np.ndarray, dtype: Any, sharding: jax.sharding.Sharding | None) -> jax.Array:
    arr = np.asarray(arr.astype(jnp.dtype(dtype), copy=False), order="C")
    if sharding is None:
        return jax.device_put(arr)
    return jax.make_array_from_callback(arr.shape, sharding, lambda index: arr[index])


def place_slices(
    reader: TensorReader,
    key: str,
    leaf: str,
    want: tuple[int, ...],
    dtype: Any,
    sharding: jax.sharding.Sharding,
) -> jax.Array:
    """Tensor `key` placed on `sharding` (`want`: its Flax-layout shape) from the slices
    this process's devices hold, each distinct slice read from the file once."""
    axes = flax_axes(leaf, len(want))
    read: dict[tuple, np.ndarray] = {}

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        bounds = tuple(s.indices(n)[:2] for s, n in zip(index, want, strict=True))
        if bounds not in read:
            torch_index = [slice(None)] * len(want)
            for flax_axis, torch_axis in enumerate(axes):
                torch_index[torch_axis] = index[flax_axis]
            part = reader.read_slice(key, tuple(torch_index)).transpose(axes)
            read[bounds] = np.asarray(part.astype(jnp.dtype(dtype), copy=False), order="C")
        return read[bounds]

    return jax.make_array_from_callback(want, sharding, shard)


def read_params(
    reader: Tensors,
    expected: Mapping[Path, Any],
    *,
    rename: Rename | None = None,
    not_an_index: frozenset[str] = NOT_AN_INDEX,
    prefix: Path = (),
    dtype: Any = jnp.float32,
    sharding_fn: ShardingFn | None = None,
) -> dict:
    """Fills the flat `expected` (see `expected_shapes`) from `reader`, one tensor at a time.

    `rename(key)` is the model family's rule (None: skip the tensor, e.g. a
    buffer or the other tower of a CLIP); `not_an_index` lists the module's
    names that end in `_<digit>` (for messages); `prefix` is prepended to the
    paths given to `sharding_fn`. Returns the nested parameter tree.
    """
    params: dict[Path, jax.Array] = {}
    keys: dict[Path, str] = {}
    for key in reader:
        name = key if rename is None else rename(key)
        if name is None:
            continue
        path = _resolve(flax_path(name), expected)
        if path is None:
            raise WeightsError(
                f"unexpected tensor {reader.describe(key)} (the model config has no "
                f"{'/'.join(flax_path(name))})"
            )
        if path in keys:
            raise WeightsError(
                f"tensors {reader.describe(keys[path])} and {reader.describe(key)} both fill "
                f"{'/'.join(path)}"
            )
        want = tuple(expected[path].shape)
        keys[path] = key
        sharding = None if sharding_fn is None else sharding_fn(prefix + path, want)
        sliced = (
            sharding is not None
            and not sharding.is_fully_replicated
            and isinstance(reader, TensorReader)
            and reader.shape(key) == torch_shape(path[-1], want)  # no Linear <-> 1x1 conv
        )
        if sliced:
            params[path] = place_slices(reader, key, path[-1], want, dtype, sharding)
            continue
        raw = reader.get(key)
        arr = to_flax_layout(raw, path[-1], want)
        if arr.shape != want:
            raise WeightsError(
                f"tensor {reader.describe(key)} has shape {tuple(raw.shape)}, expected "
                f"{torch_shape(path[-1], want)} (the model config expects {want} in Flax layout)"
            )
        params[path] = _place_on(arr, dtype, sharding)
    missing = [torch_name(p, not_an_index) for p in expected if p not in params]
    if missing:
        more = len(missing) - _MAX_LISTED
        listed = ", ".join(missing[:_MAX_LISTED]) + (f" and {more} more" if more > 0 else "")
        raise WeightsError(f"missing tensor(s) {listed} in {reader.source}")
    return traverse_util.unflatten_dict(params)


# ---------------------------------------------------------------- stacked (scanned) parameters

# A stacked subtree (a path prefix ending in `stacked`) -> (checkpoint list name, first index).
StackMap = Mapping[Path | str, tuple[str, int]]


def _stack_prefixes(paths: Any, stacks: StackMap | None) -> dict[Path, tuple[str, int]]:
    """Every stacked subtree among `paths` and the checkpoint list it comes from.

    By default `a/transformer_blocks/stacked/...` holds `a.transformer_blocks.{0..n-1}`;
    `stacks` overrides that per subtree, e.g. `{"transformer_blocks/stacked":
    ("transformer_blocks", 0), "single_blocks/stacked": ("transformer_blocks", 13)}`
    for two stacks over one checkpoint list.
    """
    given = {
        tuple(k.split("/")) if isinstance(k, str) else tuple(k): v
        for k, v in (stacks or {}).items()
    }
    found: dict[Path, tuple[str, int]] = {}
    for path in paths:
        if STACKED not in path:
            continue
        i = path.index(STACKED)
        if i == 0 or STACKED in path[i + 1 :]:
            raise ValueError(f"{'/'.join(path)}: a stack needs a name and cannot nest another")
        prefix = path[: i + 1]
        found.setdefault(prefix, given.get(prefix, (path[i - 1], 0)))
    unknown = sorted("/".join(k) for k in set(given) - set(found))
    if unknown:
        raise ValueError(f"stacks {unknown} name no stacked subtree of the parameters")
    return found


def _index_path(path: Path, prefix: Path, list_name: str, index: int) -> Path:
    return (*prefix[:-2], f"{list_name}_{index}", *path[len(prefix) :])


def _stack_plan(shapes: Mapping[Path, Any], stacks: StackMap | None) -> dict[Path, list[Path]]:
    """Stacked path -> the per-index paths of its layers, in layer order."""
    prefixes = _stack_prefixes(shapes, stacks)
    plan = {}
    for path, leaf in shapes.items():
        prefix = next((p for p in prefixes if path[: len(p)] == p), None)
        if prefix is not None:
            name, start = prefixes[prefix]
            n = np.shape(leaf)[0]
            plan[path] = [_index_path(path, prefix, name, start + i) for i in range(n)]
    return plan


def unstacked_shapes(expected: Mapping[Path, Any], stacks: StackMap | None = None) -> dict:
    """`expected` (see `expected_shapes`) with every stacked `[n, ...]` tensor replaced by the
    `n` per-index tensors a checkpoint stores (`transformer_blocks_3/attn/to_q/kernel`)."""
    plan = _stack_plan(expected, stacks)
    out: dict[Path, Any] = {}
    for path, leaf in expected.items():
        if path not in plan:
            out[path] = leaf
            continue
        layer = jax.ShapeDtypeStruct(tuple(leaf.shape)[1:], leaf.dtype)
        for index_path in plan[path]:
            if index_path in expected:
                raise ValueError(f"{'/'.join(index_path)} is both stacked and unstacked")
            out[index_path] = layer
    return out


def _stack(*layers: jax.Array) -> jax.Array:
    return jnp.stack(layers)


def _stack_one(arrays: list[Any], sharding: jax.sharding.Sharding | None) -> jax.Array:
    # One module-level function: jit's cache then compiles once per shape and sharding.
    return jax.jit(_stack, out_shardings=sharding)(*arrays)


def stack_params(
    params: Any,
    expected: Mapping[Path, Any],
    *,
    stacks: StackMap | None = None,
    prefix: Path = (),
    sharding_fn: ShardingFn | None = None,
    free: bool = False,
) -> dict:
    """A per-index parameter tree -> the stacked tree that the flat `expected` describes.

    Each stacked tensor is assembled on its devices (`sharding_fn(prefix +
    path, shape)`, default placement without one); `free` deletes the
    per-index arrays as they are stacked, so a checkpoint's worth of memory
    is never held twice.
    """
    flat = dict(traverse_util.flatten_dict(params))
    plan = _stack_plan(expected, stacks)
    out: dict[Path, Any] = {}
    for path in expected:
        if path not in plan:
            if path not in flat:
                raise WeightsError(f"missing tensor {'/'.join(path)}")
            out[path] = flat.pop(path)
            continue
        missing = [p for p in plan[path] if p not in flat]
        if missing:
            raise WeightsError(f"missing tensor {'/'.join(missing[0])} of stack {'/'.join(path)}")
        layers = [flat.pop(p) for p in plan[path]]
        shape = (len(layers), *np.shape(layers[0]))
        sharding = None if sharding_fn is None else sharding_fn(prefix + path, shape)
        out[path] = _stack_one(layers, sharding)
        if free:
            for layer in layers:
                if isinstance(layer, jax.Array):
                    layer.delete()
    if flat:
        raise WeightsError(f"unexpected tensor {'/'.join(next(iter(flat)))} (not in the model)")
    return traverse_util.unflatten_dict(out)


def unstack_params(params: Any, *, stacks: StackMap | None = None) -> dict:
    """The inverse of `stack_params`: every stacked tensor split into its per-index tensors,
    the layout (and, through `torch_name`, the names) of a diffusers checkpoint."""
    flat = traverse_util.flatten_dict(params)
    plan = _stack_plan(flat, stacks)
    out: dict[Path, Any] = {}
    for path, value in flat.items():
        if path not in plan:
            out[path] = value
            continue
        for i, index_path in enumerate(plan[path]):
            out[index_path] = value[i]
    return traverse_util.unflatten_dict(out)


def _layer_sharding(full: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """One layer's slice of a stacked tensor's sharding (the layer axis is never sharded)."""
    if isinstance(full, jax.sharding.NamedSharding):
        spec = tuple(full.spec)[1:]
        return jax.sharding.NamedSharding(full.mesh, jax.sharding.PartitionSpec(*spec))
    return full


def read_stacked_params(
    reader: Tensors,
    expected: Mapping[Path, Any],
    *,
    stacks: StackMap | None = None,
    rename: Rename | None = None,
    not_an_index: frozenset[str] = NOT_AN_INDEX,
    prefix: Path = (),
    dtype: Any = jnp.float32,
    sharding_fn: ShardingFn | None = None,
) -> dict:
    """`read_params` for a module with scanned stacks (`models.scan.Stack`).

    The checkpoint's per-index tensors (`transformer_blocks.3.attn.to_q.weight`)
    are read, converted and checked one by one as `read_params` does, each
    placed on its layer's slice of the stacked tensor's sharding, then stacked
    on the devices (`transformer_blocks/stacked/attn/to_q/kernel`, `[n, in,
    out]`) and freed. `stacks` maps stacked subtrees to checkpoint lists where
    the default (same name, from index 0) does not hold (see `_stack_prefixes`).
    """
    plan = _stack_plan(expected, stacks)
    owner = {p: (path, len(layers)) for path, layers in plan.items() for p in layers}
    layer_fn = None
    if sharding_fn is not None:

        def layer_fn(path: Path, shape: tuple[int, ...]) -> jax.sharding.Sharding:
            local = path[len(prefix) :]
            if local in owner:
                stacked, n = owner[local]
                return _layer_sharding(sharding_fn(prefix + stacked, (n, *shape)))
            return sharding_fn(path, shape)

    per_index = read_params(
        reader,
        unstacked_shapes(expected, stacks),
        rename=rename,
        not_an_index=not_an_index,
        prefix=prefix,
        dtype=dtype,
        sharding_fn=layer_fn,
    )
    return stack_params(
        per_index, expected, stacks=stacks, prefix=prefix, sharding_fn=sharding_fn, free=True
    )


# ---------------------------------------------------------------- msgpack params files


_MAP_HEADERS = frozenset([*range(0x81, 0x90), 0xDE, 0xDF])  # a non-empty msgpack map
_STR_HEADERS = frozenset([*range(0xA0, 0xC0), 0xD9, 0xDA, 0xDB])


def _looks_truncated(data: bytes) -> bool:
    """A params file (a map whose first key is a string) whose msgpack data ends early."""
    if not data or data[0] not in _MAP_HEADERS or (len(data) > 1 and data[1] not in _STR_HEADERS):
        return False
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    try:
        unpacker.unpack()
    except msgpack.OutOfData:
        return True
    except Exception:  # noqa: BLE001 (any other failure is not truncation)
        return False
    return False


def read_msgpack(path: str | os.PathLike) -> Any:
    """The tree in a `flax.serialization` msgpack file; any other file fails by name and reason."""
    where = f"weights file {os.fspath(path)}"
    if not os.path.exists(path):
        raise WeightsError(f"{where} does not exist")
    if os.path.isdir(path):
        raise WeightsError(f"{where} is a directory, not a msgpack params file")
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise WeightsError(f"{where} is empty")
    try:
        return serialization.msgpack_restore(data)
    except Exception as err:  # noqa: BLE001 (msgpack, utf-8 and numpy errors of foreign bytes)
        if is_pickle_data(os.fspath(path)):
            raise WeightsError(
                f"{where} is a pickle/torch file (refused: unpickling can run arbitrary code; "
                "this loader reads msgpack params written by flax.serialization)"
            ) from None
        if _looks_truncated(data):
            raise WeightsError(
                f"{where} is truncated: its msgpack data ends after {len(data)} bytes "
                "(an interrupted write or copy?)"
            ) from None
        reason = f"{type(err).__name__}: {err}"
        raise WeightsError(f"{where} is not a msgpack params file ({reason})") from None


def write_msgpack(path: str | os.PathLike, tree: Any) -> None:
    """Writes `tree` as a msgpack params file through a temporary file renamed into
    place, so a run killed mid-write leaves the previous file, never half of one."""
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(serialization.to_bytes(tree))
    os.replace(tmp, target)


def _keystr(key_path: tuple) -> str:
    return jax.tree_util.keystr(key_path)


def load_msgpack(path: str | os.PathLike, like: Any) -> Any:
    """`read_msgpack(path)` in the structure of `like` (arrays or ShapeDtypeStructs).

    Every tensor of `like` must be in the file with its shape, and the file
    may hold no others: a file of another model or config fails naming the
    first tensors that differ.
    """
    raw = read_msgpack(path)
    target = serialization.to_state_dict(like)
    if not isinstance(raw, dict):
        raise WeightsError(
            f"weights file {os.fspath(path)} is not a msgpack params file (it holds a "
            f"{type(raw).__name__}, not a dict of tensors)"
        )
    if isinstance(target, dict) and not set(raw) & set(target):
        raise WeightsError(
            f"weights file {os.fspath(path)} holds {sorted(raw)}, not the trees "
            f"{sorted(target)} of this model (a file of another model?)"
        )
    expected = dict(jax.tree_util.tree_flatten_with_path(target)[0])
    got = dict(jax.tree_util.tree_flatten_with_path(raw)[0])
    missing = [k for k in expected if k not in got]
    if missing:
        names = ", ".join(_keystr(k) for k in missing[:_MAX_LISTED])
        raise WeightsError(f"{os.fspath(path)}: missing tensor(s) {names} ({len(missing)} in all)")
    unexpected = [k for k in got if k not in expected]
    if unexpected:
        names = ", ".join(_keystr(k) for k in unexpected[:_MAX_LISTED])
        raise WeightsError(
            f"{os.fspath(path)}: unexpected tensor(s) {names} ({len(unexpected)} in all), "
            "not in the model config"
        )
    for key, leaf in expected.items():
        shape = tuple(np.shape(got[key]))
        if shape != tuple(leaf.shape):
            raise WeightsError(
                f"{os.fspath(path)}: tensor {_keystr(key)} has shape {shape}, the model config "
                f"expects {tuple(leaf.shape)}"
            )
    return serialization.from_state_dict(like, raw)
