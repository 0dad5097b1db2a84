"""Prompt files and a resumable prompt order that every host agrees on.

A prompt file is `.txt` (one prompt a line) or `.jsonl` with objects
`{"prompt": str, "prior": float (optional), "metadata": {...} (optional),
"image": path (optional), "last_image": path (optional)}`; an image-to-video
model's conditioning `image` (and a first-last-frame model's `last_image`),
relative to the prompt file, is checked to exist and kept as an absolute path
in `metadata` under the same key (read and resized by `prompts.images`).
The order of prompts is a pure function of (seed, position), so a resumed run
continues exactly where it stopped, and every host agrees on it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bpgo_jax.errors import ConfigError, InputFileError


@dataclasses.dataclass(frozen=True)
class PromptSet:
    prompts: tuple[str, ...]
    metadata: tuple[dict, ...]
    priors: np.ndarray | None  # float32 [P] when every entry has a prior

    def __len__(self) -> int:
        return len(self.prompts)


def _image_path(path: Path, number: int, key: str, image: object) -> str:
    """The absolute path of an entry's conditioning image `key` (relative to the prompt file)."""
    if not isinstance(image, str) or not image.strip():
        raise InputFileError(f'{path}:{number}: "{key}" must be a path, got {image!r}')
    full = (path.parent / image).resolve()
    if not full.is_file():
        raise InputFileError(f'{path}:{number}: "{key}" {image!r} is not a file ({full})')
    return str(full)


def _entry(path: Path, number: int, line: str) -> tuple[str, dict, float | None]:
    """(prompt, metadata, prior) of line `number` of a .jsonl prompt file."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputFileError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
        raise InputFileError(f'{path}:{number}: needs a string field "prompt"')
    if not entry["prompt"].strip():
        raise InputFileError(f'{path}:{number}: "prompt" is empty')
    metadata = entry.get("metadata", {})
    if not isinstance(metadata, dict):
        raise InputFileError(f'{path}:{number}: "metadata" must be an object')
    for key in ("image", "last_image"):
        if key in entry:
            metadata = {**metadata, key: _image_path(path, number, key, entry[key])}
    prior = entry.get("prior")
    if prior is not None and not (
        isinstance(prior, int | float) and not isinstance(prior, bool) and math.isfinite(prior)
    ):
        raise InputFileError(f'{path}:{number}: "prior" must be a finite number, got {prior!r}')
    return entry["prompt"], metadata, prior


def load_prompts(path: str | Path) -> PromptSet:
    """Reads a prompt file; a bad file is an `InputFileError` naming it (and the line)."""
    path = Path(path)
    if path.is_dir():
        raise InputFileError(f"prompt file {path} is a directory")
    if not path.is_file():
        raise InputFileError(f"prompt file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise InputFileError(f"prompt file {path} is not UTF-8 text ({err.reason})") from None
    except OSError as err:
        raise InputFileError(f"prompt file {path} cannot be read ({err.strerror})") from None
    prompts, metadata, priors = [], [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            prompt, meta, prior = _entry(path, number, line)
        else:
            prompt, meta, prior = line.strip(), {}, None
        prompts.append(prompt)
        metadata.append(meta)
        priors.append(prior)
    if not prompts:
        raise InputFileError(f"prompt file {path} holds no prompts")
    has = [p is not None for p in priors]
    if any(has) and not all(has):
        missing = has.index(False) + 1
        raise InputFileError(
            f"{path}: some prompts have a prior and some not (entry {missing} lacks)"
        )
    prior_array = np.asarray(priors, np.float32) if all(has) else None
    return PromptSet(tuple(prompts), tuple(metadata), prior_array)


def check_prompt_lengths(
    prompts: Sequence[str],
    count_tokens: Callable[[str], int],
    max_length: int,
    policy: str,
    field: str,
) -> None:
    """Reports prompts the text encoder would cut at `max_length` tokens.

    `count_tokens` gives a prompt's length in the model tokenizer's tokens,
    special tokens included and without truncation. `policy` is
    `config.prompts.on_too_long`: "warn" logs one warning (logger "bpgo_jax")
    with the count and an example; "error" raises ConfigError naming `field`
    and the first prompt too long.
    """
    if policy not in ("warn", "error"):
        raise ConfigError(f"prompts.on_too_long={policy!r} is not one of ('warn', 'error')")
    long = [(p, n) for p in prompts if (n := count_tokens(p)) > max_length]
    if not long:
        return
    first, tokens = long[0]
    summary = (
        f"{field}: {len(long)} of {len(prompts)} prompts have more than the "
        f"{max_length} tokens the text encoder reads"
    )
    if policy == "error":
        raise ConfigError(
            f"{summary}, the first: {first!r} ({tokens} tokens); shorten them, or set "
            "prompts.on_too_long='warn' to cut them"
        )
    logging.getLogger("bpgo_jax").warning(
        "%s and are cut to that length, e.g. %r (%d tokens)", summary, first, tokens
    )


def prompt_ids(num_prompts: int, seed: int, position: int, count: int) -> np.ndarray:
    """Ids of prompts `position .. position+count` of an endless shuffled stream.

    Each pass over the file is a fresh permutation seeded by (seed, pass).
    """
    out = np.empty(count, np.int64)
    for i in range(count):
        pass_index, offset = divmod(position + i, num_prompts)
        if i == 0 or offset == 0:
            perm = np.random.default_rng([seed, pass_index]).permutation(num_prompts)
        out[i] = perm[offset]
    return out


def sample_prompts(ids: np.ndarray, per_prompt: int, rows: np.ndarray) -> np.ndarray:
    """The prompt id of each sample `rows` of an epoch of `per_prompt` samples of
    every prompt `ids`: sample j is of prompt `ids[j // per_prompt]`, so a group
    stays consecutive wherever its rows are computed (each host takes its rows
    of every rollout batch)."""
    return np.asarray(ids)[np.asarray(rows) // per_prompt]


def host_slice(ids: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This host's contiguous share of an epoch's prompt ids."""
    if len(ids) % process_count:
        raise ValueError(f"{len(ids)} prompts per epoch do not split over {process_count} hosts")
    per = len(ids) // process_count
    return ids[process_index * per : (process_index + 1) * per]
