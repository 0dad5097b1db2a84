"""Tiny random Wan transformers (diffusers' `WanTransformer3DModel`), saved with `save_pretrained`.

Every weight is jiggled away from its initial value (`flux_folders.jiggle`),
so norms, zero-initialised position tables and gates are exercised. Widths:
2 blocks of 2 heads x 16 (rotary split t 8, h 4, w 4), patches (1, 2, 2),
UMT5 width 32, 32 sinusoid channels, FFN 64.
"""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch
from flux_folders import jiggle

T2V = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
)
# Wan2.1 I2V: noise + mask + image latents in, CLIP states (width 24 here) through the image
# branch, whose k / v projections read the model width.
I2V = dict(T2V, in_channels=36, image_dim=24, added_kv_proj_dim=32)
# FLF2V: the image embedder's learned table over two frames' 257 CLIP tokens; this one also
# drops the cross-attention norm (`cross_attn_norm=False`), the other branch of that option.
FLF2V = dict(I2V, pos_embed_seq_len=2 * 257, cross_attn_norm=False)


def transformer(config: dict, seed: int) -> diffusers.WanTransformer3DModel:
    torch.manual_seed(seed)
    return jiggle(diffusers.WanTransformer3DModel(**config), seed)


def save_transformer(folder: Path, config: dict, seed: int) -> diffusers.WanTransformer3DModel:
    """A transformer folder (config.json + safetensors) of `config`."""
    model = transformer(config, seed)
    model.save_pretrained(str(folder), safe_serialization=True)
    return model


def a14b_experts(folder: Path, seed: int) -> tuple[diffusers.WanTransformer3DModel, ...]:
    """Wan2.2 A14B's layout: `transformer/` (high noise) and `transformer_2/` (low noise),
    one architecture, different weights."""
    return (
        save_transformer(folder / "transformer", T2V, seed),
        save_transformer(folder / "transformer_2", T2V, seed + 1),
    )
