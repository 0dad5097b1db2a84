"""What a caption claims, as data, and when a set of objects makes it true.

Constraints are JSON-able dicts, shared by ground truth (scene parameters)
and the oracle (objects parsed from pixels), so both judge with one rule:

    {"objects": [{"color": "red", "shape": "circle"}, {"size": "small"}],
     "relation": "left of" | None,   # between objects[0] and objects[1]
     "count": 2 | None}              # exact number of objects, when stated

Object constraints must be met by distinct objects; unmentioned objects are
allowed unless `count` is given.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from bpgo_jax.world.scenes import COLORS, POSITIONS, RELATIONS, SHAPES, SIZES, relations_between

ATTRIBUTES = {"color": COLORS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}
KINDS = ("full", "under", "relational")

Constraints = dict[str, Any]


def validate(constraints: Mapping[str, Any]) -> None:
    """Raises ValueError naming the first malformed field."""
    objects = constraints.get("objects")
    if not isinstance(objects, list | tuple) or not 1 <= len(objects) <= 2:
        raise ValueError(f"constraints['objects'] must list 1 or 2 objects, got {objects!r}")
    for spec in objects:
        for key, value in spec.items():
            if key not in ATTRIBUTES:
                raise ValueError(f"unknown object attribute {key!r}; known: {tuple(ATTRIBUTES)}")
            if value not in ATTRIBUTES[key]:
                raise ValueError(f"object {key}={value!r} is not one of {ATTRIBUTES[key]}")
    relation = constraints.get("relation")
    if relation is not None:
        if relation not in RELATIONS:
            raise ValueError(f"relation={relation!r} is not one of {RELATIONS}")
        if len(objects) != 2:
            raise ValueError(f"relation={relation!r} needs 2 objects, got {len(objects)}")
    count = constraints.get("count")
    if count is not None and count not in (1, 2):
        raise ValueError(f"count={count!r} must be 1, 2 or None")


def holds(objects: Sequence[Mapping[str, Any]], constraints: Mapping[str, Any]) -> bool:
    """True iff `objects` (dicts with the attributes and a `center` (x, y)) satisfy it."""
    count = constraints.get("count")
    if count is not None and count != len(objects):
        return False
    specs = constraints["objects"]
    relation = constraints.get("relation")
    for chosen in itertools.permutations(objects, len(specs)):
        if not all(
            all(obj.get(k) == v for k, v in spec.items())
            for obj, spec in zip(chosen, specs, strict=True)
        ):
            continue
        if relation is None or relation in relations_between(
            chosen[0]["center"], chosen[1]["center"]
        ):
            return True
    return False


def kind(constraints: Mapping[str, Any]) -> str:
    """ "relational", "full" (every object has colour and shape) or "under"."""
    if constraints.get("relation") is not None:
        return "relational"
    full = all("color" in s and "shape" in s for s in constraints["objects"])
    return "full" if full else "under"
