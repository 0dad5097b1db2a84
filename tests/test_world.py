"""The built-in world: rendering, many-to-many captions, ground truth and the oracle."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import numpy as np
import pytest

from bpgo_jax.world import constraints as C
from bpgo_jax.world import grammar, oracle
from bpgo_jax.world.data import Degradation, degrade, perturb_scene, sample_pairs
from bpgo_jax.world.evaluate import oracle_attribute_accuracy, roc_auc
from bpgo_jax.world.render import render
from bpgo_jax.world.scenes import (
    ANCHORS,
    BACKGROUND,
    HELDOUT_PAIRS,
    PALETTE,
    Scene,
    WorldObject,
    relations_between,
    sample_scene,
    sample_scenes,
)

ROOT = Path(__file__).resolve().parents[1]
HELDOUT_OPENINGS = tuple(
    t.split("{")[0] for group in grammar.TEMPLATES["heldout"].values() for t, _ in group
)


def _train_samples(n=1500, seed=0):
    rng = np.random.default_rng(seed)
    return [grammar.sample_captioned_scene(rng, "train") for _ in range(n)]


# --- scenes and rendering -------------------------------------------------------


def test_render_is_deterministic_given_seed():
    a = render(sample_scenes(np.random.default_rng(7), 64))
    b = render(sample_scenes(np.random.default_rng(7), 64))
    c = render(sample_scenes(np.random.default_rng(8), 64))
    assert a.shape == (64, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_render_pixels_hand_checked():
    scene = Scene((WorldObject("blue", "square", "large", "left"),))
    img = render([scene])[0].astype(np.float32) / 255.0
    x, y = (int(v) for v in ANCHORS["left"])
    np.testing.assert_allclose(img[y, x], PALETTE[2], atol=1 / 255)  # inside: blue
    np.testing.assert_allclose(img[2, 30], BACKGROUND, atol=1 / 255)  # far corner: background
    # Square half-side 0.9 * 5.75 = 5.175: the pixel 5 to the right is covered
    # 0.5 - (5 - 5.175) = 0.675 (anti-aliased edge), the one 6 to the right not at all.
    edge = BACKGROUND + 0.675 * (PALETTE[2] - BACKGROUND)
    np.testing.assert_allclose(img[y, x + 5], edge, atol=1 / 255)
    np.testing.assert_allclose(img[y, x + 6], BACKGROUND, atol=1 / 255)


def test_scene_validation_rejects_overlaps_and_bad_names():
    with pytest.raises(ValueError, match="color"):
        WorldObject("pink", "circle", "small", "left")
    big_left = WorldObject("red", "circle", "large", "left")
    with pytest.raises(ValueError, match="overlap"):
        Scene((big_left, WorldObject("blue", "circle", "small", "center")))
    with pytest.raises(ValueError, match="overlap"):
        Scene((big_left, WorldObject("blue", "circle", "large", "left")))
    Scene((big_left, WorldObject("blue", "circle", "large", "right")))  # opposite: fine


def test_two_object_scenes_never_overlap_in_pixels():
    scenes = [s for s in sample_scenes(np.random.default_rng(3), 400) if len(s.objects) == 2]
    for scene in scenes[:100]:
        masks = [render([Scene((o,))])[0] != render([Scene((o,))])[0][0, 0] for o in scene.objects]
        a, b = (m.any(-1) for m in masks)
        assert not (a & b).any(), scene


def test_relations_hand_computed():
    assert relations_between((7, 16), (25, 16)) == ("left of",)
    assert relations_between((16, 25), (16, 7)) == ("below",)
    assert set(relations_between((7, 16), (16, 7))) == {"left of", "below"}
    assert relations_between((16, 16), (18, 17)) == ()


# --- captions -------------------------------------------------------------------


def test_one_scene_has_many_true_captions():
    scene = Scene(
        (
            WorldObject("red", "square", "large", "left"),
            WorldObject("cyan", "circle", "small", "right"),
        )
    )
    rng = np.random.default_rng(0)
    captions = set()
    for _ in range(200):
        caption, cons = grammar.caption_scene(scene, rng)
        assert grammar.satisfies(scene, cons), caption
        captions.add(caption)
    assert len(captions) >= 50


def test_one_caption_has_many_true_scenes():
    scenes = set(sample_scenes(np.random.default_rng(1), 400))
    vague = {"objects": [{"shape": "circle"}], "relation": None, "count": None}
    assert sum(grammar.satisfies(s, vague) for s in scenes) >= 50
    rng = np.random.default_rng(2)
    hits = []
    for _ in range(40):  # typical sampled captions: many scenes fit, rarely all
        _, cons = grammar.sample_prompt(rng)
        hits.append(sum(grammar.satisfies(s, cons) for s in scenes))
    assert np.median(hits) >= 5 and np.mean(np.array(hits) < len(scenes)) > 0.8, hits


def test_every_synonym_and_caption_kind_occurs_in_train():
    samples = _train_samples()
    text = " | ".join(f" {c} " for _, c, _ in samples)
    words = [
        w
        for table in (grammar.COLOR_WORDS, grammar.SHAPE_WORDS, grammar.SIZE_WORDS)
        for syns in table.values()
        for w in syns
    ]
    missing = [w for w in words if f" {w} " not in text]
    assert not missing
    kinds = collections.Counter(C.kind(c) for _, _, c in samples)
    assert min(kinds[k] for k in C.KINDS) > 150, kinds
    assert any(c["count"] is not None for _, _, c in samples)
    assert any("something" in cap for _, cap, _ in samples)


def test_captions_are_true_short_and_use_a_small_vocabulary():
    for split in ("train", "heldout"):
        rng = np.random.default_rng(5)
        for _ in range(500):
            scene, caption, cons = grammar.sample_captioned_scene(rng, split)
            assert grammar.satisfies(scene, cons), caption
            assert len(caption.split()) <= grammar.MAX_WORDS
            json.dumps(cons)  # JSON-able
    assert len(grammar.vocabulary()) < 200


def test_heldout_pairs_and_templates_never_appear_in_train():
    for scene, caption, cons in _train_samples():
        assert not scene.has_heldout_pair
        assert not caption.startswith(HELDOUT_OPENINGS), caption
        for spec in cons["objects"]:
            assert (spec.get("color"), spec.get("shape")) not in HELDOUT_PAIRS
    rng = np.random.default_rng(1)
    for _ in range(300):  # every held-out prompt is new in one of the two ways
        _, caption, cons = grammar.sample_captioned_scene(rng, "heldout")
        pairs = {(s.get("color"), s.get("shape")) for s in cons["objects"]}
        assert pairs & HELDOUT_PAIRS or caption.startswith(HELDOUT_OPENINGS), caption
    with pytest.raises(ValueError, match="held-out"):
        grammar.caption_scene(Scene((WorldObject("red", "cross", "small", "top"),)), rng)


def test_satisfies_hand_checked():
    scene = Scene(
        (
            WorldObject("red", "square", "large", "top"),
            WorldObject("blue", "circle", "small", "bottom"),
        )
    )

    def sat(objects, relation=None, count=None):
        return grammar.satisfies(scene, {"objects": objects, "relation": relation, "count": count})

    assert sat([{"color": "blue"}])
    assert sat([{"shape": "circle"}, {"color": "red"}], "below")
    assert not sat([{"shape": "circle"}, {"color": "red"}], "above")
    assert not sat([{"color": "red", "shape": "circle"}])  # attributes bind to one object
    assert not sat([{"color": "red"}], count=1)
    assert sat([{}, {}], count=2)
    assert not sat([{"color": "red"}, {"color": "red"}])  # two distinct red objects needed
    with pytest.raises(ValueError, match="colour|color"):
        sat([{"color": "pink"}])
    with pytest.raises(ValueError, match="relation"):
        sat([{"color": "red"}], "above")


# --- oracle ---------------------------------------------------------------------


def test_oracle_parses_a_render_exactly():
    scene = Scene(
        (
            WorldObject("orange", "triangle", "large", "right", (1, -1)),
            WorldObject("white", "cross", "small", "left"),
        )
    )
    found = sorted(oracle.parse(render([scene])[0]), key=lambda o: o["center"][0])
    assert [(o["color"], o["shape"], o["size"], o["position"]) for o in found] == [
        ("white", "cross", "small", "left"),
        ("orange", "triangle", "large", "right"),
    ]
    assert found[0]["center"] == (7.0, 16.0) and found[1]["center"] == (26.0, 15.0)


def test_oracle_per_attribute_accuracy_on_clean_and_degraded_renders():
    clean = oracle_attribute_accuracy(np.random.default_rng(0), 300)
    assert min(clean.values()) >= 0.99, clean
    noisy = oracle_attribute_accuracy(
        np.random.default_rng(1), 200, Degradation(noise=0.03, blur=0.6)
    )
    assert min(noisy.values()) >= 0.98, noisy


def test_oracle_agrees_with_ground_truth_on_true_and_near_miss_captions():
    rng = np.random.default_rng(4)
    scenes, cons, truth = [], [], []
    for _ in range(150):
        scene, _, c = grammar.sample_captioned_scene(rng, "heldout")
        _, near = grammar.caption_scene(perturb_scene(scene, rng), rng, "heldout")
        for x in (c, near):
            scenes.append(scene)
            cons.append(x)
            truth.append(grammar.satisfies(scene, x))
    images = render(scenes)
    mean, ok = oracle.accuracy(images, cons)
    assert (ok == np.array(truth)).mean() >= 0.99
    assert 0.3 < mean < 0.8  # near misses are mostly false


def test_oracle_rejects_wrong_captions():
    scene = Scene(
        (
            WorldObject("green", "circle", "large", "left"),
            WorldObject("purple", "square", "large", "right"),
        )
    )
    img = render([scene])[0]
    good = {"objects": [{"color": "green", "shape": "circle"}], "relation": None, "count": None}
    assert oracle.check(img, good)
    for wrong in (
        {"color": "blue", "shape": "circle"},
        {"color": "green", "shape": "triangle"},
        {"color": "green", "size": "small"},
        {"color": "green", "position": "right"},
    ):
        assert not oracle.check(img, {"objects": [wrong], "relation": None, "count": None})
    assert not oracle.check(img, {**good, "count": 1})
    rel = {"objects": [{"color": "purple"}, {"color": "green"}], "count": None}
    assert oracle.check(img, {**rel, "relation": "right of"})
    assert not oracle.check(img, {**rel, "relation": "left of"})
    blank = np.broadcast_to(np.round(BACKGROUND * 255).astype(np.uint8), (32, 32, 3))
    assert oracle.parse(blank) == [] and not oracle.check(blank, good)
    with pytest.raises(ValueError, match="shape"):
        oracle.parse(np.zeros((32, 32)))


# --- data -----------------------------------------------------------------------


def test_sample_pairs_are_true_pairs():
    images, captions, cons = sample_pairs(np.random.default_rng(9), 64, "heldout")
    assert images.shape == (64, 32, 32, 3) and images.dtype == np.uint8
    assert len(captions) == len(cons) == 64
    assert oracle.accuracy(images, cons)[0] >= 0.98
    with pytest.raises(ValueError, match="split"):
        sample_pairs(np.random.default_rng(0), 2, "test")


def test_degrade_is_seeded_and_bounded():
    images = render(sample_scenes(np.random.default_rng(0), 4))
    d = Degradation(noise=0.05, blur=0.7, color_jitter=0.03)
    a = degrade(images, np.random.default_rng(1), d)
    b = degrade(images, np.random.default_rng(1), d)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and a.min() >= 0.0 and a.max() <= 1.0
    np.testing.assert_allclose(
        degrade(images, np.random.default_rng(1), Degradation()), images / 255
    )


def test_roc_auc_hand_computed():
    assert roc_auc(np.array([0.9, 0.8, 0.1]), np.array([1, 0, 0])) == 1.0
    assert roc_auc(np.array([0.2, 0.8, 0.5]), np.array([1, 1, 0])) == 0.5
    assert roc_auc(np.array([0.5, 0.5]), np.array([1, 0])) == 0.5


def test_prompt_files_are_shipped_and_reproducible():
    from bpgo_jax.cli import make_world_prompts as mwp

    for split, n in (("train", 2000), ("heldout", 256)):
        lines = (ROOT / "bpgo_jax/world/assets" / f"prompts_{split}.jsonl").read_text().splitlines()
        assert len(lines) == n
        entries = [json.loads(line) for line in lines]
        assert len({e["prompt"] for e in entries}) == n
        assert all(e["metadata"]["split"] == split for e in entries)
        regenerated = mwp.make_prompts(split, 30, seed=0)
        assert [json.dumps(e, sort_keys=True) for e in regenerated] == lines[:30]
        for e in entries[:100]:
            C.validate(e["metadata"]["constraints"])
            assert re.fullmatch(r"[a-z :]+", e["prompt"])
    # val: the train grammar's next 256 distinct prompts, none of them in the train file.
    assets = ROOT / "bpgo_jax/world/assets"
    val = [json.loads(x) for x in (assets / "prompts_val.jsonl").read_text().splitlines()]
    train = (assets / "prompts_train.jsonl").read_text().splitlines()
    train = {json.loads(x)["prompt"] for x in train}
    assert len(val) == 256 and all(e["metadata"]["split"] == "val" for e in val)
    assert not {e["prompt"] for e in val} & train
    regenerated = mwp.make_prompts("train", 2010, seed=0)[2000:]
    assert [e["prompt"] for e in regenerated] == [e["prompt"] for e in val[:10]]


def test_sample_scene_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        sample_scene(np.random.default_rng(0), "validation")
