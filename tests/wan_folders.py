"""Tiny random Wan transformers (diffusers' `WanTransformer3DModel`), saved with `save_pretrained`.

Every weight is jiggled away from its initial value (`flux_folders.jiggle`),
so norms, zero-initialised position tables and gates are exercised. Widths:
2 blocks of 2 heads x 16 (rotary split t 8, h 4, w 4), patches (1, 2, 2),
UMT5 width 32, 32 sinusoid channels, FFN 64.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import numpy as np
import torch
from flux_folders import jiggle
from PIL import Image

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
# Wan2.2 TI2V-5B's layout: one transformer reading and writing the 2.2 VAE's latents (48
# channels there, 8 here), its first latent frame the conditioning image's.
TI2V = dict(T2V, in_channels=8, out_channels=8)
# Wan2.2's VAE at tiny widths: residual blocks, 2x2 patchified pixels, 16x spatial.
VAE22 = dict(
    base_dim=8,
    decoder_base_dim=12,
    z_dim=8,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    scale_factor_spatial=16,
    latents_mean=[0.3, -0.2, 0.1, 0.0, -0.5, 0.25, 0.05, -0.1],
    latents_std=[1.5, 0.7, 2.0, 1.0, 1.2, 0.9, 2.5, 1.1],
)


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


def write_prompts(root: Path, prompts: list[str], size: tuple[int, int], last: bool = False):
    """PNG frames (smooth random colour fields) under `root/images/` and a `.jsonl` naming them
    (`last`: a second frame per prompt, as `last_image`)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)

    def frame(name: str) -> str:
        small = rng.randint(0, 256, (4, 6, 3)).astype(np.uint8)
        Image.fromarray(small).resize((size[1], size[0]), Image.BILINEAR).save(root / name)
        return name

    lines = []
    for i, prompt in enumerate(prompts):
        entry = {"prompt": prompt, "image": frame(f"images/{i}.png")}
        if last:
            entry["last_image"] = frame(f"images/{i}_last.png")
        lines.append(json.dumps(entry))
    path = root / ("prompts_flf.jsonl" if last else "prompts.jsonl")
    path.write_text("\n".join(lines) + "\n")
    return path
