"""Architecture config dicts (diffusers / transformers `config.json` spelling) for weight-free FLUX.

`dev` and `schnell` are the public FLUX.1 architectures (transformer, the
16-channel VAE, CLIP-L and T5-v1.1-XXL, scheduler), so throughput and memory
runs see the real network without weights; `tiny` is a small FLUX-shaped
model (dev's guidance embedding, 8x VAE) for tests and CPU smoke runs. Each
preset is `{"transformer", "vae", "text_encoder", "text_encoder_2", "scheduler"}`,
the component names of a FLUX pipeline folder.
"""

from __future__ import annotations

import copy

from bpgo_jax.models.flux.config import DEV_SCHEDULER, SCHNELL_SCHEDULER
from bpgo_jax.models.text_stacks import CLIP_L, T5_XXL

_VAE = dict(
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

PRESETS: dict[str, dict] = {
    "dev": dict(
        transformer=dict(guidance_embeds=True),
        vae=_VAE,
        text_encoder=CLIP_L,
        text_encoder_2=T5_XXL,
        scheduler=DEV_SCHEDULER,
    ),
    "schnell": dict(
        transformer=dict(guidance_embeds=False),
        vae=_VAE,
        text_encoder=CLIP_L,
        text_encoder_2=T5_XXL,
        scheduler=SCHNELL_SCHEDULER,
    ),
    "tiny": dict(
        transformer=dict(
            in_channels=64,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=[4, 6, 6],
        ),
        vae=dict(
            _VAE,
            block_out_channels=[8, 16, 16, 16],
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=32,
        ),
        text_encoder=dict(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            eos_token_id=2,
            projection_dim=32,
        ),
        text_encoder_2=dict(
            T5_XXL, vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4
        ),
        scheduler=DEV_SCHEDULER,
    ),
}


def preset(name: str) -> dict:
    """A deep copy of preset `name` (callers may update it)."""
    if name not in PRESETS:
        raise ValueError(f"FLUX preset {name!r} is not one of {tuple(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
