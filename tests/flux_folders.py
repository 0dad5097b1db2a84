"""Tiny random FLUX.1 pipelines (transformer, 16-channel VAE, CLIP-L, T5), built offline.

The text encoders and tokenizers are `text_folders`' (real transformers
tokenizers over a small vocabulary); the transformer and VAE are diffusers'
own classes at FLUX's layout (in_channels 64 = 16 latent channels x 2x2,
an 8x VAE without quant convs, shift and scale factors), with every weight
jiggled away from its initial value so norms and gates are exercised. Folders
are written with `save_pretrained`, as a user's folder would be.
"""

from __future__ import annotations

from pathlib import Path

import diffusers
import text_folders
import torch
import transformers

from bpgo_jax.testing.sd_folders import jiggle

TRANSFORMER = dict(
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=96,  # text_folders' T5 width
    pooled_projection_dim=32,  # the CLIP-L width below
    axes_dims_rope=(4, 6, 6),
)
VAE = dict(
    block_out_channels=(8, 16, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=8,
    sample_size=32,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
# FLUX.1-dev's scheduler_config.json.
SCHEDULER = dict(
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def transformer(guidance_embeds: bool, seed: int) -> diffusers.FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=guidance_embeds)
    return jiggle(model, seed)


def dev_pipeline(folder: Path, seed: int = 0) -> diffusers.FluxPipeline:
    """A FLUX.1-dev-shaped pipeline (guidance embedding, dynamic shift), saved to `folder`."""
    torch.manual_seed(seed)
    tok, t5_tok = text_folders.clip_tokenizer(), text_folders.t5_tokenizer()
    clip = transformers.CLIPTextModel(
        text_folders.clip_config(len(tok), 32, 2, eos=2, proj=32)
    ).eval()
    t5 = transformers.T5EncoderModel(text_folders.t5_config(len(t5_tok))).eval()
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=jiggle(diffusers.AutoencoderKL(**VAE), seed + 1),
        text_encoder=clip,
        tokenizer=tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer(True, seed + 2),
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return pipe


def schnell_transformer(folder: Path, seed: int = 0) -> diffusers.FluxTransformer2DModel:
    """A schnell-shaped transformer (no guidance embedder), saved as a sharded checkpoint
    (an index and several files, as the real 12 B transformer is stored)."""
    model = transformer(False, seed)
    model.save_pretrained(str(folder), safe_serialization=True, max_shard_size="40KB")
    return model
