"""Loaders for transformers `save_pretrained` CLIP folders (config.json + safetensors).

Each loader accepts a tower folder (`CLIPTextModel[WithProjection]`,
`CLIPVisionModel[WithProjection]`) or a full `CLIPModel` folder, taking only
the tensors its tower needs. `with_projection=None` uses the tower's
projection exactly when the checkpoint contains it (so SD1/SD2 text encoders
give the raw pooled state and SDXL's second encoder gives `text_embeds`).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from bpgo_jax.models.clip import config as config_lib
from bpgo_jax.models.clip.convert import ShardingFn, expected_shapes, load_params
from bpgo_jax.models.clip.modules import CLIPModel, CLIPTextModel, CLIPVisionModel
from bpgo_jax.models.clip.weights import TensorReader, open_tensors

_TEXT = ("text_model.", "text_projection.")
_VISION = ("vision_model.", "visual_projection.")
_TOP_LEVEL = (*_TEXT, *_VISION, "logit_scale")


def _add_tower_prefix(prefix: str):
    """transformers >= 5 saves bare tower models without their `text_model.` /
    `vision_model.` prefix (older files and the *WithProjection classes keep it)."""
    return lambda key: key if key.startswith(_TOP_LEVEL) else prefix + key


def text_inputs(cfg: config_lib.TextConfig):
    return jnp.zeros((1, cfg.max_position_embeddings), jnp.int32)


def vision_inputs(cfg: config_lib.VisionConfig):
    return jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)


def _skip_for(own: tuple[str, str], other: tuple[str, ...], proj: bool) -> tuple[str, ...]:
    """Prefixes to ignore: the other tower, `logit_scale`, and our projection if unused."""
    return (*other, "logit_scale", *(() if proj else (own[1],)))


def _with_projection(reader: TensorReader, name: str, with_projection: bool | None) -> bool:
    return name in reader if with_projection is None else with_projection


def load_clip_text(
    folder: str,
    *,
    dtype: Any = jnp.float32,
    sharding_fn: ShardingFn | None = None,
    with_projection: bool | None = None,
) -> tuple[CLIPTextModel, dict]:
    """`module.apply({"params": params}, input_ids) -> (last_hidden_state, pooled)`."""
    cfg = config_lib.tower_config(config_lib.read_config(folder), "text")
    with open_tensors(folder) as reader:
        proj = _with_projection(reader, "text_projection.weight", with_projection)
        module = CLIPTextModel(cfg, with_projection=proj, dtype=dtype)
        expected = expected_shapes(module, text_inputs(cfg))
        params = load_params(
            reader,
            expected,
            skip=_skip_for(_TEXT, _VISION, proj),
            rename=_add_tower_prefix("text_model."),
            dtype=dtype,
            sharding_fn=sharding_fn,
        )
    return module, params


def load_clip_vision(
    folder: str,
    *,
    dtype: Any = jnp.float32,
    sharding_fn: ShardingFn | None = None,
    with_projection: bool | None = None,
) -> tuple[CLIPVisionModel, dict]:
    """`module.apply({"params": params}, pixels_nhwc) -> (last_hidden_state, pooled)`."""
    cfg = config_lib.tower_config(config_lib.read_config(folder), "vision")
    with open_tensors(folder) as reader:
        proj = _with_projection(reader, "visual_projection.weight", with_projection)
        module = CLIPVisionModel(cfg, with_projection=proj, dtype=dtype)
        expected = expected_shapes(module, vision_inputs(cfg))
        params = load_params(
            reader,
            expected,
            skip=_skip_for(_VISION, _TEXT, proj),
            rename=_add_tower_prefix("vision_model."),
            dtype=dtype,
            sharding_fn=sharding_fn,
        )
    return module, params


def clip_module_and_shapes(cfg: config_lib.ClipConfig, dtype: Any) -> tuple[CLIPModel, dict]:
    module = CLIPModel(cfg, dtype=dtype)
    return module, expected_shapes(module, text_inputs(cfg.text), vision_inputs(cfg.vision))


def load_clip(
    folder: str, *, dtype: Any = jnp.float32, sharding_fn: ShardingFn | None = None
) -> tuple[CLIPModel, dict]:
    """A full transformers `CLIPModel`: `module.apply(v, input_ids, pixels)` gives logits."""
    cfg = config_lib.clip_config_from_dict(config_lib.read_config(folder))
    module, expected = clip_module_and_shapes(cfg, dtype)
    with open_tensors(folder) as reader:
        params = load_params(reader, expected, dtype=dtype, sharding_fn=sharding_fn)
    return module, params
