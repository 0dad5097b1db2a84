"""BPGO advantages: RAS group weights (Eq. 2-3) and CRT auxiliary advantages (Eq. 4).

Chosen loss form. The policy update uses the paper's objective literally, with
TWO separately clipped PPO surrogates per group i:

    L_i = w_i * L_GRPO(A_i) + crt_coef * L_GRPO(At_i)

where A is the GRPO advantage of the raw rewards and At that of the
CRT-transformed rewards. The surrogate min(r*A, clip(r)*A) is not linear in A
once the ratio leaves the clip range (which side is taken depends on the sign
of A), so one surrogate on the combined advantage w*A + s*At is NOT the same
loss: A and At can have opposite signs for the same sample. Keeping two terms
also makes the RAS-only and CRT-only ablations exact.

Both modules read the RAW rewards. (The public implementation overwrote the
rewards with their CRT transform and then computed RAS on those; here CRT
produces a new array and RAS never sees it.) With alpha = 0 and crt_coef = 0
this reduces to plain GRPO bit-for-bit.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bpgo_jax.advantages.grpo import check_rewards, grpo_advantages, zero_std_groups


class BPGOAdvantages(NamedTuple):
    """Everything the BPGO loss needs per group (a pytree, so it passes through jit)."""

    advantages: jax.Array  # [N, G] GRPO advantages of the raw rewards
    ras_weights: jax.Array  # [N] RAS weight w_i of each group's surrogate
    crt_advantages: jax.Array  # [N, G] GRPO advantages of the CRT rewards (0 if crt_coef == 0)
    crt_coef: jax.Array  # [] weight s of the CRT surrogate


def _concrete(x: object) -> bool:
    """True when `x` is a host value we may validate (not a jit tracer)."""
    return not isinstance(x, jax.core.Tracer)


def _check_priors(priors: jax.Array, num_groups: int) -> jax.Array:
    p = jnp.asarray(priors, jnp.float32)
    if p.shape != (num_groups,):
        raise ValueError(f"priors must have shape [{num_groups}], got {p.shape}")
    return p


def ras_weights(
    rewards: jax.Array,
    priors: jax.Array,
    *,
    alpha: float,
    k: float,
    clamp: tuple[float, float] | None = None,
) -> jax.Array:
    """Reliability weights [N]: w = 1 + alpha * (2 sigmoid(k (mean_j R_ij - P_i)) - 1).

    Groups whose mean reward beats their prior are trusted more (w > 1), groups
    below it less (w < 1); w lies in (1 - alpha, 1 + alpha). Computed as
    1 + alpha * tanh(k * gap / 2), the same function with better precision
    near gap = 0. `clamp` optionally bounds w (the public code uses [0.01, 10]).
    """
    r = check_rewards(rewards)
    p = _check_priors(priors, r.shape[0])
    if _concrete(alpha) and not 0.0 <= alpha <= 1.0:
        raise ValueError(
            f"alpha must be in [0, 1] (larger values flip gradient signs), got {alpha}"
        )
    if _concrete(k) and not k >= 0.0:
        raise ValueError(f"k must be >= 0, got {k}")
    if clamp is not None and not clamp[0] <= clamp[1]:
        raise ValueError(f"clamp must be (low, high) with low <= high, got {clamp}")
    gap = jnp.mean(r, axis=1) - p
    w = 1.0 + alpha * jnp.tanh(0.5 * k * gap)
    if clamp is not None:
        w = jnp.clip(w, clamp[0], clamp[1])
    return w.astype(jnp.float32)


def crt_rewards(
    rewards: jax.Array, priors: jax.Array, *, lam: float, max_exp: float = 30.0
) -> jax.Array:
    """CRT rewards [N, G]: (lam * (R - P) + 1{R > P}) * exp(R), a new array.

    Deviations above the prior get a unit bonus and everything is stretched by
    exp(R), sharpening confident differences. The exp argument is clipped to
    [-max_exp, max_exp] so large rewards stay finite. The map preserves the
    order of rewards only where R - P >= -1: d/dR [lam (R - P) e^R] =
    lam e^R (1 + R - P), which is negative below that (true for rewards and
    priors in [0, 1], not for unbounded reward scales).
    """
    r = check_rewards(rewards)
    p = _check_priors(priors, r.shape[0])[:, None]
    if _concrete(max_exp) and not max_exp > 0:
        raise ValueError(f"max_exp must be positive, got {max_exp}")
    above = (r > p).astype(jnp.float32)
    return (lam * (r - p) + above) * jnp.exp(jnp.clip(r, -max_exp, max_exp))


def bpgo_advantages(
    rewards: jax.Array,
    priors: jax.Array,
    *,
    alpha: float,
    k: float,
    lam: float,
    crt_coef: float,
    std: str = "group",
    eps: float = 1e-8,
    clip: float | None = None,
    ras_clamp: tuple[float, float] | None = None,
    max_exp: float = 30.0,
) -> BPGOAdvantages:
    """GRPO advantages, RAS weights and CRT advantages of one batch of groups.

    rewards [N, G] are the raw rewards, priors [N] each group's prior anchor.
    The CRT advantages use the same std mode, eps and clip as the main ones;
    with a (Python) crt_coef of 0 they are not computed at all.
    """
    r = check_rewards(rewards)
    adv = grpo_advantages(r, std=std, eps=eps, clip=clip)
    w = ras_weights(r, priors, alpha=alpha, k=k, clamp=ras_clamp)
    if _concrete(crt_coef) and crt_coef == 0:
        crt_adv = jnp.zeros_like(adv)
    else:
        crt = crt_rewards(r, priors, lam=lam, max_exp=max_exp)
        crt_adv = grpo_advantages(crt, std=std, eps=eps, clip=clip)
        # A traced crt_coef cannot skip the work, but still yields exact zeros.
        crt_adv = jnp.where(crt_coef == 0, 0.0, crt_adv)
    return BPGOAdvantages(adv, w, crt_adv, jnp.asarray(crt_coef, jnp.float32))


def advantage_metrics(rewards: jax.Array, b: BPGOAdvantages) -> dict[str, jax.Array]:
    """Scalars for the logs; a high zero-std fraction means groups teach nothing."""
    return {
        "zero_std_group_fraction": jnp.mean(zero_std_groups(rewards).astype(jnp.float32)),
        "ras_weight_mean": jnp.mean(b.ras_weights),
        "ras_weight_min": jnp.min(b.ras_weights),
        "ras_weight_max": jnp.max(b.ras_weights),
        "advantage_abs_mean": jnp.mean(jnp.abs(b.advantages)),
        "crt_advantage_abs_mean": jnp.mean(jnp.abs(b.crt_advantages)),
    }
