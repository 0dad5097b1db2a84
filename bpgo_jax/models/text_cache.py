"""The offline text-embedding cache: a text stack's outputs per prompt, in one safetensors file.

The flow DiTs' text encoders are frozen and large (T5-XXL: 4.8 B parameters),
so a run can read its prompts' embeddings from a file that
`launch/embed_prompts.py` wrote once, instead of holding the encoders.

Layout: tensor `<key>/<field>` per prompt and output field (`key` =
`prompt_key(prompt)`, a SHA-256 of the prompt's text; fields as the stack's
`encode` names them, e.g. `prompt_embeds`, `pooled_prompt_embeds`), without
the batch axis. `__metadata__` (strings): `format`, `identity` (JSON: stack
kind, T5 `max_sequence_length`, `clip_skip`, and a fingerprint of each
encoder's weights and tokenizer files), `fields` (JSON: shape and dtype per
field), `prompts` (JSON: key -> prompt text), `compute_dtype`. A file whose
identity differs from the config's is refused with one line naming what
differs: embeddings of other weights or another length would silently
condition the model wrongly.

The writer streams: the header is known from the prompt count and the
stack's output shapes, so each batch is written as it is computed and the
host never holds the whole cache (safetensors' own writer needs every tensor
in memory at once). Files are read with the safetensors library.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open

from bpgo_jax.errors import ConfigError, InputFileError
from bpgo_jax.models import text_stacks, weights

FORMAT = "bpgo-text-embeddings/1"
_DTYPES = {  # numpy dtype name -> safetensors dtype
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
}
_FINGERPRINT_SUFFIXES = (".json", ".safetensors", ".model", ".txt")
_WHOLE_FILE_BYTES = 8 << 20  # files up to this size are hashed whole ...
_EDGE_BYTES = 4 << 20  # ... larger ones by size, first and last 4 MiB (headers, some weights)


def prompt_key(prompt: str) -> str:
    """The cache key of a prompt: SHA-256 of its UTF-8 text, 32 hex digits."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:32]


def storage_dtype(name: str) -> np.dtype:
    if name not in _DTYPES:
        raise ConfigError(f"text cache dtype {name!r} is not one of {sorted(_DTYPES)}")
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


# ---------------------------------------------------------------- identity


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """A digest of a model or tokenizer folder's files, cheap enough for every run start.

    Config, tokenizer and index files are hashed whole; a weight file by its
    size and first and last 4 MiB (its header names every tensor, shape and
    offset; the edges hold actual weights), so a fine-tune of the same
    architecture gets another fingerprint without reading gigabytes.
    """
    digest = hashlib.sha256()
    folder = Path(folder)
    for path in sorted(folder.iterdir()):
        if not path.is_file() or not path.name.endswith(_FINGERPRINT_SUFFIXES):
            continue
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= _WHOLE_FILE_BYTES:
                digest.update(f.read())
            else:
                digest.update(f.read(_EDGE_BYTES))
                f.seek(size - _EDGE_BYTES)
                digest.update(f.read(_EDGE_BYTES))
    return digest.hexdigest()[:32]


def stack_identity(
    kind: str, folder: str, max_sequence_length: int | None = None, clip_skip: int | None = None
) -> dict[str, Any]:
    """What a cache's embeddings depend on, from a pipeline folder, without loading weights."""
    kind = text_stacks.resolve_kind(kind)
    encoders = {}
    for name, paths in text_stacks.encoder_folders(kind, folder).items():
        if paths is None:  # sd3 without T5: zero states of the transformer's width
            joint = text_stacks.joint_attention_dim(folder)
            encoders[name] = f"none:{joint}"
        else:
            encoders[name] = "+".join(folder_fingerprint(p) for p in paths)
    return {
        "kind": kind,
        "max_sequence_length": text_stacks.resolve_max_sequence_length(kind, max_sequence_length),
        "clip_skip": clip_skip,
        "encoders": encoders,
    }


def identity_from_config(model_cfg: Any) -> dict[str, Any]:
    """`stack_identity` of `config.model`: `name` (flux, sd3, wan), `init` (the diffusers
    folder), optional `max_sequence_length` and `clip_skip`."""
    name, init = model_cfg.get("name", None), model_cfg.get("init", None)
    if name not in text_stacks.KINDS:
        raise ConfigError(
            f"config.model.name={name!r} has no text stack (one of {text_stacks.KINDS})"
        )
    if not init or not os.path.isdir(init):
        raise ConfigError(f"config.model.init={init!r} is not a diffusers pipeline folder")
    return stack_identity(
        name,
        init,
        model_cfg.get("max_sequence_length", None),
        model_cfg.get("clip_skip", None),
    )


def _describe_mismatch(got: Mapping[str, Any], want: Mapping[str, Any]) -> str:
    diffs = []
    for key in ("kind", "max_sequence_length", "clip_skip"):
        if got.get(key) != want.get(key):
            diffs.append(f"{key} {got.get(key)!r} (the config: {want.get(key)!r})")
    got_enc, want_enc = got.get("encoders", {}), want.get("encoders", {})
    for name in sorted(set(got_enc) | set(want_enc)):
        if got_enc.get(name) != want_enc.get(name):
            diffs.append(f"encoder {name!r} of other weights or tokenizer files")
    return "; ".join(diffs) or "a different identity"


# ---------------------------------------------------------------- writing


def write_cache(
    path: str | os.PathLike,
    prompts: Sequence[str],
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    fields: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    identity: Mapping[str, Any],
    compute_dtype: str = "float32",
) -> None:
    """Writes the embeddings of distinct `prompts`, streamed from `batches`.

    `batches` yields `{field: [b, *shape]}` for consecutive prompts, in order;
    values are cast to the field's dtype. The file appears only when complete
    (written beside it, then renamed).
    """
    if len(set(prompts)) != len(prompts):
        raise ValueError("write_cache needs distinct prompts")
    names = sorted(fields)
    sizes = {f: int(np.prod(fields[f][0])) * np.dtype(fields[f][1]).itemsize for f in names}
    header: dict[str, Any] = {
        "__metadata__": {
            "format": FORMAT,
            "identity": json.dumps(identity, sort_keys=True),
            "fields": json.dumps(
                {f: [list(fields[f][0]), np.dtype(fields[f][1]).name] for f in names}
            ),
            "prompts": json.dumps({prompt_key(p): p for p in prompts}),
            "compute_dtype": compute_dtype,
        }
    }
    offset = 0
    for prompt in prompts:
        key = prompt_key(prompt)
        for f in names:
            header[f"{key}/{f}"] = {
                "dtype": _DTYPES[np.dtype(fields[f][1]).name],
                "shape": list(fields[f][0]),
                "data_offsets": [offset, offset + sizes[f]],
            }
            offset += sizes[f]
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            written = _write_rows(f, batches, fields, names)
        if written != len(prompts):
            raise ValueError(f"got embeddings of {written} prompts, expected {len(prompts)}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _write_rows(f, batches, fields, names) -> int:
    written = 0
    for batch in batches:
        counts = {len(batch[name]) for name in names}
        if len(counts) != 1:
            raise ValueError(f"batch fields have different lengths {sorted(counts)}")
        for i in range(counts.pop()):
            for name in names:
                shape, dtype = fields[name]
                row = np.ascontiguousarray(np.asarray(batch[name][i]).astype(dtype))
                if row.shape != tuple(shape):
                    raise ValueError(f"field {name} has shape {row.shape}, expected {shape}")
                f.write(row.tobytes())
            written += 1
    return written


# ---------------------------------------------------------------- reading


class TextCache:
    """A cache file, checked against the identity a config expects (`expect`).

    `lookup(prompts)` gives `{field: [B, *shape]}` in the stored dtype;
    `rows(prompts)` their rows in `table(field)` `[P, *shape]` (for a model
    that keeps the whole table on its devices and gathers rows inside jit).
    """

    def __init__(self, path: str | os.PathLike, expect: Mapping[str, Any] | None = None):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise InputFileError(f"text cache {self.path} does not exist")
        self._stack = contextlib.ExitStack()
        # A file that is not safetensors fails here, by name and reason.
        self._reader = self._stack.enter_context(weights.open_tensors(self.path))
        try:
            self._read_metadata(expect)
        except BaseException:
            self.close()
            raise

    def _read_metadata(self, expect: Mapping[str, Any] | None) -> None:
        with safe_open(self.path, framework="np") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise InputFileError(
                f"text cache {self.path} is not a text-embedding cache (format "
                f"{meta.get('format')!r}, expected {FORMAT!r}); write one with "
                "launch/embed_prompts.py"
            )
        self.identity = json.loads(meta["identity"])
        if expect is not None and json.loads(json.dumps(expect)) != self.identity:
            raise InputFileError(
                f"text cache {self.path} does not match the config: "
                f"{_describe_mismatch(self.identity, expect)}; rerun launch/embed_prompts.py "
                "with this config"
            )
        self.fields = {
            f: (tuple(shape), storage_dtype(d))
            for f, (shape, d) in json.loads(meta["fields"]).items()
        }
        by_key = json.loads(meta["prompts"])
        self.prompts = tuple(by_key.values())
        self._row = {key: i for i, key in enumerate(by_key)}
        self.compute_dtype = meta.get("compute_dtype", "")

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> TextCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.prompts)

    def __contains__(self, prompt: str) -> bool:
        return prompt_key(prompt) in self._row

    def _check(self, prompts: Sequence[str]) -> None:
        missing = [p for p in prompts if p not in self]
        if missing:
            raise InputFileError(
                f"text cache {self.path} has no embeddings for {len(set(missing))} prompt(s), "
                f"e.g. {missing[0]!r}; rerun launch/embed_prompts.py with this prompt file"
            )

    def rows(self, prompts: Sequence[str]) -> np.ndarray:
        self._check(prompts)
        return np.asarray([self._row[prompt_key(p)] for p in prompts], np.int32)

    def lookup(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        self._check(prompts)
        return {
            f: np.stack([self._reader.get(f"{prompt_key(p)}/{f}") for p in prompts])
            for f in self.fields
        }

    def table(self, field: str) -> np.ndarray:
        """`[P, *shape]` of one field, rows in `rows` order."""
        if field not in self.fields:
            raise InputFileError(f"text cache {self.path} has no field {field!r}")
        return np.stack([self._reader.get(f"{key}/{field}") for key in self._row])


class CacheTokenizer:
    """Prompts -> their rows in a text cache's tables, `int32 [B, 1]` (the engine's tokens).

    `count(prompt)` is 1 (one row) for a cached prompt and fails for one the
    cache lacks, so the run's start-up prompt check (`prompts.check_prompt_lengths`)
    finds every missing prompt before anything is sampled.
    """

    def __init__(self, cache: TextCache):
        self._cache = cache
        self.max_length = 1

    def count(self, prompt: str) -> int:
        self._cache.rows([prompt])
        return 1

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        return self._cache.rows(list(prompts))[:, None].astype(np.int32)


def cache_tables(cache: TextCache, sharding_fn: weights.ShardingFn | None = None) -> dict:
    """The cache's tables `{field: [P, ...]}` in their stored dtype, each placed on
    `sharding_fn(("text_cache", field), shape)`; a model gathers rows inside jit."""
    tables = {}
    for f in sorted(cache.fields):
        table = cache.table(f)
        tables[f] = weights.place(table, ("text_cache", f), table.dtype, sharding_fn)
    return tables


def gather(tables: Mapping[str, Any], tokens: Any) -> dict[str, Any]:
    """`CacheTokenizer` tokens `[B, 1]` -> `{field: [B, ...]}` float32 rows of `cache_tables`."""
    rows = tokens[:, 0]
    return {f: jnp.take(table, rows, axis=0).astype(jnp.float32) for f, table in tables.items()}


def text_cache_from_config(model_cfg: Any, path: str | None = None) -> TextCache:
    """The cache `config.model.text_cache` (or `path`), refused unless it was written for
    this config's text stack (see `identity_from_config`)."""
    path = path or model_cfg.get("text_cache", None)
    if not path:
        raise ConfigError("config.model.text_cache is not set")
    return TextCache(path, expect=identity_from_config(model_cfg))


def jnp_dtype(name: str) -> Any:
    """`config.model.dtype` ("float32" / "bfloat16") -> the compute dtype."""
    if name not in ("float32", "bfloat16"):
        raise ConfigError(f"config.model.dtype={name!r} is not 'float32' or 'bfloat16'")
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32
