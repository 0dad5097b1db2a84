"""Loads a diffusers Stable Diffusion folder (SD 1.x / 2.x) into Flax parameters.

Layout read: `model_index.json`, `unet/`, `vae/` (config.json +
diffusion_pytorch_model[.variant].safetensors, or a sharded
`*.safetensors.index.json`), `text_encoder/` (transformers CLIP),
`tokenizer/`, `scheduler/`. Tensors are read with the safetensors numpy API
one by one and placed straight onto their devices; torch and pickle are never
used (pickle checkpoints are refused: loading them can run arbitrary code).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
from safetensors import safe_open

from bpgo_jax.models.clip import load_clip_text
from bpgo_jax.models.clip.modules import CLIPTextModel
from bpgo_jax.models.clip.weights import PICKLE_SUFFIXES, TensorReader
from bpgo_jax.models.sd import convert
from bpgo_jax.models.sd.config import (
    UNetConfig,
    VAEConfig,
    read_json,
    unet_config_from_dict,
    vae_config_from_dict,
)
from bpgo_jax.models.sd.scheduler import Scheduler, load_scheduler
from bpgo_jax.models.sd.unet import UNet2DConditionModel
from bpgo_jax.models.sd.vae import AutoencoderKL

_CONVERT_HINT = (
    "convert it once to safetensors, e.g. "
    "`diffusers.StableDiffusionPipeline.from_pretrained(src).save_pretrained(dst, "
    "safe_serialization=True)` (or `.from_single_file(ckpt)` for an original .ckpt)"
)
_COMPONENTS = {
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "text_encoder": "CLIPTextModel",
    "tokenizer": None,
    "scheduler": None,
}


def _refuse_pickle(path: str) -> None:
    raise ValueError(f"refusing pickle checkpoint {path} (unsafe to load); {_CONVERT_HINT}")


def weight_files(folder: str, variant: str | None = None) -> list[str]:
    """The safetensors file(s) of one diffusers component folder."""
    if not os.path.isdir(folder):
        raise ValueError(f"missing folder {folder}")
    suffix = f".{variant}" if variant else ""
    for base in ("diffusion_pytorch_model", "model"):
        index = os.path.join(folder, f"{base}.safetensors.index{suffix}.json")
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            files = [os.path.join(folder, s) for s in shards]
            for file in files:
                if not os.path.isfile(file):
                    raise ValueError(f"missing file {file} (listed in {index})")
            return files
        single = os.path.join(folder, f"{base}{suffix}.safetensors")
        if os.path.isfile(single):
            return [single]
    pickles = sorted(p for p in os.listdir(folder) if p.endswith(PICKLE_SUFFIXES))
    if pickles:
        _refuse_pickle(os.path.join(folder, pickles[0]))
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.safetensors")))
    extra = f" (found {found}; pass variant=...)" if found else ""
    raise ValueError(f"missing file {folder}/diffusion_pytorch_model{suffix}.safetensors{extra}")


@contextlib.contextmanager
def open_component(folder: str, variant: str | None = None) -> Iterator[TensorReader]:
    with contextlib.ExitStack() as stack:
        handles: dict[str, tuple[str, Any]] = {}
        for file in weight_files(folder, variant):
            handle = stack.enter_context(safe_open(file, framework="np"))
            handles.update(dict.fromkeys(handle.keys(), (file, handle)))
        yield TensorReader(handles, folder)


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
        raise ValueError(f"{folder}/config.json is a {got!r}, expected {want!r}")


def load_unet(
    folder: str, *, dtype: Any = jnp.float32, sharding_fn=None, variant: str | None = None
) -> tuple[UNet2DConditionModel, dict]:
    """A diffusers `unet/` folder -> `(module, params)`."""
    raw = read_json(os.path.join(folder, "config.json"))
    _check_class(raw, "UNet2DConditionModel", folder)
    cfg = unet_config_from_dict(raw)
    module = UNet2DConditionModel(cfg, dtype)
    expected = convert.expected_shapes(module, *unet_inputs(cfg))
    with open_component(folder, variant) as reader:
        params = convert.load_params(
            reader, expected, prefix=("unet",), dtype=dtype, sharding_fn=sharding_fn
        )
    return module, params


def load_vae(
    folder: str, *, dtype: Any = jnp.float32, sharding_fn=None, variant: str | None = None
) -> tuple[AutoencoderKL, dict]:
    """A diffusers `vae/` folder (AutoencoderKL) -> `(module, params)`."""
    raw = read_json(os.path.join(folder, "config.json"))
    _check_class(raw, "AutoencoderKL", folder)
    cfg = vae_config_from_dict(raw)
    module = AutoencoderKL(cfg, dtype)
    expected = convert.expected_shapes(module, *vae_inputs(cfg))
    with open_component(folder, variant) as reader:
        params = convert.load_params(
            reader, expected, prefix=("vae",), dtype=dtype, sharding_fn=sharding_fn
        )
    return module, params


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
        if folder.endswith(PICKLE_SUFFIXES):
            _refuse_pickle(folder)
        raise ValueError(f"{folder} is a file; load_sd expects a diffusers folder; {_CONVERT_HINT}")
    if not os.path.isdir(folder):
        raise ValueError(f"missing folder {folder}")


def load_sd(
    folder: str,
    *,
    dtype: Any = jnp.float32,
    sharding_fn: convert.ShardingFn | None = None,
    variant: str | None = None,
) -> SDCheckpoint:
    """Loads every component of a diffusers SD folder.

    `sharding_fn(path, shape)` gets paths prefixed by the component
    (`("unet", "conv_in", "kernel")`, `("vae", ...)`, `("text", ...)`) and
    returns where that tensor should live; without it tensors go to the
    default device.
    """
    _check_source(folder)
    index = read_json(os.path.join(folder, "model_index.json"))
    for name, cls in _COMPONENTS.items():
        entry = index.get(name)
        if not entry or entry[0] is None:
            raise ValueError(f"{folder}/model_index.json has no {name!r} component")
        if cls is not None and entry[1] != cls:
            raise ValueError(
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
        raise ValueError(f"missing folder {text_folder}")
    text, text_params = load_clip_text(text_folder, dtype=dtype, sharding_fn=text_sharding)
    tokenizer_path = os.path.join(folder, "tokenizer")
    if not os.path.isdir(tokenizer_path):
        raise ValueError(f"missing folder {tokenizer_path}")
    return SDCheckpoint(
        unet=unet,
        vae=vae,
        text=text,
        scheduler=load_scheduler(os.path.join(folder, "scheduler")),
        params={"unet": unet_params, "vae": vae_params, "text": text_params},
        tokenizer_path=tokenizer_path,
    )
