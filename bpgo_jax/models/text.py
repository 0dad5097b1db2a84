"""A vocabulary-free word tokenizer for small built-in models.

Words are lower-cased, split on non-alphanumerics and hashed with CRC32 into a
fixed id range, so any prompt file works without shipping a vocabulary, and the
ids are identical on every host and Python process (unlike `hash`).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np

PAD_ID = 0
BOS_ID = 1
_FIRST_WORD_ID = 2
_WORD = re.compile(r"[a-z0-9]+")


class HashTokenizer:
    """`tokenizer(prompts) -> int32 [B, max_length]` (BOS, word ids, PAD)."""

    def __init__(self, vocab_size: int = 4096, max_length: int = 24):
        if vocab_size <= _FIRST_WORD_ID:
            raise ValueError(f"vocab_size must exceed {_FIRST_WORD_ID}, got {vocab_size}")
        self.vocab_size = vocab_size
        self.max_length = max_length

    def word_id(self, word: str) -> int:
        return _FIRST_WORD_ID + zlib.crc32(word.encode()) % (self.vocab_size - _FIRST_WORD_ID)

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        out = np.full((len(prompts), self.max_length), PAD_ID, np.int32)
        for i, prompt in enumerate(prompts):
            ids = [BOS_ID] + [self.word_id(w) for w in _WORD.findall(prompt.lower())]
            ids = ids[: self.max_length]
            out[i, : len(ids)] = ids
        return out
