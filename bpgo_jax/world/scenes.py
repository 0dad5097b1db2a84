"""Scenes of the built-in world: one or two coloured shapes on a plain canvas.

A scene is a few discrete attributes per object (colour, shape, size,
position) plus a one-pixel jitter, so the truth of any caption is exact and
cheap to compute. Held-out colour-shape pairs never occur in the "train"
split, which lets evaluation probe compositional generalisation.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

IMAGE_SIZE = 32
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white")
# Well separated in RGB (smallest pairwise distance 0.44), all far from the background.
PALETTE = np.array(
    [
        [0.90, 0.08, 0.08],
        [0.10, 0.75, 0.15],
        [0.15, 0.30, 1.00],
        [1.00, 0.95, 0.10],
        [0.60, 0.10, 0.85],
        [1.00, 0.50, 0.00],
        [0.05, 0.90, 0.90],
        [0.97, 0.97, 0.97],
    ],
    np.float32,
)
BACKGROUND = np.array([0.16, 0.16, 0.16], np.float32)
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
# Chosen so that no pixel centre sits on an edge (crisp, colour-independent extents).
RADII = {"small": 3.5, "large": 5.75}
POSITIONS = ("left", "right", "top", "bottom", "center")
# Nominal object centres (x, y) in pixel coordinates (pixel (i, j) has centre x=j, y=i).
ANCHORS = {"left": (7.0, 16.0), "right": (25.0, 16.0), "top": (16.0, 7.0)}
ANCHORS |= {"bottom": (16.0, 25.0), "center": (16.0, 16.0)}
RELATIONS = ("left of", "right of", "above", "below")
# Centres must differ by more than this along an axis for a relation to hold.
RELATION_MARGIN = 4.0
SPLITS = ("train", "heldout")
# Colour-shape pairs that never appear in train scenes or train captions.
HELDOUT_PAIRS = frozenset(
    {("red", "cross"), ("blue", "triangle"), ("green", "square"), ("yellow", "circle")}
)
_OPPOSITE = frozenset({("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top")})


@dataclasses.dataclass(frozen=True)
class WorldObject:
    """One shape; `jitter` shifts it by whole pixels from its position anchor."""

    color: str
    shape: str
    size: str
    position: str
    jitter: tuple[int, int] = (0, 0)

    def __post_init__(self):
        for field, allowed in (
            ("color", COLORS),
            ("shape", SHAPES),
            ("size", SIZES),
            ("position", POSITIONS),
        ):
            if getattr(self, field) not in allowed:
                raise ValueError(f"object {field}={getattr(self, field)!r} is not one of {allowed}")
        if any(abs(j) > 1 for j in self.jitter):
            raise ValueError(f"object jitter={self.jitter} must lie in [-1, 1]")

    @property
    def center(self) -> tuple[float, float]:
        x, y = ANCHORS[self.position]
        return x + self.jitter[0], y + self.jitter[1]

    @property
    def radius(self) -> float:
        return RADII[self.size]


def pair_allowed(a: WorldObject, b: WorldObject) -> bool:
    """Two objects fit without touching: opposite anchors, or both small."""
    if a.position == b.position:
        return False
    if (a.position, b.position) in _OPPOSITE:
        return True
    return a.size == b.size == "small" and a.jitter == b.jitter == (0, 0)


def relations_between(a: tuple[float, float], b: tuple[float, float]) -> tuple[str, ...]:
    """Every relation that holds for an object centred at `a` w.r.t. one at `b`.

    Diagonal neighbours satisfy two relations (e.g. "left of" and "below"):
    part of what makes captions many-to-many.
    """
    dx, dy = a[0] - b[0], a[1] - b[1]
    out = []
    if dx < -RELATION_MARGIN:
        out.append("left of")
    if dx > RELATION_MARGIN:
        out.append("right of")
    if dy < -RELATION_MARGIN:
        out.append("above")
    if dy > RELATION_MARGIN:
        out.append("below")
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[WorldObject, ...]

    def __post_init__(self):
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene holds 1 or 2 objects, got {len(self.objects)}")
        if len(self.objects) == 2 and not pair_allowed(*self.objects):
            raise ValueError(f"objects overlap or share a position: {self.objects}")

    @property
    def has_heldout_pair(self) -> bool:
        return any((o.color, o.shape) in HELDOUT_PAIRS for o in self.objects)


_ALL_PAIRS = tuple(itertools.product(COLORS, SHAPES))
_TRAIN_PAIRS = tuple(p for p in _ALL_PAIRS if p not in HELDOUT_PAIRS)
_HELDOUT_PAIRS = tuple(sorted(HELDOUT_PAIRS))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")


def _jitter(rng: np.random.Generator) -> tuple[int, int]:
    dx, dy = rng.integers(-1, 2, size=2)
    return int(dx), int(dy)


def sample_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    """A random scene; "train" avoids held-out pairs, "heldout" contains one."""
    _check_split(split)
    n = int(rng.integers(1, 3))
    pool = _TRAIN_PAIRS if split == "train" else _ALL_PAIRS
    pairs = [pool[rng.integers(len(pool))] for _ in range(n)]
    if split == "heldout":
        pairs[rng.integers(n)] = _HELDOUT_PAIRS[rng.integers(len(_HELDOUT_PAIRS))]
    sizes = [SIZES[rng.integers(2)] for _ in range(n)]
    if n == 1:
        pos = [POSITIONS[rng.integers(len(POSITIONS))]]
        jit = [_jitter(rng)]
    elif "large" in sizes:
        pos = list(sorted(_OPPOSITE)[rng.integers(len(_OPPOSITE))])
        jit = [_jitter(rng), _jitter(rng)]
    else:
        pos = [POSITIONS[i] for i in rng.choice(len(POSITIONS), size=2, replace=False)]
        opposite = tuple(pos) in _OPPOSITE
        jit = [_jitter(rng), _jitter(rng)] if opposite else [(0, 0), (0, 0)]
    objects = tuple(
        WorldObject(c, s, z, p, j) for (c, s), z, p, j in zip(pairs, sizes, pos, jit, strict=True)
    )
    return Scene(objects)


def sample_scenes(rng: np.random.Generator, n: int, split: str = "train") -> list[Scene]:
    return [sample_scene(rng, split) for _ in range(n)]
