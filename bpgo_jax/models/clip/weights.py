"""Tensor-by-tensor reading of safetensors checkpoints, without torch or pickle.

A `TensorReader` is the one thing the converters see: iteration over names
and `get(name) -> np.ndarray`. It spans a single file or a sharded folder
(`*.safetensors.index.json`), and reads bfloat16 tensors (which the numpy
backend of `safetensors` refuses) straight from the file bytes via `ml_dtypes`.
Pickle checkpoints are refused: loading them runs arbitrary code.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np
from safetensors import safe_open

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_CONVERT_HINT = (
    "convert it once to safetensors, e.g. `model.save_pretrained(dir, safe_serialization=True)` "
    "in transformers, or `sd = torch.load(path, map_location='cpu', weights_only=True); "
    "safetensors.torch.save_file({k: v.contiguous() for k, v in sd.get('state_dict', sd).items()}, "
    "out)`"
)


def refuse_pickle(path: str) -> None:
    raise ValueError(f"refusing pickle checkpoint {path!r} (unsafe to load); {_CONVERT_HINT}")


def safetensors_files(path: str) -> list[str]:
    """The `.safetensors` files of a checkpoint file or transformers folder."""
    if os.path.isfile(path):
        if path.endswith(PICKLE_SUFFIXES):
            refuse_pickle(path)
        if not path.endswith(".safetensors"):
            raise ValueError(f"checkpoint {path!r} is not a .safetensors file")
        return [path]
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint path {path!r} does not exist")
    indexes = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
    if indexes:
        with open(indexes[0]) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if len(found) == 1:
        return found
    pickles = [p for p in sorted(os.listdir(path)) if p.endswith(PICKLE_SUFFIXES)]
    if pickles:
        refuse_pickle(os.path.join(path, pickles[0]))
    raise ValueError(f"no model.safetensors (or index) in {path!r}")


def _bf16_from_bytes(path: str, name: str) -> np.ndarray:
    """Reads one BF16 tensor from the raw file: 8-byte header size, JSON header, data."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(size))[name]
        start, end = info["data_offsets"]
        f.seek(8 + size + start)
        data = f.read(end - start)
    return np.frombuffer(data, dtype=ml_dtypes.bfloat16).reshape(info["shape"])


class TensorReader:
    """Name -> numpy tensor over one or more safetensors files."""

    def __init__(self, handles: dict[str, tuple[str, object]], source: str):
        self._handles = handles  # tensor name -> (file path, safe_open handle)
        self.source = source

    def __iter__(self) -> Iterator[str]:
        return iter(self._handles)

    def __contains__(self, name: str) -> bool:
        return name in self._handles

    def shape(self, name: str) -> tuple[int, ...]:
        """Without reading the data."""
        if name not in self._handles:
            raise ValueError(f"missing tensor {name!r} in {self.source}")
        return tuple(self._handles[name][1].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        if name not in self._handles:
            raise ValueError(f"missing tensor {name!r} in {self.source}")
        path, handle = self._handles[name]
        if handle.get_slice(name).get_dtype() == "BF16":
            return _bf16_from_bytes(path, name)
        return handle.get_tensor(name)


@contextlib.contextmanager
def open_tensors(path: str) -> Iterator[TensorReader]:
    """Opens a checkpoint (file or folder) for reading tensor by tensor."""
    files = safetensors_files(path)
    with contextlib.ExitStack() as stack:
        handles: dict[str, tuple[str, object]] = {}
        for file in files:
            handle = stack.enter_context(safe_open(file, framework="np"))
            handles.update(dict.fromkeys(handle.keys(), (file, handle)))
        yield TensorReader(handles, path)
