"""BPGO advantages: RAS group weights and CRT rewards, as the paper states them and as
the authors' released code computes them.

RAS gives each group i a weight w_i of its surrogate; CRT transforms the rewards
within a group around the prior. Each has the paper's form and the released
one (`advantage.ras`, `advantage.crt`; `forms.py` holds the presets):

- `ras_weights` (paper, Eq. 2): 1 + alpha (2 sigmoid(k (mean R_i - P_i)) - 1).
  A fixed k ignores the reward scale: on rewards in [0, 1] with k = 1, a gap
  of 0.1 between group mean and prior moves w by only 0.05 alpha.
- `bayes_weights` (released): a z-test of the group mean against the prior,
  so it reads the gap in units of the group's own spread.
- `sign_std_weights` (released `cvpr` mode): 1 + alpha sign(mean - P) m with
  m the group std, a fixed value or a uniform draw.
- `crt_rewards` (paper, Eq. 4) and `binary_crt_rewards` (released).

How CRT enters the loss (`crt_mode`). The policy loss has one form,

    ras_weights_i * S(ratio, A) + s * S(ratio, At),   S = -min(r A, clip(r) A)

and each mode is written in it (`loss_terms`):

- auxiliary (paper): A, At the group z-scores of the raw / CRT rewards. Two
  separately clipped surrogates: S is not linear in A once the ratio leaves
  the clip range (which side is taken depends on the sign of A), so one
  surrogate on w A + s At is NOT the same loss, and two terms keep the
  RAS-only and CRT-only ablations exact.
- replace (released default): the CRT rewards replace the raw ones before the
  group advantage; A is their z-score and there is no second term.
- append (released `append_rerange_samples`): the CRT copies join the batch as
  extra samples, each stored sample entering twice with two advantages. The
  released code's batch of 2B samples has the loss mean_{2B} w S(A); written
  over the B stored samples, with the copies weighted s (s = 1 there), it is
  (w S(A) + s w S(At)) / (1 + s) per sample: RAS weights both copies (the
  released code mirrors a group's weight onto its copies) and the mean over
  the doubled batch is the 1 / (1 + s). S is positively homogeneous in A
  (S(r, c A) = c S(r, A) for c >= 0), so `loss_terms` puts w / (1 + s) on the
  first term and w / (1 + s) into At. The rollout is not duplicated, and the
  optimiser takes as many steps as without CRT (a doubled batch cut into
  mini-batches of the same size would take twice as many).

`ras_on` picks the rewards RAS reads: "raw" (the paper) or "transformed" (the
released default, which overwrites the rewards with their CRT transform and
then weights groups by those, against the raw-scale prior). The raw rewards
are never overwritten here: CRT produces a new array. Without RAS and CRT (or
alpha = 0 and s = 0) this reduces to plain GRPO bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bpgo_jax.advantages.grpo import check_rewards, grpo_advantages, zero_std_groups

RAS_FORMS = ("paper", "bayes", "sign_std", "none")
CRT_FORMS = ("paper", "binary", "none")
CRT_MODES = ("auxiliary", "replace", "append")
RAS_ON = ("raw", "transformed")
SIGN_MAGNITUDES = ("std", "fixed", "random")
# Added to the released forms' group variance / std, as there.
_VAR_EPS = 1e-8

# (rewards [N, G], priors [N]) -> RAS weights [N] or CRT rewards [N, G].
GroupFn = Callable[[jax.Array, jax.Array], jax.Array]


class BPGOAdvantages(NamedTuple):
    """Everything the BPGO loss needs per group (a pytree, so it passes through jit)."""

    advantages: jax.Array  # [N, G] z-scores the main surrogate reads (CRT rewards' if replace)
    ras_weights: jax.Array  # [N] RAS weight w_i of each group
    crt_advantages: jax.Array  # [N, G] z-scores of the CRT rewards (0 without a CRT term)
    crt_coef: jax.Array  # [] weight s of the CRT term (0 without one)
    transformed: jax.Array | None = None  # [N, G] CRT rewards, where computed


def _concrete(x: object) -> bool:
    """True when `x` is a host value we may validate (not a jit tracer)."""
    return not isinstance(x, jax.core.Tracer)


def _check_priors(priors: jax.Array, num_groups: int) -> jax.Array:
    p = jnp.asarray(priors, jnp.float32)
    if p.shape != (num_groups,):
        raise ValueError(f"priors must have shape [{num_groups}], got {p.shape}")
    return p


def _check_clamp(clamp: tuple[float, float] | None) -> None:
    if clamp is not None and not clamp[0] <= clamp[1]:
        raise ValueError(f"clamp must be (low, high) with low <= high, got {clamp}")


def _finish_weights(w: jax.Array, clamp: tuple[float, float] | None) -> jax.Array:
    if clamp is not None:
        w = jnp.clip(w, clamp[0], clamp[1])
    return w.astype(jnp.float32)


def ras_weights(
    rewards: jax.Array,
    priors: jax.Array,
    *,
    alpha: float,
    k: float,
    clamp: tuple[float, float] | None = None,
) -> jax.Array:
    """Paper's reliability weights [N] (Eq. 2): 1 + alpha (2 sigmoid(k (mean_j R_ij - P_i)) - 1).

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
    _check_clamp(clamp)
    gap = jnp.mean(r, axis=1) - p
    return _finish_weights(1.0 + alpha * jnp.tanh(0.5 * k * gap), clamp)


def bayes_weights(
    rewards: jax.Array,
    priors: jax.Array,
    *,
    alpha: float = 1.0,
    prior_var: float = 1.0,
    weight_range: tuple[float, float] = (0.5, 1.5),
    clamp: tuple[float, float] | None = (0.01, 10.0),
) -> jax.Array:
    """Released RAS weights [N]: how surely a group's posterior mean beats its prior.

    The G rewards are evidence on a Normal prior N(P, prior_var): with s2 the
    group's unbiased variance (+1e-8; 1 when G = 1), the posterior has
    variance v = 1 / (G / s2 + 1 / prior_var) and mean
    v (G mean / s2 + P / prior_var), and p = P(posterior > P) =
    Phi((mean_post - P) / sqrt(v)). The base weight w_min + (w_max - w_min) p
    lies in `weight_range`; the weight is 1 + alpha (base - 1), clamped. A
    z-test, it reads the gap in units of the group's own spread, so it needs
    no scale knob like Eq. 2's k.
    """
    r = check_rewards(rewards)
    p = _check_priors(priors, r.shape[0])
    w_min, w_max = weight_range
    if not w_min <= w_max:
        raise ValueError(
            f"weight_range must be (w_min, w_max) with w_min <= w_max, got {weight_range}"
        )
    if _concrete(prior_var) and not prior_var > 0:
        raise ValueError(f"prior_var must be > 0, got {prior_var}")
    _check_clamp(clamp)
    n = r.shape[1]
    mean = jnp.mean(r, axis=1)
    s2 = jnp.var(r, axis=1, ddof=1) + _VAR_EPS if n > 1 else jnp.ones_like(mean)
    post_var = 1.0 / (n / s2 + 1.0 / prior_var)
    post_mean = post_var * (n * mean / s2 + p / prior_var)
    prob = jax.scipy.special.ndtr((post_mean - p) / jnp.sqrt(post_var))
    base = w_min + (w_max - w_min) * prob
    return _finish_weights(1.0 + alpha * (base - 1.0), clamp)


def sign_std_weights(
    rewards: jax.Array,
    priors: jax.Array,
    *,
    alpha: float = 1.0,
    magnitude: str = "std",
    value: float = 0.0,
    key: jax.Array | None = None,
    clamp: tuple[float, float] | None = (0.01, 10.0),
) -> jax.Array:
    """Released `cvpr` RAS weights [N]: 1 + alpha sign(mean_j R_ij - P_i) m_i, clamped.

    sign is +1 above the prior and -1 otherwise (a tie counts as below). m is
    the group's unbiased std + 1e-8 (`magnitude="std"`), `value`
    ("fixed"), or a uniform [0, 1) draw per group from `key` ("random", an
    ablation). The std grows with the reward scale, so keep the clamp.
    """
    r = check_rewards(rewards)
    p = _check_priors(priors, r.shape[0])
    if magnitude not in SIGN_MAGNITUDES:
        raise ValueError(f"magnitude must be one of {SIGN_MAGNITUDES}, got {magnitude!r}")
    _check_clamp(clamp)
    n = r.shape[1]
    mean = jnp.mean(r, axis=1)
    sign = jnp.where(mean > p, 1.0, -1.0)
    if magnitude == "std":
        m = (jnp.std(r, axis=1, ddof=1) if n > 1 else jnp.zeros_like(mean)) + _VAR_EPS
    elif magnitude == "fixed":
        m = jnp.full_like(mean, value)
    else:
        if key is None:
            raise ValueError("magnitude='random' needs a PRNG key")
        m = jax.random.uniform(key, mean.shape)
    return _finish_weights(1.0 + alpha * sign * m, clamp)


def crt_rewards(
    rewards: jax.Array, priors: jax.Array, *, lam: float, max_exp: float = 30.0
) -> jax.Array:
    """Paper's CRT rewards [N, G] (Eq. 4): (lam * (R - P) + 1{R > P}) * exp(R), a new array.

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


def binary_crt_rewards(
    rewards: jax.Array,
    priors: jax.Array,
    *,
    a: float = 50.0,
    tau: float = 5.0,
    max_exp: float = 30.0,
) -> jax.Array:
    """Released CRT rewards [N, G]: (a (R - P) + 1{R > P}) / (1 + exp(-R / tau)) * R.

    The factor R sigmoid(R / tau) replaces Eq. 4's exp(R); a = 50 makes the
    distance from the prior dominate the unit bonus. Rewards at the prior (or
    at 0) map to 0. The exp argument is clipped to [-max_exp, max_exp].
    """
    r = check_rewards(rewards)
    p = _check_priors(priors, r.shape[0])[:, None]
    if _concrete(tau) and not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if _concrete(max_exp) and not max_exp > 0:
        raise ValueError(f"max_exp must be positive, got {max_exp}")
    above = (r > p).astype(jnp.float32)
    gate = 1.0 + jnp.exp(jnp.clip(-r / tau, -max_exp, max_exp))
    return (a * (r - p) + above) / gate * r


def bpgo_advantages(
    rewards: jax.Array,
    priors: jax.Array,
    *,
    ras: GroupFn | None,
    crt: GroupFn | None,
    crt_coef: float = 0.0,
    crt_mode: str = "auxiliary",
    ras_on: str = "raw",
    std: str = "group",
    eps: float = 1e-8,
    clip: float | None = None,
) -> BPGOAdvantages:
    """Advantages, RAS weights and CRT advantages of one batch of groups.

    rewards [N, G] are the raw rewards, priors [N] each group's prior anchor;
    `ras` maps them to weights (None: all 1), `crt` to transformed rewards
    (None: no CRT). Every z-score uses the same std mode, eps and clip. In
    auxiliary / append mode a (Python) crt_coef of 0 skips the CRT rewards
    unless RAS reads them.
    """
    if crt_mode not in CRT_MODES:
        raise ValueError(f"crt_mode must be one of {CRT_MODES}, got {crt_mode!r}")
    if ras_on not in RAS_ON:
        raise ValueError(f"ras_on must be one of {RAS_ON}, got {ras_on!r}")
    if ras_on == "transformed" and crt is None:
        raise ValueError("ras_on='transformed' needs a CRT transform (crt is None)")
    r = check_rewards(rewards)
    p = _check_priors(priors, r.shape[0])
    replace = crt is not None and crt_mode == "replace"
    term = crt is not None and not replace and not (_concrete(crt_coef) and crt_coef == 0)
    needs_t = crt is not None and (replace or term or ras_on == "transformed")
    t = crt(r, p) if needs_t else None
    adv = grpo_advantages(t if replace else r, std=std, eps=eps, clip=clip)
    if ras is None:
        w = jnp.ones(r.shape[0], jnp.float32)
    else:
        w = ras(t if ras_on == "transformed" else r, p)
    if term:
        crt_adv = grpo_advantages(t, std=std, eps=eps, clip=clip)
        # A traced crt_coef cannot skip the work, but still yields exact zeros.
        crt_adv = jnp.where(crt_coef == 0, 0.0, crt_adv)
    else:
        crt_adv = jnp.zeros_like(adv)
    coef = crt_coef if term else 0.0
    return BPGOAdvantages(adv, w, crt_adv, jnp.asarray(coef, jnp.float32), t)


def loss_terms(b: BPGOAdvantages, crt_mode: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(A [N, G], surrogate weights [N], CRT advantages [N, G]) of the loss
    `weights * S(A) + s * S(crt)` that `crt_mode` asks for (module docstring).

    Only append differs from `b`: (w S(A) + s w S(At)) / (1 + s) becomes
    weights w / (1 + s) and CRT advantages At w / (1 + s) (S is positively
    homogeneous in A and w >= 0).
    """
    if crt_mode not in CRT_MODES:
        raise ValueError(f"crt_mode must be one of {CRT_MODES}, got {crt_mode!r}")
    if crt_mode != "append":
        return b.advantages, b.ras_weights, b.crt_advantages
    scale = b.ras_weights / (1.0 + b.crt_coef)
    return b.advantages, scale, b.crt_advantages * scale[:, None]


def advantage_metrics(rewards: jax.Array, b: BPGOAdvantages) -> dict[str, jax.Array]:
    """Scalars for the logs; a high zero-std fraction means groups teach nothing."""
    out = {
        "zero_std_group_fraction": jnp.mean(zero_std_groups(rewards).astype(jnp.float32)),
        "ras_weight_mean": jnp.mean(b.ras_weights),
        "ras_weight_min": jnp.min(b.ras_weights),
        "ras_weight_max": jnp.max(b.ras_weights),
        "advantage_abs_mean": jnp.mean(jnp.abs(b.advantages)),
        "crt_advantage_abs_mean": jnp.mean(jnp.abs(b.crt_advantages)),
    }
    if b.transformed is not None:
        t = b.transformed
        out.update(
            crt_reward_mean=jnp.mean(t),
            crt_reward_std=jnp.std(t),
            crt_reward_min=jnp.min(t),
            crt_reward_max=jnp.max(t),
        )
    return out
