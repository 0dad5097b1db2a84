"""The shipped world reward model and the world rewards in the registry."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import bpgo_jax.world  # noqa: F401  (registers world_clip and world_oracle)
from bpgo_jax.errors import WeightsError
from bpgo_jax.rewards import base
from bpgo_jax.world import reward_model as rm
from bpgo_jax.world.data import sample_pairs
from bpgo_jax.world.evaluate import (
    failure_cause,
    failure_causes,
    group_agreement,
    group_coverage,
    reward_agreement,
    reward_eval_set,
)
from bpgo_jax.world.grammar import caption_scene
from bpgo_jax.world.render import render_float
from bpgo_jax.world.scenes import Scene, WorldObject

TINY = rm.RewardModelConfig(
    vocab_size=64, max_length=8, image_widths=(4, 4, 4), image_hidden=8, text_width=8,
    text_heads=2, embed_dim=8,
)  # fmt: skip

# Its module-scoped fixtures build once: keep the file on one xdist worker.
pytestmark = pytest.mark.xdist_group("test_world_reward")


@pytest.fixture(scope="module")
def shipped():
    return rm.load()


@pytest.fixture(scope="module")
def tiny_params():
    return rm.init_params(TINY, jax.random.key(1))


def test_shipped_model_is_small_and_loads(shipped):
    params, cfg = shipped
    assert rm.DEFAULT_PATH.stat().st_size < 5 * 2**20
    assert cfg.vocab_size == 4096 and cfg.max_length == 24
    fresh = jax.eval_shape(functools.partial(rm.init_params, cfg), jax.random.key(0))
    assert jax.tree.structure(fresh) == jax.tree.structure(params)
    shapes = jax.tree.map(lambda a, b: a.shape == b.shape, fresh, params)
    assert all(jax.tree.leaves(shapes))


def test_shipped_score_is_in_unit_interval_and_prefers_true_captions(shipped):
    params, cfg = shipped
    ev = reward_eval_set(np.random.default_rng(123), 200, "heldout")
    result = reward_agreement(rm.host_scorer(params, cfg), ev)
    assert result["all"]["mean_true"] > result["all"]["mean_false"] + 0.1, result
    assert result["all"]["auc"] > 0.7, result
    images, captions, _ = sample_pairs(np.random.default_rng(0), 16, "heldout")
    scores = jax.jit(rm.score, static_argnums=1)(
        params, cfg, images.astype(np.float32) / 255, rm.tokenizer(cfg)(captions)
    )
    assert scores.shape == (16,) and scores.dtype == jnp.float32
    assert bool(jnp.all((scores >= 0) & (scores <= 1)))


def test_score_is_the_diagonal_of_pair_logits(tiny_params):
    params = tiny_params
    images, captions, _ = sample_pairs(np.random.default_rng(1), 5)
    x, t = images.astype(np.float32) / 255, rm.tokenizer(TINY)(captions)
    logits = jax.jit(rm.pair_logits, static_argnums=1)(params, TINY, x, t)
    scores = jax.jit(rm.score, static_argnums=1)(params, TINY, x, t)
    np.testing.assert_allclose(scores, jax.nn.sigmoid(jnp.diag(logits)), rtol=1e-5, atol=1e-6)
    # SigLIP loss by hand: own caption positive, the others negative.
    lg = np.asarray(logits, np.float64)
    z = np.where(np.eye(5, dtype=bool), lg, -lg)
    expected = np.log1p(np.exp(-z)).sum(1).mean()
    loss = jax.jit(rm.siglip_loss, static_argnums=1)(params, TINY, x, t)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_siglip_training_reduces_the_loss(tiny_params):
    params = tiny_params
    images, captions, _ = sample_pairs(np.random.default_rng(2), 16)
    x, t = images.astype(np.float32) / 255, rm.tokenizer(TINY)(captions)
    opt = optax.adam(1e-2)
    state = opt.init(params)
    loss_fn = jax.jit(jax.value_and_grad(rm.siglip_loss), static_argnums=1)
    first = None
    for _ in range(30):
        loss, grads = loss_fn(params, TINY, x, t)
        first = first if first is not None else float(loss)
        updates, state = opt.update(grads, state)
        params = optax.apply_updates(params, updates)
    assert float(loss) < 0.5 * first


def test_save_load_round_trip_and_errors(tmp_path, tiny_params):
    params = tiny_params
    rm.save(tmp_path / "m.msgpack", params, TINY)
    loaded, cfg = rm.load(tmp_path / "m.msgpack")
    assert cfg == TINY
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="do not exist"):
        rm.load(tmp_path / "missing.msgpack")
    # Weights that do not fit the config beside them fail at load, naming the tensor.
    wider = dataclasses.replace(TINY, embed_dim=16)
    (tmp_path / "m.json").write_text(wider.to_json())
    with pytest.raises(WeightsError, match=r"m\.msgpack: tensor \['image_tower'\]\['proj'\]"):
        rm.load(tmp_path / "m.msgpack")
    (tmp_path / "m.json").write_text('{"vocab": 3}')
    with pytest.raises(WeightsError, match=r"m\.json': unknown reward model config keys"):
        rm.load(tmp_path / "m.msgpack")
    with pytest.raises(ValueError, match="divisible"):
        rm.RewardModelConfig(text_width=10, text_heads=4)


def test_world_clip_reward_builds_and_matches_the_model(shipped):
    reward = base.build("world_clip", ml_collections.ConfigDict())
    assert reward.jittable and reward.name == "world_clip"
    scene = Scene((WorldObject("red", "square", "large", "center"),))
    prompts = ["a red square", "a big crimson box in the middle", "a cyan circle"]
    aux = reward.prepare(prompts, [{}] * 3)
    assert aux["tokens"].dtype == np.int32 and aux["tokens"].shape == (3, 24)
    images = jnp.asarray(render_float([scene] * 3))
    out = jax.jit(reward.fn)(reward.params, images, aux)
    assert out.shape == (3,) and out.dtype == jnp.float32
    params, cfg = shipped
    direct = jax.jit(rm.score, static_argnums=1)(params, cfg, images, aux["tokens"])
    np.testing.assert_allclose(out, direct, atol=1e-6)
    assert float(out[:2].min()) > float(out[2])  # true captions beat a false one
    big = jax.image.resize(images, (3, 64, 64, 3), "nearest")  # other resolutions are resized
    assert jax.jit(reward.fn)(reward.params, big, aux).shape == (3,)


def test_world_clip_reads_cfg_path(tmp_path, tiny_params):
    params = tiny_params
    rm.save(tmp_path / "tiny.msgpack", params, TINY)
    reward = base.build(
        "world_clip", ml_collections.ConfigDict({"path": str(tmp_path / "tiny.msgpack")})
    )
    assert reward.prepare(["a red circle"], [{}])["tokens"].shape == (1, 8)


def test_world_oracle_reward_scores_constraints():
    reward = base.build("world_oracle", ml_collections.ConfigDict())
    assert not reward.jittable
    rng = np.random.default_rng(5)
    scene = Scene(
        (
            WorldObject("blue", "circle", "small", "top"),
            WorldObject("white", "cross", "small", "center"),
        )
    )
    true_caption, true_cons = caption_scene(scene, rng, "train", kind="relational")
    false_cons = {"objects": [{"color": "green"}], "relation": None, "count": None}
    images = render_float([scene, scene])
    out = reward.fn(
        images,
        [true_caption, "a green shape"],
        [{"constraints": true_cons}, {"constraints": false_cons}],
    )
    np.testing.assert_array_equal(out, np.array([1.0, 0.0], np.float32))
    assert out.dtype == np.float32
    with pytest.raises(ValueError, match="constraints"):
        reward.fn(images[:1], ["x"], [{}])


def test_group_agreement_reads_rankings_within_groups_only():
    correct = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
    # Perfect ranking inside the mixed groups, but group 1 sits far below the
    # others, so the pooled AUC is imperfect while the within-group one is 1.
    scores = np.array([[5.0, 4, 3, 2], [0.2, 0.1, 0.0, -0.1], [9, 9, 9, 9], [6, 6, 6, 6]])
    got = group_agreement(scores, correct)
    assert got["within_group_auc"] == 1.0
    assert got["mixed_group_fraction"] == 0.5
    assert got["auc"] < 0.8
    assert got["advantage_gap"] > 1.0
    flipped = group_agreement(-scores, correct)
    assert flipped["within_group_auc"] == 0.0 and flipped["advantage_gap"] < -1.0
    # No mixed group: no signal, reported as NaN rather than a made-up value.
    none = group_agreement(scores[2:], correct[2:])
    assert np.isnan(none["within_group_auc"]) and np.isnan(none["advantage_gap"])
    with pytest.raises(ValueError, match="must both be"):
        group_agreement(scores.ravel(), correct.ravel())


def test_group_coverage_counts_prompts_by_right_samples():
    correct = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
    assert group_coverage(correct) == {
        "never_right": 0.25,
        "at_most_one_right": 0.5,
        "always_right": 0.25,
        "mixed": 0.5,
    }
    with pytest.raises(ValueError, match="G >= 2"):
        group_coverage(correct[:, :1])


def test_failure_cause_names_the_one_constraint_that_fails():
    red_square = {"color": "red", "shape": "square", "center": (16.0, 16.0)}
    blue_circle = {"color": "blue", "shape": "circle", "center": (26.0, 16.0)}
    both = [red_square, blue_circle]
    assert failure_cause(both, {"objects": [{"color": "red", "shape": "square"}]}) is None
    assert (
        failure_cause([red_square], {"objects": [{"color": "red", "shape": "circle"}]}) == "shape"
    )
    # Either change would do: both are named.
    assert failure_cause(both, {"objects": [{"color": "red", "shape": "circle"}]}) == "color+shape"
    assert failure_cause([red_square], {"objects": [{"color": "green", "shape": "cross"}]}) == (
        "several"
    )
    assert failure_cause(both, {"objects": [{"color": "red"}], "count": 1}) == "count"
    left_of = {
        "objects": [{"color": "red", "shape": "square"}, {"color": "blue", "shape": "circle"}],
        "relation": "left of",
    }
    assert failure_cause(both, left_of) is None
    assert failure_cause(both, {**left_of, "relation": "right of"}) == "relation"
    assert failure_cause([red_square], left_of) == "several"  # the blue object is missing


def test_failure_causes_reads_rendered_samples():
    scenes = [
        Scene((WorldObject("red", "square", "large", "center"),)),
        Scene((WorldObject("blue", "circle", "large", "left"),)),
    ]
    images = render_float(scenes)
    captions = [
        {"objects": [{"color": "red", "shape": "square"}]},  # right
        {"objects": [{"color": "blue", "shape": "triangle"}]},  # wrong shape
    ]
    assert failure_causes(images, captions) == {"shape": 0.5}
