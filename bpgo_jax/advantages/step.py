"""The advantages stage: priors, BPGO / GRPO advantages and the updated priors.

One pure function of the prior state and an epoch's rewards, so it can be
tested alone and compiled once; the DDPO tracker, a host-side buffer, is
applied afterwards by the loop.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding

from bpgo_jax import priors as prior_lib
from bpgo_jax.advantages.bpgo import advantage_metrics, bpgo_advantages


class SampleAdvantages(NamedTuple):
    """Per-sample terms of the loss, each [B] (group values repeated G times)."""

    advantages: jax.Array
    ras_weights: jax.Array
    crt_advantages: jax.Array


def advantages_step(
    prior_state: prior_lib.PriorState,
    ids: jax.Array,
    rewards: jax.Array,
    *,
    config: ml_collections.ConfigDict,
    group_size: int,
) -> tuple[SampleAdvantages, prior_lib.PriorState, dict[str, jax.Array]]:
    """Advantages of rewards [N * G] of prompts `ids` [N], new priors, metrics.

    The priors are looked up before this epoch's group means update them. GRPO
    is BPGO with alpha = s = 0 (bit for bit).
    """
    groups = rewards.reshape(-1, group_size)
    kind = config.prior.kind
    clip = tuple(config.prior.clip) if config.prior.clip else None
    priors = prior_lib.lookup(prior_state, ids, kind=kind, clip=clip)
    a = config.advantage
    bpgo = a.method == "bpgo"
    out = bpgo_advantages(
        groups,
        priors,
        alpha=a.alpha if bpgo else 0.0,
        k=a.k,
        lam=a.lam,
        crt_coef=a.crt_coef if bpgo else 0.0,
        std=a.std,
        eps=a.eps,
        clip=a.clip,
        ras_clamp=tuple(a.ras_clamp) if a.ras_clamp else None,
        max_exp=a.max_exp,
    )
    if kind == "moving_average":
        prior_state = prior_lib.update(
            prior_state, ids, groups.mean(axis=1), kind=kind, decay=config.prior.decay
        )
    metrics = advantage_metrics(groups, out)
    metrics.update(
        prior_mean=priors.mean(),
        reward_minus_prior_mean=(groups.mean(axis=1) - priors).mean(),
        reward_mean=groups.mean(),
        reward_std=groups.std(),
        group_std_mean=groups.std(axis=1).mean(),
    )
    per_sample = lambda x: jnp.repeat(x, group_size) if x.ndim == 1 else x.reshape(-1)
    sample_adv = SampleAdvantages(
        per_sample(out.advantages), per_sample(out.ras_weights), per_sample(out.crt_advantages)
    )
    return sample_adv, prior_state, metrics


def jit_advantages_step(
    config: ml_collections.ConfigDict,
    *,
    batch_sharding: NamedSharding,
    prior_sharding,
    replicated: NamedSharding,
):
    """`advantages_step` compiled: per-sample outputs batch-sharded, priors kept in place."""
    return jax.jit(
        functools.partial(advantages_step, config=config, group_size=config.sample.group_size),
        out_shardings=(batch_sharding, prior_sharding, replicated),
    )
