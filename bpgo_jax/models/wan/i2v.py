"""Wan image-to-video (Wan2.2-I2V-A14B's two experts, Wan2.1 I2V / FLF2V's one transformer
with its CLIP image branch, or Wan2.2 TI2V-5B's first-frame blend) as a `DiffusionModel`:
WanImageToVideoPipeline's sampling as pure functions.

    sets = [("i2v.jsonl", load_prompts("i2v.jsonl"))]
    model, trainable, frozen = wan_i2v_model(folder, prompt_sets=sets, num_frames=81)

The conditioning frame of each prompt comes from its prompt-file `image`
(`prompts.images.condition_images`: a uint8 table `[N, H, W, 3]` kept in
frozen["condition_images"], and `{prompt: row}`; FLF2V's last frame from its
`last_image`, in frozen["last_images"]); `tokenize` appends the
prompt's rows to its UMT5 tokens, so `encode_text` (run once per rollout row,
inside the rollout program) returns the whole conditioning and the update
recomputes exactly the network inputs of the rollout:

- "prompt_embeds" / "negative_embeds": UMT5 states of the prompt and of
  `negative_prompt` (WanPipeline's "" by default);
- "condition" `[B, F, H, W, 4 + z]`: the pipeline's `prepare_latents` - the
  video [image, zeros x (num_frames - 1)] (FLF2V: the last of them the last
  image) VAE-encoded (posterior mean), normalized, after the 4 mask channels
  (`condition_mask`: 1 on the first latent frame, which stands for the first
  frame repeated `temporal_factor` times, and on the last pixel frame for
  FLF2V); TI2V: the image's own latent `[B, 1, H, W, z]`;
- "image_embeds" (Wan2.1 I2V, whose transformer has the CLIP image branch):
  the folder's `image_encoder` (CLIP ViT-H) penultimate hidden states of the
  original image (`encode_image`; FLF2V: the first and last images' states
  concatenated), its pixels made on the host as the folder's
  `image_processor` does (`prompts.images.clip_pixels`, kept in
  frozen["clip_pixels"]).

`predict` feeds `[x, condition]` (36 channels for Wan2.1's VAE) to the expert
of the step: `transformer` (high noise) while `t >= boundary_ratio * 1000`,
then `transformer_2` (low noise), each with its own classifier-free guidance
scale (`guidance_scale`, `guidance_scale_2`: the model applies them, as the
pipeline does, with one batched call of the negative and the prompt; the
engine's `sample.guidance_scale` must then be 1.0). Rows of one call on both
sides of the boundary (the update's per-sample steps) run both experts and
take each row's own; a call on one side runs one expert only.

TI2V (`expand_timesteps` in model_index.json or the preset): the one
transformer reads the latents alone, their first latent frame replaced by the
image's latent, with per-token timesteps 0 on that frame's tokens; the model's
`hold` makes the sampler keep that frame at the image's latent (no step
noise) and the log-probs average over the other frames
(`rollout.samplers.held`), as the pipeline never samples it.

Trees: trainable = {expert: params} for the trained experts (`experts`,
default all) or {"lora": {expert: factors}}; frozen = {"vae", "text",
"condition_images"[, "image_encoder", "clip_pixels"]} plus every expert's
weights that are not trained (under LoRA: all of them).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bpgo_jax.errors import ConfigError, WeightsError
from bpgo_jax.models import lora as lora_lib
from bpgo_jax.models import text_stacks, weights
from bpgo_jax.models.clip import CLIPVisionModel, VisionConfig, load_clip_vision
from bpgo_jax.models.clip.loaders import vision_inputs
from bpgo_jax.models.dit import pipeline as dit_pipeline
from bpgo_jax.models.interface import DiffusionModel
from bpgo_jax.models.lora import LoraSpec
from bpgo_jax.models.text import Tokenizer
from bpgo_jax.models.wan import vae as wan_vae
from bpgo_jax.models.wan.pipeline import (
    DEFAULT_FRAMES,
    DEFAULT_SIZE,
    FAMILY,
    WAN_ATTENTION_TARGETS,
    preset_components,
)
from bpgo_jax.models.wan.presets import preset
from bpgo_jax.models.wan.transformer import (
    EXPERTS,
    WanTransformer3DModel,
    example_inputs,
    expanded_timesteps,
    first_frame_mask,
    load_wan_transformer,
    wan_transformer,
)
from bpgo_jax.models.wan.vae_config import latent_shape
from bpgo_jax.prompts import PromptSet, load_prompts
from bpgo_jax.prompts.images import clip_table, condition_images, signed

Params = Any
MASK_CHANNELS = 4  # the pipeline's mask channels (Wan2.1 VAE's temporal factor)
DEFAULT_GUIDANCE = 5.0  # WanImageToVideoPipeline's guidance_scale (guidance_scale_2 defaults to it)


@dataclasses.dataclass(frozen=True)
class WanI2VModules:
    """The experts (`EXPERTS` order: high noise first), VAE, UMT5 and scheduler of an I2V model."""

    experts: tuple[tuple[str, WanTransformer3DModel], ...]
    vae: wan_vae.AutoencoderKLWan
    text: text_stacks.TextStack
    scheduler: dict
    boundary_ratio: float | None  # None: one transformer for every step
    image_encoder: CLIPVisionModel | None = None  # Wan2.1 I2V's CLIP vision tower
    image_processor: dict | None = None  # its preprocessor_config.json
    expand_timesteps: bool = False  # Wan2.2 TI2V: the first-frame blend, per-token timesteps


@dataclasses.dataclass(frozen=True)
class WanI2VModel(DiffusionModel):
    """An image-to-video `DiffusionModel`; TI2V's adds `hold` (`rollout.samplers.held`):
    the first latent frame held at the conditioning image's latent."""

    hold: Callable[[Any], tuple[jax.Array, jax.Array]] | None = None


def check_i2v(m: WanI2VModules) -> None:
    """The experts read `[latents, mask, image latents]` (TI2V: the latents, whose first frame
    is the image's) and write latents (else ValueError)."""
    z, mask = m.vae.cfg.z_dim, m.vae.cfg.temporal_factor
    width = m.text.modules["t5"].cfg.d_model
    for name, module in m.experts:
        if width != module.cfg.text_dim:
            raise ValueError(
                f"UMT5 width {width} does not match {name}'s text_dim {module.cfg.text_dim}"
            )
    if m.expand_timesteps:
        t = m.experts[0][1].cfg
        if len(m.experts) != 1 or m.image_encoder is not None or t.has_image_branch:
            raise ValueError("Wan2.2 TI2V (expand_timesteps) has one transformer, no image branch")
        if t.in_channels != z or t.out_channels != z:
            raise ValueError(
                f"transformer in/out_channels={t.in_channels}/{t.out_channels}; TI2V with vae "
                f"z_dim={z} needs {z}/{z} (the latents, the first frame blended in)"
            )
        return
    if len(m.experts) == 2 and m.boundary_ratio is None:
        raise ValueError("two experts need a boundary_ratio (model_index.json) to switch at")
    if len(m.experts) == 1 and m.boundary_ratio is not None:
        raise ValueError(f"boundary_ratio={m.boundary_ratio} without a transformer_2")
    for name, module in m.experts:
        t = module.cfg
        if t.in_channels != 2 * z + mask or t.out_channels != z:
            raise ValueError(
                f"{name}: in/out_channels={t.in_channels}/{t.out_channels}; image-to-video with "
                f"vae z_dim={z} needs {2 * z + mask}/{z} (latents + {mask} mask + image latents)"
            )
        if t.has_image_branch != (m.image_encoder is not None):
            raise ValueError(
                f"{name} has a CLIP image branch (Wan2.1 I2V) but there is no image_encoder"
                if t.has_image_branch
                else f"an image_encoder is given, but {name} has no CLIP image branch"
            )
        if t.has_image_branch and m.image_encoder.cfg.hidden_size != t.image_dim:
            raise ValueError(
                f"image_encoder width {m.image_encoder.cfg.hidden_size} does not match "
                f"{name}'s image_dim {t.image_dim}"
            )


def condition_mask(num_frames: int, temporal: int, last: jax.Array | None = None) -> jax.Array:
    """`prepare_latents`' mask channels `[B | 1, F, 1, 1, temporal]`: 1 on the given pixel
    frames (the first; the last too where `last` [B] is True), the first one repeated
    `temporal` times, then grouped `temporal` frames per latent frame."""
    pixels = jnp.zeros((1, num_frames), jnp.float32).at[:, 0].set(1.0)
    if last is not None:
        last = jnp.asarray(last, jnp.float32)
        pixels = jnp.broadcast_to(pixels, (last.shape[0], num_frames)).at[:, -1].set(last)
    pixels = jnp.concatenate([jnp.repeat(pixels[:, :1], temporal, axis=1), pixels[:, 1:]], axis=1)
    return pixels.reshape(pixels.shape[0], -1, 1, 1, temporal)


def condition_latents(
    vae: wan_vae.AutoencoderKLWan,
    params: Params,
    images: jax.Array,
    num_frames: int,
    last_images: jax.Array | None = None,
    has_last: jax.Array | None = None,
) -> jax.Array:
    """`prepare_latents`' condition: images `[B, H, W, 3]` in [-1, 1] -> `[B, F, h, w, 4 + z]`.

    The video is the image followed by `num_frames - 1` black (zero) frames
    (FLF2V: the last of them `last_images` where `has_last` [B]), VAE-encoded
    (posterior mean) and normalized, after the mask channels (`condition_mask`).
    """
    b, h, w, c = images.shape
    video = [images[:, None], jnp.zeros((b, num_frames - 1, h, w, c))]
    if last_images is not None:
        keep = jnp.asarray(has_last, jnp.float32)[:, None, None, None]
        video = [video[0], video[1][:, 1:], (last_images * keep)[:, None]]
    mean, _ = wan_vae.encode(vae, params, jnp.concatenate(video, axis=1).astype(jnp.float32))
    latents = wan_vae.normalize_latents(vae.cfg, mean)
    last = None if last_images is None else has_last
    mask = condition_mask(num_frames, vae.cfg.temporal_factor, last)
    mask = jnp.broadcast_to(mask, (*latents.shape[:-1], vae.cfg.temporal_factor))
    return jnp.concatenate([mask, latents], axis=-1)


def first_frame_latent(vae: wan_vae.AutoencoderKLWan, params: Params, images: jax.Array):
    """TI2V's condition: images `[B, H, W, 3]` in [-1, 1] -> the normalized VAE latent
    (posterior mean) of the one-frame video, `[B, 1, h, w, z]`."""
    mean, _ = wan_vae.encode(vae, params, images[:, None].astype(jnp.float32))
    return wan_vae.normalize_latents(vae.cfg, mean)


@dataclasses.dataclass(frozen=True)
class RowTokenizer:
    """UMT5 tokens of each prompt with its conditioning-image row and last-image row
    appended (`[B, L + 2]`; -1: no last image).

    Prompts without an image are refused, except `allowed` (the negative
    prompts the engine encodes), which get row -1 (a zero condition).
    """

    text: Tokenizer
    rows: Mapping[str, int]
    allowed: frozenset[str] = frozenset({""})
    last_rows: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @property
    def max_length(self) -> int:
        return self.text.max_length

    def count(self, prompt: str) -> int:
        return self.text.count(prompt)

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        rows = []
        for p in prompts:
            if p not in self.rows and p not in self.allowed:
                raise ConfigError(
                    f"prompt {p!r} has no conditioning image: list its prompt file in "
                    'model.condition_prompts (every entry needs an "image")'
                )
            rows.append((self.rows.get(p, -1), self.last_rows.get(p, -1)))
        tokens = np.asarray(self.text(prompts), np.int32)
        return np.concatenate([tokens, np.asarray(rows, np.int32).reshape(-1, 2)], axis=1)


def _expert_params(trainable: Params, frozen: Params, lora: LoraSpec | None, name: str) -> Params:
    """`name`'s weights as `predict` applies them: trained, LoRA-merged, or frozen."""
    if lora is None:
        return trainable[name] if name in trainable else frozen[name]
    factors = trainable["lora"].get(name)
    if factors is None:
        return frozen[name]
    merged = lora_lib.merge(frozen[name], factors, alpha=lora.alpha, rank=lora.rank)
    return jax.lax.optimization_barrier(merged)  # as `lora.unet_params`: ratio exactly 1


def split_experts(
    params: Mapping[str, Params],
    frozen: Params,
    lora: LoraSpec | None,
    trained: Sequence[str],
    rng: jax.Array,
) -> tuple[Params, Params]:
    """`(trainable, frozen)` of the experts' weights: `trained` ones (or LoRA factors over
    them) trainable, the rest frozen."""
    if lora is None:
        trainable = {e: params[e] for e in trained}
        rest = {e: p for e, p in params.items() if e not in trained}
        return trainable, {**frozen, **rest}
    factors = {
        e: lora_lib.init_lora(
            params[e],
            rank=lora.rank,
            alpha=lora.alpha,
            targets=lora.targets,
            rng=jax.random.fold_in(rng, i),
        )
        for i, e in enumerate(trained)
    }
    return {"lora": factors}, {**frozen, **params}


def _trained(m: WanI2VModules, experts: Sequence[str] | None) -> tuple[str, ...]:
    names = tuple(n for n, _ in m.experts)
    chosen = names if not experts else tuple(experts)
    bad = [e for e in chosen if e not in names]
    if bad or not chosen or len(set(chosen)) != len(chosen):
        raise ConfigError(f"model.lora.experts={tuple(experts or ())} must be some of {names}")
    return chosen


def model_from_modules(
    m: WanI2VModules,
    images: np.ndarray,
    rows: Mapping[str, int],
    *,
    num_frames: int = DEFAULT_FRAMES,
    resolution: int | tuple[int, int] | None = None,
    lora: LoraSpec | None = None,
    guidance_scale: float = DEFAULT_GUIDANCE,
    guidance_scale_2: float | None = None,
    negative_prompt: str = "",
    experts: Sequence[str] | None = None,
    clip: np.ndarray | None = None,
    last: tuple[np.ndarray, Mapping[str, int]] | None = None,
) -> tuple[DiffusionModel, tuple[str, ...]]:
    """`(model, trained experts)` for `num_frames` x `resolution` videos of the prompts `rows`
    (`images` uint8 `[N, H, W, 3]` at that size; `clip` their CLIP pixels `[N, S, S, 3]`
    for a model with an image encoder, FLF2V's last images' rows after the first
    images'). `last`: `(uint8 [M, H, W, 3], {prompt: row})` of the prompts with a
    last frame (FLF2V; frozen["last_images"]). `guidance_scale_2` None: the first."""
    check_i2v(m)
    height, width = dit_pipeline.image_size(resolution, DEFAULT_SIZE)
    tables = [("conditioning images", images)] + ([] if last is None else [("last", last[0])])
    for what, table in tables:
        if table.dtype != np.uint8 or table.ndim != 4 or table.shape[1:] != (height, width, 3):
            raise ConfigError(
                f"{what} {table.dtype}{list(table.shape)} must be uint8 "
                f"[N, {height}, {width}, 3] (model.resolution)"
            )
    shape = latent_shape(m.vae.cfg, num_frames, height, width)
    first = m.experts[0][1].cfg
    _, ph, pw = first.patch_size
    if shape[1] % ph or shape[2] % pw:
        raise ConfigError(f"resolution={height}x{width} does not split into {ph}x{pw} patches")
    trained = _trained(m, experts)
    if (clip is None) != (m.image_encoder is None):
        raise ValueError("give `clip` pixels exactly when the model has an image encoder")
    last_rows = _check_last(m, rows, last, num_frames)
    flf = bool(last_rows)
    second = guidance_scale if guidance_scale_2 is None else guidance_scale_2
    scales = (float(guidance_scale), float(second))
    boundary = (
        None
        if m.boundary_ratio is None
        else m.boundary_ratio * float(m.scheduler["num_train_timesteps"])
    )
    stack = m.text
    negative = np.asarray(stack.tokenizer([negative_prompt]), np.int32)
    allowed = frozenset({"", negative_prompt})
    tokenize = RowTokenizer(stack.tokenizer, dict(rows), allowed, dict(last_rows))
    guided = any(s != 1.0 for s in scales[: len(m.experts)])
    # TI2V: the first latent frame is the image's (held), its tokens at timestep 0.
    frame_mask = first_frame_mask(shape) if m.expand_timesteps else None
    drawn = None if frame_mask is None else jnp.asarray(frame_mask[None, ..., None] > 0)

    def encode_text(frozen: Params, tokens: jax.Array) -> dict[str, jax.Array]:
        text = stack.encode(frozen["text"], tokens[:, :-2])["prompt_embeds"]
        row, last_row = tokens[:, -2], tokens[:, -1]
        table = frozen["condition_images"]
        pick = jnp.clip(row, 0, table.shape[0] - 1)
        picked = signed(table[pick])
        present = (row >= 0).astype(jnp.float32)[:, None, None, None, None]
        lpick = has_last = None
        if m.expand_timesteps:
            condition = first_frame_latent(m.vae, frozen["vae"], picked)
        elif flf:
            ltable = frozen["last_images"]
            lpick, has_last = jnp.clip(last_row, 0, ltable.shape[0] - 1), last_row >= 0
            lasts = signed(ltable[lpick])
            condition = condition_latents(m.vae, frozen["vae"], picked, num_frames, lasts, has_last)
        else:
            condition = condition_latents(m.vae, frozen["vae"], picked, num_frames)
        cond = {"prompt_embeds": text, "condition": condition * present}
        if m.image_encoder is not None:
            pixels = frozen["clip_pixels"][pick]
            if flf:  # the last images' pixels follow the first images' rows
                pixels = jnp.concatenate([pixels, frozen["clip_pixels"][table.shape[0] + lpick]])
            encoder = {"params": frozen["image_encoder"]}
            states = m.image_encoder.apply(encoder, pixels, output_hidden_states=True)[2]
            states = states[-2].astype(jnp.float32)
            if flf:  # FLF2V: both frames' states, concatenated (the pipeline's [image, last])
                states = jnp.concatenate(jnp.split(states, 2), axis=1)
            cond["image_embeds"] = states
        if guided:
            neg = stack.encode(frozen["text"], jnp.asarray(negative))["prompt_embeds"]
            cond["negative_embeds"] = jnp.broadcast_to(neg, text.shape)
        return cond

    def run_expert(i: int, trainable, frozen, x_in, t, cond) -> jax.Array:
        name, module = m.experts[i]
        params = {"params": _expert_params(trainable, frozen, lora, name)}
        image = cond.get("image_embeds")
        if scales[i] == 1.0:
            return module.apply(params, x_in, t, cond["prompt_embeds"], image).astype(jnp.float32)
        text = jnp.concatenate([cond["negative_embeds"], cond["prompt_embeds"]])
        image = None if image is None else jnp.concatenate([image, image])
        both = module.apply(
            params, jnp.concatenate([x_in, x_in]), jnp.concatenate([t, t]), text, image
        )
        out_u, out_c = jnp.split(both.astype(jnp.float32), 2)
        return out_u + scales[i] * (out_c - out_u)

    def predict(trainable, frozen, x, timestep, cond):
        t = jnp.asarray(timestep, jnp.float32)
        if m.expand_timesteps:  # the pipeline's blend and per-token timesteps
            x_in = jnp.where(drawn, x, cond["condition"].astype(x.dtype))
            return run_expert(
                0, trainable, frozen, x_in, expanded_timesteps(t, frame_mask, first), cond
            )
        x_in = jnp.concatenate([x, cond["condition"].astype(x.dtype)], axis=-1)
        args = (trainable, frozen, x_in, t, cond)
        if boundary is None:
            return run_expert(0, *args)
        high = t >= boundary
        view = high.reshape(-1, *([1] * (x.ndim - 1)))

        def mixed():
            return jnp.where(view, run_expert(0, *args), run_expert(1, *args))

        branch = jnp.where(jnp.all(high), 0, jnp.where(jnp.any(high), 2, 1))
        return jax.lax.switch(
            branch, [lambda: run_expert(0, *args), lambda: run_expert(1, *args), mixed]
        )

    def hold(cond) -> tuple[jax.Array, jax.Array]:
        condition = cond["condition"]
        return drawn, jnp.broadcast_to(condition, (condition.shape[0], *shape))

    def decode(frozen: Params, latents: jax.Array) -> jax.Array:
        return wan_vae.decode_frames(m.vae, frozen["vae"], latents)

    def init(rng: jax.Array) -> tuple[Params, Params]:
        from bpgo_jax.models.sd.pipeline import random_params

        keys = jax.random.split(rng, len(m.experts) + 4)
        dtype = first_module.dtype
        nets = {
            name: random_params(mod, keys[i], dtype, *example_inputs(mod.cfg))
            for i, (name, mod) in enumerate(m.experts)
        }
        frozen = {
            "vae": random_params(m.vae, keys[-3], dtype, *wan_vae.example_inputs(m.vae.cfg)),
            "text": stack.init(keys[-2], dtype),
            **condition_tables(images, last if flf else None),
        }
        if m.image_encoder is not None:
            encoder = m.image_encoder
            frozen["image_encoder"] = random_params(
                encoder, keys[-4], dtype, vision_inputs(encoder.cfg)
            )
            frozen["clip_pixels"] = jnp.asarray(clip)
        return split_experts(nets, frozen, lora, trained, keys[-1])

    first_module = m.experts[0][1]
    model = WanI2VModel(
        name="wan",
        latent_shape=tuple(shape),
        prediction_type="flow",
        tokenize=tokenize,
        encode_text=encode_text,
        predict=predict,
        decode=decode,
        init=init,
        scheduler_config=dict(m.scheduler),
        hold=hold if m.expand_timesteps else None,
    )
    return model, trained


def condition_tables(
    images: np.ndarray, last: tuple[np.ndarray, Mapping[str, int]] | None
) -> dict[str, jax.Array]:
    """The frozen uint8 image tables: "condition_images"[, "last_images" (FLF2V)]."""
    out = {"condition_images": jnp.asarray(images, jnp.uint8)}
    if last is not None and len(last[1]):
        out["last_images"] = jnp.asarray(last[0], jnp.uint8)
    return out


def _check_last(
    m: WanI2VModules,
    rows: Mapping[str, int],
    last: tuple[np.ndarray, Mapping[str, int]] | None,
    num_frames: int,
) -> Mapping[str, int]:
    """The prompts' last-image rows, checked against the model (ConfigError naming why)."""
    last_rows = {} if last is None else dict(last[1])
    cfg = m.experts[0][1].cfg
    if cfg.pos_embed_seq_len is not None:  # FLF2V's image branch reads two frames
        missing = [p for p in rows if p not in last_rows]
        if missing:
            raise ConfigError(
                f"prompt {missing[0]!r} has no last_image: this first-last-frame (FLF2V) model "
                'needs a "last_image" on every prompt'
            )
    if not last_rows:
        return last_rows
    if m.expand_timesteps:
        raise ConfigError(
            "Wan2.2 TI2V conditions on the first frame only: remove the prompts' last_image"
        )
    if cfg.has_image_branch and cfg.pos_embed_seq_len is None:
        raise ConfigError(
            "prompts have a last_image, but this Wan2.1 I2V transformer's image branch reads "
            "one frame (the FLF2V transformer has pos_embed_seq_len)"
        )
    if num_frames < 5:
        raise ConfigError(f"a last_image needs model.num_frames >= 5, not {num_frames}")
    return last_rows


# ---------------------------------------------------------------- building


def modules_from_configs(configs: dict, dtype: Any = jnp.float32, **options: Any) -> WanI2VModules:
    """Random-weight modules of an I2V preset (`presets.preset("wan22_i2v_a14b")` or a dict of
    its form: `transformer`[, `transformer_2`, `boundary_ratio`], `vae`[, `text_encoder`,
    `scheduler`]); `options` are `dit.pipeline.BuildOptions.modules()`."""
    o = dit_pipeline.options_of(options)
    encoder = processor = None
    if configs["transformer"].get("image_dim") is not None:
        if not configs.get("image_encoder"):
            raise ConfigError(
                "a Wan2.1 I2V preset needs its CLIP `image_encoder` config (a VisionConfig "
                "dict, e.g. presets.preset('wan21_i2v_14b')), or load a folder"
            )
        vision = VisionConfig(**dict(configs["image_encoder"]))
        encoder = CLIPVisionModel(vision, with_projection=False, dtype=dtype, attention=o.attention)
        processor = dict(configs.get("image_processor") or {})
    experts = tuple(
        (e, wan_transformer(configs[e], dtype=dtype, attention=o.attention, remat=o.remat))
        for e in EXPERTS
        if configs.get(e) is not None
    )
    mods = WanI2VModules(
        experts=experts,
        **preset_components(configs, dtype, o),
        boundary_ratio=configs.get("boundary_ratio"),
        image_encoder=encoder,
        image_processor=processor,
        expand_timesteps=bool(configs.get("expand_timesteps", False)),
    )
    try:
        check_i2v(mods)
    except ValueError as err:
        raise ConfigError(f"model preset: {err}") from None
    return mods


def is_i2v_folder(folder: str) -> bool:
    """A WanImageToVideoPipeline folder (its model_index.json's class)."""
    index = os.path.join(folder, "model_index.json")
    return (
        os.path.isfile(index)
        and weights.read_json(index).get("_class_name") == "WanImageToVideoPipeline"
    )


def load_wan_i2v(folder: str, **options: Any) -> tuple[WanI2VModules, dict]:
    """A WanImageToVideoPipeline folder (or Wan2.2 TI2V-5B's) -> `(modules, {expert...,
    "vae", "text"})`; Wan2.2 A14B's `transformer_2/` and `boundary_ratio`, TI2V's
    `expand_timesteps`, Wan2.1 I2V's `image_encoder/` (+ `"image_encoder"` params) and
    `image_processor/` are read when model_index.json has them. `options` are
    `dit.pipeline.BuildOptions`."""
    o = dit_pipeline.options_of(options)
    index = weights.read_json(os.path.join(folder, "model_index.json"))
    base, params = dit_pipeline.load_components(
        dataclasses.replace(FAMILY, check=None), folder, with_text=True, **options
    )
    experts = [("transformer", base.transformer)]
    ratio = index.get("boundary_ratio")
    if (index.get("transformer_2") or [None])[0]:
        module, p2 = load_wan_transformer(
            folder,
            expert="transformer_2",
            dtype=o.dtype,
            sharding_fn=o.sharding_fn,
            variant=o.variant,
            attention=o.attention,
            remat=o.remat,
        )
        experts.append(("transformer_2", module))
        params["transformer_2"] = p2
    encoder = processor = None
    if (index.get("image_encoder") or [None])[0]:  # Wan2.1 I2V: CLIP ViT-H
        encoder, params["image_encoder"] = load_clip_vision(
            os.path.join(folder, "image_encoder"),
            dtype=o.dtype,
            sharding_fn=weights.prefixed(o.sharding_fn, "image_encoder"),
            with_projection=False,
            attention=o.attention,
        )
        where = os.path.join(folder, "image_processor", "preprocessor_config.json")
        processor = weights.read_json(where)
    expand = bool(index.get("expand_timesteps", False))
    mods = WanI2VModules(
        tuple(experts), base.vae, base.text, base.scheduler, ratio, encoder, processor, expand
    )
    try:
        check_i2v(mods)
    except ValueError as err:
        raise WeightsError(f"{folder}: {err}") from None
    return mods, params


def wan_i2v_model(
    source: str | dict,
    *,
    prompt_sets: Sequence[tuple[str, PromptSet]],
    rng: jax.Array | None = None,
    num_frames: int = DEFAULT_FRAMES,
    resolution: int | tuple[int, int] | None = None,
    lora: LoraSpec | None = None,
    guidance_scale: float = DEFAULT_GUIDANCE,
    guidance_scale_2: float | None = None,
    negative_prompt: str = "",
    experts: Sequence[str] | None = None,
    **options: Any,
) -> tuple[DiffusionModel, Params, Params]:
    """`(model, trainable, frozen)` from a WanImageToVideoPipeline folder or an I2V preset dict
    (random weights from `rng`, which also seeds the LoRA factors), conditioned on the
    images of `prompt_sets` (`(name, prompts)` pairs, `prompts.images.condition_paths`);
    see `model_from_modules`."""
    rng = jax.random.key(0) if rng is None else rng
    opts = dit_pipeline.options_of(options)
    height, width = dit_pipeline.image_size(resolution, DEFAULT_SIZE)
    images, rows = condition_images(prompt_sets, height, width)
    last = condition_images(prompt_sets, height, width, key="last_image")
    kw = dict(
        num_frames=num_frames,
        resolution=resolution,
        lora=lora,
        guidance_scale=guidance_scale,
        guidance_scale_2=guidance_scale_2,
        negative_prompt=negative_prompt,
        experts=experts,
        last=last,
    )
    if not isinstance(source, str):
        mods = modules_from_configs(source, opts.dtype, **opts.modules())
        clip = clip_pixel_table(mods, prompt_sets, last)
        model, _ = model_from_modules(mods, images, rows, clip=clip, **kw)
        return (model, *model.init(rng))
    mods, params = load_wan_i2v(source, **options)
    clip = clip_pixel_table(mods, prompt_sets, last)
    model, trained = model_from_modules(mods, images, rows, clip=clip, **kw)
    frozen = {"vae": params["vae"], "text": params["text"], **condition_tables(images, last)}
    if clip is not None:
        frozen.update(image_encoder=params["image_encoder"], clip_pixels=jnp.asarray(clip))
    nets = {name: params[name] for name, _ in mods.experts}
    trainable, frozen = split_experts(nets, frozen, lora, trained, rng)
    return model, trainable, frozen


def clip_pixel_table(
    m: WanI2VModules,
    prompt_sets: Sequence[tuple[str, PromptSet]],
    last: tuple[np.ndarray, Mapping[str, int]],
) -> np.ndarray | None:
    """The CLIP pixels `[N, S, S, 3]` of the conditioning images for a model with an image
    encoder (FLF2V: the last images' rows after the first images'), else None."""
    if m.image_encoder is None:
        return None
    clip = clip_table(prompt_sets, m.image_processor)
    if last[1]:
        clip = np.concatenate([clip, clip_table(prompt_sets, m.image_processor, key="last_image")])
    return clip


def condition_files(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """`config.model.condition_prompts` (a file, or files) and `extra_condition_prompts`: the
    prompt files whose `image` fields condition (the shipped configs point the first at
    `prompts.path`; add the eval files to the second)."""
    files: list[str] = []
    for key in ("condition_prompts", "extra_condition_prompts"):
        value = cfg.get(key, None) or ()
        files.extend(f for f in ((value,) if isinstance(value, str) else value) if f)
    files = tuple(dict.fromkeys(files))
    if not files:
        raise ConfigError(
            "config.model.condition_prompts is empty: an image-to-video model needs the prompt "
            'files whose entries\' "image" fields condition it (prompts.path, eval.prompts_path)'
        )
    return files


def config_options(cfg: ml_collections.ConfigDict) -> tuple[list[tuple[str, PromptSet]], dict]:
    """`(prompt sets, dit.pipeline.model_from_config keywords)` of an image-to-video
    `config.model` (`wan_i2v_from_config`; the abstract build of `parallel.aot` reads
    the same)."""
    sets = [(f, load_prompts(f)) for f in condition_files(cfg)]
    scales = tuple(float(s) for s in (cfg.get("guidance_scales", None) or (DEFAULT_GUIDANCE,)))
    if not 1 <= len(scales) <= 2 or not all(np.isfinite(s) and s >= 1.0 for s in scales):
        raise ConfigError(
            f"config.model.guidance_scales={scales!r} must be one or two numbers >= 1 "
            "(high-noise, low-noise expert)"
        )
    lora_cfg = cfg.get("lora", None) or {}
    return sets, dict(
        family="Wan",
        targets=WAN_ATTENTION_TARGETS,
        preset=preset,
        overrides=("transformer", "transformer_2", "vae"),
        num_frames=int(cfg.get("num_frames", DEFAULT_FRAMES)),
        guidance_scale=scales[0],
        guidance_scale_2=scales[-1],
        negative_prompt=str(cfg.get("negative_prompt", "")),
        experts=tuple(lora_cfg.get("experts", None) or ()),
    )


def wan_i2v_from_config(
    cfg: ml_collections.ConfigDict, rng: jax.Array, sharding_fn=None
) -> tuple[DiffusionModel, Params, Params]:
    """`config.model` of an image-to-video Wan run -> `(model, trainable, frozen)`.

    The Wan fields (`pipeline.wan_from_config`; `init` a WanImageToVideoPipeline
    folder, or "random" with an I2V `preset`, "wan22_i2v_a14b"), plus
    `condition_prompts` / `extra_condition_prompts` (prompt files, `condition_files`;
    every entry's `image` is read at `resolution`), `guidance_scales` (the
    (high-noise, low-noise) experts' classifier-free guidance; one value: both;
    WanImageToVideoPipeline's 5.0), `negative_prompt` ("" as the pipeline's)
    and `lora.experts` (which experts train; empty: all).
    """
    sets, options = config_options(cfg)
    build = functools.partial(_build_from_config, prompt_sets=sets)
    return dit_pipeline.model_from_config(cfg, rng, sharding_fn, build=build, **options)


def _build_from_config(source, *, text_cache=None, **kw):
    if text_cache:
        raise ConfigError("model.text_cache is not read by the image-to-video model (set '')")
    return wan_i2v_model(source, **kw)
