"""Captions for world scenes that map many-to-many, with their constraints.

Every caption is built from the scene it describes (so it is true of it) by
choosing which attributes to mention, a synonym for each word and a
paraphrase template. Under-specified captions ("something blue") are true of
many scenes; one scene has many true captions. Held-out templates and
held-out colour-shape pairs are reserved for the "heldout" split.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bpgo_jax.world import constraints as C
from bpgo_jax.world.scenes import (
    HELDOUT_PAIRS,
    SPLITS,
    Scene,
    WorldObject,
    relations_between,
    sample_scene,
)

COLOR_WORDS = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "lime"),
    "blue": ("blue", "azure", "cobalt"),
    "yellow": ("yellow", "golden", "lemon"),
    "purple": ("purple", "violet", "lilac"),
    "orange": ("orange", "amber", "tangerine"),
    "cyan": ("cyan", "turquoise", "aqua"),
    "white": ("white", "ivory", "snowy"),
}
SHAPE_WORDS = {
    "circle": ("circle", "disc", "dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "pyramid", "wedge"),
    "cross": ("cross", "plus", "plus sign"),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
GENERIC_NOUNS = ("shape", "object", "thing", "figure")
POSITION_PHRASES = {
    "left": ("on the left", "at the left", "in the left part"),
    "right": ("on the right", "at the right", "in the right part"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "center": ("in the center", "in the middle", "at the centre"),
}
RELATION_PHRASES = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
# Templates: {a}, {b} are noun phrases with article; {rel} a relation phrase.
# Each entry is (template, count it asserts or None).
TEMPLATES = {
    "train": {
        "one": (
            ("{a}", None),
            ("a picture of {a}", None),
            ("an image of {a}", None),
            ("a photo of {a}", None),
            ("a drawing of {a}", None),
            ("{a} on a dark background", None),
            ("only {a}", 1),
            ("just {a} and nothing else", 1),
        ),
        "two": (
            ("{a} and {b}", None),
            ("a picture of {a} and {b}", None),
            ("two shapes: {a} and {b}", 2),
            ("{a} next to {b}", None),
        ),
        "rel": (
            ("{a} {rel} {b}", None),
            ("a picture of {a} {rel} {b}", None),
            ("{a} located {rel} {b}", None),
        ),
    },
    "heldout": {
        "one": (
            ("in the image there is {a}", None),
            ("the image shows {a}", None),
            ("a rendering of {a}", None),
            ("nothing but {a}", 1),
        ),
        "two": (
            ("there are {a} and {b}", None),
            ("an image containing {a} as well as {b}", None),
        ),
        "rel": (
            ("there is {a} that is {rel} {b}", None),
            ("the image shows {a} positioned {rel} {b}", None),
        ),
    },
}
MAX_WORDS = 20

# Attribute subsets that leave colour or shape unsaid (under-specified).
_UNDER_SUBSETS = (
    ("shape",),
    ("color",),
    ("size", "shape"),
    ("size", "color"),
    ("color", "position"),
    ("shape", "position"),
    ("size",),
    (),
)


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def noun_phrase(spec: Mapping[str, str], rng: np.random.Generator) -> str:
    """Words for one object constraint, e.g. "a tiny crimson disc on the left"."""
    words = []
    if "size" in spec:
        words.append(_pick(rng, SIZE_WORDS[spec["size"]]))
    color = _pick(rng, COLOR_WORDS[spec["color"]]) if "color" in spec else None
    if "shape" in spec:
        words += [color] if color else []
        phrase = _article(" ".join(words + [_pick(rng, SHAPE_WORDS[spec["shape"]])]))
    elif color and not words and rng.random() < 0.5:
        phrase = f"something {color}"
    else:
        words += [color] if color else []
        phrase = _article(" ".join(words + [_pick(rng, GENERIC_NOUNS)]))
    if "position" in spec:
        phrase += " " + _pick(rng, POSITION_PHRASES[spec["position"]])
    return phrase


def _spec(obj: WorldObject, keys) -> dict[str, str]:
    return {k: getattr(obj, k) for k in ("size", "color", "shape", "position") if k in keys}


def _full_keys(rng: np.random.Generator, with_position: bool) -> tuple[str, ...]:
    keys = ["color", "shape"]
    if rng.random() < 0.4:
        keys.append("size")
    if with_position and rng.random() < 0.3:
        keys.append("position")
    return tuple(keys)


def _plan(scene: Scene, rng: np.random.Generator, kind: str, force: int | None):
    """Chooses (objects mentioned, their specs, relation) for a caption kind."""
    objs = list(scene.objects)
    if kind == "relational":
        order = [force, 1 - force] if force is not None else list(rng.permutation(2))
        a, b = objs[order[0]], objs[order[1]]
        relation = _pick(rng, relations_between(a.center, b.center))
        specs = []
        for i, obj in zip(order, (a, b), strict=True):
            if i == force or rng.random() < 0.8:
                specs.append(_spec(obj, _full_keys(rng, with_position=False)))
            else:
                specs.append(_spec(obj, _pick(rng, _UNDER_SUBSETS[:4])))
        return specs, relation
    if force is not None:
        mention = [force] if len(objs) == 1 or rng.random() < 0.3 else list(rng.permutation(2))
    elif len(objs) == 1 or rng.random() < 0.3:
        mention = [int(rng.integers(len(objs)))]
    else:
        mention = [0, 1] if rng.random() < 0.5 else [1, 0]
    specs = []
    if kind == "full":
        specs = [_spec(objs[i], _full_keys(rng, with_position=True)) for i in mention]
    else:
        vague = int(rng.integers(len(mention)))
        for j, i in enumerate(mention):
            if i == force:
                keys = _full_keys(rng, with_position=True)
            elif j == vague or rng.random() < 0.5:
                keys = _pick(rng, _UNDER_SUBSETS)
            else:
                keys = _full_keys(rng, with_position=True)
            specs.append(_spec(objs[i], keys))
    return specs, None


def caption_scene(
    scene: Scene, rng: np.random.Generator, split: str = "train", kind: str | None = None
) -> tuple[str, C.Constraints]:
    """A random true caption of `scene` and its constraints.

    kind: "full", "under", "relational" or None (random). On the "heldout"
    split a scene with a held-out colour-shape pair is always described by
    that pair (any template); other scenes get held-out templates only.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    n = len(scene.objects)
    kinds = C.KINDS if n == 2 else C.KINDS[:2]
    if kind is None:
        kind = _pick(rng, kinds)
    if kind not in kinds:
        raise ValueError(f"kind={kind!r} is not possible for a {n}-object scene; use {kinds}")
    heldout_idx = [i for i, o in enumerate(scene.objects) if (o.color, o.shape) in HELDOUT_PAIRS]
    if split == "train" and heldout_idx:
        raise ValueError(f"train captions never describe held-out pairs: {scene}")
    force = _pick(rng, heldout_idx) if split == "heldout" and heldout_idx else None
    if force is not None and kind == "under":
        kind = "full"
    pools = [TEMPLATES["heldout"]] if split == "heldout" and force is None else []
    pools += [TEMPLATES["train"], TEMPLATES["heldout"]] if force is not None else []
    pools = pools or [TEMPLATES["train"]]
    while True:
        specs, relation = _plan(scene, rng, kind, force)
        if relation is not None:
            group = "rel"
        elif len(specs) == 2:
            group = "two"
        else:
            group = "one"
        # A template that states a count is only used when the count is right.
        options = [t for t in _pick(rng, pools)[group] if t[1] in (None, n)]
        template, count = _pick(rng, options)
        phrases = [noun_phrase(s, rng) for s in specs]
        rel = _pick(rng, RELATION_PHRASES[relation]) if relation else ""
        caption = template.format(a=phrases[0], b=phrases[-1], rel=rel)
        if len(caption.split()) <= MAX_WORDS:
            return caption, {"objects": specs, "relation": relation, "count": count}


def sample_captioned_scene(
    rng: np.random.Generator, split: str = "train"
) -> tuple[Scene, str, C.Constraints]:
    """A random scene of `split` and one random true caption of it.

    Held-out: half the scenes carry a held-out colour-shape pair (always
    mentioned), the others are described with held-out templates only.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    scene_split = "heldout" if split == "heldout" and rng.random() < 0.5 else "train"
    scene = sample_scene(rng, scene_split)
    return (scene, *caption_scene(scene, rng, split))


def sample_prompt(rng: np.random.Generator, split: str = "train") -> tuple[str, C.Constraints]:
    """A caption (and its constraints) of a random scene of `split`."""
    _, caption, constraints = sample_captioned_scene(rng, split)
    return caption, constraints


def satisfies(scene: Scene, constraints: Mapping[str, Any]) -> bool:
    """Ground truth: does `scene` make the caption with `constraints` true?"""
    C.validate(constraints)
    return C.holds(scene_objects(scene), constraints)


def scene_objects(scene: Scene) -> list[dict[str, Any]]:
    """Attribute dicts of a scene's objects (the form the oracle also returns)."""
    return [
        {
            "color": o.color,
            "shape": o.shape,
            "size": o.size,
            "position": o.position,
            "center": o.center,
        }
        for o in scene.objects
    ]


def vocabulary() -> set[str]:
    """Every word any caption can use."""
    texts = [w for d in (COLOR_WORDS, SHAPE_WORDS, SIZE_WORDS) for ws in d.values() for w in ws]
    texts += [p for d in (POSITION_PHRASES, RELATION_PHRASES) for ps in d.values() for p in ps]
    texts += list(GENERIC_NOUNS) + ["a", "an", "something"]
    texts += [t for split in TEMPLATES.values() for g in split.values() for t, _ in g]
    return {w.strip(":") for t in texts for w in t.replace("{", " {").split() if "{" not in w}
