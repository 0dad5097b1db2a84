"""Architecture config dicts (diffusers `config.json` spelling) for weight-free SD models.

`sd15` and `sd21` are the public SD 1.5 / SD 2.1 architectures, so
throughput and memory runs see the real network without downloading weights;
`tiny` is a few-hundred-kilobyte SD-shaped model for tests and CPU smoke runs.
Each preset is `{"unet", "vae", "text_encoder", "scheduler"}`.
"""

from __future__ import annotations

import copy

_CA, _DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_CAUP, _UP = "CrossAttnUpBlock2D", "UpBlock2D"
_SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
    timestep_spacing="leading",
)
_SD_VAE = dict(
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

PRESETS: dict[str, dict] = {
    "sd15": dict(
        unet=dict(
            sample_size=64,
            block_out_channels=[320, 640, 1280, 1280],
            down_block_types=[_CA, _CA, _CA, _DOWN],
            up_block_types=[_UP, _CAUP, _CAUP, _CAUP],
            layers_per_block=2,
            attention_head_dim=8,
            cross_attention_dim=768,
        ),
        vae=_SD_VAE,
        text_encoder=dict(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            eos_token_id=2,
        ),
        scheduler=dict(_SD_SCHEDULE, prediction_type="epsilon"),
    ),
    "sd21": dict(
        unet=dict(
            sample_size=96,
            block_out_channels=[320, 640, 1280, 1280],
            down_block_types=[_CA, _CA, _CA, _DOWN],
            up_block_types=[_UP, _CAUP, _CAUP, _CAUP],
            layers_per_block=2,
            attention_head_dim=[5, 10, 20, 20],
            cross_attention_dim=1024,
            use_linear_projection=True,
            upcast_attention=True,
        ),
        vae=dict(_SD_VAE, sample_size=768),
        text_encoder=dict(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
            eos_token_id=2,
        ),
        scheduler=dict(_SD_SCHEDULE, prediction_type="v_prediction"),
    ),
    "tiny": dict(
        unet=dict(
            sample_size=8,
            block_out_channels=[32, 64],
            down_block_types=[_CA, _DOWN],
            up_block_types=[_UP, _CAUP],
            layers_per_block=1,
            attention_head_dim=4,
            cross_attention_dim=32,
            norm_num_groups=8,
        ),
        vae=dict(
            block_out_channels=[16, 32],
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=16,
        ),
        text_encoder=dict(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            eos_token_id=2,
        ),
        scheduler=dict(_SD_SCHEDULE, prediction_type="epsilon"),
    ),
}


def preset(name: str) -> dict:
    """A deep copy of preset `name`'s config dicts."""
    if name not in PRESETS:
        raise ValueError(f"unknown SD preset {name!r}; known: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
