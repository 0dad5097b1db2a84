"""Batches of (image, true caption) pairs and the corruptions used on them.

`sample_pairs` feeds generator pre-training and reward-model training;
`degrade` simulates imperfect generator output (noise, blur, colour shifts)
for augmentation and for stress-testing the oracle.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from bpgo_jax.world import constraints as C
from bpgo_jax.world.grammar import sample_captioned_scene
from bpgo_jax.world.render import render
from bpgo_jax.world.scenes import (
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
)


def sample_captioned_scenes(
    rng: np.random.Generator, n: int, split: str = "train"
) -> tuple[list[Scene], list[str], list[C.Constraints]]:
    """n random scenes of `split`, each with one random true caption."""
    scenes, captions, cons = [], [], []
    for _ in range(n):
        scene, caption, c = sample_captioned_scene(rng, split)
        scenes.append(scene)
        captions.append(caption)
        cons.append(c)
    return scenes, captions, cons


def sample_pairs(
    rng: np.random.Generator, n: int, split: str = "train"
) -> tuple[np.ndarray, list[str], list[C.Constraints]]:
    """(uint8 images [n, 32, 32, 3], captions, constraints); each caption is true of its image."""
    scenes, captions, cons = sample_captioned_scenes(rng, n, split)
    return render(scenes), captions, cons


def perturb_scene(scene: Scene, rng: np.random.Generator) -> Scene:
    """The scene with one attribute of one object changed (a near miss)."""
    values = {"color": COLORS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}
    while True:
        i = int(rng.integers(len(scene.objects)))
        attr = ("color", "shape", "size", "position")[int(rng.integers(4))]
        obj = scene.objects[i]
        options = [v for v in values[attr] if v != getattr(obj, attr)]
        new = dataclasses.replace(obj, **{attr: options[int(rng.integers(len(options)))]})
        objects = scene.objects[:i] + (new,) + scene.objects[i + 1 :]
        try:
            return Scene(objects)
        except ValueError:  # the change made the two objects collide; try another
            continue


@dataclasses.dataclass(frozen=True)
class Degradation:
    """Corruptions of generator-like output; zero everywhere means none."""

    noise: float = 0.0  # std of additive Gaussian pixel noise
    blur: float = 0.0  # Gaussian blur sigma in pixels
    color_jitter: float = 0.0  # std of a per-image, per-channel colour offset


def degrade(images: np.ndarray, rng: np.random.Generator, d: Degradation) -> np.ndarray:
    """float32 images [N, H, W, 3] in [0, 1] corrupted by `d` (input uint8 or float)."""
    x = np.asarray(images)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if d.blur > 0:
        x = ndimage.gaussian_filter(x, sigma=(0, d.blur, d.blur, 0))
    if d.color_jitter > 0:
        x = x + d.color_jitter * rng.standard_normal((len(x), 1, 1, 3)).astype(np.float32)
    if d.noise > 0:
        x = x + d.noise * rng.standard_normal(x.shape).astype(np.float32)
    return np.clip(x, 0.0, 1.0)
