"""Loaders for transformers `save_pretrained` CLIP folders (config.json + safetensors).

Each tower loader accepts a tower folder (`CLIPTextModel[WithProjection]`,
`CLIPVisionModel[WithProjection]`) or a full `CLIPModel` folder, taking only
the tensors its tower needs. `with_projection=None` uses the tower's
projection exactly when the checkpoint contains it (so SD1/SD2 text encoders
give the raw pooled state and SDXL's second encoder gives `text_embeds`).
Files, names, layouts and placement are `bpgo_jax.models.weights`'; CLIP's
rename rules are here.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp

from bpgo_jax.models import weights
from bpgo_jax.models.clip import config as config_lib
from bpgo_jax.models.clip.modules import CLIPModel, CLIPTextModel, CLIPVisionModel

_TEXT = ("text_model.", "text_projection.")
_VISION = ("vision_model.", "visual_projection.")
_TOP_LEVEL = (*_TEXT, *_VISION, "logit_scale")
_TOWERS = {  # tower -> (module, its prefixes, the other tower's, its projection tensor)
    "text": (CLIPTextModel, _TEXT, _VISION, "text_projection.weight"),
    "vision": (CLIPVisionModel, _VISION, _TEXT, "visual_projection.weight"),
}


def read_config(folder: str) -> dict[str, Any]:
    return weights.read_json(os.path.join(folder, "config.json"))


def clip_rename(key: str) -> str | None:
    """Skips the `position_ids` buffer old checkpoints saved; other names are the module's."""
    return None if key.endswith("position_ids") else key


def tower_rename(own: tuple[str, str], other: tuple[str, ...], proj: bool) -> weights.Rename:
    """One tower out of a tower or `CLIPModel` checkpoint.

    transformers >= 5 saves bare tower models without their `text_model.` /
    `vision_model.` prefix (older files and the *WithProjection classes keep
    it); the other tower, `logit_scale` and an unused projection are skipped.
    """
    skip = (*other, "logit_scale", *(() if proj else (own[1],)))

    def rename(key: str) -> str | None:
        name = key if key.startswith(_TOP_LEVEL) else own[0] + key
        return None if name.startswith(skip) else clip_rename(name)

    return rename


def text_inputs(cfg: config_lib.TextConfig):
    return jnp.zeros((1, cfg.max_position_embeddings), jnp.int32)


def vision_inputs(cfg: config_lib.VisionConfig):
    return jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)


def _load_tower(
    folder: str,
    tower: str,
    *,
    dtype: Any,
    sharding_fn: weights.ShardingFn | None,
    with_projection: bool | None,
    attention: str = "auto",
    variant: str | None = None,
) -> tuple[Any, dict]:
    module_cls, own, other, proj_name = _TOWERS[tower]
    cfg = config_lib.tower_config(read_config(folder), tower)
    inputs = text_inputs(cfg) if tower == "text" else vision_inputs(cfg)
    with weights.open_tensors(folder, variant) as reader:
        proj = proj_name in reader if with_projection is None else with_projection
        module = module_cls(cfg, with_projection=proj, dtype=dtype, attention=attention)
        params = weights.read_params(
            reader,
            weights.expected_shapes(module, inputs),
            rename=tower_rename(own, other, proj),
            dtype=dtype,
            sharding_fn=sharding_fn,
        )
    return module, params


def load_clip_text(
    folder: str,
    *,
    dtype: Any = jnp.float32,
    sharding_fn: weights.ShardingFn | None = None,
    with_projection: bool | None = None,
    attention: str = "auto",
    variant: str | None = None,
) -> tuple[CLIPTextModel, dict]:
    """`module.apply({"params": params}, input_ids) -> (last_hidden_state, pooled)`.

    `attention` is the kernel of `models.attention` (`config.model.attention`);
    `variant` picks `model.<variant>.safetensors` files (e.g. "fp16").
    """
    return _load_tower(
        folder,
        "text",
        dtype=dtype,
        sharding_fn=sharding_fn,
        with_projection=with_projection,
        attention=attention,
        variant=variant,
    )


def load_clip_vision(
    folder: str,
    *,
    dtype: Any = jnp.float32,
    sharding_fn: weights.ShardingFn | None = None,
    with_projection: bool | None = None,
    attention: str = "auto",
) -> tuple[CLIPVisionModel, dict]:
    """`module.apply({"params": params}, pixels_nhwc) -> (last_hidden_state, pooled)`."""
    return _load_tower(
        folder,
        "vision",
        dtype=dtype,
        sharding_fn=sharding_fn,
        with_projection=with_projection,
        attention=attention,
    )


def clip_module_and_shapes(
    cfg: config_lib.ClipConfig, dtype: Any, attention: str = "auto"
) -> tuple[CLIPModel, dict]:
    module = CLIPModel(cfg, dtype=dtype, attention=attention)
    inputs = (text_inputs(cfg.text), vision_inputs(cfg.vision))
    return module, weights.expected_shapes(module, *inputs)


def load_clip(
    folder: str,
    *,
    dtype: Any = jnp.float32,
    sharding_fn: weights.ShardingFn | None = None,
    attention: str = "auto",
) -> tuple[CLIPModel, dict]:
    """A full transformers `CLIPModel`: `module.apply(v, input_ids, pixels)` gives logits."""
    cfg = config_lib.clip_config_from_dict(read_config(folder))
    module, expected = clip_module_and_shapes(cfg, dtype, attention)
    with weights.open_tensors(folder) as reader:
        params = weights.read_params(
            reader, expected, rename=clip_rename, dtype=dtype, sharding_fn=sharding_fn
        )
    return module, params
