"""Wan2.1 / Wan2.2 video models in Flax, read from diffusers folders.

module, params = load_wan_transformer("Wan2.1-T2V-1.3B-Diffusers")
module, params = load_wan_transformer("Wan2.2-T2V-A14B-Diffusers", expert="transformer_2")
module, params = init_wan_transformer(preset("tiny")["transformer"], jax.random.key(0))
vae, vae_params, vae_config = load_wan_vae("Wan2.1-T2V-1.3B-Diffusers")
model, trainable, frozen = wan_model("Wan2.1-T2V-1.3B-Diffusers", num_frames=81)  # T2V
"""

from bpgo_jax.models.wan.config import IMAGE_LEN, TEXT_LEN, WanConfig, wan_config_from_dict

# The T2V `DiffusionModel` last: it builds on every module above.
from bpgo_jax.models.wan.pipeline import (  # noqa: E402
    WAN_ATTENTION_TARGETS,
    WanModules,
    load_wan,
    wan_from_config,
    wan_model,
)
from bpgo_jax.models.wan.presets import (
    PRESETS,
    AbstractCall,
    abstract_call,
    experts,
    latent_shape,
    param_shapes,
    preset,
)
from bpgo_jax.models.wan.transformer import (
    EXPERTS,
    WanTransformer3DModel,
    example_inputs,
    expanded_timesteps,
    first_frame_mask,
    init_wan_transformer,
    load_wan_transformer,
    wan_rope,
    wan_transformer,
)
from bpgo_jax.models.wan.vae import (
    AutoencoderKLWan,
    decode_frames,
    decode_frames_uint8,
    denormalize_latents,
    load_wan_vae,
    normalize_latents,
)
from bpgo_jax.models.wan.vae_config import WAN22_VAE_ARCH, WanVAEConfig, wan_vae_config_from_dict

__all__ = [
    "EXPERTS",
    "WAN22_VAE_ARCH",
    "AutoencoderKLWan",
    "WanVAEConfig",
    "decode_frames",
    "decode_frames_uint8",
    "denormalize_latents",
    "load_wan_vae",
    "normalize_latents",
    "wan_vae_config_from_dict",
    "IMAGE_LEN",
    "PRESETS",
    "TEXT_LEN",
    "AbstractCall",
    "WanConfig",
    "WanTransformer3DModel",
    "abstract_call",
    "example_inputs",
    "expanded_timesteps",
    "experts",
    "first_frame_mask",
    "init_wan_transformer",
    "latent_shape",
    "load_wan_transformer",
    "param_shapes",
    "preset",
    "wan_config_from_dict",
    "wan_rope",
    "wan_transformer",
    "WAN_ATTENTION_TARGETS",
    "WanModules",
    "load_wan",
    "wan_from_config",
    "wan_model",
]
