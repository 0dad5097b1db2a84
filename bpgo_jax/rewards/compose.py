"""Weighted composition of several rewards, each component kept for logging.

`config.rewards` maps reward names to blocks with a `weight` and the reward's
own options, e.g. `{"world_clip": {"weight": 1.0}, "jpeg_compressibility":
{"weight": 0.1}}`. The training reward is the weighted sum.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np

from bpgo_jax.rewards.base import Reward, build


@dataclasses.dataclass(frozen=True)
class RewardSet:
    rewards: tuple[Reward, ...]
    names: tuple[str, ...]
    weights: tuple[float, ...]

    @property
    def jittable(self) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.rewards) if r.jittable)

    @property
    def host(self) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.rewards) if not r.jittable)

    def params(self) -> dict:
        return {self.names[i]: self.rewards[i].params for i in self.jittable}

    def prepare(self, prompts: Sequence[str], metadata: Sequence[dict]) -> dict:
        """Host-side per-sample inputs of the jittable rewards."""
        out = {}
        for i in self.jittable:
            prep = self.rewards[i].prepare
            out[self.names[i]] = prep(prompts, metadata) if prep else {}
        return out

    def score_jittable(self, params: dict, images: jax.Array, aux: dict) -> dict:
        """Runs inside jit: {name: [B]} for every jittable reward."""
        return {
            self.names[i]: self.rewards[i].fn(params[self.names[i]], images, aux[self.names[i]])
            for i in self.jittable
        }

    def score_host(self, images: np.ndarray, prompts, metadata) -> dict:
        return {
            self.names[i]: np.asarray(self.rewards[i].fn(images, prompts, metadata), np.float32)
            for i in self.host
        }

    def total(self, components: Mapping[str, np.ndarray]) -> np.ndarray:
        """Weighted sum of the components (float32 arrays, host or device), in config order."""
        return sum(w * components[n] for n, w in zip(self.names, self.weights, strict=True))


def build_reward_set(cfg: ml_collections.ConfigDict) -> RewardSet:
    """Builds every reward of `config.rewards` (name -> {weight, ...options})."""
    if not cfg:
        raise ValueError("config.rewards is empty: name at least one reward")
    rewards, names, weights = [], [], []
    for name, block in cfg.items():
        if "weight" not in block:
            raise ValueError(f"config.rewards.{name}.weight is missing")
        rewards.append(build(name, block))
        names.append(name)
        weights.append(float(block.weight))
    return RewardSet(tuple(rewards), tuple(names), tuple(weights))
