"""Workdir paths: a local directory or an object-store URL (`gs://bucket/run`).

Every path a run writes under goes through `workdir_path`. A local path stays
a `pathlib.Path`, so local runs keep the operating system's guarantees
(atomic rename, fsync, flock). A URL becomes an `etils.epath.Path`, the path
type Orbax itself takes: it has the same pathlib API (`/`, `read_text`,
`write_bytes`, `exists`, `iterdir`, ...) over fsspec (`gs://` needs gcsfs),
while Orbax's arrays go through TensorStore's own object-store drivers.

On an object store there is no append, no rename of a directory in one step
and no flock; an object PUT is atomic (a reader sees the old object or the
new one). `bpgo_jax.checkpoint.workdir` and `bpgo_jax.logs` choose their
object-store forms with `is_remote`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePath
from typing import Any, TypeAlias

from etils import epath

from bpgo_jax.errors import WorkdirError

WorkPath: TypeAlias = Path | epath.Path

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# Schemes epath knows (through fsspec). A URL that went through `pathlib.Path`
# lost one slash of its `//` ("gs:/bucket/run"): such a path is repaired.
_SCHEMES = ("gs", "s3", "az", "hf")


def url_scheme(path: str | os.PathLike) -> str | None:
    """'gs' for 'gs://bucket/run' (and for pathlib's folded 'gs:/bucket/run'), else None."""
    text = os.fspath(path)
    match = _URL.match(text)
    if match:
        return match.group(1).lower()
    first = path.parts[0] if isinstance(path, PurePath) and path.parts else ""
    if first.endswith(":") and first[:-1] in _SCHEMES:
        return first[:-1]
    return None


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` names an object-store location rather than a local file."""
    return url_scheme(path) is not None


def workdir_path(path: str | os.PathLike) -> WorkPath:
    """`path` as the path type of its store: an absolute `pathlib.Path` when local, an
    `epath.Path` for an object-store URL.

    Raises `WorkdirError` for a URL whose scheme epath cannot open (it names the scheme).
    """
    scheme = url_scheme(path)
    if scheme is None:
        return path if isinstance(path, Path) and path.is_absolute() else Path(path).absolute()
    if isinstance(path, epath.Path) and not isinstance(path, Path):
        return path
    text = os.fspath(path)
    if not _URL.match(text):  # pathlib folded the `//`
        text = f"{scheme}://{text[len(scheme) + 2 :]}"
    try:
        return epath.Path(text)
    except KeyError:
        raise WorkdirError(
            f"{text}: {scheme}:// is not a supported store (local paths and "
            f"{', '.join(s + '://' for s in _SCHEMES)} are)"
        ) from None


def store_path(path: str | os.PathLike) -> WorkPath:
    """`workdir_path` for URLs; a local path is kept as given (relative stays relative)."""
    return workdir_path(path) if is_remote(path) else Path(path)


def filesystem(path: WorkPath) -> tuple[Any, str]:
    """(the fsspec filesystem, the path within it) of an object-store path.

    For the operations epath does not offer: a create-only write, a recursive move.
    """
    import fsspec

    try:
        return fsspec.core.url_to_fs(os.fspath(path))
    except (ImportError, ValueError) as err:
        raise WorkdirError(
            f"cannot open {path}: {err} (gs:// workdirs need `pip install gcsfs`)"
        ) from err
