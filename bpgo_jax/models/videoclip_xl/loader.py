"""Loads a converted VideoCLIP-XL folder, and tokenizes prompts as the reference does."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from bpgo_jax.errors import WeightsError
from bpgo_jax.models import weights
from bpgo_jax.models.text import PretrainedTokenizer
from bpgo_jax.models.videoclip_xl.model import VideoCLIPXL, VideoClipXLConfig, example_inputs

CONVERTER = "bpgo-convert-videoclip-xl"


def read_config(folder: str) -> VideoClipXLConfig:
    raw = weights.read_json(os.path.join(folder, "config.json"))
    if raw.get("model_type") != "videoclip_xl":
        raise WeightsError(
            f"{folder}/config.json is not a converted VideoCLIP-XL config (model_type "
            f"{raw.get('model_type')!r}); make the folder with {CONVERTER}"
        )
    try:
        return VideoClipXLConfig.from_dict(raw)
    except (KeyError, TypeError, ValueError) as err:
        raise WeightsError(f"{folder}/config.json: {err}") from None


def load_videoclip_xl(
    folder: str,
    *,
    dtype: Any = jnp.float32,
    sharding_fn: weights.ShardingFn | None = None,
    attention: str = "auto",
) -> tuple[VideoCLIPXL, dict]:
    """A folder written by `convert.convert_checkpoint` -> our module and its params."""
    cfg = read_config(folder)
    module = VideoCLIPXL(cfg, dtype=dtype, attention=attention)
    expected = weights.expected_shapes(module, *example_inputs(cfg))
    with weights.open_tensors(folder) as reader:
        params = weights.read_params(reader, expected, dtype=dtype, sharding_fn=sharding_fn)
    return module, params


TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # a fast or a slow CLIPTokenizer's


def check_tokenizer_folder(folder: str) -> None:
    """transformers builds an empty tokenizer from a folder without files: refuse it."""
    if not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        raise WeightsError(
            f"{folder} holds no CLIPTokenizer (none of {', '.join(TOKENIZER_FILES)}): give "
            f"{CONVERTER} a --tokenizer, or the reward a tokenizer_path"
        )


def check_tokenizer(tokenizer: Any, vocab_size: int, folder: str) -> None:
    """The model pools at the largest id, so EOT must be the vocabulary's last token."""
    size, eos = len(tokenizer), tokenizer.eos_token_id
    if size > vocab_size:
        raise WeightsError(
            f"tokenizer {folder} has {size} tokens, more than the model's {vocab_size}"
        )
    if eos != size - 1:
        raise WeightsError(
            f"tokenizer {folder}: its end-of-text id {eos} is not its largest ({size - 1}); "
            "VideoCLIP-XL pools at the largest id, so use CLIP's vocabulary"
        )


class ZeroPaddedTokenizer(PretrainedTokenizer):
    """transformers' `CLIPTokenizer` with the reference's padding: zeros after the first EOT.

    The ids up to EOT (start token, byte-pair tokens, truncation keeping EOT
    last) are `CLIPTokenizer`'s; the reference pads with id 0 where
    `CLIPTokenizer` pads with its pad token (EOT for OpenAI's vocabulary). The
    embedding at EOT is the same either way (causal mask); the ids are too.
    """

    def __init__(self, folder: str, max_length: int, vocab_size: int):
        check_tokenizer_folder(folder)
        super().__init__(folder, max_length)
        check_tokenizer(self._tokenizer, vocab_size, folder)
        self.eos_id = self._tokenizer.eos_token_id

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        ids = super().__call__(prompts)
        eos = ids == self.eos_id
        after = (np.cumsum(eos, axis=1) - eos) > 0
        return np.where(after, 0, ids).astype(np.int32)
