"""Stable Diffusion as a `DiffusionModel`: pure functions over (trainable, frozen) pytrees.

trainable = {"unet": params}, or {"lora": factors} when LoRA is configured
(the UNet base weights then sit in frozen["unet"]); frozen also holds
{"text": CLIP text params, "vae": autoencoder params}. The same functions
serve weights loaded from a diffusers folder and a randomly initialised model
built from config dicts (tests, throughput runs without weights).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bpgo_jax.errors import ConfigError, WeightsError
from bpgo_jax.models import lora as lora_lib
from bpgo_jax.models.clip import CLIPTextModel
from bpgo_jax.models.clip.config import text_config_from_dict
from bpgo_jax.models.interface import DiffusionModel
from bpgo_jax.models.lora import LoraSpec
from bpgo_jax.models.scan import num_layer_axes
from bpgo_jax.models.sd import loader
from bpgo_jax.models.sd.config import unet_config_from_dict, vae_config_from_dict
from bpgo_jax.models.sd.presets import preset
from bpgo_jax.models.sd.scheduler import Scheduler, scheduler_from_dict
from bpgo_jax.models.sd.unet import UNet2DConditionModel
from bpgo_jax.models.sd.vae import AutoencoderKL
from bpgo_jax.models.text import HashTokenizer, PretrainedTokenizer, Tokenizer

Params = Any


@dataclasses.dataclass(frozen=True)
class SDModules:
    """The Flax modules and host-side pieces one SD model is made of."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text: CLIPTextModel
    scheduler: Scheduler
    tokenize: Tokenizer


def modules_from_configs(
    configs: dict, dtype: Any = jnp.float32, attention: str = "auto"
) -> SDModules:
    """Modules from `{"unet", "vae", "text_encoder", "scheduler"[, "tokenizer"]}` config dicts.

    "tokenizer" (optional) is a tokenizer folder; without it a hash tokenizer
    over the text encoder's vocabulary stands in (random models only).
    `attention` is the UNet's and text encoder's kernel (`models.attention`).
    """
    for key in ("unet", "vae", "text_encoder", "scheduler"):
        if key not in configs:
            raise ValueError(f"SD configs lack the {key!r} config dict")
    text_cfg = text_config_from_dict(dict(configs["text_encoder"]))
    tok_path = configs.get("tokenizer")
    if tok_path:
        tokenize = PretrainedTokenizer(tok_path, text_cfg.max_position_embeddings)
    else:
        tokenize = HashTokenizer(text_cfg.vocab_size, text_cfg.max_position_embeddings)
    return SDModules(
        unet=UNet2DConditionModel(unet_config_from_dict(dict(configs["unet"])), dtype, attention),
        vae=AutoencoderKL(vae_config_from_dict(dict(configs["vae"])), dtype),
        text=CLIPTextModel(text_cfg, with_projection=False, dtype=dtype, attention=attention),
        scheduler=scheduler_from_dict(dict(configs["scheduler"])),
        tokenize=tokenize,
    )


def _check_compatible(m: SDModules) -> None:
    u, v, t = m.unet.cfg, m.vae.cfg, m.text.cfg
    if t.hidden_size != u.cross_attention_dim[0] or len(set(u.cross_attention_dim)) != 1:
        raise ValueError(
            f"unet cross_attention_dim={u.cross_attention_dim} does not match the text "
            f"encoder hidden_size={t.hidden_size}"
        )
    if v.latent_channels != u.in_channels or u.in_channels != u.out_channels:
        raise ValueError(
            f"vae latent_channels={v.latent_channels} does not match unet "
            f"in/out_channels={u.in_channels}/{u.out_channels}"
        )


def model_from_modules(
    m: SDModules, *, resolution: int | None = None, lora: LoraSpec | None = None
) -> DiffusionModel:
    """The `DiffusionModel` of modules `m` at image size `resolution` (default: native)."""
    _check_compatible(m)
    u, v = m.unet.cfg, m.vae.cfg
    size = resolution or u.sample_size * v.downscale
    multiple = v.downscale * 2**u.num_upsamplers
    if size % multiple:
        raise ConfigError(f"resolution={size} must be a multiple of {multiple} for this model")
    latent_shape = (size // v.downscale, size // v.downscale, u.in_channels)
    dtype = m.unet.dtype
    tokens0 = jnp.zeros((1, m.text.cfg.max_position_embeddings), jnp.int32)

    def encode_text(frozen: Params, tokens: jax.Array) -> jax.Array:
        hidden, _ = m.text.apply({"params": frozen["text"]}, tokens)
        return hidden.astype(jnp.float32)

    def predict(trainable, frozen, x, t, cond):
        return m.unet.apply({"params": lora_lib.unet_params(trainable, frozen, lora)}, x, t, cond)

    def decode(frozen: Params, latents: jax.Array) -> jax.Array:
        return m.vae.apply({"params": frozen["vae"]}, latents, method="decode_images")

    def init(rng: jax.Array) -> tuple[Params, Params]:
        k_text, k_unet, k_vae, k_lora = jax.random.split(rng, 4)
        unet = random_params(m.unet, k_unet, dtype, *loader.unet_inputs(u))
        frozen = {
            "text": random_params(m.text, k_text, dtype, tokens0),
            "vae": random_params(m.vae, k_vae, dtype, *loader.vae_inputs(v)),
        }
        return lora_lib.split_params(unet, frozen, lora, k_lora)

    return DiffusionModel(
        name="sd",
        latent_shape=latent_shape,
        prediction_type=m.scheduler.prediction_type,
        tokenize=m.tokenize,
        encode_text=encode_text,
        predict=predict,
        decode=decode,
        init=init,
        scheduler_config=m.scheduler.to_dict(),
    )


def random_params(module: nn.Module, rng: jax.Array, dtype: Any, *inputs: Any) -> Params:
    """Random weights for `module` drawn on the host, leaf by leaf.

    Only shapes are traced (`eval_shape`); drawing with numpy avoids compiling
    flax's init graph, which for a UNet costs far more than the forward pass.
    Kernels ~ N(0, 1/fan_in) (LeCun), biases 0, norm scales 1, embeddings N(0, 0.02^2).
    A scanned stack's kernel `[layers, ..., in, out]` (`models/scan.py`) is one
    kernel per layer: its fan-in leaves out the layer axes.
    """
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))["params"]
    data = rng if rng.dtype == jnp.uint32 else jax.random.key_data(rng)
    gen = np.random.default_rng(np.asarray(data).ravel().tolist())

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "bias":
            arr = np.zeros(shape, np.float32)
        elif name == "scale":
            arr = np.ones(shape, np.float32)
        elif name == "kernel":
            keys = tuple(str(getattr(k, "key", k)) for k in path)
            fan_in = int(np.prod(shape[num_layer_axes(keys) : -1]))
            arr = gen.standard_normal(shape, np.float32) / np.float32(np.sqrt(fan_in))
        else:
            arr = gen.standard_normal(shape, np.float32) * np.float32(0.02)
        return jax.device_put(arr.astype(jnp.dtype(dtype)))

    return jax.tree_util.tree_map_with_path(draw, shapes)


def sd_model(
    source: str | dict,
    *,
    rng: jax.Array | None = None,
    dtype: Any = jnp.float32,
    resolution: int | None = None,
    lora: LoraSpec | None = None,
    sharding_fn=None,
    variant: str | None = None,
    scheduler_overrides: dict | None = None,
    attention: str = "auto",
) -> tuple[DiffusionModel, Params, Params]:
    """`(model, trainable, frozen)` from a diffusers folder or from config dicts.

    A folder loads its weights (see `loader.load_sd`); config dicts
    (`{"unet", "vae", "text_encoder", "scheduler"}`, e.g. `presets.preset("sd15")`)
    give random weights from `rng`. `rng` also seeds the LoRA factors.
    `scheduler_overrides` (e.g. `{"prediction_type": "v_prediction"}`) replace
    keys of the schedule read from the source. `attention` is the UNet's and
    text encoder's kernel (`models.attention`).
    """
    rng = jax.random.key(0) if rng is None else rng
    if isinstance(source, str):
        ckpt = loader.load_sd(source, dtype=dtype, sharding_fn=sharding_fn, variant=variant)
        mods = SDModules(
            unet=ckpt.unet.clone(attention=attention),
            vae=ckpt.vae,
            text=ckpt.text.clone(attention=attention),
            scheduler=ckpt.scheduler,
            tokenize=PretrainedTokenizer(
                ckpt.tokenizer_path, ckpt.text.cfg.max_position_embeddings
            ),
        )
        params = ckpt.params
    else:
        mods, params = modules_from_configs(source, dtype, attention), None
    if scheduler_overrides:
        schedule = scheduler_from_dict({**mods.scheduler.to_dict(), **scheduler_overrides})
        mods = dataclasses.replace(mods, scheduler=schedule)
    model = model_from_modules(mods, resolution=resolution, lora=lora)
    if params is None:
        trainable, frozen = model.init(rng)
    else:
        frozen = {"text": params["text"], "vae": params["vae"]}
        trainable, frozen = lora_lib.split_params(params["unet"], frozen, lora, rng)
    return model, trainable, frozen


def sd_from_config(
    cfg: ml_collections.ConfigDict, rng: jax.Array, sharding_fn=None
) -> tuple[DiffusionModel, Params, Params]:
    """`config.model` with name="sd" -> `(model, trainable, frozen)`.

    Fields: `init` ("random" or a diffusers folder), `dtype` ("float32" /
    "bfloat16"), optional `preset` ("sd15", "sd21", "tiny"; random init),
    optional `unet` / `vae` / `text_encoder` dicts overriding preset keys,
    optional `scheduler` dict overriding keys of the schedule (random or
    loaded; None values are ignored, so configs can declare overridable keys),
    optional `resolution`, optional `variant`, and optional
    `lora` = {rank, alpha (default rank), targets (default: attention projections)},
    and optional `attention` (the kernel, `models.attention`; default "auto").
    `config.model.prediction_type` is not read: it comes from the schedule, and
    a value that disagrees with it is an error rather than silently ignored.
    `sharding_fn(path, shape)` places each loaded tensor as it is read.
    """
    dtype = jnp.bfloat16 if cfg.get("dtype", "float32") == "bfloat16" else jnp.float32
    lora = lora_lib.spec_from_config(cfg.get("lora", None), lora_lib.SD_ATTENTION_TARGETS)
    kw = dict(
        rng=rng,
        dtype=dtype,
        resolution=cfg.get("resolution", None),
        lora=lora,
        attention=cfg.get("attention", "auto"),
        scheduler_overrides={
            k: v for k, v in dict(cfg.get("scheduler", None) or {}).items() if v is not None
        },
    )
    init = cfg.get("init", "random")
    if init != "random":
        if not os.path.isdir(init):
            raise WeightsError(
                f"config.model.init={init!r} is neither 'random' nor a diffusers folder"
            )
        out = sd_model(init, variant=cfg.get("variant", None), sharding_fn=sharding_fn, **kw)
    else:
        configs = preset(cfg.get("preset", "tiny"))
        for key in ("unet", "vae", "text_encoder"):
            configs[key].update(dict(cfg.get(key, None) or {}))
        out = sd_model(configs, **kw)
    _check_prediction_type(cfg, out[0].prediction_type)
    return out


def _check_prediction_type(cfg: ml_collections.ConfigDict, actual: str) -> None:
    """A `config.model.prediction_type` that disagrees with the schedule would be ignored."""
    asked = cfg.get("prediction_type", None)
    if asked is not None and asked != actual:
        raise ConfigError(
            f"config.model.prediction_type={asked!r} is not used by SD: the scheduler config "
            f"decides ({actual!r}); drop the field, or set "
            "config.model.scheduler.prediction_type to change it"
        )
