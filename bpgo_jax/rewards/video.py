"""Video rewards from image rewards: score K frames of each clip, then reduce.

A video model's `decode` gives float32 frames `[B, F, H, W, 3]` in [0, 1];
the image rewards take `[B, H, W, 3]`. The wrapper picks K frames of each
clip, scores them as one batch of `B * K` images with the wrapped reward
(each frame with its own clip's prompt, metadata and `prepare` output) and
reduces over the K scores. It is jittable when the wrapped reward is (the
frame pick and reshape run inside the jitted rollout, sharded over the batch
like the images), a host reward otherwise.

Every registered image reward can be wrapped, in two spellings:

    config.rewards.video_frames = {"reward": "pickscore", "frames": 4, "reduce": "mean",
                                   "weight": 1.0, "path": "PickScore_v1"}
    config.rewards.video_pickscore = {"frames": 4, "weight": 1.0, "path": "PickScore_v1"}

`video_frames` wraps the reward its `reward` field names (any registered
image reward, plugins included); `video_<name>` is the same for the rewards
of `ALIASED` and lets one config combine several wrapped rewards (the keys
of `config.rewards` are reward names, so `video_frames` can appear once).
Options: `frames` (K, default 4): K frames evenly spaced from the first to the
last, rounded to the nearest frame (K = 1: the first frame); `reduce`:
"mean" (default) averages their scores, "first" scores the first frame alone
(then `frames` must be 1 or unset). Every other field but `weight` is the
wrapped reward's own config (`path`, `dtype`, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bpgo_jax.errors import ConfigError
from bpgo_jax.rewards import base
from bpgo_jax.rewards.base import Reward, register

REDUCES = ("mean", "first")
DEFAULT_FRAMES = 4
# The wrapper's own fields; the rest of a block configures the wrapped reward.
OWN_FIELDS = ("reward", "frames", "reduce", "weight")
# Image rewards that also get a `video_<name>` alias.
ALIASED = (
    "aesthetic",
    "clip_score",
    "hpsv2",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "pickscore",
    "saturation",
    "world_clip",
    "world_oracle",
)


def frame_indices(num_frames: int, frames: int, name: str = "video_frames") -> np.ndarray:
    """`frames` indices evenly spaced over `[0, num_frames)`, first and last included."""
    if frames > num_frames:
        raise ConfigError(
            f"config.rewards.{name}.frames={frames} exceeds the {num_frames} frames of the clips"
        )
    return np.round(np.linspace(0, num_frames - 1, frames)).astype(np.int32)


def _check_video(shape: Sequence[int], name: str) -> None:
    if len(shape) != 5 or shape[-1] != 3:
        raise ConfigError(
            f"reward {name!r} scores videos [B, F, H, W, 3], got an array of shape "
            f"{tuple(shape)}; use the image reward itself on an image model"
        )


def _check_options(frames: int, reduce: str, name: str) -> None:
    if reduce not in REDUCES:
        raise ConfigError(f"config.rewards.{name}.reduce={reduce!r} is not one of {REDUCES}")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ConfigError(f"config.rewards.{name}.frames={frames!r} must be a positive integer")
    if reduce == "first" and frames != 1:
        raise ConfigError(
            f"config.rewards.{name}: reduce='first' scores one frame; frames={frames} must be 1"
        )


def wrap(
    inner: Reward, *, frames: int = DEFAULT_FRAMES, reduce: str = "mean", name: str = ""
) -> Reward:
    """`inner` (an image reward) as a reward of videos `[B, F, H, W, 3]`.

    Frame k of clip b is row `b * K + k` of the batch `inner` scores, so its
    per-sample inputs (jittable: `prepare`'s arrays; host: prompts and
    metadata) are each clip's repeated K times.
    """
    name = name or f"video_{inner.name}"
    _check_options(frames, reduce, name)

    def pick(shape: Sequence[int]) -> np.ndarray:
        _check_video(shape, name)
        return frame_indices(shape[1], frames, name)

    if inner.jittable:

        def fn(params, videos: jax.Array, aux: dict) -> jax.Array:
            b = videos.shape[0]
            idx = pick(videos.shape)
            clips = videos if len(idx) == videos.shape[1] else jnp.take(videos, idx, axis=1)
            flat = clips.reshape(b * frames, *clips.shape[2:])
            aux = jax.tree.map(lambda a: jnp.repeat(a, frames, axis=0), aux)
            return inner.fn(params, flat, aux).reshape(b, frames).mean(axis=1)

        return Reward(name=name, jittable=True, fn=fn, params=inner.params, prepare=inner.prepare)

    def host_fn(videos: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict]):
        videos = np.asarray(videos)
        b = videos.shape[0]
        flat = videos[:, pick(videos.shape)].reshape(b * frames, *videos.shape[2:])
        scores = inner.fn(
            flat,
            [p for p in prompts for _ in range(frames)],
            [m for m in metadata for _ in range(frames)],
        )
        return np.asarray(scores, np.float32).reshape(b, frames).mean(axis=1)

    return Reward(name=name, jittable=False, fn=host_fn)


def _build(cfg: ml_collections.ConfigDict, inner_name: str, name: str) -> Reward:
    if inner_name not in base.names():
        from bpgo_jax.rewards import load_plugins

        load_plugins()
    # Rewards that take whole clips already (this module's, VideoCLIP-XL's) wrap nothing.
    own = {"video_frames", "videoclip_xl", *(f"video_{n}" for n in ALIASED)}
    known = [n for n in base.names() if n not in own]
    if inner_name not in known:
        raise ConfigError(
            f"config.rewards.{name}.reward={inner_name!r} is not an image reward; known: {known}"
        )
    reduce = cfg.get("reduce", "mean")
    frames = cfg.get("frames", 1 if reduce == "first" else DEFAULT_FRAMES)
    _check_options(frames, reduce, name)
    inner_cfg = ml_collections.ConfigDict({k: v for k, v in cfg.items() if k not in OWN_FIELDS})
    inner = base.build(inner_name, inner_cfg)
    return wrap(inner, frames=frames, reduce=reduce, name=name)


@register("video_frames")
def build_video_frames(cfg: ml_collections.ConfigDict) -> Reward:
    """The image reward `cfg.reward` on K frames of each clip."""
    inner_name = cfg.get("reward")
    if not inner_name:
        raise ConfigError(
            "config.rewards.video_frames.reward is missing: name the image reward to wrap, "
            "e.g. 'pickscore'"
        )
    return _build(cfg, inner_name, "video_frames")


def _alias(inner_name: str):
    def build(cfg: ml_collections.ConfigDict) -> Reward:
        if "reward" in cfg:
            raise ConfigError(
                f"config.rewards.video_{inner_name} wraps {inner_name!r}; drop its 'reward' "
                f"field (or use video_frames)"
            )
        return _build(cfg, inner_name, f"video_{inner_name}")

    build.__doc__ = f"`{inner_name}` on K frames of each clip."
    return build


for _name in ALIASED:
    register(f"video_{_name}")(_alias(_name))
