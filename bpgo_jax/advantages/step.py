"""The advantages stage: priors, BPGO / GRPO advantages and the updated priors.

One pure function of the prior state and an epoch's rewards, so it can be
tested alone and compiled once; the DDPO tracker, a host-side buffer, is
applied afterwards by the loop. Every BPGO form and CRT mode leaves here as
the three per-sample terms of the one loss in `update/loss.py`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding

from bpgo_jax import priors as prior_lib
from bpgo_jax.advantages import forms as forms_lib
from bpgo_jax.advantages.bpgo import advantage_metrics, bpgo_advantages, loss_terms


class SampleAdvantages(NamedTuple):
    """Per-sample terms of the loss `ras_weights * S(advantages) + s * S(crt_advantages)`,
    each [B] (group values repeated G times); `bpgo.loss_terms` writes every CRT
    mode in this form."""

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
    (and the DDPO tracker, which replaces the advantages afterwards) is BPGO
    without RAS and CRT: weights exactly 1, no CRT term.
    """
    groups = rewards.reshape(-1, group_size)
    kind = config.prior.kind
    clip = tuple(config.prior.clip) if config.prior.clip else None
    priors = prior_lib.lookup(prior_state, ids, kind=kind, clip=clip)
    a = config.advantage
    forms = forms_lib.resolve_forms(a)
    if a.method != "bpgo":
        forms = forms._replace(ras="none", crt="none", ras_on="raw")
    key = None
    if forms.ras == "sign_std" and a.sign_std.magnitude == "random":
        key = forms_lib.reward_key(config.seed, groups)
    out = bpgo_advantages(
        groups,
        priors,
        ras=forms_lib.ras_function(a, forms, key),
        crt=forms_lib.crt_function(a, forms),
        crt_coef=a.crt_coef,
        crt_mode=forms.crt_mode,
        ras_on=forms.ras_on,
        std=a.std,
        eps=a.eps,
        clip=a.clip,
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
    sample_adv = SampleAdvantages(*map(per_sample, loss_terms(out, forms.crt_mode)))
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
