"""WorldCLIP: a small CLIP-like image-text reward model for the built-in world.

A conv image tower and a one-layer transformer text tower (the built-in
`TextEncoder` over `HashTokenizer` ids, pooled and projected) map into a joint
space; the reward is `sigmoid(exp(logit_scale) * cosine + logit_bias)` in
[0, 1], exactly what the SigLIP pairwise sigmoid loss trains. It is trained
briefly on world pairs so that, like real reward models, it is correlated with
the truth but uncertain.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bpgo_jax.errors import WeightsError
from bpgo_jax.models.text import HashTokenizer, TextEncoder
from bpgo_jax.models.weights import load_msgpack, write_msgpack
from bpgo_jax.world.scenes import IMAGE_SIZE

Params = Any
DEFAULT_PATH = Path(__file__).resolve().parent / "assets" / "reward_model.msgpack"


@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
    vocab_size: int = 4096
    max_length: int = 24
    image_widths: tuple[int, ...] = (32, 48, 64)
    image_hidden: int = 128
    text_width: int = 64
    text_depth: int = 1
    text_heads: int = 4
    embed_dim: int = 64
    init_logit_scale: float = math.log(10.0)
    init_logit_bias: float = -10.0

    def __post_init__(self):
        if self.text_width % self.text_heads:
            raise ValueError(
                f"text_width={self.text_width} is not divisible by text_heads={self.text_heads}"
            )
        object.__setattr__(self, "image_widths", tuple(self.image_widths))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RewardModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown reward model config keys {sorted(unknown)}")
        return cls(**d)


class ImageTower(nn.Module):
    """Strided convs down to 4x4, then flatten (keeps where things are) and MLP."""

    widths: tuple[int, ...]
    hidden: int
    embed_dim: int

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = nn.gelu(nn.Conv(self.widths[0], (3, 3), name="stem")(images * 2.0 - 1.0))
        for i, w in enumerate(self.widths):
            x = nn.gelu(nn.Conv(w, (3, 3), strides=2, name=f"down_{i}")(x))
            x = nn.gelu(nn.Conv(w, (3, 3), name=f"conv_{i}")(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.gelu(nn.Dense(self.hidden, name="hidden")(x))
        return nn.Dense(self.embed_dim, name="proj")(x)


class WorldCLIP(nn.Module):
    cfg: RewardModelConfig

    def setup(self):
        c = self.cfg
        self.image_tower = ImageTower(c.image_widths, c.image_hidden, c.embed_dim)
        self.text_tower = TextEncoder(
            c.vocab_size,
            c.max_length,
            c.text_width,
            c.text_depth,
            c.text_heads,
            embed_dim=c.embed_dim,
        )
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(c.init_logit_scale), ()
        )
        self.logit_bias = self.param("logit_bias", nn.initializers.constant(c.init_logit_bias), ())

    def embed_images(self, images: jax.Array) -> jax.Array:
        z = self.image_tower(images)
        return z / jnp.linalg.norm(z, axis=-1, keepdims=True).clip(1e-6)

    def embed_text(self, tokens: jax.Array) -> jax.Array:
        z = self.text_tower(tokens)
        return z / jnp.linalg.norm(z, axis=-1, keepdims=True).clip(1e-6)

    def __call__(self, images: jax.Array, tokens: jax.Array) -> jax.Array:
        """Logits [B_img, B_txt] of every image-caption pair."""
        cos = self.embed_images(images) @ self.embed_text(tokens).T
        return jnp.exp(self.logit_scale) * cos + self.logit_bias


def init_params(cfg: RewardModelConfig, rng: jax.Array) -> Params:
    images = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
    tokens = jnp.zeros((1, cfg.max_length), jnp.int32)
    # One compiled init instead of op-by-op dispatch (seconds faster on CPU).
    return jax.jit(WorldCLIP(cfg).init)(rng, images, tokens)["params"]


def _resize(images: jax.Array) -> jax.Array:
    if images.shape[1:3] == (IMAGE_SIZE, IMAGE_SIZE):
        return images
    return jax.image.resize(
        images, (images.shape[0], IMAGE_SIZE, IMAGE_SIZE, images.shape[-1]), "linear"
    )


def pair_logits(
    params: Params, cfg: RewardModelConfig, images: jax.Array, tokens: jax.Array
) -> jax.Array:
    """Logits [B_img, B_txt] of all pairs (what the SigLIP loss trains)."""
    return WorldCLIP(cfg).apply({"params": params}, _resize(images), tokens)


def score(
    params: Params, cfg: RewardModelConfig, images: jax.Array, tokens: jax.Array
) -> jax.Array:
    """Reward in [0, 1] of each image [B, H, W, 3] (float in [0, 1]) with its own caption."""
    model = WorldCLIP(cfg)
    variables = {"params": params}
    zi = model.apply(variables, _resize(images.astype(jnp.float32)), method=WorldCLIP.embed_images)
    zt = model.apply(variables, tokens, method=WorldCLIP.embed_text)
    cos = (zi * zt).sum(-1)
    logits = jnp.exp(params["logit_scale"]) * cos + params["logit_bias"]
    return jax.nn.sigmoid(logits)


def siglip_loss(
    params: Params, cfg: RewardModelConfig, images: jax.Array, tokens: jax.Array
) -> jax.Array:
    """Pairwise sigmoid loss: row i's own caption is positive, all others negative.

    In this world other captions in the batch are sometimes true of an image
    too ("a circle"); treating them as negatives is the false-negative noise
    that makes real reward models unsure on vague captions.
    """
    logits = pair_logits(params, cfg, images, tokens)
    labels = 2.0 * jnp.eye(logits.shape[0]) - 1.0
    return -jax.nn.log_sigmoid(labels * logits).sum(-1).mean()


def tokenizer(cfg: RewardModelConfig) -> HashTokenizer:
    return HashTokenizer(cfg.vocab_size, cfg.max_length)


def save(path: str | Path, params: Params, cfg: RewardModelConfig) -> None:
    """Writes `path` (msgpack params) and `path` with suffix .json (the config)."""
    path = Path(path)
    write_msgpack(path, jax.tree.map(np.asarray, params))
    path.with_suffix(".json").write_text(cfg.to_json() + "\n")


def load(path: str | Path | None = None) -> tuple[Params, RewardModelConfig]:
    """(params, config) from `path` (default: the shipped model)."""
    path = Path(path) if path else DEFAULT_PATH
    if not path.exists():
        raise WeightsError(f"reward model weights {str(path)!r} do not exist")
    cfg_path = path.with_suffix(".json")
    if not cfg_path.is_file():
        raise WeightsError(f"reward model config {str(cfg_path)!r} does not exist")
    try:
        cfg = RewardModelConfig.from_dict(json.loads(cfg_path.read_text()))
    except (ValueError, TypeError) as err:  # JSON errors are ValueErrors
        raise WeightsError(f"reward model config {str(cfg_path)!r}: {err}") from None
    # Every tensor the config implies, with its shape, and no other.
    like = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return jax.tree.map(jnp.asarray, load_msgpack(path, like)), cfg


def batch_scorer(
    cfg: RewardModelConfig, chunk: int = 256
) -> Callable[[Params, np.ndarray, Sequence[str]], np.ndarray]:
    """`scores(params, images float [N, H, W, 3], captions) -> float32 [N]`.

    Runs in fixed-size jitted chunks (padded), so it compiles once.
    """
    tok = tokenizer(cfg)
    fn = jax.jit(lambda p, x, t: score(p, cfg, x, t))

    def scores(params: Params, images: np.ndarray, captions: Sequence[str]) -> np.ndarray:
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        out = []
        for i in range(0, len(images), chunk):
            x = np.asarray(images[i : i + chunk], np.float32)
            t = tok(captions[i : i + chunk])
            pad = chunk - len(x)
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)])
            t = np.concatenate([t, np.zeros((pad, t.shape[1]), np.int32)])
            out.append(np.asarray(fn(params, x, t))[: chunk - pad])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    return scores


def host_scorer(
    params: Params, cfg: RewardModelConfig, chunk: int = 256
) -> Callable[[np.ndarray, Sequence[str]], np.ndarray]:
    """`scores(images, captions)` of fixed `params` (see `batch_scorer`)."""
    scores = batch_scorer(cfg, chunk)
    return lambda images, captions: scores(params, images, captions)
