"""Tiny random SD3 / SD3.5 transformers and whole pipelines, written as `save_pretrained` does.

`transformer_folder` saves one `SD3Transformer2DModel`; `pipeline_folder`
a complete `StableDiffusion3Pipeline` (transformer, 16-channel VAE with
shift and scale factors, CLIP-L, CLIP-G, T5 and their tokenizers from
`text_folders`, the flow scheduler), so a test loads exactly what a user's
folder holds.
"""

from __future__ import annotations

from pathlib import Path

import diffusers
import text_folders
import torch
import transformers

# SD3(-medium): no q-k norm, no dual attention; the last block is context-pre-only.
SD3 = dict(
    sample_size=8,
    patch_size=2,
    in_channels=16,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=24,
    caption_projection_dim=16,
    pooled_projection_dim=12,
    out_channels=16,
    pos_embed_max_size=6,
)
# SD3.5(-medium): RMS q-k norms, dual attention in blocks 0-1; text widths of `text_folders`.
SD35 = dict(
    SD3,
    num_layers=4,
    joint_attention_dim=96,  # T5 d_model
    pooled_projection_dim=52,  # CLIP-L 24 + CLIP-G 28 projections
    pos_embed_max_size=8,
    qk_norm="rms_norm",
    dual_attention_layers=(0, 1),
)
VAE = dict(
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=8,
    sample_size=16,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
SHIFT = 3.0


def transformer(kw: dict, seed: int) -> diffusers.SD3Transformer2DModel:
    torch.manual_seed(seed)
    return diffusers.SD3Transformer2DModel(**kw).eval()


def transformer_folder(folder: Path, kw: dict, seed: int = 0) -> diffusers.SD3Transformer2DModel:
    model = transformer(kw, seed)
    model.save_pretrained(str(folder), safe_serialization=True)
    return model


def pipeline_folder(
    folder: Path, transformer_kw: dict = SD35, seed: int = 0
) -> diffusers.StableDiffusion3Pipeline:
    torch.manual_seed(seed)
    tok = text_folders.clip_tokenizer()
    v = len(tok)
    clip = transformers.CLIPTextModelWithProjection
    t5_tok = text_folders.t5_tokenizer()
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer(transformer_kw, seed + 1),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=SHIFT),
        vae=diffusers.AutoencoderKL(**VAE).eval(),
        text_encoder=clip(text_folders.clip_config(v, 32, 3, eos=2, proj=24)).eval(),
        tokenizer=tok,
        text_encoder_2=clip(text_folders.clip_config(v, 40, 2, eos=v - 1, proj=28)).eval(),
        tokenizer_2=text_folders.clip_tokenizer(pad="!"),
        text_encoder_3=transformers.T5EncoderModel(text_folders.t5_config(len(t5_tok))).eval(),
        tokenizer_3=t5_tok,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return pipe
