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
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from bpgo_jax.errors import ConfigError, WeightsError
from bpgo_jax.models import lora as lora_lib
from bpgo_jax.models import text_stacks, weights
from bpgo_jax.models.clip import CLIPTextModel
from bpgo_jax.models.clip.config import text_config_from_dict
from bpgo_jax.models.dit import patchify, unpatchify
from bpgo_jax.models.dit import pipeline as dit_pipeline
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
from bpgo_jax.models.sd.config import vae_config_from_dict
from bpgo_jax.models.sd.loader import load_vae, vae_inputs
from bpgo_jax.models.sd.vae import AutoencoderKL
from bpgo_jax.models.t5 import T5EncoderModel, t5_config_from_dict
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
    lora: lora_lib.LoraSpec | None = None,
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
    height, width = dit_pipeline.image_size(resolution, (DEFAULT_RESOLUTION,) * 2)
    multiple = v.downscale * PACK
    if height % multiple or width % multiple or height < multiple or width < multiple:
        raise ConfigError(
            f"resolution={height}x{width} must be a positive multiple of {multiple} "
            "(8x VAE, 2x2 packing)"
        )
    latent_shape = (height // v.downscale, width // v.downscale, v.latent_channels)
    guidance = float(guidance)

    def predict(trainable, frozen, x, timestep, cond):
        params = dit_pipeline.transformer_params(trainable, frozen, lora)
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

    functions, text = (latent_shape, predict, decode), (cache_tables, tokenize)
    return dit_pipeline.flow_model("flux", m, _parts(m), functions, lora, text, FluxModel)


def _parts(m: FluxModules) -> tuple[dit_pipeline.Part, dit_pipeline.Part]:
    """The transformer and VAE with their init inputs."""
    return (m.transformer, transformer_inputs(m.transformer.cfg)), (m.vae, vae_inputs(m.vae.cfg))


def split_params(
    transformer: Params, frozen: Params, spec: lora_lib.LoraSpec | None, rng: jax.Array
) -> tuple[Params, Params]:
    """`lora.split_params` under the key "transformer"."""
    return dit_pipeline.split_params(transformer, frozen, spec, rng)


def param_shapes(m: FluxModules, lora: lora_lib.LoraSpec | None = None) -> tuple[Params, Params]:
    """`(trainable, frozen)` of `m`'s model as `ShapeDtypeStruct`s, nothing drawn or read
    (`dit.pipeline.param_shapes`)."""
    return dit_pipeline.param_shapes(*_parts(m), m.text, lora, m.transformer.dtype)


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


def modules_from_configs(configs: dict, dtype: Any = jnp.float32, **options: Any) -> FluxModules:
    """Modules (random weights) from `{"transformer", "vae", "text_encoder", "text_encoder_2",
    "scheduler"}` config dicts, e.g. `presets.preset("dev")`; `options`: `attention`,
    `remat`, `max_sequence_length` (`dit.pipeline.BuildOptions`)."""
    for key in ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        if key not in configs:
            raise ValueError(f"FLUX configs lack the {key!r} config dict")
    o = dit_pipeline.options_of(options)
    length = text_stacks.resolve_max_sequence_length("flux", o.max_sequence_length)
    return FluxModules(
        transformer=FluxTransformer2DModel(
            flux_config_from_dict(dict(configs["transformer"])), dtype, o.attention, o.remat
        ),
        vae=AutoencoderKL(vae_config_from_dict(dict(configs["vae"])), dtype),
        text=_random_text(configs, dtype, o.attention, length),
        scheduler=scheduler_config_from_dict(dict(configs["scheduler"])),
    )


FAMILY = dit_pipeline.Family(
    kind="flux",
    name="FLUX.1",
    components=_COMPONENTS,
    load_transformer=dit_pipeline.in_subfolder(load_transformer, "transformer"),
    load_vae=dit_pipeline.in_subfolder(load_vae, "vae"),
    parse_scheduler=lambda raw, where: scheduler_config_from_dict(raw),
    modules=FluxModules,
    check=_check_compatible,
)


def load_flux(folder: str, *, with_text: bool = True, **options: Any) -> tuple[FluxModules, dict]:
    """Every component of a diffusers FLUX.1 folder -> `(modules, params)`.

    `params` = {"transformer", "vae"[, "text"]}; `options` are
    `dit.pipeline.BuildOptions` (dtype, sharding_fn, variant, attention,
    remat, max_sequence_length). `with_text=False` skips the text encoders
    (a run reading a text cache).
    """
    if os.path.isfile(folder) and not (
        folder.endswith(weights.PICKLE_SUFFIXES) or weights.is_pickle_data(folder)
    ):
        raise WeightsError(
            f"{folder} is a file; FLUX loads a diffusers pipeline folder (convert a "
            "Black Forest Labs checkpoint with `FluxPipeline.from_single_file`, see docs/models.md)"
        )
    return dit_pipeline.load_components(FAMILY, folder, with_text=with_text, **options)


def flux_model(
    source: str | dict,
    *,
    rng: jax.Array | None = None,
    resolution: int | tuple[int, int] | None = None,
    lora: lora_lib.LoraSpec | None = None,
    guidance: float = DEFAULT_GUIDANCE,
    text_cache: str | None = None,
    **options: Any,
) -> tuple[FluxModel, Params, Params]:
    """`(model, trainable, frozen)` from a diffusers folder or from config dicts.

    A folder loads its weights (`load_flux`); config dicts (`presets.preset`)
    give random weights from `rng`, which also seeds the LoRA factors.
    `text_cache` (with a folder only) is a `launch/embed_prompts.py` file read
    instead of the text encoders: it must have been written for this folder
    and T5 length, and hold every prompt the run uses. `options` are
    `dit.pipeline.BuildOptions` (dtype, sharding_fn, variant, attention,
    remat, max_sequence_length).
    """
    make = functools.partial(
        model_from_modules, resolution=resolution, lora=lora, guidance=guidance
    )
    return dit_pipeline.assemble(
        "flux",
        source,
        modules_from_configs,
        load_flux,
        make,
        rng=rng,
        lora=lora,
        text_cache=text_cache,
        **options,
    )


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
    guidance = cfg.get("guidance", None)
    return dit_pipeline.model_from_config(
        cfg,
        rng,
        sharding_fn,
        family="FLUX",
        targets=FLUX_ATTENTION_TARGETS,
        preset=preset,
        build=flux_model,
        guidance=DEFAULT_GUIDANCE if guidance is None else float(guidance),
    )
