"""DDPO's per-prompt reward normaliser: advantages against each prompt's recent history.

Unlike GRPO it does not need all samples of a prompt in one batch: each prompt
keeps a ring buffer of its last `buffer_size` rewards across epochs. It lives
on the host (numpy, string keys) and is checkpointed as a JSON-able dict.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

STD_EPS = 1e-6


class PerPromptStatTracker:
    """Per-prompt ring buffers of past rewards.

    A prompt is normalised with its own buffer once that holds at least
    `min_count` rewards; before that with the statistics of the current batch.
    `clip` bounds |A| as `advantage.clip` bounds GRPO's: these advantages
    replace the clipped group ones, and a prompt whose buffer holds nearly
    equal rewards would otherwise give an outlier a large one.
    """

    def __init__(self, buffer_size: int, min_count: int, clip: float | None = None) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if not 1 <= min_count <= buffer_size:
            raise ValueError(
                f"min_count must be in [1, buffer_size={buffer_size}], got {min_count}"
            )
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be positive or None, got {clip!r}")
        self.buffer_size = int(buffer_size)
        self.min_count = int(min_count)
        self.clip = None if clip is None else float(clip)
        self._buffers: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: np.ndarray) -> np.ndarray:
        """Adds this batch's rewards to the buffers, then returns float32 advantages [B]."""
        r = np.asarray(rewards, dtype=np.float64)
        if r.ndim != 1 or r.shape[0] != len(prompts):
            raise ValueError(
                f"rewards must have shape [len(prompts)={len(prompts)}], got {r.shape}"
            )
        if not np.all(np.isfinite(r)):
            raise ValueError("rewards contain NaN or inf")
        prompts = list(prompts)
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        adv = np.empty_like(r)
        batch_mean, batch_std = r.mean(), r.std()
        for p, idx in groups.items():
            buf = self._buffers.setdefault(p, deque(maxlen=self.buffer_size))
            buf.extend(r[idx].tolist())
            if len(buf) >= self.min_count:
                hist = np.asarray(buf)
                mean, std = hist.mean(), hist.std()
            else:
                mean, std = batch_mean, batch_std
            adv[idx] = (r[idx] - mean) / (std + STD_EPS)
        if self.clip is not None:
            adv = np.clip(adv, -self.clip, self.clip)
        return adv.astype(np.float32)

    def stats(self) -> dict[str, float]:
        """Number of prompts tracked and their mean buffer length, for the logs."""
        lengths = [len(b) for b in self._buffers.values()]
        return {
            "num_prompts": float(len(lengths)),
            "mean_buffer_length": float(np.mean(lengths)) if lengths else 0.0,
        }

    def state_dict(self) -> dict:
        """JSON-serialisable snapshot (buffers oldest first)."""
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {p: list(b) for p, b in self._buffers.items()},
        }

    def load_state_dict(self, d: dict) -> None:
        """Restores buffers; this tracker's own buffer_size / min_count / clip win, so
        a resumed run may change them (longer saved buffers keep their newest values)."""
        if "buffers" not in d:
            raise ValueError(f"state dict has no 'buffers' entry (keys: {sorted(d)})")
        self._buffers = {
            str(p): deque((float(x) for x in vals), maxlen=self.buffer_size)
            for p, vals in d["buffers"].items()
        }
