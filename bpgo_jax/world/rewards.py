"""Registers the world's rewards: the learned `world_clip` and the exact `world_oracle`.

world_clip is what policies are post-trained on (uncertain, like real reward
models); world_oracle is ground truth for evaluation only.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from bpgo_jax.rewards.base import Reward, register
from bpgo_jax.world import oracle
from bpgo_jax.world import reward_model as rm


@register("world_clip")
def build_world_clip(cfg: ml_collections.ConfigDict) -> Reward:
    """cfg.path: weights (.msgpack, config .json beside); default the shipped model."""
    params, model_cfg = rm.load(cfg.get("path") or None)
    tok = rm.tokenizer(model_cfg)

    def prepare(prompts: Sequence[str], metadata: Sequence[dict]) -> dict[str, np.ndarray]:
        del metadata
        return {"tokens": tok(prompts)}

    def fn(params, images: jax.Array, aux: dict[str, jax.Array]) -> jax.Array:
        return rm.score(params, model_cfg, images, aux["tokens"])

    return Reward(name="world_clip", jittable=True, fn=fn, params=params, prepare=prepare)


@register("world_oracle")
def build_world_oracle(cfg: ml_collections.ConfigDict) -> Reward:
    """1.0 where every constraint in metadata[i]["constraints"] holds, else 0.0."""
    ocfg = oracle.OracleConfig(
        **{
            k: cfg[k]
            for k in ("color_threshold", "min_coverage", "min_area", "large_extent")
            if k in cfg
        }
    )

    def fn(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict]) -> np.ndarray:
        if not len(images) == len(prompts) == len(metadata):
            raise ValueError(
                f"world_oracle got {len(images)} images, {len(prompts)} prompts, "
                f"{len(metadata)} metadata"
            )
        out = np.zeros(len(images), np.float32)
        for i, (image, meta) in enumerate(zip(np.asarray(images), metadata, strict=True)):
            if "constraints" not in meta:
                raise ValueError(f"metadata[{i}] has no 'constraints' (prompt {prompts[i]!r})")
            out[i] = float(oracle.check(image, meta["constraints"], ocfg))
        return out

    return Reward(name="world_oracle", jittable=False, fn=fn)
