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
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bpgo_jax.errors import ConfigError
from bpgo_jax.models import text_stacks
from bpgo_jax.models.clip import CLIPTextModel
from bpgo_jax.models.clip.config import text_config_from_dict
from bpgo_jax.models.dit import pipeline as dit_pipeline
from bpgo_jax.models.interface import DiffusionModel
from bpgo_jax.models.lora import LoraSpec
from bpgo_jax.models.sd.config import vae_config_from_dict
from bpgo_jax.models.sd.loader import load_vae, vae_inputs
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
    latent_shape = (side, side, t.in_channels)

    def predict(trainable, frozen, x, timestep, cond):
        params = dit_pipeline.transformer_params(trainable, frozen, lora)
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

    parts = (m.transformer, example_inputs(t)), (m.vae, vae_inputs(v))
    functions = (latent_shape, predict, decode)
    return dit_pipeline.flow_model("sd3", m, parts, functions, lora, (cache_tables, tokenize))


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


def modules_from_configs(configs: dict, dtype: Any = jnp.float32, **options: Any) -> SD3Modules:
    """Modules (random weights) from `{"transformer", "vae", "text_encoder", "text_encoder_2",
    "text_encoder_3" (or None: no T5), "scheduler"}` config dicts, e.g. `presets.preset(...)`;
    `options`: `attention`, `remat`, `max_sequence_length` (`dit.pipeline.BuildOptions`)."""
    o = dit_pipeline.options_of(options)
    attention, remat = o.attention, o.remat
    for key in ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        if key not in configs:
            raise ValueError(f"SD3 configs lack the {key!r} config dict")
    length = text_stacks.resolve_max_sequence_length("sd3", o.max_sequence_length)
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


FAMILY = dit_pipeline.Family(
    kind="sd3",
    name="SD3",
    components=_COMPONENTS,
    load_transformer=dit_pipeline.in_subfolder(load_transformer, "transformer"),
    load_vae=dit_pipeline.in_subfolder(load_vae, "vae"),
    parse_scheduler=schedule.check_scheduler_config,
    modules=SD3Modules,
)


def load_sd3(
    folder: str,
    *,
    clip_skip: int | None = None,
    with_text: bool = True,
    **options: Any,
) -> tuple[SD3Modules, dict]:
    """Every component of a diffusers SD3 / SD3.5 folder -> `(modules, params)`.

    `params` = {"transformer", "vae"[, "text"]}; `options` are
    `dit.pipeline.BuildOptions` (dtype, sharding_fn, variant, attention,
    remat, max_sequence_length). `with_text=False` skips the text encoders
    (a run reading a text cache).
    """
    return dit_pipeline.load_components(
        FAMILY, folder, with_text=with_text, text_kw={"clip_skip": clip_skip}, **options
    )


def sd3_model(
    source: str | dict,
    *,
    rng: jax.Array | None = None,
    resolution: int | None = None,
    lora: LoraSpec | None = None,
    clip_skip: int | None = None,
    text_cache: str | None = None,
    **options: Any,
) -> tuple[DiffusionModel, Params, Params]:
    """`(model, trainable, frozen)` from a diffusers folder or from config dicts.

    A folder loads its weights (`load_sd3`); config dicts (`presets.preset`)
    give random weights from `rng`, which also seeds the LoRA factors.
    `text_cache` (a folder's only) is a `launch/embed_prompts.py` file read
    instead of the text encoders: it must have been written for this
    folder, T5 length and `clip_skip`, and hold every prompt the run uses.
    `options` are `dit.pipeline.BuildOptions` (dtype, sharding_fn, variant,
    attention, remat, max_sequence_length).
    """
    make = functools.partial(model_from_modules, resolution=resolution, lora=lora)
    load = functools.partial(load_sd3, clip_skip=clip_skip)
    return dit_pipeline.assemble(
        "sd3",
        source,
        modules_from_configs,
        load,
        make,
        rng=rng,
        lora=lora,
        clip_skip=clip_skip,
        text_cache=text_cache,
        **options,
    )


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
    return dit_pipeline.model_from_config(
        cfg,
        rng,
        sharding_fn,
        family="SD3",
        targets=SD3_ATTENTION_TARGETS,
        preset=preset,
        build=sd3_model,
        clip_skip=cfg.get("clip_skip", None),
    )
