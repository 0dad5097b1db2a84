"""Stable Diffusion 3 / 3.5 in Flax: MMDiT transformer and diffusers-folder loader.

model, trainable, frozen = sd3_model("path/to/stable-diffusion-3.5-medium")
model, trainable, frozen = sd3_model(preset("tiny"), rng=jax.random.key(0))

The text encoders are `models.text_stacks`' (kind "sd3"), the VAE is
`models.sd.vae.AutoencoderKL` (16 latent channels, shift and scale factors).
"""

from bpgo_jax.models.sd3.config import SD3Config, sd3_config_from_dict
from bpgo_jax.models.sd3.pipeline import (
    SD3_ATTENTION_TARGETS,
    SD3Modules,
    load_sd3,
    model_from_modules,
    modules_from_configs,
    sd3_from_config,
    sd3_model,
)
from bpgo_jax.models.sd3.presets import PRESETS, preset
from bpgo_jax.models.sd3.schedule import check_scheduler_config
from bpgo_jax.models.sd3.transformer import (
    JointTransformerBlock,
    SD3Transformer2DModel,
    block_runs,
    load_transformer,
    stack_map,
)

__all__ = [
    "PRESETS",
    "SD3_ATTENTION_TARGETS",
    "JointTransformerBlock",
    "SD3Config",
    "SD3Modules",
    "SD3Transformer2DModel",
    "block_runs",
    "check_scheduler_config",
    "load_sd3",
    "load_transformer",
    "model_from_modules",
    "modules_from_configs",
    "preset",
    "sd3_config_from_dict",
    "sd3_from_config",
    "sd3_model",
    "stack_map",
]
