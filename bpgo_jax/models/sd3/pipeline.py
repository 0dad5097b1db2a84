"""SD3 / SD3.5 as a `DiffusionModel`: pure functions over (trainable, frozen) pytrees.

trainable = {"transformer": params}, or {"lora": factors} when LoRA is
configured (the transformer's weights then sit in frozen["transformer"]);
frozen also holds "vae" and either "text" (the CLIP-L, CLIP-G and T5
encoders, `models.text_stacks`) or "text_cache" (a precomputed embedding
table per output field, `models.text_cache`). Latents are channels last,
`[B, h, w, 16]`; `predict` returns the flow velocity `noise - x0` at
diffusers' timestep `1000 * sigma`, in float32.

The conditioning is `{"prompt_embeds": [B, 77 + L_t5, 4096],
"pooled_prompt_embeds": [B, 2048]}`; the sampler's classifier-free
guidance batches it with the negative prompt's (`sample.negative_prompt`,
`sample.guidance_scale`), as diffusers' pipeline does.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bpgo_jax.errors import ConfigError, WeightsError
from bpgo_jax.models import lora as lora_lib
from bpgo_jax.models import text_cache as text_cache_lib
from bpgo_jax.models import text_stacks, weights
from bpgo_jax.models.clip import CLIPTextModel
from bpgo_jax.models.clip.config import text_config_from_dict
from bpgo_jax.models.interface import DiffusionModel
from bpgo_jax.models.lora import LoraSpec
from bpgo_jax.models.sd.config import vae_config_from_dict
from bpgo_jax.models.sd.loader import load_vae, vae_inputs
from bpgo_jax.models.sd.pipeline import random_params
from bpgo_jax.models.sd.vae import AutoencoderKL
from bpgo_jax.models.sd3 import schedule
from bpgo_jax.models.sd3.config import sd3_config_from_dict
from bpgo_jax.models.sd3.presets import preset
from bpgo_jax.models.sd3.transformer import (
    SD3Transformer2DModel,
    example_inputs,
    load_transformer,
)
from bpgo_jax.models.t5 import T5EncoderModel, t5_config_from_dict
from bpgo_jax.models.text import HashTokenizer

Params = Any

# Flow-GRPO's SD3 LoRA targets: every projection of the joint attention (`attn`),
# in stacked (`joint_blocks/stacked/attn/...`) and unstacked blocks alike.
SD3_ATTENTION_TARGETS = (
    r".*/attn/(to_q|to_k|to_v|to_out_0|add_q_proj|add_k_proj|add_v_proj|to_add_out)/kernel",
)
_COMPONENTS = {  # model_index.json entries the pipeline needs, and their classes
    "transformer": "SD3Transformer2DModel",
    "vae": "AutoencoderKL",
    "scheduler": "FlowMatchEulerDiscreteScheduler",
}


@dataclasses.dataclass(frozen=True)
class SD3Modules:
    """The Flax modules and host-side pieces one SD3 model is made of."""

    transformer: SD3Transformer2DModel
    vae: AutoencoderKL
    text: text_stacks.TextStack | None  # None: conditioning from a text cache
    scheduler: dict  # {"num_train_timesteps", "shift"} (`schedule.check_scheduler_config`)


def _check_compatible(m: SD3Modules) -> None:
    t, v = m.transformer.cfg, m.vae.cfg
    if v.latent_channels != t.in_channels or t.in_channels != t.out_channels:
        raise ValueError(
            f"vae latent_channels={v.latent_channels} does not match the transformer's "
            f"in/out_channels={t.in_channels}/{t.out_channels}"
        )


def model_from_modules(
    m: SD3Modules,
    *,
    resolution: int | None = None,
    lora: LoraSpec | None = None,
    cache_tables: dict[str, jax.Array] | None = None,
    tokenize: Callable[[Sequence[str]], np.ndarray] | None = None,
) -> DiffusionModel:
    """The `DiffusionModel` of modules `m` at image side `resolution` (default: native).

    Without a text stack (`m.text` None), `cache_tables` (`{field: [P, ...]}`)
    and `tokenize` (prompts -> table rows) stand in for the encoders.
    """
    _check_compatible(m)
    t, v = m.transformer.cfg, m.vae.cfg
    size = resolution or t.sample_size * v.downscale
    multiple = v.downscale * t.patch_size
    if size % multiple:
        raise ConfigError(f"resolution={size} must be a multiple of {multiple} for this model")
    side = size // v.downscale
    if t.pos_embed_max_size and side // t.patch_size > t.pos_embed_max_size:
        raise ConfigError(
            f"resolution={size} is {side // t.patch_size} patches a side, more than the "
            f"transformer's pos_embed_max_size={t.pos_embed_max_size}"
        )
    if (m.text is None) != (cache_tables is not None):
        raise ValueError("give either a text stack or text-cache tables, not both or neither")
    latent_shape = (side, side, t.in_channels)
    dtype = m.transformer.dtype

    def encode_text(frozen: Params, tokens: jax.Array) -> dict[str, jax.Array]:
        if m.text is not None:
            return m.text.encode(frozen["text"], tokens)
        return text_cache_lib.gather(frozen["text_cache"], tokens)

    def predict(trainable, frozen, x, timestep, cond):
        params = lora_lib.unet_params(trainable, frozen, lora, key="transformer")
        out = m.transformer.apply(
            {"params": params},
            x,
            timestep,
            cond["prompt_embeds"],
            cond["pooled_prompt_embeds"],
        )
        return out.astype(jnp.float32)

    def decode(frozen: Params, latents: jax.Array) -> jax.Array:
        return m.vae.apply({"params": frozen["vae"]}, latents, method="decode_images")

    def init(rng: jax.Array) -> tuple[Params, Params]:
        k_text, k_transformer, k_vae, k_lora = jax.random.split(rng, 4)
        net = random_params(m.transformer, k_transformer, dtype, *example_inputs(t))
        frozen = {"vae": random_params(m.vae, k_vae, dtype, *vae_inputs(v))}
        if m.text is not None:
            frozen["text"] = m.text.init(k_text, dtype)
        else:
            frozen["text_cache"] = dict(cache_tables)
        return lora_lib.split_params(net, frozen, lora, k_lora, key="transformer")

    return DiffusionModel(
        name="sd3",
        latent_shape=latent_shape,
        prediction_type="flow",
        tokenize=m.text.tokenizer if m.text is not None else tokenize,
        encode_text=encode_text,
        predict=predict,
        decode=decode,
        init=init,
        scheduler_config=dict(m.scheduler),
    )


# ---------------------------------------------------------------- building


def _random_text(configs: dict, dtype: Any, attention: str, length: int) -> text_stacks.TextStack:
    """A text stack of config dicts with hash tokenizers (random weights only)."""
    encoders, tokenizers = {}, {}
    for name, key in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
        cfg = text_config_from_dict(dict(configs[key]))
        encoders[name] = CLIPTextModel(cfg, with_projection=True, dtype=dtype, attention=attention)
        tokenizers[name] = HashTokenizer(cfg.vocab_size, cfg.max_position_embeddings)
    t5 = configs.get("text_encoder_3")
    if t5 is not None:
        cfg = t5_config_from_dict(dict(t5))
        encoders["t5"] = T5EncoderModel(cfg, dtype=dtype)
        tokenizers["t5"] = HashTokenizer(cfg.vocab_size, length)
    return text_stacks.stack_from_modules(
        "sd3",
        encoders,
        tokenizers,
        max_sequence_length=length,
        joint_attention_dim=int(configs["transformer"]["joint_attention_dim"]),
    )


def modules_from_configs(
    configs: dict,
    dtype: Any = jnp.float32,
    *,
    attention: str = "auto",
    remat: str = "none",
    max_sequence_length: int | None = None,
) -> SD3Modules:
    """Modules (random weights) from `{"transformer", "vae", "text_encoder", "text_encoder_2",
    "text_encoder_3" (or None: no T5), "scheduler"}` config dicts, e.g. `presets.preset(...)`."""
    for key in ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        if key not in configs:
            raise ValueError(f"SD3 configs lack the {key!r} config dict")
    length = text_stacks.resolve_max_sequence_length("sd3", max_sequence_length)
    return SD3Modules(
        transformer=SD3Transformer2DModel(
            sd3_config_from_dict(dict(configs["transformer"])),
            attention=attention,
            remat=remat,
            dtype=dtype,
        ),
        vae=AutoencoderKL(vae_config_from_dict(dict(configs["vae"])), dtype),
        text=_random_text(configs, dtype, attention, length),
        scheduler=schedule.check_scheduler_config(dict(configs["scheduler"])),
    )


def _check_folder(folder: str) -> None:
    if not os.path.isdir(folder):
        raise WeightsError(f"missing folder {folder} (an SD3 diffusers pipeline folder)")
    weights.check_pipeline_index(folder, _COMPONENTS, "SD3")


def load_sd3(
    folder: str,
    *,
    dtype: Any = jnp.float32,
    sharding_fn: weights.ShardingFn | None = None,
    variant: str | None = None,
    attention: str = "auto",
    remat: str = "none",
    max_sequence_length: int | None = None,
    clip_skip: int | None = None,
    with_text: bool = True,
) -> tuple[SD3Modules, dict]:
    """Every component of a diffusers SD3 / SD3.5 folder -> `(modules, params)`.

    `params` = {"transformer", "vae"[, "text"]}; `sharding_fn(path, shape)`
    gets paths starting with those names. `with_text=False` skips the text
    encoders (a run reading a text cache).
    """
    _check_folder(folder)
    transformer, t_params = load_transformer(
        os.path.join(folder, "transformer"),
        dtype=dtype,
        sharding_fn=sharding_fn,
        variant=variant,
        attention=attention,
        remat=remat,
    )
    vae, v_params = load_vae(
        os.path.join(folder, "vae"), dtype=dtype, sharding_fn=sharding_fn, variant=variant
    )
    raw = weights.read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
    try:
        sched = schedule.check_scheduler_config(raw, f"{folder}/scheduler/scheduler_config.json")
    except ConfigError as err:
        raise WeightsError(str(err)) from None
    params = {"transformer": t_params, "vae": v_params}
    stack = None
    if with_text:
        stack, params["text"] = text_stacks.load_text_stack(
            "sd3",
            folder,
            max_sequence_length=max_sequence_length,
            dtype=dtype,
            sharding_fn=weights.prefixed(sharding_fn, "text"),
            variant=variant,
            clip_skip=clip_skip,
            attention=attention,
        )
    return SD3Modules(transformer, vae, stack, sched), params


def sd3_model(
    source: str | dict,
    *,
    rng: jax.Array | None = None,
    dtype: Any = jnp.float32,
    resolution: int | None = None,
    lora: LoraSpec | None = None,
    sharding_fn: weights.ShardingFn | None = None,
    variant: str | None = None,
    attention: str = "auto",
    remat: str = "none",
    max_sequence_length: int | None = None,
    clip_skip: int | None = None,
    text_cache: str | None = None,
) -> tuple[DiffusionModel, Params, Params]:
    """`(model, trainable, frozen)` from a diffusers folder or from config dicts.

    A folder loads its weights (`load_sd3`); config dicts (`presets.preset`)
    give random weights from `rng`, which also seeds the LoRA factors.
    `text_cache` (a folder's only) is a `launch/embed_prompts.py` file read
    instead of the text encoders: it must have been written for this
    folder, T5 length and `clip_skip`, and hold every prompt the run uses.
    """
    rng = jax.random.key(0) if rng is None else rng
    if not isinstance(source, str):
        if text_cache:
            raise ConfigError("model.text_cache needs model.init to be the diffusers folder")
        mods = modules_from_configs(
            source, dtype, attention=attention, remat=remat, max_sequence_length=max_sequence_length
        )
        model = model_from_modules(mods, resolution=resolution, lora=lora)
        return (model, *model.init(rng))
    mods, params = load_sd3(
        source,
        dtype=dtype,
        sharding_fn=sharding_fn,
        variant=variant,
        attention=attention,
        remat=remat,
        max_sequence_length=max_sequence_length,
        clip_skip=clip_skip,
        with_text=not text_cache,
    )
    frozen = {"vae": params["vae"]}
    if text_cache:
        expect = text_cache_lib.stack_identity("sd3", source, max_sequence_length, clip_skip)
        with text_cache_lib.TextCache(text_cache, expect=expect) as cache:
            tables = text_cache_lib.cache_tables(cache, sharding_fn)
            model = model_from_modules(
                mods,
                resolution=resolution,
                lora=lora,
                cache_tables=tables,
                tokenize=text_cache_lib.CacheTokenizer(cache),
            )
        frozen["text_cache"] = tables
    else:
        model = model_from_modules(mods, resolution=resolution, lora=lora)
        frozen["text"] = params["text"]
    trainable, frozen = lora_lib.split_params(
        params["transformer"], frozen, lora, rng, key="transformer"
    )
    return model, trainable, frozen


def sd3_from_config(
    cfg: ml_collections.ConfigDict, rng: jax.Array, sharding_fn=None
) -> tuple[DiffusionModel, Params, Params]:
    """`config.model` with name="sd3" -> `(model, trainable, frozen)`.

    Fields: `init` ("random" or a diffusers folder), `dtype`, optional
    `preset` (random init: "sd3_medium", "sd35_medium", "sd35_large",
    "tiny"), optional `transformer` / `vae` dicts overriding preset keys,
    `resolution`, `variant`, `lora` = {rank, alpha, targets (default:
    `SD3_ATTENTION_TARGETS`)}, `attention`, `remat`, `max_sequence_length`
    (T5 tokens; 0 or unset: 256), `clip_skip`, `text_cache` (a
    `launch/embed_prompts.py` file; "" runs the encoders). A
    `prediction_type` other than "flow" is refused.
    """
    asked = cfg.get("prediction_type", None)
    if asked not in (None, "flow"):
        raise ConfigError(
            f"config.model.prediction_type={asked!r}: SD3 predicts the flow velocity ('flow')"
        )
    dtype = text_cache_lib.jnp_dtype(cfg.get("dtype", "float32"))
    kw = dict(
        rng=rng,
        dtype=dtype,
        resolution=cfg.get("resolution", None),
        lora=lora_lib.spec_from_config(cfg.get("lora", None), SD3_ATTENTION_TARGETS),
        attention=cfg.get("attention", "auto"),
        remat=cfg.get("remat", "none"),
        max_sequence_length=cfg.get("max_sequence_length", None) or None,
        clip_skip=cfg.get("clip_skip", None),
    )
    init = cfg.get("init", "random")
    if init == "random":
        try:
            configs = preset(cfg.get("preset", "tiny"))
        except ValueError as err:
            raise ConfigError(f"config.model.preset: {err}") from None
        for key in ("transformer", "vae"):
            configs[key].update(dict(cfg.get(key, None) or {}))
        return sd3_model(configs, text_cache=cfg.get("text_cache", None) or None, **kw)
    if not os.path.isdir(init):
        raise WeightsError(f"config.model.init={init!r} is neither 'random' nor a diffusers folder")
    return sd3_model(
        init,
        sharding_fn=sharding_fn,
        variant=cfg.get("variant", None),
        text_cache=cfg.get("text_cache", None) or None,
        **kw,
    )
