"""Loads a diffusers Stable Diffusion folder (SD 1.x / 2.x) into Flax parameters.

Layout read: `model_index.json`, `unet/`, `vae/` (config.json +
diffusion_pytorch_model[.variant].safetensors, or a sharded
`*.safetensors.index.json`), `text_encoder/` (transformers CLIP),
`tokenizer/`, `scheduler/`. Files, names, layouts and placement are
`bpgo_jax.models.weights`'; what is SD's is here: the component classes,
their example inputs, and the pre-0.14 VAE attention names.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bpgo_jax.errors import WeightsError
from bpgo_jax.models import weights
from bpgo_jax.models.clip import load_clip_text
from bpgo_jax.models.clip.modules import CLIPTextModel
from bpgo_jax.models.sd.config import (
    UNetConfig,
    VAEConfig,
    unet_config_from_dict,
    vae_config_from_dict,
)
from bpgo_jax.models.sd.scheduler import Scheduler, load_scheduler
from bpgo_jax.models.sd.unet import UNet2DConditionModel
from bpgo_jax.models.sd.vae import AutoencoderKL

_COMPONENTS = {
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "text_encoder": "CLIPTextModel",
    "tokenizer": None,
    "scheduler": None,
}
# Pre-0.14 diffusers VAE attention names (still in many hub checkpoints).
_DEPRECATED_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def diffusers_rename(key: str) -> str:
    """SD's rename rule: deprecated attention names -> today's (`...attentions.0.query.weight`
    -> `...attentions.0.to_q.weight`); every other key is already the module's."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] in _DEPRECATED_ATTN and "attentions" in parts:
        parts = parts[:-2] + _DEPRECATED_ATTN[parts[-2]].split(".") + parts[-1:]
    return ".".join(parts)


def unet_inputs(cfg: UNetConfig) -> tuple[Any, ...]:
    """Example inputs for init / eval_shape (spatial size only needs to be valid)."""
    side = 2**cfg.num_upsamplers
    return (
        jnp.zeros((1, side, side, cfg.in_channels), jnp.float32),
        jnp.zeros((1,), jnp.float32),
        jnp.zeros((1, 1, cfg.cross_attention_dim[0]), jnp.float32),
    )


def vae_inputs(cfg: VAEConfig) -> tuple[Any, ...]:
    return (jnp.zeros((1, cfg.downscale, cfg.downscale, cfg.in_channels), jnp.float32),)


def _check_class(raw: dict, want: str, folder: str) -> None:
    got = raw.get("_class_name", want)
    if got != want:
        raise WeightsError(f"{folder}/config.json is a {got!r}, expected {want!r}")


# component -> (diffusers class, module from its config.json, example inputs)
_LOADERS: dict[str, tuple[str, Callable[[dict, Any], nn.Module], Callable[[Any], tuple]]] = {
    "unet": (
        "UNet2DConditionModel",
        lambda raw, dtype: UNet2DConditionModel(unet_config_from_dict(raw), dtype),
        unet_inputs,
    ),
    "vae": (
        "AutoencoderKL",
        lambda raw, dtype: AutoencoderKL(vae_config_from_dict(raw), dtype),
        vae_inputs,
    ),
}


def _load_component(
    folder: str,
    name: str,
    *,
    dtype: Any,
    sharding_fn: weights.ShardingFn | None,
    variant: str | None,
) -> tuple[Any, dict]:
    """One diffusers component folder -> `(module, params)`; the paths given to
    `sharding_fn` start with `name` ("unet", "vae")."""
    class_name, build, inputs = _LOADERS[name]
    raw = weights.read_json(os.path.join(folder, "config.json"))
    _check_class(raw, class_name, folder)
    module = build(raw, dtype)
    expected = weights.expected_shapes(module, *inputs(module.cfg))
    with weights.open_tensors(folder, variant) as reader:
        params = weights.read_params(
            reader,
            expected,
            rename=diffusers_rename,
            prefix=(name,),
            dtype=dtype,
            sharding_fn=sharding_fn,
        )
    return module, params


def load_unet(
    folder: str, *, dtype: Any = jnp.float32, sharding_fn=None, variant: str | None = None
) -> tuple[UNet2DConditionModel, dict]:
    """A diffusers `unet/` folder -> `(module, params)`."""
    kw = dict(dtype=dtype, sharding_fn=sharding_fn, variant=variant)
    return _load_component(folder, "unet", **kw)


def load_vae(
    folder: str, *, dtype: Any = jnp.float32, sharding_fn=None, variant: str | None = None
) -> tuple[AutoencoderKL, dict]:
    """A diffusers `vae/` folder (AutoencoderKL) -> `(module, params)`."""
    kw = dict(dtype=dtype, sharding_fn=sharding_fn, variant=variant)
    return _load_component(folder, "vae", **kw)


@dataclasses.dataclass(frozen=True)
class SDCheckpoint:
    """Modules, parameters and side files of one loaded SD folder."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text: CLIPTextModel
    scheduler: Scheduler
    params: dict  # {"unet": ..., "vae": ..., "text": ...}
    tokenizer_path: str


def _check_source(folder: str) -> None:
    if os.path.isfile(folder):
        if folder.endswith(weights.PICKLE_SUFFIXES) or weights.is_pickle_data(folder):
            weights.refuse_pickle(folder)
        raise WeightsError(
            f"{folder} is a file; load_sd expects a diffusers folder; {weights.CONVERT_HINT}"
        )
    if not os.path.isdir(folder):
        raise WeightsError(f"missing folder {folder}")


def load_sd(
    folder: str,
    *,
    dtype: Any = jnp.float32,
    sharding_fn: weights.ShardingFn | None = None,
    variant: str | None = None,
) -> SDCheckpoint:
    """Loads every component of a diffusers SD folder.

    `sharding_fn(path, shape)` gets paths prefixed by the component
    (`("unet", "conv_in", "kernel")`, `("vae", ...)`, `("text", ...)`) and
    returns where that tensor should live; without it tensors go to the
    default device.
    """
    _check_source(folder)
    index = weights.read_json(os.path.join(folder, "model_index.json"))
    for name, cls in _COMPONENTS.items():
        entry = index.get(name)
        if not entry or entry[0] is None:
            raise WeightsError(f"{folder}/model_index.json has no {name!r} component")
        if cls is not None and entry[1] != cls:
            raise WeightsError(
                f"{folder}/model_index.json: {name} is a {entry[1]!r}, expected {cls!r} "
                f"(pipeline {index.get('_class_name')!r} is not supported)"
            )
    unet, unet_params = load_unet(
        os.path.join(folder, "unet"), dtype=dtype, sharding_fn=sharding_fn, variant=variant
    )
    vae, vae_params = load_vae(
        os.path.join(folder, "vae"), dtype=dtype, sharding_fn=sharding_fn, variant=variant
    )
    text_sharding = None
    if sharding_fn is not None:
        text_sharding = lambda path, shape: sharding_fn(("text", *path), shape)
    text_folder = os.path.join(folder, "text_encoder")
    if not os.path.isdir(text_folder):
        raise WeightsError(f"missing folder {text_folder}")
    text, text_params = load_clip_text(text_folder, dtype=dtype, sharding_fn=text_sharding)
    tokenizer_path = os.path.join(folder, "tokenizer")
    if not os.path.isdir(tokenizer_path):
        raise WeightsError(f"missing folder {tokenizer_path}")
    return SDCheckpoint(
        unet=unet,
        vae=vae,
        text=text,
        scheduler=load_scheduler(os.path.join(folder, "scheduler")),
        params={"unet": unet_params, "vae": vae_params, "text": text_params},
        tokenizer_path=tokenizer_path,
    )
