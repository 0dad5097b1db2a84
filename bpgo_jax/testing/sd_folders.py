"""Random Stable Diffusion pipeline folders, written with diffusers' `save_pretrained`.

The folders have the layout of a real checkpoint (unet/, vae/, text_encoder/,
tokenizer/, scheduler/, model_index.json, safetensors weights), so the
loaders read them as they read SD 1.5, and the PyTorch parts written there
serve as numerical references (tests) or as the PyTorch peer's model
(benchmarks/vs_pytorch.py). torch, diffusers and transformers are imported by the
functions that write, so the model configs here are free to import.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_CA, _DOWN, _CAUP, _UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
# An SD-layout UNet of 5.8 M parameters on 16x16x4 latents (blocks 64/128/128): large
# enough that XLA:CPU's reductions block as on real models (its up path normalises
# 16x16x192 activations, where tests/test_onpolicy_ratio.py first saw programs differ);
# the model of benchmarks/vs_pytorch.py.
UNET_6M = dict(
    sample_size=16,
    block_out_channels=[64, 128, 128],
    down_block_types=[_CA, _CA, _DOWN],
    up_block_types=[_UP, _CAUP, _CAUP],
    layers_per_block=1,
    attention_head_dim=8,
    cross_attention_dim=32,
    norm_num_groups=32,
)
# An 8x8 -> 16x16 two-level VAE (4 latent channels) and SD 1.x's DDIM schedule.
VAE = dict(
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    scaling_factor=0.5,
)
SCHEDULE = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def jiggle(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random non-zero offsets on every weight (diffusers zero-inits some output
    layers, and norm scales start at one), in eval mode."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return module.eval()


def write_tokenizer(folder: str | os.PathLike) -> None:
    """A tiny byte-level BPE vocabulary in the layout of SD's `tokenizer/` folder."""
    os.makedirs(folder, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["!", '"', *letters, *(c + "</w>" for c in letters)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    merges = ["p h", "o t", "ph ot", "c a"]
    vocab = {t: i for i, t in enumerate(tokens)}
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 77}, f)


def save_sd_pipeline(
    root: str | os.PathLike,
    unet: dict,
    *,
    act: str = "quick_gelu",
    prediction: str = "epsilon",
    seed: int = 0,
    vae: dict = VAE,
) -> dict:
    """Writes `root/sd`: a random `StableDiffusionPipeline` with UNet kwargs `unet`, a
    2-layer CLIP text encoder of width `unet["cross_attention_dim"]` (activation
    `act`), the VAE kwargs `vae` and DDIM with `prediction`. Returns the folder
    path ("folder"), the tokenizer and the torch modules ("text_encoder", "unet", "vae")."""
    import diffusers
    import torch
    import transformers

    root = Path(root)
    tok_src = str(root / "tokenizer_src")
    write_tokenizer(tok_src)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_src)
    torch.manual_seed(seed)
    text_cfg = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=unet["cross_attention_dim"],
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    parts = dict(
        text_encoder=transformers.CLIPTextModel(text_cfg).eval(),
        unet=jiggle(diffusers.UNet2DConditionModel(**unet), seed),
        vae=jiggle(diffusers.AutoencoderKL(**vae), seed + 1),
    )
    pipe = diffusers.StableDiffusionPipeline(
        **parts,
        tokenizer=tokenizer,
        scheduler=diffusers.DDIMScheduler(**SCHEDULE, prediction_type=prediction),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = str(root / "sd")
    pipe.save_pretrained(folder, safe_serialization=True)
    return {"folder": folder, "tokenizer": tokenizer, **parts}
