"""CLIP text and vision towers in Flax, loaded from transformers or OpenCLIP safetensors.

module, params = load_clip_text("sd/text_encoder")
hidden, pooled = module.apply({"params": params}, input_ids)
"""

from bpgo_jax.models.clip.config import ClipConfig, TextConfig, VisionConfig
from bpgo_jax.models.clip.loaders import load_clip, load_clip_text, load_clip_vision
from bpgo_jax.models.clip.modules import CLIPModel, CLIPTextModel, CLIPVisionModel, l2_normalize
from bpgo_jax.models.clip.openclip import load_openclip
from bpgo_jax.models.clip.preprocess import preprocess_images

__all__ = [
    "CLIPModel",
    "CLIPTextModel",
    "CLIPVisionModel",
    "ClipConfig",
    "TextConfig",
    "VisionConfig",
    "l2_normalize",
    "load_clip",
    "load_clip_text",
    "load_clip_vision",
    "load_openclip",
    "preprocess_images",
]
