"""The BPGO / GRPO policy loss of one denoising step of one micro-batch.

One form serves every method and BPGO variant:

    w_i * S(ratio, A_ij) + s * S(ratio, At_ij),   S = -min(r A, clip(r) A)

(`advantages.step.SampleAdvantages`: w = the RAS weight of the sample's group,
A / At = group z-scores of the raw / CRT-transformed rewards in the paper's
auxiliary mode; `advantages.bpgo.loss_terms` writes the released replace and
append modes in it). With the clip active two surrogates differ from one on
`w A + s At`; with w = 1 and s = 0 it is plain GRPO.

The optional KL to the reference policy compares the two Gaussian steps'
means, `beta * mean((mu - mu_ref)^2) / (2 var)`. `kl_form` picks var:
"gaussian" divides by the transition variance (std_t^2 |dt| for the flow
SDE), which makes it the exact KL of the two steps; "flow_grpo" divides by
std_t^2 as Flow-GRPO's SD3 script does, a KL |dt| times smaller per step
(flow sampler only). Latent positions the model holds fixed
(`samplers.held`) are not drawn by the sampler, so neither term reads them.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bpgo_jax.rollout import samplers

Params = Any
KL_FORMS = ("gaussian", "flow_grpo")


class PolicyBatch(NamedTuple):
    """Rollout samples ready for the update; every leaf has a leading batch axis."""

    latents: jax.Array  # [B, T + 1, *latent]
    outputs: jax.Array  # [B, T, *latent] behaviour-policy network outputs from the rollout
    cond: Any  # conditioning pytree
    advantages: jax.Array  # [B]
    ras_weights: jax.Array  # [B] weight of the sample's group
    crt_advantages: jax.Array  # [B]


def clipped_surrogate(ratio: jax.Array, adv: jax.Array, clip_range: float) -> jax.Array:
    """PPO's pessimistic surrogate, negated so that lower is better."""
    clipped = jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return -jnp.minimum(ratio * adv, clipped * adv)


def step_loss(
    trainable: Params,
    frozen: Params,
    ref_trainable: Params | None,
    mb: PolicyBatch,
    uncond: Any,
    k: jax.Array,
    *,
    model,
    sampler,
    clip_range: float,
    crt_coef: float,
    kl_beta: float,
    kl_form: str = "gaussian",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss at per-sample step indices `k` [b] of micro-batch `mb`."""
    if kl_form not in KL_FORMS:
        raise ValueError(f"kl_form must be one of {KL_FORMS}, got {kl_form!r}")
    if kl_beta and kl_form == "flow_grpo" and "sde_std" not in sampler.tables:
        raise ValueError(f"kl_form='flow_grpo' needs the flow sampler, not {sampler.kind!r}")
    rows = jnp.arange(k.shape[0])
    x, x_next = mb.latents[rows, k], mb.latents[rows, k + 1]
    t = jnp.asarray(sampler.tables["model_t"])[k]
    # Differentiated as is, the network would be compiled with its backward pass:
    # intermediates become residuals, XLA fuses differently from the rollout's
    # forward-only program, and a reduction whose order follows what is fused
    # into it (XLA:CPU's GroupNorm statistics, for one) rounds differently, so the
    # on-policy ratio misses 1 (in bfloat16 by more than a 1e-4 clip range).
    # `jax.checkpoint` keeps only the inputs as residuals and recomputes the
    # network for the gradient: this output is computed as in the rollout, for
    # one more forward pass per trained step.
    predict = functools.partial(samplers.guided_prediction, model, sampler.guidance_scale)
    out = jax.checkpoint(predict)(trainable, frozen, x, t, mb.cond, uncond)
    hold = samplers.held(model, mb.cond)  # positions the sampler does not draw: not averaged
    drawn = None if hold is None else hold[0]
    old_out = mb.outputs[rows, k]
    log_ratio, mean, std = samplers.log_ratio(sampler, k, x, x_next, out, old_out, drawn)
    ratio = jnp.exp(log_ratio)
    per_sample = mb.ras_weights * clipped_surrogate(ratio, mb.advantages, clip_range)
    if crt_coef:
        per_sample = per_sample + crt_coef * clipped_surrogate(ratio, mb.crt_advantages, clip_range)
    metrics = {}
    if kl_beta:
        ref_out = samplers.guided_prediction(
            model, sampler.guidance_scale, ref_trainable, frozen, x, t, mb.cond, uncond
        )
        ref_mean, _ = samplers.transition(sampler, k, x, jax.lax.stop_gradient(ref_out))
        if kl_form == "gaussian":
            step_std = jnp.squeeze(std, axis=tuple(range(1, x.ndim)))
        else:
            step_std = jnp.asarray(sampler.tables["sde_std"])[k]
        kl = samplers.position_mean((mean - ref_mean) ** 2, drawn) / (2 * step_std**2)
        per_sample = per_sample + kl_beta * kl
        metrics["kl_ref"] = kl.mean()
    loss = per_sample.mean()
    metrics.update(
        loss=loss,
        approx_kl=0.5 * jnp.mean(log_ratio**2),
        clip_fraction=jnp.mean(jnp.abs(ratio - 1.0) > clip_range),
        ratio_mean=ratio.mean(),
        ratio_max_dev=jnp.abs(ratio - 1.0).max(),
    )
    return loss, metrics
