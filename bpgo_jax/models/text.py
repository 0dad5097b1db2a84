"""Text side of the models: tokenizers behind one interface, and the built-in text transformer.

A `Tokenizer` maps prompts to int32 ids `[B, max_length]` on the host:
`HashTokenizer` (no vocabulary, for the built-in models) or
`PretrainedTokenizer` (a checkpoint's transformers tokenizer: CLIP for SD and
the CLIP rewards, T5 / UMT5 for the DiTs to come).

`TextEncoder` is the small transformer over `HashTokenizer` ids shared by
the built-in generator (per-token features the UNet attends to) and
WorldCLIP's text tower (pooled and projected), so a generator can start from
a trained tower's weights (`bpgo_jax.pretrain.text_from_clip`).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PAD_ID = 0
BOS_ID = 1
_FIRST_WORD_ID = 2
_WORD = re.compile(r"[a-z0-9]+")


class Tokenizer(Protocol):
    """`tokenizer(prompts) -> int32 [B, max_length]`, padded and truncated;
    `count(prompt)` is the prompt's length in tokens before truncation."""

    max_length: int

    def __call__(self, prompts: Sequence[str]) -> np.ndarray: ...

    def count(self, prompt: str) -> int: ...


class HashTokenizer:
    """BOS, word ids, PAD: words are lower-cased, split on non-alphanumerics and
    hashed with CRC32 into a fixed id range, so any prompt file works without a
    vocabulary and ids are identical on every host and process (unlike `hash`)."""

    def __init__(self, vocab_size: int = 4096, max_length: int = 24):
        if vocab_size <= _FIRST_WORD_ID:
            raise ValueError(f"vocab_size must exceed {_FIRST_WORD_ID}, got {vocab_size}")
        self.vocab_size = vocab_size
        self.max_length = max_length

    def word_id(self, word: str) -> int:
        return _FIRST_WORD_ID + zlib.crc32(word.encode()) % (self.vocab_size - _FIRST_WORD_ID)

    def count(self, prompt: str) -> int:
        return 1 + len(_WORD.findall(prompt.lower()))  # BOS and the words

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        out = np.full((len(prompts), self.max_length), PAD_ID, np.int32)
        for i, prompt in enumerate(prompts):
            ids = [BOS_ID] + [self.word_id(w) for w in _WORD.findall(prompt.lower())]
            ids = ids[: self.max_length]
            out[i, : len(ids)] = ids
        return out


class PretrainedTokenizer:
    """A transformers tokenizer folder (e.g. a diffusers `tokenizer/`), padded to `max_length`.

    `kind` is the transformers class (`CLIPTokenizer`, `T5TokenizerFast`, ...);
    transformers is imported only here, on the host, and only for real checkpoints.
    """

    def __init__(self, folder: str, max_length: int, kind: str = "CLIPTokenizer"):
        import transformers

        self._tokenizer: Any = getattr(transformers, kind).from_pretrained(folder)
        self.max_length = max_length

    def count(self, prompt: str) -> int:
        return len(self._tokenizer(prompt, truncation=False)["input_ids"])

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        ids = self._tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="np",
        )["input_ids"]
        return ids.astype(np.int32)


class TextEncoder(nn.Module):
    """Token + position embeddings and pre-LN transformer layers over `HashTokenizer` ids.

    Without `embed_dim`: per-token features `[B, L, width]` after `ln_final`
    (the built-in generator's encoder). With it: the masked mean over tokens,
    `ln_final`, then a `proj` Dense to `[B, embed_dim]` (WorldCLIP's text tower).
    Outputs are float32 whatever the compute `dtype`.
    """

    vocab_size: int
    max_length: int
    width: int
    depth: int
    heads: int
    dtype: jnp.dtype = jnp.float32
    embed_dim: int | None = None

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        mask = tokens != PAD_ID
        x = nn.Embed(self.vocab_size, self.width, name="token_embedding")(tokens)
        pos = self.param(
            "position_embedding", nn.initializers.normal(0.02), (self.max_length, self.width)
        )
        x = (x + pos[None, : tokens.shape[1]]).astype(self.dtype)
        attn_mask = nn.make_attention_mask(mask, mask)
        for i in range(self.depth):
            h = nn.LayerNorm(dtype=self.dtype, name=f"ln_attn_{i}")(x)
            x = x + nn.MultiHeadDotProductAttention(self.heads, dtype=self.dtype, name=f"attn_{i}")(
                h, h, mask=attn_mask
            )
            h = nn.LayerNorm(dtype=self.dtype, name=f"ln_mlp_{i}")(x)
            h = nn.Dense(4 * self.width, dtype=self.dtype, name=f"mlp_in_{i}")(h)
            x = x + nn.Dense(self.width, dtype=self.dtype, name=f"mlp_out_{i}")(nn.gelu(h))
        ln_final = nn.LayerNorm(dtype=self.dtype, name="ln_final")
        if self.embed_dim is None:
            return ln_final(x).astype(jnp.float32)
        m = mask[..., None].astype(x.dtype)
        pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        out = nn.Dense(self.embed_dim, dtype=self.dtype, name="proj")(ln_final(pooled))
        return out.astype(jnp.float32)
