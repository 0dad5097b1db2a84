"""FLUX.1 (dev, schnell) as a `DiffusionModel`: pure functions over (trainable, frozen) pytrees.

trainable = {"transformer": params}, or {"lora": factors} when LoRA is
configured (the transformer's weights then sit in frozen["transformer"]);
frozen also holds "vae" and either "text" (CLIP-L and T5, `models.text_stacks`)
or "text_cache" (a precomputed table per output field, `models.text_cache`).

The engine sees channels-last latents `[B, h, w, 16]` (h, w = image side / 8),
so per-step noise, log-probabilities and patch noise stay generic; `predict`
packs them 2x2 into the transformer's 64-channel tokens and unpacks the
velocity (`noise - x0`, float32). Its `t` is the engine's `1000 * sigma`; the
transformer gets `sigma = t / 1000`, as FluxPipeline passes `timestep / 1000`.
dev's guidance embedding gets `guidance` (a constant of the model, 3.5 by
default as in FluxPipeline): guidance distillation, not classifier-free
guidance, so runs keep `sample.guidance_scale=1`. The conditioning is
`{"prompt_embeds": [B, L_t5, 4096], "pooled_prompt_embeds": [B, 768]}`.

The sampling schedule is the folder's `scheduler_config.json`
(`model.scheduler_config`); `image_seq_len` (packed tokens) and
`config.flux_shift` give FLUX.1-dev's resolution-dependent shift.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from bpgo_jax.errors import ConfigError, UserError, WeightsError
from bpgo_jax.models import lora as lora_lib
from bpgo_jax.models import text_cache as text_cache_lib
from bpgo_jax.models import text_stacks, weights
from bpgo_jax.models.clip import CLIPTextModel
from bpgo_jax.models.clip.config import text_config_from_dict
from bpgo_jax.models.clip.loaders import text_inputs
from bpgo_jax.models.dit import patchify, unpatchify
from bpgo_jax.models.flux.config import (
    PACK,
    flux_config_from_dict,
    packed_seq_len,
    scheduler_config_from_dict,
)
from bpgo_jax.models.flux.presets import preset
from bpgo_jax.models.flux.transformer import (
    FluxTransformer2DModel,
    flux_rope,
    load_transformer,
    transformer_inputs,
)
from bpgo_jax.models.interface import DiffusionModel
from bpgo_jax.models.lora import LoraSpec
from bpgo_jax.models.sd.config import vae_config_from_dict
from bpgo_jax.models.sd.loader import load_vae, vae_inputs
from bpgo_jax.models.sd.pipeline import random_params
from bpgo_jax.models.sd.vae import AutoencoderKL
from bpgo_jax.models.t5 import T5EncoderModel, t5_config_from_dict
from bpgo_jax.models.t5 import example_inputs as t5_example_inputs
from bpgo_jax.models.text import HashTokenizer, Tokenizer

Params = Any

# Every projection of the double blocks' joint attention and of the single blocks'
# self-attention (PEFT's `to_q, to_k, to_v, to_out.0, add_{q,k,v}_proj, to_add_out`
# on diffusers' FLUX), in both stacks.
FLUX_ATTENTION_TARGETS = (
    r".*/attn/(to_q|to_k|to_v|to_out_0|add_q_proj|add_k_proj|add_v_proj|to_add_out)/kernel",
)
DEFAULT_GUIDANCE = 3.5  # FluxPipeline's guidance_scale
DEFAULT_RESOLUTION = 1024  # FluxPipeline's default_sample_size * vae_scale_factor
_COMPONENTS = {  # model_index.json entries read here, and their classes
    "transformer": "FluxTransformer2DModel",
    "vae": "AutoencoderKL",
    "scheduler": "FlowMatchEulerDiscreteScheduler",
}


@dataclasses.dataclass(frozen=True)
class FluxModel(DiffusionModel):
    """A `DiffusionModel` that also tells the sampler its packed image length."""

    @property
    def image_seq_len(self) -> int:
        """Transformer image tokens per sample (FluxPipeline's `image_seq_len`, `mu`'s input)."""
        return packed_seq_len(self.latent_shape)


@dataclasses.dataclass(frozen=True)
class FluxModules:
    """The Flax modules and host-side pieces one FLUX model is made of."""

    transformer: FluxTransformer2DModel
    vae: AutoencoderKL
    text: text_stacks.TextStack | None  # None: conditioning from a text cache
    scheduler: dict  # the scheduler_config.json, defaults filled in


def _size(resolution: Any) -> tuple[int, int]:
    """`resolution` (a side, or (height, width); None: the pipeline's 1024) in pixels."""
    if resolution is None:
        return DEFAULT_RESOLUTION, DEFAULT_RESOLUTION
    if isinstance(resolution, (tuple, list)):
        if len(resolution) != 2:
            raise ConfigError(f"resolution={resolution!r} must be a side or (height, width)")
        return int(resolution[0]), int(resolution[1])
    return int(resolution), int(resolution)


def _check_compatible(m: FluxModules) -> None:
    t, v = m.transformer.cfg, m.vae.cfg
    if v.latent_channels != t.latent_channels or t.out_dim != t.in_channels:
        raise ValueError(
            f"vae latent_channels={v.latent_channels} does not match the transformer's "
            f"in/out_channels={t.in_channels}/{t.out_dim} (4 x the latent channels)"
        )
    if m.text is None:
        return
    clip, t5 = m.text.modules["clip_l"].cfg, m.text.modules["t5"].cfg
    if clip.hidden_size != t.pooled_projection_dim or t5.d_model != t.joint_attention_dim:
        raise ValueError(
            f"text encoders (CLIP width {clip.hidden_size}, T5 width {t5.d_model}) do not match "
            f"the transformer's pooled_projection_dim={t.pooled_projection_dim} / "
            f"joint_attention_dim={t.joint_attention_dim}"
        )


def model_from_modules(
    m: FluxModules,
    *,
    resolution: int | tuple[int, int] | None = None,
    lora: LoraSpec | None = None,
    guidance: float = DEFAULT_GUIDANCE,
    cache_tables: dict[str, jax.Array] | None = None,
    tokenize: Tokenizer | None = None,
) -> FluxModel:
    """The `DiffusionModel` of modules `m` at `resolution` pixels (default 1024 x 1024).

    Without a text stack (`m.text` None), `cache_tables` (`{field: [P, ...]}`)
    and `tokenize` (prompts -> table rows) stand in for the encoders.
    """
    _check_compatible(m)
    t, v = m.transformer.cfg, m.vae.cfg
    height, width = _size(resolution)
    multiple = v.downscale * PACK
    if height % multiple or width % multiple or height < multiple or width < multiple:
        raise ConfigError(
            f"resolution={height}x{width} must be a positive multiple of {multiple} "
            "(8x VAE, 2x2 packing)"
        )
    if (m.text is None) != (cache_tables is not None):
        raise ValueError("give either a text stack or text-cache tables, not both or neither")
    latent_shape = (height // v.downscale, width // v.downscale, v.latent_channels)
    dtype = m.transformer.dtype
    guidance = float(guidance)

    def encode_text(frozen: Params, tokens: jax.Array) -> dict[str, jax.Array]:
        if m.text is not None:
            return m.text.encode(frozen["text"], tokens)
        return text_cache_lib.gather(frozen["text_cache"], tokens)

    def predict(trainable, frozen, x, timestep, cond):
        params = lora_lib.unet_params(trainable, frozen, lora, key="transformer")
        b, h, w, _ = x.shape
        text = cond["prompt_embeds"]
        rope = flux_rope(t, text.shape[1], h // PACK, w // PACK)
        sigma = jnp.asarray(timestep, jnp.float32) / 1000.0
        g = jnp.full((b,), guidance, jnp.float32) if t.guidance_embeds else None
        out = m.transformer.apply(
            {"params": params},
            patchify(x, (PACK, PACK), channels_first=True),
            text,
            cond["pooled_prompt_embeds"],
            sigma,
            g,
            rope,
        )
        grid = (h // PACK, w // PACK)
        return unpatchify(out.astype(jnp.float32), grid, (PACK, PACK), channels_first=True)

    def decode(frozen: Params, latents: jax.Array) -> jax.Array:
        return m.vae.apply({"params": frozen["vae"]}, latents, method="decode_images")

    def init(rng: jax.Array) -> tuple[Params, Params]:
        k_text, k_transformer, k_vae, k_lora = jax.random.split(rng, 4)
        net = random_params(m.transformer, k_transformer, dtype, *transformer_inputs(t))
        frozen = {"vae": random_params(m.vae, k_vae, dtype, *vae_inputs(v))}
        if m.text is not None:
            frozen["text"] = m.text.init(k_text, dtype)
        else:
            frozen["text_cache"] = dict(cache_tables)
        return split_params(net, frozen, lora, k_lora)

    return FluxModel(
        name="flux",
        latent_shape=latent_shape,
        prediction_type="flow",
        tokenize=m.text.tokenizer if m.text is not None else tokenize,
        encode_text=encode_text,
        predict=predict,
        decode=decode,
        init=init,
        scheduler_config=dict(m.scheduler),
    )


def split_params(
    transformer: Params, frozen: Params, spec: LoraSpec | None, rng: jax.Array
) -> tuple[Params, Params]:
    """`lora.split_params` under the key "transformer"."""
    return lora_lib.split_params(transformer, frozen, spec, rng, key="transformer")


def param_shapes(m: FluxModules, lora: LoraSpec | None = None) -> tuple[Params, Params]:
    """`(trainable, frozen)` of `m`'s model as `ShapeDtypeStruct`s, nothing drawn or read.

    For memory and FLOP estimates of the real-size presets (`model.init`
    draws every weight on the host); text-cache tables are not included.
    """
    dtype = jnp.dtype(m.transformer.dtype)

    def shapes(module, *inputs):
        tree = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))["params"]
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), tree)

    net = shapes(m.transformer, *transformer_inputs(m.transformer.cfg))
    frozen = {"vae": shapes(m.vae, *vae_inputs(m.vae.cfg))}
    if m.text is not None:
        frozen["text"] = {
            name: shapes(module, *_text_inputs(module)) for name, module in m.text.encoders
        }
    return jax.eval_shape(lambda n, f: split_params(n, f, lora, jax.random.key(0)), net, frozen)


def _text_inputs(module: Any) -> tuple[Any, ...]:
    if isinstance(module, CLIPTextModel):
        return (text_inputs(module.cfg),)
    return t5_example_inputs()


# ---------------------------------------------------------------- building


def _random_text(configs: dict, dtype: Any, attention: str, length: int) -> text_stacks.TextStack:
    """A text stack of config dicts with hash tokenizers (random weights only)."""
    clip_cfg = text_config_from_dict(dict(configs["text_encoder"]))
    t5_cfg = t5_config_from_dict(dict(configs["text_encoder_2"]))
    encoders = {
        "clip_l": CLIPTextModel(clip_cfg, with_projection=False, dtype=dtype, attention=attention),
        "t5": T5EncoderModel(t5_cfg, dtype=dtype, attention=attention),
    }
    tokenizers = {
        "clip_l": HashTokenizer(clip_cfg.vocab_size, clip_cfg.max_position_embeddings),
        "t5": HashTokenizer(t5_cfg.vocab_size, length),
    }
    return text_stacks.stack_from_modules("flux", encoders, tokenizers, max_sequence_length=length)


def modules_from_configs(
    configs: dict,
    dtype: Any = jnp.float32,
    *,
    attention: str = "auto",
    remat: str = "none",
    max_sequence_length: int | None = None,
) -> FluxModules:
    """Modules (random weights) from `{"transformer", "vae", "text_encoder", "text_encoder_2",
    "scheduler"}` config dicts, e.g. `presets.preset("dev")`."""
    for key in ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        if key not in configs:
            raise ValueError(f"FLUX configs lack the {key!r} config dict")
    length = text_stacks.resolve_max_sequence_length("flux", max_sequence_length)
    return FluxModules(
        transformer=FluxTransformer2DModel(
            flux_config_from_dict(dict(configs["transformer"])), dtype, attention, remat
        ),
        vae=AutoencoderKL(vae_config_from_dict(dict(configs["vae"])), dtype),
        text=_random_text(configs, dtype, attention, length),
        scheduler=scheduler_config_from_dict(dict(configs["scheduler"])),
    )


def _check_folder(folder: str) -> None:
    if os.path.isfile(folder):
        if folder.endswith(weights.PICKLE_SUFFIXES) or weights.is_pickle_data(folder):
            weights.refuse_pickle(folder)
        raise WeightsError(
            f"{folder} is a file; FLUX loads a diffusers pipeline folder (convert a "
            "Black Forest Labs checkpoint with `FluxPipeline.from_single_file`, see docs/models.md)"
        )
    if not os.path.isdir(folder):
        raise WeightsError(f"missing folder {folder} (a FLUX diffusers pipeline folder)")
    weights.check_pipeline_index(folder, _COMPONENTS, "FLUX.1")


def load_flux(
    folder: str,
    *,
    dtype: Any = jnp.float32,
    sharding_fn: weights.ShardingFn | None = None,
    variant: str | None = None,
    attention: str = "auto",
    remat: str = "none",
    max_sequence_length: int | None = None,
    with_text: bool = True,
) -> tuple[FluxModules, dict]:
    """Every component of a diffusers FLUX.1 folder -> `(modules, params)`.

    `params` = {"transformer", "vae"[, "text"]}; `sharding_fn(path, shape)`
    gets paths starting with those names and places each tensor as it is
    read. `with_text=False` skips the text encoders (a run reading a text cache).
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
    where = os.path.join(folder, "scheduler", "scheduler_config.json")
    try:
        sched = scheduler_config_from_dict(weights.read_json(where))
    except ValueError as err:
        raise WeightsError(f"{where}: {err}") from None
    params = {"transformer": t_params, "vae": v_params}
    stack = None
    if with_text:
        stack, params["text"] = text_stacks.load_text_stack(
            "flux",
            folder,
            max_sequence_length=max_sequence_length,
            dtype=dtype,
            sharding_fn=weights.prefixed(sharding_fn, "text"),
            variant=variant,
            attention=attention,
        )
    mods = FluxModules(transformer, vae, stack, sched)
    try:
        _check_compatible(mods)
    except ValueError as err:
        raise WeightsError(f"{folder}: {err}") from None
    return mods, params


def flux_model(
    source: str | dict,
    *,
    rng: jax.Array | None = None,
    dtype: Any = jnp.float32,
    resolution: int | tuple[int, int] | None = None,
    lora: LoraSpec | None = None,
    guidance: float = DEFAULT_GUIDANCE,
    sharding_fn: weights.ShardingFn | None = None,
    variant: str | None = None,
    attention: str = "auto",
    remat: str = "none",
    max_sequence_length: int | None = None,
    text_cache: str | None = None,
) -> tuple[FluxModel, Params, Params]:
    """`(model, trainable, frozen)` from a diffusers folder or from config dicts.

    A folder loads its weights (`load_flux`); config dicts (`presets.preset`)
    give random weights from `rng`, which also seeds the LoRA factors.
    `text_cache` (with a folder only) is a `launch/embed_prompts.py` file read
    instead of the text encoders: it must have been written for this folder
    and T5 length, and hold every prompt the run uses.
    """
    rng = jax.random.key(0) if rng is None else rng
    if not isinstance(source, str):
        if text_cache:
            raise ConfigError("model.text_cache needs model.init to be the diffusers folder")
        mods = modules_from_configs(
            source, dtype, attention=attention, remat=remat, max_sequence_length=max_sequence_length
        )
        model = model_from_modules(mods, resolution=resolution, lora=lora, guidance=guidance)
        return (model, *model.init(rng))
    mods, params = load_flux(
        source,
        dtype=dtype,
        sharding_fn=sharding_fn,
        variant=variant,
        attention=attention,
        remat=remat,
        max_sequence_length=max_sequence_length,
        with_text=not text_cache,
    )
    frozen = {"vae": params["vae"]}
    kw = dict(resolution=resolution, lora=lora, guidance=guidance)
    if text_cache:
        expect = text_cache_lib.stack_identity("flux", source, max_sequence_length)
        with text_cache_lib.TextCache(text_cache, expect=expect) as cache:
            tables = text_cache_lib.cache_tables(cache, sharding_fn)
            model = model_from_modules(
                mods, cache_tables=tables, tokenize=text_cache_lib.CacheTokenizer(cache), **kw
            )
        frozen["text_cache"] = tables
    else:
        model = model_from_modules(mods, **kw)
        frozen["text"] = params["text"]
    trainable, frozen = split_params(params["transformer"], frozen, lora, rng)
    return model, trainable, frozen


def flux_from_config(
    cfg: ml_collections.ConfigDict, rng: jax.Array, sharding_fn=None
) -> tuple[FluxModel, Params, Params]:
    """`config.model` with name="flux" -> `(model, trainable, frozen)`.

    Fields: `init` ("random" or a diffusers folder), `dtype`, optional
    `preset` (random init: "dev", "schnell", "tiny"), optional `transformer` /
    `vae` dicts overriding preset keys, `resolution` (a side or (height,
    width); default 1024), `variant`, `lora` = {rank, alpha, targets
    (default: `FLUX_ATTENTION_TARGETS`)}, `attention`, `remat`, `guidance`
    (dev's embedded guidance; default 3.5), `max_sequence_length` (T5
    tokens; 0 or unset: 512), `text_cache` (a `launch/embed_prompts.py`
    file; "" runs the encoders). A `prediction_type` other than "flow" is refused.
    """
    asked = cfg.get("prediction_type", None)
    if asked not in (None, "flow"):
        raise ConfigError(
            f"config.model.prediction_type={asked!r}: FLUX predicts the flow velocity ('flow')"
        )
    guidance = cfg.get("guidance", None)
    kw = dict(
        rng=rng,
        dtype=text_cache_lib.jnp_dtype(cfg.get("dtype", "float32")),
        resolution=cfg.get("resolution", None),
        lora=lora_lib.spec_from_config(cfg.get("lora", None), FLUX_ATTENTION_TARGETS),
        guidance=DEFAULT_GUIDANCE if guidance is None else float(guidance),
        attention=cfg.get("attention", "auto"),
        remat=cfg.get("remat", "none"),
        max_sequence_length=cfg.get("max_sequence_length", None) or None,
        text_cache=cfg.get("text_cache", None) or None,
    )
    init = cfg.get("init", "random")
    if init == "random":
        try:
            configs = preset(cfg.get("preset", "tiny"))
        except ValueError as err:
            raise ConfigError(f"config.model.preset: {err}") from None
        for key in ("transformer", "vae"):
            configs[key].update(dict(cfg.get(key, None) or {}))
        try:
            return flux_model(configs, **kw)
        except UserError:
            raise
        except ValueError as err:  # a config dict the modules refuse
            raise ConfigError(f"config.model: {err}") from None
    if not os.path.isdir(init):
        raise WeightsError(f"config.model.init={init!r} is neither 'random' nor a diffusers folder")
    return flux_model(init, sharding_fn=sharding_fn, variant=cfg.get("variant", None), **kw)
