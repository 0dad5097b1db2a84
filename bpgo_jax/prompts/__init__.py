"""Prompt files and a resumable, host-sharded prompt order.

A prompt file is `.txt` (one prompt a line) or `.jsonl` with objects
`{"prompt": str, "prior": float (optional), "metadata": {...} (optional)}`.
The order of prompts is a pure function of (seed, position), so a resumed run
continues exactly where it stopped, and every host agrees on it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class PromptSet:
    prompts: tuple[str, ...]
    metadata: tuple[dict, ...]
    priors: np.ndarray | None  # float32 [P] when every entry has a prior

    def __len__(self) -> int:
        return len(self.prompts)


def load_prompts(path: str | Path) -> PromptSet:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file {path} does not exist")
    prompts, metadata, priors = [], [], []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
                raise ValueError(f'{path}:{number}: needs a string field "prompt"')
            prompts.append(entry["prompt"])
            metadata.append(entry.get("metadata", {}))
            priors.append(entry.get("prior"))
        else:
            prompts.append(line.strip())
            metadata.append({})
            priors.append(None)
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    has = [p is not None for p in priors]
    if any(has) and not all(has):
        missing = has.index(False) + 1
        raise ValueError(f"{path}: some prompts have a prior and some not (entry {missing} lacks)")
    prior_array = np.asarray(priors, np.float32) if all(has) else None
    return PromptSet(tuple(prompts), tuple(metadata), prior_array)


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


def host_slice(ids: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This host's contiguous share of an epoch's prompt ids."""
    if len(ids) % process_count:
        raise ValueError(f"{len(ids)} prompts per epoch do not split over {process_count} hosts")
    per = len(ids) // process_count
    return ids[process_index * per : (process_index + 1) * per]
