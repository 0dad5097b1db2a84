"""Prior state: hand-computed EMA / running means, fallbacks, duplicates, jit, checkpoints."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bpgo_jax.priors import PriorState, init_prior_state, lookup, needs_reference, update

MA = dict(kind="moving_average")


def test_ema_sequence_and_lookup_before_update():
    state = init_prior_state(3, init_value=0.3, **MA)
    batches = [([0, 1], [1.0, 0.5]), ([0, 2], [0.0, 0.2]), ([0, 1], [0.5, 0.7])]
    priors = []
    for ids, means in batches:
        ids = np.array(ids, np.int32)
        priors.append(np.asarray(lookup(state, ids, **MA)))  # before update: past epochs only
        state = update(state, ids, np.array(means, np.float32), decay=0.9, **MA)
    # Epoch 1: nothing seen -> the initial value.
    np.testing.assert_allclose(priors[0], [0.3, 0.3])
    # Epoch 2: prompt 0 saw 1.0; prompt 2 unseen -> global = mean(1.0, 0.5) = 0.75.
    np.testing.assert_allclose(priors[1], [1.0, 0.75])
    # Epoch 3: prompt 0 = 0.9 * 1.0 + 0.1 * 0.0 = 0.9; prompt 1 still 0.5.
    np.testing.assert_allclose(priors[2], [0.9, 0.5], rtol=1e-6)
    # After epoch 3: 0.9*0.9 + 0.1*0.5 = 0.86; 0.9*0.5 + 0.1*0.7 = 0.52; 0.2 (first visit).
    np.testing.assert_allclose(state.values, [0.86, 0.52, 0.2], rtol=1e-6)
    np.testing.assert_array_equal(state.counts, [3, 2, 1])
    # Global EMA of batch means 0.75, 0.1, 0.6: 0.75 -> 0.685 -> 0.6765.
    np.testing.assert_allclose(state.global_value, 0.6765, rtol=1e-6)
    assert int(state.global_count) == 6


def test_duplicate_ids_are_averaged_then_updated_once():
    state = init_prior_state(2, **MA)
    state = update(state, np.array([0, 0, 1]), np.array([1.0, 0.0, 0.4]), decay=0.5, **MA)
    np.testing.assert_allclose(state.values, [0.5, 0.4], rtol=1e-6)
    np.testing.assert_array_equal(state.counts, [2, 1])
    np.testing.assert_allclose(state.global_value, 1.4 / 3, rtol=1e-6)
    # One EMA step 0.5 * 0.5 + 0.5 * 1.0, not two (which would give 0.875).
    state = update(state, np.array([0, 0]), np.array([1.0, 1.0]), decay=0.5, **MA)
    np.testing.assert_allclose(state.values[0], 0.75, rtol=1e-6)


def test_reference_running_mean_and_needs_reference():
    kw = dict(kind="reference")
    state = init_prior_state(3, **kw)
    np.testing.assert_array_equal(needs_reference(state, np.array([0, 1, 2])), [True] * 3)
    state = update(state, np.array([0, 1, 0]), np.array([0.2, 0.6, 0.4]), **kw)
    np.testing.assert_allclose(state.values[:2], [0.3, 0.6], rtol=1e-6)
    np.testing.assert_allclose(state.global_value, 0.4, rtol=1e-6)
    state = update(state, np.array([0]), np.array([0.9]), **kw)
    np.testing.assert_allclose(state.values[0], (0.3 * 2 + 0.9) / 3, rtol=1e-6)  # 0.5
    np.testing.assert_allclose(state.global_value, (0.4 * 3 + 0.9) / 4, rtol=1e-6)  # 0.525
    np.testing.assert_array_equal(needs_reference(state, np.array([2, 0, 1])), [True, False, False])
    np.testing.assert_allclose(lookup(state, np.array([2, 0]), **kw), [0.525, 0.5], rtol=1e-6)


def test_fixed_priors_lookup_clip_and_no_update():
    kw = dict(kind="fixed")
    state = init_prior_state(3, fixed_values=np.array([0.1, 0.2, 0.3]), **kw)
    np.testing.assert_allclose(lookup(state, np.array([2, 0]), **kw), [0.3, 0.1], rtol=1e-6)
    clipped = lookup(state, np.array([2, 0, 1]), clip=(0.15, 0.25), **kw)
    np.testing.assert_allclose(clipped, [0.25, 0.15, 0.2], rtol=1e-6)
    assert update(state, np.array([0]), np.array([5.0]), decay=0.9, **kw) is state
    assert not np.any(needs_reference(state, np.array([0, 1, 2])))


def test_fixed_validation_errors():
    with pytest.raises(ValueError, match="needs fixed_values"):
        init_prior_state(2, kind="fixed")
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        init_prior_state(2, kind="fixed", fixed_values=np.zeros(3))
    with pytest.raises(ValueError, match=r"NaN/inf priors at prompt ids \[1\]"):
        init_prior_state(2, kind="fixed", fixed_values=np.array([0.5, np.nan]))
    with pytest.raises(ValueError, match="only used with kind='fixed'"):
        init_prior_state(2, kind="reference", fixed_values=np.zeros(2))
    with pytest.raises(ValueError, match="prior kind"):
        init_prior_state(2, kind="ema")


def test_bad_ids_and_decay():
    state = init_prior_state(2, **MA)
    with pytest.raises(ValueError, match=r"out of range \[0, 2\): \[2, -1\]"):
        lookup(state, np.array([0, 2, -1]), **MA)
    with pytest.raises(ValueError, match="needs decay"):
        update(state, np.array([0]), np.array([1.0]), **MA)
    with pytest.raises(ValueError, match="decay"):
        update(state, np.array([0]), np.array([1.0]), decay=1.5, **MA)
    with pytest.raises(ValueError, match="shape"):
        update(state, np.array([0, 1]), np.array([1.0]), decay=0.5, **MA)
    # Under jit ids cannot be checked: bad ones read NaN and are dropped by update.
    jl = jax.jit(functools.partial(lookup, **MA))
    assert np.isnan(np.asarray(jl(state, jnp.array([0, 5])))[1])
    ju = jax.jit(functools.partial(update, decay=0.5, **MA))
    new = ju(state, jnp.array([1, 5, -1]), jnp.array([0.4, 9.0, 9.0]))
    np.testing.assert_allclose(new.values, [0.0, 0.4], rtol=1e-6)
    np.testing.assert_allclose(new.global_value, 0.4, rtol=1e-6)
    assert int(new.global_count) == 1


@pytest.mark.parametrize("kind", ["moving_average", "reference"])
def test_jit_matches_eager(kind):
    state = init_prior_state(4, kind=kind, init_value=0.1)
    ids = np.array([3, 1, 3, 0], np.int32)
    means = np.array([0.2, 0.9, 0.6, 0.4], np.float32)
    ju = jax.jit(functools.partial(update, kind=kind, decay=0.8))
    jl = jax.jit(functools.partial(lookup, kind=kind))
    for _ in range(3):
        eager = update(state, ids, means, kind=kind, decay=0.8)
        jitted = ju(state, ids, means)
        chex.assert_trees_all_close(jitted, eager, rtol=1e-6)
        chex.assert_trees_all_close(jl(jitted, ids[:3]), lookup(eager, ids[:3], kind=kind))
        state = jitted
        means = means[::-1].copy()
    assert jitted.values.dtype == jnp.float32 and jitted.counts.dtype == jnp.int32


def test_state_is_a_checkpointable_pytree(tmp_path):
    state = init_prior_state(3, **MA)
    state = update(state, np.array([0, 2]), np.array([0.25, 0.75]), decay=0.9, **MA)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    assert len(leaves) == 4
    chex.assert_trees_all_equal(jax.tree_util.tree_unflatten(treedef, leaves), state)

    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "prior", state)
    ckptr.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = ckptr.restore(tmp_path / "prior", abstract)
    assert isinstance(restored, PriorState)
    chex.assert_trees_all_equal(restored, state)
    chex.assert_trees_all_equal_dtypes(restored, state)
