"""FLUX.1 (dev and schnell) in Flax: transformer, diffusers-folder loader, `DiffusionModel`.

model, trainable, frozen = flux_model("path/to/FLUX.1-dev")
model, trainable, frozen = flux_model(preset("tiny"), rng=jax.random.key(0))
shift = flux_shift(model.scheduler_config, model.image_seq_len)
"""

from bpgo_jax.models.flux.config import (
    FluxConfig,
    flux_config_from_dict,
    flux_shift,
    packed_seq_len,
    scheduler_config_from_dict,
)
from bpgo_jax.models.flux.pipeline import (
    FLUX_ATTENTION_TARGETS,
    FluxModel,
    FluxModules,
    flux_from_config,
    flux_model,
    load_flux,
    model_from_modules,
    modules_from_configs,
    param_shapes,
)
from bpgo_jax.models.flux.presets import PRESETS, preset
from bpgo_jax.models.flux.transformer import (
    FluxTransformer2DModel,
    flux_rope,
    load_transformer,
    transformer_inputs,
)

__all__ = [
    "FLUX_ATTENTION_TARGETS",
    "PRESETS",
    "FluxConfig",
    "FluxModel",
    "FluxModules",
    "FluxTransformer2DModel",
    "flux_config_from_dict",
    "flux_from_config",
    "flux_model",
    "flux_rope",
    "flux_shift",
    "load_flux",
    "load_transformer",
    "model_from_modules",
    "modules_from_configs",
    "packed_seq_len",
    "param_shapes",
    "preset",
    "scheduler_config_from_dict",
    "transformer_inputs",
]
