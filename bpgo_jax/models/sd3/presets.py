"""Architecture config dicts (diffusers / transformers `config.json` spelling) for weight-free SD3.

`sd3_medium`, `sd35_medium` and `sd35_large` are the public architectures
(throughput and memory runs without weights); `tiny` is a few-hundred-
kilobyte model of the same structure (dual-attention blocks, RMS q-k norms,
a context-pre-only last block, three text encoders) for tests and CPU smoke
runs. Each preset is `{"transformer", "vae", "text_encoder", "text_encoder_2",
"text_encoder_3", "scheduler"}`; `text_encoder_3` None leaves T5 out (its
states are zeros, as diffusers does).
"""

from __future__ import annotations

import copy

from bpgo_jax.models.text_stacks import CLIP_L, T5_XXL

_VAE = dict(
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
_CLIP_G = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    eos_token_id=49407,
    projection_dim=1280,
)
_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
_REAL_TEXT = dict(text_encoder=CLIP_L, text_encoder_2=_CLIP_G, text_encoder_3=T5_XXL)
_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
)


def _tiny_clip(hidden: int, layers: int, eos: int | None, proj: int) -> dict:
    return dict(
        vocab_size=1000,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        eos_token_id=eos,
        projection_dim=proj,
    )


PRESETS: dict[str, dict] = {
    "sd3_medium": dict(
        transformer=dict(_MEDIUM, pos_embed_max_size=192),
        vae=_VAE,
        scheduler=_SCHEDULER,
        **_REAL_TEXT,
    ),
    "sd35_medium": dict(
        transformer=dict(
            _MEDIUM,
            pos_embed_max_size=384,
            qk_norm="rms_norm",
            dual_attention_layers=list(range(13)),
        ),
        vae=_VAE,
        scheduler=_SCHEDULER,
        **_REAL_TEXT,
    ),
    "sd35_large": dict(
        transformer=dict(
            _MEDIUM,
            num_layers=38,
            num_attention_heads=38,
            caption_projection_dim=2432,
            pos_embed_max_size=192,
            qk_norm="rms_norm",
        ),
        vae=_VAE,
        scheduler=_SCHEDULER,
        **_REAL_TEXT,
    ),
    "tiny": dict(
        transformer=dict(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            num_layers=4,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=48,
            caption_projection_dim=16,
            pooled_projection_dim=40,
            out_channels=16,
            pos_embed_max_size=8,
            qk_norm="rms_norm",
            dual_attention_layers=[0, 1],
        ),
        vae=dict(
            block_out_channels=[16, 32],
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=8,
            sample_size=16,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=_tiny_clip(16, 2, 2, 16),
        text_encoder_2=_tiny_clip(24, 2, 999, 24),
        text_encoder_3=dict(
            vocab_size=1000,
            d_model=48,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
        ),
        scheduler=_SCHEDULER,
    ),
}


def preset(name: str) -> dict:
    """A deep copy of preset `name`'s config dicts."""
    if name not in PRESETS:
        raise ValueError(f"unknown SD3 preset {name!r}; known: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
