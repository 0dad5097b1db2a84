"""Reward registry: named factories that build a `Reward` from its config.

Two kinds of reward exist. A *jittable* reward is a pure function of its own
parameters, the decoded images and per-sample auxiliary arrays; it runs inside
the jitted, sharded rollout. A *host* reward runs in numpy on process-local
images (JPEG size, external scorers); the engine gathers images for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

Params = Any


@dataclasses.dataclass(frozen=True)
class Reward:
    """One scalar reward per image.

    jittable: `fn(params, images, aux) -> [B]` with images float32
      `[B, H, W, 3]` in [0, 1] and `aux` the batched output of `prepare`.
    host: `fn(images, prompts, metadata) -> [B]` on numpy arrays.
    `prepare(prompts, metadata)` (optional, jittable rewards only) turns the
    batch's prompts into per-sample numpy arrays (e.g. token ids) on the host.
    """

    name: str
    jittable: bool
    fn: Callable[..., Any]
    params: Params = None
    prepare: Callable[[Sequence[str], Sequence[dict]], dict[str, np.ndarray]] | None = None


RewardFactory = Callable[[ml_collections.ConfigDict], Reward]
_REGISTRY: dict[str, RewardFactory] = {}


def register(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator: make a reward factory available under `name` in configs."""

    def wrap(factory: RewardFactory) -> RewardFactory:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return wrap


def names() -> list[str]:
    return sorted(_REGISTRY)


def build(name: str, cfg: ml_collections.ConfigDict) -> Reward:
    """Builds reward `name`; `cfg` is that reward's own config block."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(names())}")
    return _REGISTRY[name](cfg)
