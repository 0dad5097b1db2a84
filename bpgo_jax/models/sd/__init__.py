"""Stable Diffusion 1.x / 2.x in Flax: UNet, VAE, scheduler, diffusers-folder loader.

model, trainable, frozen = sd_model("path/to/stable-diffusion-v1-5")
model, trainable, frozen = sd_model(preset("tiny"), rng=jax.random.key(0))
"""

from bpgo_jax.models.sd.loader import SDCheckpoint, load_sd, load_unet, load_vae
from bpgo_jax.models.sd.pipeline import LoraSpec, sd_from_config, sd_model
from bpgo_jax.models.sd.presets import preset
from bpgo_jax.models.sd.scheduler import Scheduler, load_scheduler, scheduler_from_dict

__all__ = [
    "LoraSpec",
    "SDCheckpoint",
    "Scheduler",
    "load_scheduler",
    "load_sd",
    "load_unet",
    "load_vae",
    "preset",
    "scheduler_from_dict",
    "sd_from_config",
    "sd_model",
]
