"""Learned CLIP-based rewards that run inside the jitted rollout.

- `clip_score`: cosine of CLIP image and prompt embeddings (times `cfg.scale`).
- `aesthetic`: LAION improved aesthetic predictor, an MLP on the normalised
  CLIP ViT-L/14 image embedding; the prompt is unused.
- `pickscore`: PickScore, `exp(logit_scale) * cos` of a fine-tuned CLIP-H.
- `hpsv2`: HPSv2, cosine of an OpenCLIP ViT-H-14 fine-tune (`.safetensors`
  converted from the released `.pt`, see `bpgo_jax.models.clip.openclip`).

Config options: `path` (required), `tokenizer_path` (a `CLIPTokenizer` folder;
defaults to `path`, required for `hpsv2`), `dtype` ("float32" / "bfloat16"),
`scale` (clip_score), `head_path` (aesthetic), `text_heads` / `vision_heads`
(hpsv2, when not the OpenCLIP defaults). Images are preprocessed in jnp, see
`bpgo_jax.models.clip.preprocess` for how that differs from PIL. HPSv2's own
evaluation pads non-square images after resizing the longer side; for square
generator outputs that is the same as our resize + center crop.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bpgo_jax.errors import ConfigError, WeightsError
from bpgo_jax.models.clip import (
    CLIPModel,
    l2_normalize,
    load_clip,
    load_clip_vision,
    load_openclip,
    preprocess_images,
)
from bpgo_jax.models.text import PretrainedTokenizer, Tokenizer
from bpgo_jax.models.weights import open_tensors
from bpgo_jax.rewards.base import Reward, register

Prepare = Callable[[Sequence[str], Sequence[dict]], dict[str, np.ndarray]]


def require_path(cfg: ml_collections.ConfigDict, key: str, reward: str, what: str) -> str:
    path = cfg.get(key)
    if not path:
        raise ConfigError(f"reward {reward!r} needs cfg.{key}: {what}")
    if not os.path.exists(path):
        raise WeightsError(f"reward {reward!r}: cfg.{key}={path!r} does not exist")
    return path


def _dtype(cfg: ml_collections.ConfigDict):
    return jnp.dtype(cfg.get("dtype", "float32"))


def tokenizer_prepare(tokenizer: Tokenizer) -> Prepare:
    """Host-side `prepare`: prompts -> `{"input_ids": int32 [B, L]}` (metadata unused)."""

    def prepare(prompts: Sequence[str], metadata: Sequence[dict]) -> dict[str, np.ndarray]:
        del metadata
        return {"input_ids": tokenizer(prompts)}

    return prepare


def clip_cosine(module: CLIPModel, params, images: jax.Array, input_ids: jax.Array) -> jax.Array:
    """Cosine similarity of each image with its own prompt: `[B]` float32."""
    pixels = preprocess_images(images, module.cfg.vision.image_size)
    variables = {"params": params}
    image = l2_normalize(module.apply(variables, pixels, method="get_image_features"))
    text = l2_normalize(module.apply(variables, input_ids, method="get_text_features"))
    return jnp.sum(image * text, axis=-1)


def _clip_reward(
    name: str,
    module: CLIPModel,
    params,
    tokenizer_path: str,
    score: Callable[[dict, jax.Array], jax.Array],
) -> Reward:
    def fn(params, images: jax.Array, aux: dict) -> jax.Array:
        return score(params, clip_cosine(module, params, images, aux["input_ids"]))

    tokenizer = PretrainedTokenizer(tokenizer_path, module.cfg.text.max_position_embeddings)
    prepare = tokenizer_prepare(tokenizer)
    return Reward(name=name, jittable=True, fn=fn, params=params, prepare=prepare)


@register("clip_score")
def build_clip_score(cfg: ml_collections.ConfigDict) -> Reward:
    path = require_path(cfg, "path", "clip_score", "a transformers CLIPModel folder")
    module, params = load_clip(path, dtype=_dtype(cfg))
    scale = float(cfg.get("scale", 1.0))
    tokenizer = cfg.get("tokenizer_path") or path
    return _clip_reward("clip_score", module, params, tokenizer, lambda p, cos: scale * cos)


@register("pickscore")
def build_pickscore(cfg: ml_collections.ConfigDict) -> Reward:
    path = require_path(cfg, "path", "pickscore", "the PickScore_v1 CLIPModel folder")
    module, params = load_clip(path, dtype=_dtype(cfg))
    tokenizer = cfg.get("tokenizer_path") or path

    def score(params, cos):  # as the PickScore reference: logit_scale.exp() * cos
        return jnp.exp(params["logit_scale"].astype(jnp.float32)) * cos

    return _clip_reward("pickscore", module, params, tokenizer, score)


@register("hpsv2")
def build_hpsv2(cfg: ml_collections.ConfigDict) -> Reward:
    path = require_path(cfg, "path", "hpsv2", "an OpenCLIP ViT-H-14 .safetensors file")
    tokenizer = require_path(
        cfg, "tokenizer_path", "hpsv2", "a CLIPTokenizer folder (e.g. laion/CLIP-ViT-H-14)"
    )
    module, params = load_openclip(
        path,
        text_heads=cfg.get("text_heads"),
        vision_heads=cfg.get("vision_heads"),
        dtype=_dtype(cfg),
    )
    return _clip_reward("hpsv2", module, params, tokenizer, lambda p, cos: cos)


_HEAD_KEY = re.compile(r"^layers\.(\d+)\.(weight|bias)$")


def load_aesthetic_head(path: str) -> list[dict[str, jax.Array]]:
    """The LAION aesthetic MLP from its state dict (`layers.{0,2,4,6,7}.weight/bias`).

    The original `MLP` is Linear(768, 1024), Dropout, Linear(1024, 128),
    Dropout, Linear(128, 64), Dropout, Linear(64, 16), Linear(16, 1): its
    ReLUs are commented out, and dropout is the identity at inference, so the
    head is a chain of affine maps. We apply every Linear found, in index
    order, and check the chain's shapes. It is tiny, so it stays in float32.
    """
    found: dict[int, dict[str, np.ndarray]] = {}
    with open_tensors(path) as reader:
        for key in reader:
            m = _HEAD_KEY.match(key)
            if m is None:
                raise WeightsError(f"unexpected tensor {key!r} in aesthetic head {path!r}")
            found.setdefault(int(m[1]), {})[m[2]] = reader.get(key)
    layers, width = [], None
    for index in sorted(found):
        tensors = found[index]
        for part in ("weight", "bias"):
            if part not in tensors:
                raise WeightsError(f"missing tensor 'layers.{index}.{part}' in {path!r}")
        w, b = tensors["weight"], tensors["bias"]
        if w.ndim != 2 or b.shape != (w.shape[0],) or (width is not None and w.shape[1] != width):
            raise WeightsError(
                f"aesthetic head layer {index} has weight {w.shape} / bias {b.shape}, "
                f"expected [out, {width or 'in'}] / [out]"
            )
        width = w.shape[0]
        layers.append(
            {"kernel": jnp.asarray(w.T, jnp.float32), "bias": jnp.asarray(b, jnp.float32)}
        )
    if not layers or width != 1:
        raise WeightsError(f"aesthetic head {path!r} must end in a Linear(., 1), got width {width}")
    return layers


def aesthetic_head(layers: list[dict[str, jax.Array]], embeds: jax.Array) -> jax.Array:
    """`[B, D]` normalised embeddings -> `[B]` scores; float32 accumulation."""
    x = embeds.astype(jnp.float32)
    for layer in layers:
        x = x @ layer["kernel"] + layer["bias"]
    return x[:, 0]


@register("aesthetic")
def build_aesthetic(cfg: ml_collections.ConfigDict) -> Reward:
    path = require_path(cfg, "path", "aesthetic", "a CLIP ViT-L/14 transformers folder")
    head_path = require_path(
        cfg, "head_path", "aesthetic", "the aesthetic MLP head as .safetensors"
    )
    module, clip = load_clip_vision(path, dtype=_dtype(cfg), with_projection=True)
    params = {"clip": clip, "head": load_aesthetic_head(head_path)}

    def fn(params, images: jax.Array, aux: dict) -> jax.Array:
        del aux  # the prompt is not used
        pixels = preprocess_images(images, module.cfg.image_size)
        _, embeds = module.apply({"params": params["clip"]}, pixels)
        return aesthetic_head(params["head"], l2_normalize(embeds))

    return Reward(name="aesthetic", jittable=True, fn=fn, params=params)
