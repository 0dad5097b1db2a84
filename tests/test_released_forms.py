"""BPGO's released forms beside the paper's: hand values, properties, presets, the
loss they feed, and the flow-SDE / KL / tracker details that come with them."""

from __future__ import annotations

import functools
import math

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_config import tiny_config

from bpgo_jax import advantages as adv_lib
from bpgo_jax.advantages import forms as forms_lib
from bpgo_jax.advantages.bpgo import (
    bayes_weights,
    binary_crt_rewards,
    bpgo_advantages,
    crt_rewards,
    loss_terms,
    ras_weights,
    sign_std_weights,
)
from bpgo_jax.advantages.grpo import grpo_advantages
from bpgo_jax.advantages.step import advantages_step
from bpgo_jax.config import validate
from bpgo_jax.configs.common import base_config
from bpgo_jax.errors import ConfigError
from bpgo_jax.priors import init_prior_state
from bpgo_jax.rollout import samplers, schedules
from bpgo_jax.update.loss import PolicyBatch, clipped_surrogate, step_loss

# Group 0: mean 0.5, unbiased var 0.2 / 3 (+1e-8), so with prior_var 1 the posterior
# has variance 1 / 61 and mean (30 + 0.3) / 61 = 0.4967213; p = Phi(1.5364) = 0.937785.
# Group 1: the same rewards against P = 0.55: mean_post 0.5008197, p = 0.350448.
# Group 2: mean 0.05, far below P = 0.5 with a small spread: p = 0 (w_min).
BR = np.array([[0.2, 0.4, 0.6, 0.8], [0.2, 0.4, 0.6, 0.8], [0.0, 0.1, 0.0, 0.1]], np.float32)
BP = np.array([0.3, 0.55, 0.5], np.float32)
BAYES_W = np.array([1.4377850, 0.8504482, 0.5])


def test_bayes_hand_values():
    chex.assert_trees_all_close(bayes_weights(BR, BP), BAYES_W, atol=2e-6)
    # alpha scales the distance from 1: 1 + 0.5 (1.4377850 - 1).
    half = bayes_weights(BR, BP, alpha=0.5)
    chex.assert_trees_all_close(half, 1 + 0.5 * (BAYES_W - 1), atol=2e-6)
    # A wider range and the clamp: base 0 + 2 p, clamped to [0.1, 1.8].
    wide = bayes_weights(BR, BP, weight_range=(0.0, 2.0), clamp=(0.1, 1.8))
    chex.assert_trees_all_close(wide, np.array([1.8, 0.7008965, 0.1]), atol=3e-6)


def test_bayes_single_sample_group_uses_unit_variance():
    # G = 1: s2 = 1, posterior variance 1/2, mean (0.7 + 0.2) / 2; p = Phi(0.25 / 0.7071).
    w = bayes_weights(np.array([[0.7]], np.float32), np.array([0.2], np.float32))
    assert float(w[0]) == pytest.approx(1.1381632, abs=1e-6)


def test_sign_std_hand_values():
    # Unbiased stds 0.2581989 and 0.0577350; group 0 is above its prior, 1 below, and
    # group 2 sits on it (a tie counts as below).
    r = np.array([[0.2, 0.4, 0.6, 0.8], [0.0, 0.1, 0.0, 0.1], [0.5, 0.5, 0.5, 0.5]], np.float32)
    p = np.array([0.3, 0.5, 0.5], np.float32)
    w = sign_std_weights(r, p, alpha=1.0)
    chex.assert_trees_all_close(w, np.array([1.2581989, 0.9422650, 1.0]), atol=1e-6)
    fixed = sign_std_weights(r, p, alpha=0.5, magnitude="fixed", value=0.4)
    chex.assert_trees_all_close(fixed, np.array([1.2, 0.8, 0.8]), atol=1e-7)
    # The clamp bounds a large spread: std 70.71 -> 1 + 70.71, clamped to 10.
    big = sign_std_weights(np.array([[0.0, 100.0]], np.float32), np.zeros(1), alpha=1.0)
    assert float(big[0]) == 10.0


def test_sign_std_random_magnitude_is_keyed():
    r = np.tile(np.array([[0.2, 0.8]], np.float32), (64, 1))
    p = np.full(64, 0.3, np.float32)  # every group above its prior
    key = jax.random.key(3)
    w = np.asarray(sign_std_weights(r, p, alpha=0.5, magnitude="random", key=key))
    assert np.all((w >= 1.0) & (w < 1.5)) and len(np.unique(w)) > 32
    again = sign_std_weights(r, p, alpha=0.5, magnitude="random", key=key)
    np.testing.assert_array_equal(np.asarray(again), w)
    with pytest.raises(ValueError, match="key"):
        sign_std_weights(r, p, magnitude="random")


# (50 (R - P) + 1{R > P}) / (1 + exp(-R / 5)) * R:
# 0.8, P 0.5: 16 / (1 + e^-0.16) * 0.8 = 6.9109105; 0.2: -15 / (1 + e^-0.04) * 0.2;
# R = P and R = 0 give 0; 1.0, P 0.25: 38.5 / (1 + e^-0.2).
BINARY_R = np.array([[0.8, 0.2, 0.5], [1.0, 0.0, 0.25]], np.float32)
BINARY_P = np.array([0.5, 0.25], np.float32)
BINARY = np.array([[6.9109105, -1.5299960, 0.0], [21.1686089, 0.0, 0.0]])


def test_binary_crt_hand_values():
    chex.assert_trees_all_close(
        binary_crt_rewards(BINARY_R, BINARY_P), BINARY, rtol=1e-6, atol=1e-6
    )
    # The exp guard: -R / tau = 1000 / 1 is clipped to 30, so the value stays finite.
    out = binary_crt_rewards(np.array([[-1000.0, 0.0]]), np.zeros(1), a=1.0, tau=1.0)
    assert float(out[0, 0]) == pytest.approx(1e6 / (1 + math.exp(30)), rel=1e-5)


def _released(r, p, **kw):
    """The released preset's forms with their defaults."""
    return bpgo_advantages(
        r,
        p,
        ras=functools.partial(bayes_weights, clamp=(0.01, 10.0)),
        crt=binary_crt_rewards,
        crt_mode="replace",
        ras_on="transformed",
        **kw,
    )


def _reference_released_loss(r, p, ratio, clip_range):
    """Per-sample loss of the released pipeline literally, in float64: rewards
    overwritten by their CRT transform, GRPO advantages of those, RAS (bayes) on
    them against the raw-scale prior, advantages times clamp(1 + alpha (w - 1)),
    one surrogate."""
    r = np.asarray(r, np.float64)
    n = r.shape[1]
    t = (50 * (r - p[:, None]) + (r > p[:, None])) / (1 + np.exp(-r / 5)) * r
    adv = (t - t.mean(1, keepdims=True)) / (t.std(1, keepdims=True) + 1e-8)
    s2 = t.var(1, ddof=1) + 1e-8
    v = 1 / (n / s2 + 1)
    m = v * (n * t.mean(1) / s2 + p)
    prob = np.array(
        [
            0.5 * (1 + math.erf((mi - pi) / math.sqrt(vi) / math.sqrt(2)))
            for mi, pi, vi in zip(m, p, v, strict=True)
        ]
    )
    scale = np.clip(1 + 1.0 * (0.5 + prob - 1), 0.01, 10)
    a = (adv * scale[:, None]).reshape(-1)
    clipped = np.clip(ratio, 1 - clip_range, 1 + clip_range)
    return -np.minimum(ratio * a, clipped * a)


def test_replace_mode_matches_the_released_pipeline():
    rng = np.random.default_rng(0)
    r = rng.uniform(size=(4, 6)).astype(np.float32)
    p = np.array([0.3, 0.5, 0.7, 0.45], np.float32)
    b = _released(r, p)
    # Replace: one surrogate on the CRT rewards' z-scores, no second term.
    t = binary_crt_rewards(r, p)
    np.testing.assert_array_equal(np.asarray(b.advantages), np.asarray(grpo_advantages(t)))
    np.testing.assert_array_equal(np.asarray(b.crt_advantages), np.zeros((4, 6)))
    assert float(b.crt_coef) == 0.0
    # RAS on the transformed rewards (the released default).
    np.testing.assert_array_equal(
        np.asarray(b.ras_weights), np.asarray(bayes_weights(t, p, clamp=(0.01, 10.0)))
    )
    ratio = rng.uniform(0.9998, 1.0002, size=24)  # both sides of the 1e-4 clip range
    adv, w, crt = loss_terms(b, "replace")
    ours = np.repeat(np.asarray(w), 6) * np.asarray(clipped_surrogate(ratio, adv.reshape(-1), 1e-4))
    # Terms of size ~1 whose mean nearly cancels: compare them one by one.
    want = _reference_released_loss(r, p, ratio, 1e-4)
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-6)
    assert np.abs(want).max() > 0.5


def test_ras_on_raw_reads_the_raw_rewards():
    r = np.array([[0.0, 0.9]], np.float32)
    p = np.array([0.5], np.float32)
    released = _released(r, p)
    b = bpgo_advantages(
        r, p, ras=bayes_weights, crt=binary_crt_rewards, crt_mode="replace", ras_on="raw"
    )
    np.testing.assert_array_equal(np.asarray(b.ras_weights), np.asarray(bayes_weights(r, p)))
    assert float(b.ras_weights[0]) != float(released.ras_weights[0])
    with pytest.raises(ValueError, match="ras_on"):
        bpgo_advantages(r, p, ras=bayes_weights, crt=None, ras_on="transformed")


def test_append_mode_equals_the_doubled_batch():
    """The released `append_rerange_samples` loss, a mean over 2B samples (the raw
    ones and their CRT copies, each group's RAS weight mirrored onto its copies),
    equals our sum of two surrogates over the B stored samples with s = 1."""
    rng = np.random.default_rng(1)
    r = rng.uniform(size=(3, 4)).astype(np.float32)
    p = np.array([0.4, 0.5, 0.6], np.float32)
    kw = dict(ras=functools.partial(ras_weights, alpha=0.5, k=4.0), crt=binary_crt_rewards)
    b = bpgo_advantages(r, p, crt_coef=1.0, crt_mode="append", **kw)
    assert float(b.crt_coef) == 1.0
    ratio = rng.uniform(0.9998, 1.0002, size=12)
    w = np.repeat(np.asarray(b.ras_weights), 4)
    a_raw = np.asarray(grpo_advantages(r)).reshape(-1)
    a_copy = np.asarray(grpo_advantages(binary_crt_rewards(r, p))).reshape(-1)
    doubled = np.asarray(
        clipped_surrogate(
            np.concatenate([ratio, ratio]), np.concatenate([w * a_raw, w * a_copy]), 1e-4
        )
    )
    adv, weights, crt = loss_terms(b, "append")
    s = float(b.crt_coef)
    stored = np.repeat(np.asarray(weights), 4) * np.asarray(
        clipped_surrogate(ratio, adv.reshape(-1), 1e-4)
    ) + s * np.asarray(clipped_surrogate(ratio, crt.reshape(-1), 1e-4))
    # The doubled batch's mean over 2B is the stored samples' mean of these pairs;
    # terms of size ~1 nearly cancel in the mean, so compare them one by one.
    np.testing.assert_allclose(stored, (doubled[:12] + doubled[12:]) / 2, rtol=1e-5, atol=1e-6)
    assert np.abs(stored).max() > 0.3
    # s weighs the copies: s = 0.5 gives (w S(A) + 0.5 w S(At)) / 1.5.
    half = bpgo_advantages(r, p, crt_coef=0.5, crt_mode="append", **kw)
    _, weights, crt = loss_terms(half, "append")
    chex.assert_trees_all_close(weights, half.ras_weights / 1.5, rtol=1e-6)
    chex.assert_trees_all_close(crt, half.crt_advantages * (half.ras_weights / 1.5)[:, None])


def test_auxiliary_loss_terms_are_unchanged():
    b = bpgo_advantages(
        BR, BP, ras=bayes_weights, crt=functools.partial(crt_rewards, lam=1.0), crt_coef=0.5
    )
    out = loss_terms(b, "auxiliary")
    for got, want in zip(out, (b.advantages, b.ras_weights, b.crt_advantages), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


_groups = hnp.arrays(np.float32, (3, 5), elements=st.floats(-3, 3, width=32))
_anchor = hnp.arrays(np.float32, (3,), elements=st.floats(-3, 3, width=32))


@settings(max_examples=30, deadline=None)
@given(
    r=_groups,
    p=_anchor,
    alpha=st.floats(0.0, 1.0),
    lo=st.floats(0.0, 1.0),
    width=st.floats(0.0, 2.0),
    prior_var=st.floats(0.01, 10.0),
)
def test_bayes_weights_stay_in_range(r, p, alpha, lo, width, prior_var):
    w = np.asarray(
        bayes_weights(
            r, p, alpha=alpha, prior_var=prior_var, weight_range=(lo, lo + width), clamp=None
        )
    )
    low, high = 1 + alpha * (lo - 1), 1 + alpha * (lo + width - 1)
    assert np.all(w >= np.float32(low) - 1e-6) and np.all(w <= np.float32(high) + 1e-6)
    gap = r.mean(1) - p
    assert np.all(w[gap > 1e-2] >= np.float32(1 + alpha * (lo + width / 2 - 1)) - 1e-6)


@settings(max_examples=30, deadline=None)
@given(
    r=_groups,
    p=_anchor,
    alpha=st.floats(0.0, 5.0),
    magnitude=st.sampled_from(["std", "fixed", "random"]),
    value=st.floats(0.0, 3.0),
)
def test_sign_std_weights_stay_in_the_clamp(r, p, alpha, magnitude, value):
    w = np.asarray(
        sign_std_weights(
            r,
            p,
            alpha=alpha,
            magnitude=magnitude,
            value=value,
            key=jax.random.key(0),
            clamp=(0.01, 10.0),
        )
    )
    assert np.all((w >= np.float32(0.01)) & (w <= 10.0))
    gap = r.mean(1) - p  # away from ties, which summation order may break either way
    assert np.all(w[gap > 1e-5] >= 1.0) and np.all(w[gap < -1e-5] <= 1.0)


@settings(max_examples=30, deadline=None)
@given(
    r=hnp.arrays(np.float32, (2, 6), elements=st.floats(0, 1, width=32)),
    p=hnp.arrays(np.float32, (2,), elements=st.floats(0, 1, width=32)),
)
def test_binary_crt_keeps_the_sign_of_the_gap(r, p):
    t = np.asarray(binary_crt_rewards(r, p))
    gap = r - p[:, None]
    # XLA:CPU flushes subnormal results to zero: R > 1e-30 keeps t out of that range.
    assert np.all(t[(gap > 0) & (r > 1e-30)] > 0) and np.all(t[gap < 0] <= 0)


_FORMS = {
    "paper": functools.partial(ras_weights, alpha=0.5, k=2.0),
    "bayes": bayes_weights,
    "sign_std": sign_std_weights,
    "none": None,
}
_CRTS = {"paper": functools.partial(crt_rewards, lam=1.0), "binary": binary_crt_rewards}


@settings(max_examples=40, deadline=None)
@given(
    value=st.floats(-2, 2, width=32),
    other=hnp.arrays(np.float32, (2, 4), elements=st.floats(-2, 2, width=32)),
    p=hnp.arrays(np.float32, (3,), elements=st.floats(-2, 2, width=32)),
    ras=st.sampled_from(sorted(_FORMS)),
    crt=st.sampled_from(sorted(_CRTS)),
    mode=st.sampled_from(["auxiliary", "replace", "append"]),
    ras_on=st.sampled_from(["raw", "transformed"]),
)
def test_zero_variance_groups_give_zero_advantages(value, other, p, ras, crt, mode, ras_on):
    r = np.concatenate([np.full((1, 4), value, np.float32), other])
    b = bpgo_advantages(
        r, p, ras=_FORMS[ras], crt=_CRTS[crt], crt_coef=0.7, crt_mode=mode, ras_on=ras_on
    )
    adv, weights, crt_adv = loss_terms(b, mode)
    assert np.all(np.asarray(adv)[0] == 0.0) and np.all(np.asarray(crt_adv)[0] == 0.0)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in (adv, weights, crt_adv))


@settings(max_examples=30, deadline=None)
@given(
    r=hnp.arrays(np.float32, (4, 5), elements=st.floats(-3, 3, width=32)),
    p=hnp.arrays(np.float32, (4,), elements=st.floats(-3, 3, width=32)),
    form=st.sampled_from(["paper", "bayes", "sign_std"]),
    std=st.sampled_from(["group", "global"]),
)
def test_alpha0_without_crt_is_grpo_bit_for_bit(r, p, form, std):
    ras = {
        "paper": functools.partial(ras_weights, alpha=0.0, k=1.0, clamp=(0.01, 10.0)),
        "bayes": functools.partial(bayes_weights, alpha=0.0),
        "sign_std": functools.partial(sign_std_weights, alpha=0.0),
    }[form]
    for mode in ("auxiliary", "replace", "append"):
        b = bpgo_advantages(r, p, ras=ras, crt=None, crt_coef=0.5, crt_mode=mode, std=std, clip=5.0)
        adv, w, crt = loss_terms(b, mode)
        np.testing.assert_array_equal(
            np.asarray(adv), np.asarray(grpo_advantages(r, std=std, clip=5.0))
        )
        np.testing.assert_array_equal(np.asarray(w), np.ones(4, np.float32))
        np.testing.assert_array_equal(np.asarray(crt), np.zeros((4, 5), np.float32))


# ------------------------------------------------------------------ presets and config


def _adv(**fields):
    c = base_config()
    c.advantage.update(fields)
    return c.advantage


def test_presets_resolve_to_their_forms():
    assert forms_lib.resolve_forms(_adv()) == forms_lib.Forms("paper", "paper", "auxiliary", "raw")
    assert forms_lib.resolve_forms(_adv(preset="released")) == forms_lib.Forms(
        "bayes", "binary", "replace", "transformed"
    )
    # A form set to the preset's own value is not a contradiction.
    assert forms_lib.resolve_forms(_adv(preset="released", ras="bayes")).ras == "bayes"
    custom = forms_lib.resolve_forms(_adv(preset="custom", ras="bayes", crt="none"))
    assert custom == forms_lib.Forms("bayes", "none", "auxiliary", "raw")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"preset": "released", "ras": "paper"},
            "advantage.ras='paper' contradicts advantage.preset='released', which sets "
            "ras='bayes'; set advantage.preset='custom' to combine forms",
        ),
        ({"crt_mode": "append"}, "advantage.crt_mode='append' contradicts advantage.preset="),
        ({"preset": "authors"}, "advantage.preset='authors' is not one of"),
        ({"preset": "custom", "crt": "exp"}, "advantage.crt='exp' is not one of"),
        (
            {"preset": "custom", "crt": "none", "ras_on": "transformed"},
            "advantage.ras_on='transformed' needs a CRT transform",
        ),
    ],
)
def test_preset_errors(fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        forms_lib.resolve_forms(_adv(**fields))


def _validated(tmp_path, **overrides):
    return validate(tiny_config(tmp_path, **overrides), 8)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"advantage.preset": "released", "advantage.crt": "paper"}, "contradicts"),
        ({"advantage.preset": "released", "advantage.bayes.prior_var": 0.0}, "prior_var=0.0"),
        (
            {
                "advantage.preset": "released",
                "advantage.bayes.alpha": 3.0,
                "advantage.ras_clamp": None,
            },
            "allows RAS weights down to -0.5",
        ),
        (
            {
                "advantage.preset": "custom",
                "advantage.ras": "sign_std",
                "advantage.ras_clamp": None,
            },
            "advantage.ras='sign_std' needs advantage.ras_clamp",
        ),
        ({"advantage.sign_std.magnitude": "uniform"}, "advantage.sign_std.magnitude="),
        ({"advantage.binary.tau": 0.0}, "advantage.binary.tau=0.0 must be a finite number > 0"),
        ({"train.kl_form": "exact"}, "train.kl_form='exact' is not one of"),
        (
            {
                "train.kl_form": "flow_grpo",
                "model.prediction_type": "epsilon",
                "sample.kind": "ddim",
            },
            "train.kl_form='flow_grpo' is Flow-GRPO's form for the flow SDE",
        ),
        ({"sample.shift": -1.0}, "sample.shift=-1.0 must be a finite number > 0"),
    ],
)
def test_validate_refuses(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _validated(tmp_path, **overrides)


def test_validate_accepts_the_presets(tmp_path):
    for preset in ("paper", "released", "custom"):
        _validated(tmp_path, **{"advantage.preset": preset})
    # A bayes weight that could reach 0 is fine while the clamp keeps it positive.
    _validated(tmp_path, **{"advantage.preset": "released", "advantage.bayes.alpha": 3.0})


def test_loss_crt_coef():
    c = base_config()
    assert forms_lib.loss_crt_coef(c) == 0.5
    c.advantage.preset = "released"
    assert forms_lib.loss_crt_coef(c) == 0.0
    c.advantage.update(preset="custom", ras="bayes", crt="binary", crt_mode="append")
    assert forms_lib.loss_crt_coef(c) == 0.5
    c.advantage.method = "grpo"
    assert forms_lib.loss_crt_coef(c) == 0.0


def _step(config, rewards, ids):
    prior = init_prior_state(8, kind="moving_average", init_value=0.4)
    return advantages_step(prior, ids, rewards, config=config, group_size=4)


def test_advantages_step_released_preset_and_metrics():
    c = base_config()
    c.advantage.preset = "released"
    r = jnp.asarray(np.random.default_rng(2).uniform(size=16), jnp.float32)
    ids = jnp.arange(4)
    out, _, metrics = _step(c, r, ids)
    groups = r.reshape(4, 4)
    b = _released(groups, jnp.full(4, 0.4), clip=5.0)
    np.testing.assert_array_equal(np.asarray(out.advantages), np.asarray(b.advantages).reshape(-1))
    np.testing.assert_array_equal(np.asarray(out.ras_weights), np.repeat(b.ras_weights, 4))
    np.testing.assert_array_equal(np.asarray(out.crt_advantages), np.zeros(16))
    assert float(metrics["ras_weight_min"]) >= 0.5 and float(metrics["ras_weight_max"]) <= 1.5
    assert float(metrics["crt_reward_mean"]) == pytest.approx(float(b.transformed.mean()))
    for key in ("crt_reward_std", "crt_reward_min", "crt_reward_max", "ras_weight_mean"):
        assert np.isfinite(float(metrics[key]))
    # GRPO ignores the forms: weights exactly 1, no CRT term, the raw z-scores.
    c.advantage.method = "grpo"
    g, _, m = _step(c, r, ids)
    np.testing.assert_array_equal(
        np.asarray(g.advantages), np.asarray(grpo_advantages(groups, clip=5.0)).reshape(-1)
    )
    np.testing.assert_array_equal(np.asarray(g.ras_weights), np.ones(16, np.float32))
    assert "crt_reward_mean" not in m


def test_advantages_step_random_magnitude_under_jit():
    c = base_config()
    c.advantage.update(preset="custom", ras="sign_std", crt="none")
    c.advantage.sign_std.update(magnitude="random", alpha=0.5)
    step = jax.jit(functools.partial(advantages_step, config=c, group_size=4))
    prior = init_prior_state(8, kind="moving_average", init_value=-1.0)  # all groups above
    r = jnp.asarray(np.random.default_rng(3).uniform(size=32), jnp.float32)
    a, _, _ = step(prior, jnp.arange(8), r)
    b, _, _ = step(prior, jnp.arange(8), r)
    w = np.asarray(a.ras_weights)[::4]
    assert np.all((w >= 1.0) & (w < 1.5)) and len(np.unique(w)) == 8
    np.testing.assert_array_equal(np.asarray(b.ras_weights), np.asarray(a.ras_weights))
    other, _, _ = step(prior, jnp.arange(8), r + 0.01)
    assert not np.array_equal(np.asarray(other.ras_weights), np.asarray(a.ras_weights))


# ------------------------------------------------------------------ flow SDE and KL


@pytest.mark.parametrize("shift", [0.05, 0.1, 0.15, 0.3, 1.0, 3.0])
def test_flow_grpo_first_step_is_chosen_by_index(shift):
    # With shift 0.3, flow_sigmas gives s_0 = 1 - 2 ulp: a test `s >= 1` missed it
    # and the first step's std became ~3e7.
    s = schedules.flow_sigmas(6, shift)
    tab = schedules.flow_tables(6, shift, "flow_grpo", 0.7)
    want = 0.7 * math.sqrt(s[0] / (1 - s[1])) * math.sqrt(s[0] - s[1])
    assert float(tab["std"][0]) == pytest.approx(want, rel=1e-6)
    assert np.all(np.isfinite(tab["std"])) and float(tab["std"].max()) < 2.0
    np.testing.assert_allclose(tab["std"], tab["sde_std"] * np.sqrt(s[:-1] - s[1:]), rtol=1e-6)


class _LinearFlow:
    """A flow 'network' v = theta * x: enough to check the loss arithmetic."""

    def predict(self, trainable, frozen, x, t, cond):
        del frozen, t, cond
        return trainable["theta"] * x


def test_kl_forms():
    sampler = samplers.Sampler(
        "flow", "flow", 4, 1.0, schedules.flow_tables(4, 1.0, "flow_grpo", 0.7)
    )
    rng = np.random.default_rng(4)
    b = 3
    latents = jnp.asarray(rng.normal(size=(b, 5, 2, 2, 1)), jnp.float32)
    outputs = 0.5 * latents[:, :4]  # the behaviour policy: theta = 0.5
    zeros = jnp.zeros(b)
    mb = PolicyBatch(latents, outputs, None, zeros, jnp.ones(b), zeros)
    k = jnp.array([0, 1, 3])
    kw = dict(model=_LinearFlow(), sampler=sampler, clip_range=1e-4, crt_coef=0.0, kl_beta=1.0)
    policy, ref = {"theta": jnp.asarray(0.5)}, {"theta": jnp.asarray(0.2)}
    _, gauss = step_loss(policy, None, ref, mb, None, k, **kw)
    _, flow = step_loss(policy, None, ref, mb, None, k, kl_form="flow_grpo", **kw)
    # mu - mu_ref = cv * (0.5 - 0.2) x; the Gaussian KL divides by the transition
    # variance, Flow-GRPO's by std_t^2 = transition variance / |dt| (dt = -0.25).
    x = np.asarray(latents)[np.arange(b), np.asarray(k)]
    cv = sampler.tables["cv"][np.asarray(k)]
    sq = ((cv[:, None, None, None] * 0.3 * x) ** 2).mean(axis=(1, 2, 3))
    var = sampler.tables["std"][np.asarray(k)] ** 2
    assert float(gauss["kl_ref"]) == pytest.approx(float(np.mean(sq / (2 * var))), rel=1e-5)
    assert float(flow["kl_ref"]) == pytest.approx(float(np.mean(sq / (2 * var / 0.25))), rel=1e-5)
    ddim = samplers.Sampler(
        "ddim", "epsilon", 4, 1.0, schedules.ddim_tables(schedules.DEFAULT_DDPM, 4, 1.0)
    )
    with pytest.raises(ValueError, match="flow sampler"):
        step_loss(policy, None, ref, mb, None, k, **{**kw, "sampler": ddim}, kl_form="flow_grpo")


# ------------------------------------------------------------------ DDPO tracker


def test_tracker_clips_its_advantages():
    # Buffer [0, 0, 0, 10] after the update: mean 2.5, std 4.3301270; the outlier's
    # advantage 1.7320508 is clipped to 1.5, the others (-0.5773503) are not.
    t = adv_lib.PerPromptStatTracker(buffer_size=8, min_count=2, clip=1.5)
    out = t.update(["a"] * 4, np.array([0.0, 0.0, 0.0, 10.0]))
    np.testing.assert_allclose(out, [-0.5773503, -0.5773503, -0.5773503, 1.5], rtol=1e-6)
    unclipped = adv_lib.PerPromptStatTracker(buffer_size=8, min_count=2)
    assert float(unclipped.update(["a"] * 4, np.array([0.0, 0.0, 0.0, 10.0]))[3]) > 1.7
    with pytest.raises(ValueError, match="clip"):
        adv_lib.PerPromptStatTracker(buffer_size=8, min_count=2, clip=0.0)


# ------------------------------------------------------------------ through the train loop


def test_train_loop_runs_the_released_preset(tmp_path):
    from bpgo_jax.train import train

    overrides = {"train.num_epochs": 1, "mesh.num_devices": 1, "advantage.preset": "released"}
    (record,) = train(tiny_config(tmp_path, **overrides), tmp_path / "run").records
    assert record["onpolicy_ratio_max_dev"] == 0.0 and np.isfinite(record["loss"])
    assert 0.5 <= record["ras_weight_min"] <= record["ras_weight_mean"]
    assert record["ras_weight_mean"] <= record["ras_weight_max"] <= 1.5
    for key in ("crt_reward_mean", "crt_reward_std", "crt_reward_min", "crt_reward_max"):
        assert np.isfinite(record[key])
    assert record["crt_advantage_abs_mean"] == 0.0  # replace: no second surrogate
    assert record["advantage_abs_mean"] > 0.1
