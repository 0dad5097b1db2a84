"""Measurements behind docs/world.md: oracle accuracy per attribute, and how
well a reward model's scores agree with ground truth (ROC-AUC per caption kind).

    python -m bpgo_jax.world.evaluate --n=3000
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import flags

from bpgo_jax import runtime
from bpgo_jax.world import constraints as C
from bpgo_jax.world.data import Degradation, degrade, perturb_scene
from bpgo_jax.world.grammar import caption_scene, sample_captioned_scene, satisfies
from bpgo_jax.world.oracle import OracleConfig, parse
from bpgo_jax.world.render import render
from bpgo_jax.world.scenes import relations_between, sample_scenes

ORACLE_ATTRIBUTES = ("count", "color", "shape", "size", "position", "relation")


def oracle_attribute_accuracy(
    rng: np.random.Generator,
    n: int,
    d: Degradation | None = None,
    cfg: OracleConfig | None = None,
) -> dict[str, float]:
    """Fraction of objects (relations: object pairs) the oracle reads correctly.

    Detected objects are matched to true ones by nearest centre; a scene whose
    object count is wrong counts as wrong for every attribute of its objects.
    """
    d, cfg = d or Degradation(), cfg or OracleConfig()
    scenes = sample_scenes(rng, n // 2, "train") + sample_scenes(rng, n - n // 2, "heldout")
    images = degrade(render(scenes), rng, d)
    hits, total = collections.Counter(), collections.Counter()
    for scene, image in zip(scenes, images, strict=True):
        found = parse(image, cfg)
        ok_count = len(found) == len(scene.objects)
        hits["count"] += ok_count
        total["count"] += 1
        matched = []
        for obj in scene.objects:
            near = min(found, key=lambda f: _dist2(f["center"], obj.center)) if found else None
            matched.append(near)
            for attr in ("color", "shape", "size", "position"):
                total[attr] += 1
                hits[attr] += bool(ok_count and near and near[attr] == getattr(obj, attr))
        if len(scene.objects) == 2:
            a, b = scene.objects
            truth = relations_between(a.center, b.center)
            seen = (
                relations_between(matched[0]["center"], matched[1]["center"]) if ok_count else None
            )
            total["relation"] += 1
            hits["relation"] += seen == truth
    return {k: hits[k] / total[k] for k in ORACLE_ATTRIBUTES}


def _dist2(a: Sequence[float], b: Sequence[float]) -> float:
    return (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count 1/2)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def group_agreement(scores: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    """How well reward scores rank a generator's own samples, the way GRPO reads them.

    scores, correct: [P, G] (G samples per prompt; correct = the oracle's
    verdict). Only groups with both verdicts carry a learning signal, so the
    within-group ROC-AUC is averaged over those; `advantage_gap` is the mean
    group z-scored reward of correct minus incorrect samples.
    """
    scores, correct = np.asarray(scores, np.float64), np.asarray(correct, bool)
    if scores.shape != correct.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and correct {correct.shape} must both be [P, G]")
    mixed = correct.any(axis=1) & ~correct.all(axis=1)
    within = [roc_auc(s, c) for s, c in zip(scores[mixed], correct[mixed], strict=True)]
    z = (scores - scores.mean(1, keepdims=True)) / (scores.std(1, keepdims=True) + 1e-8)
    return {
        "auc": roc_auc(scores.ravel(), correct.ravel()),
        "within_group_auc": float(np.mean(within)) if within else float("nan"),
        "mixed_group_fraction": float(mixed.mean()),
        "advantage_gap": float(z[mixed][correct[mixed]].mean() - z[mixed][~correct[mixed]].mean())
        if mixed.any()
        else float("nan"),
    }


def group_coverage(correct: np.ndarray) -> dict[str, float]:
    """Shares of prompts by how many of their G samples are right; correct: [P, G] bools.

    GRPO learns only from mixed groups: a prompt never right carries no
    signal however good the reward, so `never_right` bounds what RL can reach.
    """
    correct = np.asarray(correct, bool)
    if correct.ndim != 2 or correct.shape[1] < 2:
        raise ValueError(f"correct {correct.shape} must be [P, G] with G >= 2")
    k = correct.sum(axis=1)
    return {
        "never_right": float((k == 0).mean()),
        "at_most_one_right": float((k <= 1).mean()),
        "always_right": float((k == correct.shape[1]).mean()),
        "mixed": float(((k > 0) & (k < correct.shape[1])).mean()),
    }


def failure_cause(objects: Sequence[dict[str, Any]], constraints: dict[str, Any]) -> str | None:
    """Why a sample's caption fails: the one constraint whose removal makes it hold.

    None when the caption holds; the names of every such constraint joined by
    "+" when several would each suffice; "several" when no single one does
    (e.g. an object missing altogether). Constraint names: an object attribute
    (color, shape, size, position), "relation" or "count".
    """
    if C.holds(objects, constraints):
        return None
    causes = []
    for attr in C.ATTRIBUTES:
        relaxed = [{k: v for k, v in s.items() if k != attr} for s in constraints["objects"]]
        if relaxed != list(constraints["objects"]) and C.holds(
            objects, {**constraints, "objects": relaxed}
        ):
            causes.append(attr)
    for key in ("relation", "count"):
        if constraints.get(key) is not None and C.holds(objects, {**constraints, key: None}):
            causes.append(key)
    return "+".join(causes) or "several"


def failure_causes(
    images: np.ndarray, constraints_list: Sequence[dict[str, Any]], cfg: OracleConfig | None = None
) -> dict[str, float]:
    """Shares of all samples failing for each `failure_cause`, largest first."""
    counts = collections.Counter(
        failure_cause(parse(image, cfg or OracleConfig()), c)
        for image, c in zip(images, constraints_list, strict=True)
    )
    counts.pop(None, None)
    n = max(len(constraints_list), 1)
    return {cause: k / n for cause, k in counts.most_common()}


def reward_eval_set(rng: np.random.Generator, n: int, split: str = "heldout") -> dict[str, Any]:
    """Renders of n scenes, each with 3 captions and ground-truth labels.

    Per scene: its own caption (true), a near miss (caption of the scene with
    one attribute changed) and a caption of another random scene; the last
    two are labelled by `satisfies`, so some are true by coincidence.
    """
    images, captions, labels, kinds, image_index = [], [], [], [], []
    for i in range(n):
        scene, caption, cons = sample_captioned_scene(rng, split)
        near_caption, near_cons = caption_scene(perturb_scene(scene, rng), rng, "heldout")
        _, other_caption, other_cons = sample_captioned_scene(rng, split)
        images.append(scene)
        for cap, c in ((caption, cons), (near_caption, near_cons), (other_caption, other_cons)):
            captions.append(cap)
            labels.append(satisfies(scene, c))
            kinds.append(C.kind(c))
            image_index.append(i)
    return {
        "images": render(images),
        "captions": captions,
        "labels": np.array(labels),
        "kinds": np.array(kinds),
        "image_index": np.array(image_index),
    }


def reward_agreement(
    score_fn: Callable[[np.ndarray, list[str]], np.ndarray], eval_set: dict[str, Any]
) -> dict[str, dict[str, float]]:
    """ROC-AUC, mean score of true / false captions and score spread, per caption kind.

    score_fn(float images [N, 32, 32, 3] in [0, 1], captions) -> scores [N].
    """
    images = eval_set["images"][eval_set["image_index"]].astype(np.float32) / 255.0
    scores = np.asarray(score_fn(images, eval_set["captions"]), np.float64)
    labels, kinds = eval_set["labels"], eval_set["kinds"]
    out = {}
    for kind in ("all", *C.KINDS):
        sel = np.ones_like(labels) if kind == "all" else kinds == kind
        s, y = scores[sel], labels[sel]
        out[kind] = {
            "auc": roc_auc(s, y),
            "mean_true": float(s[y].mean()),
            "mean_false": float(s[~y].mean()),
            "std": float(s.std()),
            "n": int(sel.sum()),
        }
    return out


def _define_flags() -> None:
    """The command line's flags; defined only when run as a program, since library
    users of this module (bpgo_jax.cli.evaluate_generator) have flags of these names."""
    flags.DEFINE_integer("n", 3000, "Scenes per measurement.")
    flags.DEFINE_integer("seed", 0, "Seed of scenes, degradations and captions.")
    flags.DEFINE_string("reward_model", "", "Reward model msgpack path; '' = the shipped model.")
    flags.DEFINE_bool("skip_oracle", False, "Measure only the reward model.")


def _main(argv: list[str]) -> None:
    del argv
    args = flags.FLAGS
    rng = np.random.default_rng(args.seed)
    if not args.skip_oracle:
        print("| condition | " + " | ".join(ORACLE_ATTRIBUTES) + " |")
        print("|---" * (len(ORACLE_ATTRIBUTES) + 1) + "|")
        for name, d in (
            ("clean", Degradation()),
            ("noise 0.03", Degradation(noise=0.03)),
            ("noise 0.03 + blur 0.6", Degradation(noise=0.03, blur=0.6)),
            ("noise 0.05 + blur 0.8", Degradation(noise=0.05, blur=0.8)),
        ):
            acc = oracle_attribute_accuracy(rng, args.n, d)
            print(f"| {name} | " + " | ".join(f"{acc[k]:.4f}" for k in ORACLE_ATTRIBUTES) + " |")
    from bpgo_jax.world import reward_model  # JAX is imported only when needed

    params, cfg = reward_model.load(args.reward_model or None)
    score_fn = reward_model.host_scorer(params, cfg)
    for split in ("heldout", "train"):
        result = reward_agreement(score_fn, reward_eval_set(rng, args.n, split))
        print(f"\nreward model on {split} renders")
        print("| captions | n | ROC-AUC | mean true | mean false | score std |")
        print("|---|---|---|---|---|---|")
        for kind, r in result.items():
            print(
                f"| {kind} | {r['n']} | {r['auc']:.3f} | {r['mean_true']:.3f} "
                f"| {r['mean_false']:.3f} | {r['std']:.3f} |"
            )


if __name__ == "__main__":
    _define_flags()
    runtime.run(_main, __doc__)
