"""GRPO / BPGO advantages and DDPO's per-prompt tracker against hand-computed values."""

import functools
import json

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpgo_jax.advantages import (
    BPGOAdvantages,
    PerPromptStatTracker,
    advantage_metrics,
    bpgo_advantages,
    crt_rewards,
    grpo_advantages,
    ras_weights,
    zero_std_groups,
)


def paper(rewards, priors, *, alpha, k, lam, crt_coef, ras_clamp=None, max_exp=30.0, **kw):
    """BPGO with the paper's forms (Eq. 2 and 4) in the auxiliary mode."""
    return bpgo_advantages(
        rewards,
        priors,
        ras=functools.partial(ras_weights, alpha=alpha, k=k, clamp=ras_clamp),
        crt=functools.partial(crt_rewards, lam=lam, max_exp=max_exp),
        crt_coef=crt_coef,
        **kw,
    )


# Group 0: mean 3, deviations [-2,-1,0,3], var 14/4 = 3.5, std 1.8708287.
# Group 1: mean 2, std 2. Whole batch: mean 2.5, var 32/8 = 4, std 2.
R = np.array([[1.0, 2.0, 3.0, 6.0], [0.0, 4.0, 0.0, 4.0]], np.float32)
GROUP_ADV = np.array([[-1.069045, -0.5345225, 0.0, 1.6035675], [-1.0, 1.0, -1.0, 1.0]])
GLOBAL_ADV = np.array([[-1.0, -0.5, 0.0, 1.5], [-1.0, 1.0, -1.0, 1.0]])

# CRT with lam = 2: (2 (R - P) + 1{R > P}) e^R.
RC = np.array([[0.2, 0.8, 0.5], [1.0, 0.0, 0.25]], np.float32)
PC = np.array([0.5, 0.25], np.float32)
# -0.6 e^0.2, 1.6 e^0.8, 0 (R == P: strict >), 2.5 e, -0.5 e^0, 0
CRT = np.array([[-0.7328417, 3.5608655, 0.0], [6.7957046, -0.5, 0.0]])
# group z-scores of CRT (numpy, ddof=0)
CRT_ADV = np.array([[-0.8934376, 1.3961012, -0.5026636], [1.4115503, -0.7809034, -0.6306469]])


def test_grpo_group_std_hand_values():
    chex.assert_trees_all_close(grpo_advantages(R), GROUP_ADV, atol=1e-6)


def test_grpo_global_std_hand_values():
    chex.assert_trees_all_close(grpo_advantages(R, std="global"), GLOBAL_ADV, atol=1e-6)


def test_grpo_clip_bounds_magnitude():
    expected = np.clip(GROUP_ADV, -1.2, 1.2)  # only 1.6035675 -> 1.2 changes
    chex.assert_trees_all_close(grpo_advantages(R, clip=1.2), expected, atol=1e-6)


@pytest.mark.parametrize("std", ["group", "global"])
def test_zero_variance_group_is_exactly_zero(std):
    # fp32 mean of twelve 0.1s is not exactly 0.1, so a naive z-score is noise.
    r = np.stack([np.full(12, 0.1, np.float32), np.linspace(0, 1, 12, dtype=np.float32)])
    adv = np.asarray(grpo_advantages(r, std=std))
    assert np.all(adv[0] == 0.0)
    assert np.all(np.isfinite(adv))
    assert np.abs(adv[1]).max() > 0.1
    np.testing.assert_array_equal(np.asarray(zero_std_groups(r)), [True, False])


def test_global_std_zero_batch_gives_zeros():
    adv = np.asarray(grpo_advantages(np.full((3, 4), 0.7, np.float32), std="global"))
    np.testing.assert_array_equal(adv, np.zeros((3, 4)))


def test_grpo_bad_input():
    with pytest.raises(ValueError, match="std"):
        grpo_advantages(R, std="batch")
    with pytest.raises(ValueError, match="num_groups"):
        grpo_advantages(R[0])
    with pytest.raises(ValueError, match="clip"):
        grpo_advantages(R, clip=0.0)


def test_ras_hand_values_and_clamp():
    r = np.array([[0.2, 0.4], [0.9, 0.7], [0.5, 0.5]], np.float32)
    p = np.full(3, 0.5, np.float32)
    # 1 + 0.5 (2 sigmoid(2 gap) - 1) with gaps -0.2, 0.3, 0 (numpy).
    expected = np.array([0.9013123, 1.1456563, 1.0])
    chex.assert_trees_all_close(ras_weights(r, p, alpha=0.5, k=2.0), expected, atol=1e-6)
    clamped = ras_weights(r, p, alpha=0.5, k=2.0, clamp=(0.95, 1.1))
    chex.assert_trees_all_close(clamped, np.array([0.95, 1.1, 1.0]), atol=1e-7)
    with pytest.raises(ValueError, match="priors"):
        ras_weights(r, p[:2], alpha=0.5, k=2.0)
    with pytest.raises(ValueError, match="alpha"):
        ras_weights(r, p, alpha=1.5, k=2.0)


_rewards = hnp.arrays(np.float32, (3, 4), elements=st.floats(-5, 5, width=32))
_priors = hnp.arrays(np.float32, (3,), elements=st.floats(-5, 5, width=32))


@settings(max_examples=40, deadline=None)
@given(r=_rewards, p=_priors, alpha=st.floats(0.01, 0.99), k=st.floats(0.1, 2.0))
def test_ras_bounds_and_direction(r, p, alpha, k):
    w = np.asarray(ras_weights(r, p, alpha=alpha, k=k))
    gap = r.mean(1) - p
    # float32 tanh saturates, so the open bounds are only closed numerically.
    assert np.all(w >= np.float32(1 - alpha)) and np.all(w <= np.float32(1 + alpha))
    assert np.all(w[gap > 1e-3] > 1.0)
    assert np.all(w[gap < -1e-3] < 1.0)


def test_crt_hand_values():
    chex.assert_trees_all_close(crt_rewards(RC, PC, lam=2.0), CRT, rtol=1e-6, atol=1e-6)


def test_crt_not_monotone_far_below_prior():
    # R - P < -1: d/dR = lam e^R (1 + R - P) < 0, so a higher reward scores lower.
    out = np.asarray(crt_rewards(np.array([[0.0, 1.0]]), np.array([3.0]), lam=1.0))
    chex.assert_trees_all_close(out, np.array([[-3.0, -5.4365637]]), rtol=1e-6)


def test_crt_exp_guard_keeps_huge_rewards_finite():
    out = np.asarray(crt_rewards(np.array([[50.0, 0.0]]), np.array([0.0]), lam=1.0))
    chex.assert_trees_all_close(out, np.array([[5.4501020e14, 0.0]]), rtol=1e-5)  # 51 e^30
    r = np.array([[1e4, 0.0, 5.0, -1e4]], np.float32)
    b = paper(r, np.zeros(1), alpha=0.5, k=1.0, lam=1.0, crt_coef=1.0)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(b))


@settings(max_examples=40, deadline=None)
@given(
    r=hnp.arrays(np.float32, (2, 6), elements=st.floats(0, 1, width=32)),
    p=hnp.arrays(np.float32, (2,), elements=st.floats(0, 1, width=32)),
    lam=st.floats(0.1, 5.0),
)
def test_crt_preserves_order_on_unit_interval(r, p, lam):
    t = np.asarray(crt_rewards(r, p, lam=lam), np.float64)
    tol = 1e-6 * (1.0 + np.abs(t).max())
    for i in range(2):
        order = np.argsort(r[i], kind="stable")
        assert np.all(np.diff(t[i][order]) >= -tol)


def test_bpgo_hand_values():
    b = paper(RC, PC, alpha=0.5, k=2.0, lam=2.0, crt_coef=0.3)
    assert isinstance(b, BPGOAdvantages)
    # raw group means 0.5, 0.41667 vs priors 0.5, 0.25 -> w = 1, 1 + 0.5 tanh(1/6)
    chex.assert_trees_all_close(b.ras_weights, np.array([1.0, 1.0825702]), atol=1e-6)
    chex.assert_trees_all_close(b.crt_advantages, CRT_ADV, atol=1e-5)
    # group z-scores of the raw rewards (numpy, ddof=0)
    z = (RC - RC.mean(1, keepdims=True)) / RC.std(1, keepdims=True)
    chex.assert_trees_all_close(b.advantages, z, atol=1e-5)
    assert float(b.crt_coef) == pytest.approx(0.3)


@pytest.mark.parametrize("std", ["group", "global"])
def test_alpha0_s0_is_grpo_bit_for_bit(std):
    r = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    r[2] = 0.1
    b = paper(r, r.mean(1) + 0.3, alpha=0.0, k=1.0, lam=1.0, crt_coef=0.0, std=std)
    # RAS weights exactly 1 and CRT terms exactly 0: the loss is GRPO's to the bit.
    np.testing.assert_array_equal(np.asarray(b.ras_weights), np.ones(4, np.float32))
    np.testing.assert_array_equal(np.asarray(b.crt_advantages), np.zeros((4, 6)))
    assert np.all(np.asarray(b.advantages)[2] == 0.0) and np.abs(b.advantages).max() > 0.1


def test_ras_uses_raw_rewards_not_crt():
    # Raw mean 0.45 is below the prior 0.5 (w < 1); the CRT rewards [-1, 1.8 e^0.9]
    # average 1.71, above it. The public implementation's bug would give w > 1.
    r = np.array([[0.0, 0.9]], np.float32)
    p = np.array([0.5], np.float32)
    r_before = r.copy()
    b = paper(r, p, alpha=0.5, k=1.0, lam=2.0, crt_coef=1.0)
    buggy = ras_weights(crt_rewards(r, p, lam=2.0), p, alpha=0.5, k=1.0)
    assert float(buggy[0]) > 1.0
    # 1 + 0.5 tanh((0.45 - 0.5) / 2) from the raw mean; z-scores of [0, 0.9] are -+1.
    assert float(b.ras_weights[0]) == pytest.approx(0.98750260, abs=1e-6)
    chex.assert_trees_all_close(b.advantages, np.array([[-1.0, 1.0]]), atol=1e-6)
    np.testing.assert_array_equal(r, r_before)


def test_bpgo_under_jit_matches_eager():
    r = np.random.default_rng(1).uniform(size=(3, 5)).astype(np.float32)
    p = np.array([0.2, 0.5, 0.8], np.float32)
    kw = dict(alpha=0.5, k=3.0, lam=1.0, crt_coef=0.5, clip=5.0, ras_clamp=(0.01, 10.0))
    eager = paper(r, p, **kw)
    jitted = jax.jit(functools.partial(paper, **kw))(r, p)
    chex.assert_trees_all_close(jitted, eager, rtol=1e-6, atol=1e-6)
    # Traced crt_coef: the computation cannot be skipped but 0 still means zeros.
    f = jax.jit(lambda s: paper(r, p, alpha=0.5, k=3.0, lam=1.0, crt_coef=s))
    np.testing.assert_array_equal(np.asarray(f(0.0).crt_advantages), np.zeros((3, 5)))
    assert np.abs(np.asarray(f(0.5).crt_advantages)).max() > 0.1


def test_advantage_metrics():
    r = np.array([[0.1] * 4, [0.0, 1.0, 0.0, 1.0]], np.float32)
    b = paper(r, np.array([0.5, 0.0]), alpha=0.5, k=2.0, lam=1.0, crt_coef=0.0)
    m = {k: float(v) for k, v in advantage_metrics(r, b).items()}
    assert m["zero_std_group_fraction"] == 0.5
    assert m["advantage_abs_mean"] == pytest.approx(0.5, abs=1e-6)  # 0s and +-1s
    assert m["crt_advantage_abs_mean"] == 0.0
    # gaps -0.4, +0.5: 1 + 0.5 tanh(-0.4), 1 + 0.5 tanh(0.5)
    assert m["ras_weight_min"] == pytest.approx(0.8100255, abs=1e-6)
    assert m["ras_weight_max"] == pytest.approx(1.2310586, abs=1e-6)
    assert m["ras_weight_mean"] == pytest.approx(1.0205420, abs=1e-6)


def test_tracker_hand_values_eviction_and_fallback():
    t = PerPromptStatTracker(buffer_size=3, min_count=2)
    # "a" buffer [1, 3]: mean 2, std 1. "b" has one value -> batch mean 3, std 1.6329932.
    a1 = t.update(["a", "a", "b"], np.array([1.0, 3.0, 5.0]))
    np.testing.assert_allclose(a1, [-1.0, 1.0, 1.2247449], rtol=1e-5)
    # "a" [1, 3, 5]: (5 - 3) / 1.6329932; "b" [5, 7]: (7 - 6) / 1.
    a2 = t.update(["a", "b"], np.array([5.0, 7.0]))
    np.testing.assert_allclose(a2, [1.2247449, 1.0], rtol=1e-5)
    # "1" is evicted: [3, 5, 9], mean 17/3, std 2.4944383 (with it: mean 4.5).
    a3 = t.update(["a"], np.array([9.0]))
    np.testing.assert_allclose(a3, [1.3363062], rtol=1e-5)
    assert a3.dtype == np.float32
    assert t.stats() == {"num_prompts": 2.0, "mean_buffer_length": 2.5}


def test_tracker_state_dict_round_trip():
    t = PerPromptStatTracker(buffer_size=4, min_count=2)
    t.update(["x", "y", "x"], np.array([0.5, 0.2, 0.9]))
    t2 = PerPromptStatTracker(buffer_size=4, min_count=2)
    t2.load_state_dict(json.loads(json.dumps(t.state_dict())))
    assert t2.state_dict() == t.state_dict()
    batch = (["x", "y", "z"], np.array([0.1, 0.4, 0.7]))
    np.testing.assert_array_equal(t2.update(*batch), t.update(*batch))


def test_tracker_bad_input():
    with pytest.raises(ValueError, match="min_count"):
        PerPromptStatTracker(buffer_size=2, min_count=3)
    t = PerPromptStatTracker(buffer_size=2, min_count=1)
    with pytest.raises(ValueError, match="rewards"):
        t.update(["a", "b"], np.array([1.0]))
    with pytest.raises(ValueError, match="buffers"):
        t.load_state_dict({})


def test_inputs_are_jnp_friendly():
    # Works on jax arrays directly, returns float32.
    out = grpo_advantages(jnp.asarray(R, jnp.bfloat16))
    assert out.dtype == jnp.float32
