"""Wan2.1 text-to-video as a `DiffusionModel`: pure functions over (trainable, frozen) pytrees.

    model, trainable, frozen = wan_model("Wan2.1-T2V-1.3B-Diffusers", num_frames=81)
    model, trainable, frozen = wan_model(preset("tiny"), num_frames=5, resolution=(16, 16))

The trees are the flow DiTs' (`dit.pipeline`): trainable = {"transformer"}
or {"lora"}, frozen = {"vae", "text" | "text_cache"[, "transformer"]}; the
text stack is UMT5 (`text_stacks` kind "wan": 512 tokens, states past each
prompt's length zeroed, as WanPipeline.encode_prompt).

The engine sees channels-last video latents `[B, F, H, W, 16]` (F = 1 +
(frames - 1) / 4, H, W = pixels / 8), normalized as the pipeline's
transformer sees them, so per-step noise and log-probabilities (averaged
over every non-batch dim) are the engine's own. `predict` gets the engine's
`t = 1000 * sigma`, which is WanPipeline's `timestep`, and returns the
velocity `noise - x0` in float32. Classifier-free guidance is the sampler's
(`sample.guidance_scale`, WanPipeline's default 5.0; the negative prompt is
`sample.negative_prompt`, "" as the pipeline's when none is given: one
batched call of the negative and the prompts' conditioning, combined as
`uncond + w (cond - uncond)`). `decode` de-normalizes the latents and runs
the VAE one latent frame at a time: frames `[B, F_video, H, W, 3]` in [0, 1],
WanPipeline's `output_type="np"`.

The schedule: the folder's scheduler config gives the flow shift (Wan's
UniPC `flow_shift`, 3.0 for 480p and 5.0 for 720p; a FlowMatchEuler
`shift`), kept as `scheduler_config["shift"]`; the flow sampler takes it
when `sample.shift` is unset (`rollout.samplers.make_sampler`).
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
from bpgo_jax.models import text_stacks, weights
from bpgo_jax.models.dit import pipeline as dit_pipeline
from bpgo_jax.models.interface import DiffusionModel
from bpgo_jax.models.lora import LoraSpec
from bpgo_jax.models.t5 import T5EncoderModel, t5_config_from_dict
from bpgo_jax.models.text import HashTokenizer, Tokenizer
from bpgo_jax.models.wan import vae as wan_vae
from bpgo_jax.models.wan.presets import preset
from bpgo_jax.models.wan.transformer import (
    WanTransformer3DModel,
    example_inputs,
    load_wan_transformer,
    wan_transformer,
)
from bpgo_jax.models.wan.vae_config import (
    VAE_CLASS,
    WanVAEConfig,
    latent_shape,
    wan_vae_config_from_dict,
)

Params = Any

# Self- and cross-attention projections of every block (PEFT's `to_q, to_k, to_v, to_out.0`
# on diffusers' Wan transformer, Flow-GRPO's and DanceGRPO's Wan LoRA targets).
WAN_ATTENTION_TARGETS = (r".*/attn[12]/(to_q|to_k|to_v|to_out_0)/kernel",)
DEFAULT_SIZE = (480, 832)  # WanPipeline's height, width
DEFAULT_FRAMES = 81  # WanPipeline's num_frames
DEFAULT_SHIFT = 3.0  # the Wan2.1 480p folders' UniPC flow_shift
SCHEDULERS = ("UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler")
_COMPONENTS = {"transformer": "WanTransformer3DModel", "vae": VAE_CLASS}
# UMT5-XXL (the Wan2.1 / 2.2 text encoder), for weight-free runs of the real presets.
UMT5_XXL = dict(text_stacks.T5_XXL, model_type="umt5", vocab_size=256384)


@dataclasses.dataclass(frozen=True)
class WanModules:
    """The Flax modules and host-side pieces one Wan2.1 T2V model is made of."""

    transformer: WanTransformer3DModel
    vae: wan_vae.AutoencoderKLWan
    text: text_stacks.TextStack | None  # None: conditioning from a text cache
    scheduler: dict  # {"num_train_timesteps", "shift"} (`scheduler_from_dict`)


def scheduler_from_dict(raw: dict, where: str = "scheduler config") -> dict:
    """A Wan folder's `scheduler_config.json` -> `{"num_train_timesteps", "shift"}`.

    UniPC (the Wan folders'): `flow_shift` with `use_flow_sigmas`; FlowMatchEuler:
    `shift`. Other schedulers have no flow shift to take.
    """
    cls = raw.get("_class_name", SCHEDULERS[1])
    if cls not in SCHEDULERS:
        raise ConfigError(f"{where}: _class_name={cls!r} is not one of {SCHEDULERS}")
    if cls == SCHEDULERS[0] and not raw.get("use_flow_sigmas", False):
        raise ConfigError(f"{where}: a UniPC scheduler without use_flow_sigmas is not a flow one")
    shift = raw.get("flow_shift", 1.0) if cls == SCHEDULERS[0] else raw.get("shift", 1.0)
    steps = raw.get("num_train_timesteps", 1000)
    if not (isinstance(shift, int | float) and shift > 0):
        raise ConfigError(f"{where}: the flow shift {shift!r} must be a number > 0")
    return {"num_train_timesteps": int(steps), "shift": float(shift)}


def _check_compatible(m: WanModules) -> None:
    t, v = m.transformer.cfg, m.vae.cfg
    if t.in_channels != v.z_dim or t.out_channels != v.z_dim:
        raise ValueError(
            f"vae z_dim={v.z_dim} does not match the transformer's in/out_channels="
            f"{t.in_channels}/{t.out_channels} (text-to-video: the latents alone)"
        )
    if m.text is not None:
        width = m.text.modules["t5"].cfg.d_model
        if width != t.text_dim:
            raise ValueError(f"UMT5 width {width} does not match the transformer's text_dim")


def model_from_modules(
    m: WanModules,
    *,
    num_frames: int = DEFAULT_FRAMES,
    resolution: int | tuple[int, int] | None = None,
    lora: LoraSpec | None = None,
    cache_tables: dict[str, jax.Array] | None = None,
    tokenize: Tokenizer | None = None,
    vae_batch_chunk: int | None = None,
) -> DiffusionModel:
    """The `DiffusionModel` of `m` for `num_frames` (1 + 4k) x `resolution` pixel videos.

    Without a text stack (`m.text` None), `cache_tables` and `tokenize` stand
    in for the encoder. `vae_batch_chunk` decodes that many videos at a time.
    """
    _check_compatible(m)
    t = m.transformer.cfg
    height, width = dit_pipeline.image_size(resolution, DEFAULT_SIZE)
    shape = latent_shape(m.vae.cfg, num_frames, height, width)
    pt, ph, pw = t.patch_size
    if shape[1] % ph or shape[2] % pw:
        multiple = m.vae.cfg.spatial_factor * max(ph, pw)
        raise ConfigError(
            f"resolution={height}x{width} must be a multiple of {multiple} "
            f"({m.vae.cfg.spatial_factor}x VAE, {ph}x{pw} patches)"
        )
    if shape[0] % pt:
        raise ConfigError(
            f"num_frames={num_frames} gives {shape[0]} latent frames, not a multiple of the "
            f"transformer's temporal patch {pt}"
        )

    def predict(trainable, frozen, x, timestep, cond):
        params = dit_pipeline.transformer_params(trainable, frozen, lora)
        out = m.transformer.apply({"params": params}, x, timestep, cond["prompt_embeds"])
        return out.astype(jnp.float32)

    def decode(frozen: Params, latents: jax.Array) -> jax.Array:
        return wan_vae.decode_frames(m.vae, frozen["vae"], latents, batch_chunk=vae_batch_chunk)

    functions = (shape, predict, decode)
    return dit_pipeline.flow_model("wan", m, _parts(m), functions, lora, (cache_tables, tokenize))


def _parts(m: WanModules) -> tuple[dit_pipeline.Part, dit_pipeline.Part]:
    """The transformer and VAE with their init inputs."""
    transformer = (m.transformer, example_inputs(m.transformer.cfg))
    return transformer, (m.vae, wan_vae.example_inputs(m.vae.cfg))


def param_shapes(m: WanModules, lora: LoraSpec | None = None) -> tuple[Params, Params]:
    """`(trainable, frozen)` of `m`'s model as `ShapeDtypeStruct`s, nothing drawn or read."""
    return dit_pipeline.param_shapes(*_parts(m), m.text, lora, m.transformer.dtype)


# ---------------------------------------------------------------- building


def text_encoder_config(transformer: dict) -> dict:
    """The UMT5 of a preset: UMT5-XXL for the real widths (4096), else a 2-layer one of the
    transformer's `text_dim` (the tiny preset)."""
    width = int(transformer["text_dim"])
    if width == UMT5_XXL["d_model"]:
        return dict(UMT5_XXL)
    return dict(
        model_type="umt5",
        vocab_size=512,
        d_model=width,
        d_kv=8,
        d_ff=2 * width,
        num_layers=2,
        num_heads=max(1, width // 8),
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu",
    )


def modules_from_configs(configs: dict, dtype: Any = jnp.float32, **options: Any) -> WanModules:
    """Modules (random weights) from a preset (`presets.preset`): its `transformer` dict and
    `vae` (`WanVAEConfig` or dict), optional `text_encoder` (a UMT5 config dict;
    default `text_encoder_config`) and `scheduler` (default shift 3.0). Wan2.2's
    second expert and per-token timesteps are not part of the T2V path. `options`:
    `attention`, `remat`, `max_sequence_length` (`dit.pipeline.BuildOptions`)."""
    o = dit_pipeline.options_of(options)
    if configs.get("transformer_2") is not None or configs.get("expand_timesteps"):
        raise ConfigError(
            "this Wan preset has two experts or per-token timesteps (Wan2.2); the Wan "
            "pipeline trains Wan2.1 text-to-video"
        )
    return WanModules(
        transformer=wan_transformer(
            configs["transformer"], dtype=dtype, attention=o.attention, remat=o.remat
        ),
        **preset_components(configs, dtype, o),
    )


def preset_components(configs: dict, dtype: Any, o: dit_pipeline.BuildOptions) -> dict[str, Any]:
    """`vae`, `text` and `scheduler` of a preset dict (T2V and I2V alike): the VAE of its
    `vae` config, the UMT5 stack of `text_encoder` (default `text_encoder_config`) with
    hash tokenizers, and `scheduler` (default shift `DEFAULT_SHIFT`)."""
    vae_cfg = configs["vae"]
    if not isinstance(vae_cfg, WanVAEConfig):
        vae_cfg = wan_vae_config_from_dict(dict(vae_cfg))
    text_cfg = t5_config_from_dict(
        configs.get("text_encoder") or text_encoder_config(configs["transformer"])
    )
    length = text_stacks.resolve_max_sequence_length("wan", o.max_sequence_length)
    text = text_stacks.stack_from_modules(
        "wan",
        {"t5": T5EncoderModel(text_cfg, dtype=dtype, attention=o.attention)},
        {"t5": HashTokenizer(text_cfg.vocab_size, length)},
        max_sequence_length=length,
    )
    sched = configs.get("scheduler") or {"num_train_timesteps": 1000, "shift": DEFAULT_SHIFT}
    return dict(
        vae=wan_vae.AutoencoderKLWan(vae_cfg, dtype),
        text=text,
        scheduler=scheduler_from_dict(dict(sched)),
    )


FAMILY = dit_pipeline.Family(
    kind="wan",
    name="Wan",
    components=_COMPONENTS,
    load_transformer=load_wan_transformer,
    load_vae=lambda folder, **kw: wan_vae.load_wan_vae(folder, **kw)[:2],
    parse_scheduler=scheduler_from_dict,
    modules=WanModules,
    check=_check_compatible,
)


def load_wan(folder: str, *, with_text: bool = True, **options: Any) -> tuple[WanModules, dict]:
    """A diffusers WanPipeline folder (`transformer/ vae/ text_encoder/ tokenizer/
    scheduler/`) -> `(modules, {"transformer", "vae"[, "text"]})`.

    `options` are `dit.pipeline.BuildOptions` (dtype, sharding_fn: paths
    start with those names, variant, attention, remat, max_sequence_length).
    `with_text=False` skips the encoder (a text-cache run).
    """
    index = os.path.join(folder, "model_index.json")
    if os.path.isfile(index) and (weights.read_json(index).get("transformer_2") or [None])[0]:
        raise WeightsError(
            f"{folder} has a transformer_2 (Wan2.2 A14B's two experts); the Wan pipeline "
            "trains Wan2.1 text-to-video folders"
        )
    return dit_pipeline.load_components(FAMILY, folder, with_text=with_text, **options)


def wan_model(
    source: str | dict,
    *,
    rng: jax.Array | None = None,
    num_frames: int = DEFAULT_FRAMES,
    resolution: int | tuple[int, int] | None = None,
    lora: LoraSpec | None = None,
    text_cache: str | None = None,
    vae_batch_chunk: int | None = None,
    **options: Any,
) -> tuple[DiffusionModel, Params, Params]:
    """`(model, trainable, frozen)` from a diffusers folder (`load_wan`) or a preset dict
    (random weights from `rng`, which also seeds the LoRA factors); `text_cache` (a
    folder's only) is read instead of the UMT5 encoder (`dit.pipeline.assemble`).
    `options` are `dit.pipeline.BuildOptions` (dtype, sharding_fn, variant,
    attention, remat, max_sequence_length)."""
    make = functools.partial(
        model_from_modules,
        num_frames=num_frames,
        resolution=resolution,
        lora=lora,
        vae_batch_chunk=vae_batch_chunk,
    )
    return dit_pipeline.assemble(
        "wan",
        source,
        modules_from_configs,
        load_wan,
        make,
        rng=rng,
        lora=lora,
        text_cache=text_cache,
        **options,
    )


def wan_from_config(
    cfg: ml_collections.ConfigDict, rng: jax.Array, sharding_fn=None
) -> tuple[DiffusionModel, Params, Params]:
    """`config.model` with name="wan" -> `(model, trainable, frozen)`.

    The flow DiTs' fields (`dit.pipeline.model_from_config`: `init` "random"
    or a WanPipeline folder, `preset` for random init ("wan21_t2v_1_3b",
    "wan21_t2v_14b", "tiny"), `transformer` / `vae` overrides, `dtype`,
    `resolution` (a side or (height, width); default 480 x 832), `variant`,
    `lora` (default targets `WAN_ATTENTION_TARGETS`), `attention`, `remat`,
    `max_sequence_length` (0: 512), `text_cache`), plus `num_frames` (1 + 4k;
    default 81) and `vae_batch_chunk` (videos decoded at a time; 0: all).
    With `condition_prompts` set, the model is image-to-video
    (`i2v.wan_i2v_from_config`); a WanImageToVideoPipeline folder needs them.
    """
    init = cfg.get("init", "random")
    if cfg.get("condition_prompts", None):
        from bpgo_jax.models.wan.i2v import wan_i2v_from_config

        return wan_i2v_from_config(cfg, rng, sharding_fn)
    if init != "random" and os.path.isdir(init):
        from bpgo_jax.models.wan.i2v import is_i2v_folder

        if is_i2v_folder(init):
            raise ConfigError(
                f"config.model.init={init} is a WanImageToVideoPipeline folder: set "
                'config.model.condition_prompts to the prompt files whose "image" fields '
                "condition it"
            )
    return dit_pipeline.model_from_config(
        cfg,
        rng,
        sharding_fn,
        family="Wan",
        targets=WAN_ATTENTION_TARGETS,
        preset=preset,
        build=wan_model,
        num_frames=int(cfg.get("num_frames", DEFAULT_FRAMES)),
        vae_batch_chunk=cfg.get("vae_batch_chunk", None) or None,
    )
