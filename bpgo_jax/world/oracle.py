"""Exact, learning-free judge of generated world images.

Each pixel is unmixed against the background (anti-aliasing and blur make
`alpha * colour + (1 - alpha) * background`) and snapped to the palette
colour whose hue it matches within a threshold, when alpha >= 0.5. Pixels
are split into connected components per colour, and each component is
described by geometry: bounding-box extent -> size, bounding-box centre ->
position and relations, and shape by analysis-by-synthesis (the shape whose
ideal mask, fitted around the bounding box, overlaps it best).
The parsed objects are judged with the same rule as ground truth
(`constraints.holds`), so oracle and `satisfies` agree on clean renders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from bpgo_jax.world import constraints as C
from bpgo_jax.world.render import SQUARE_HALF, shape_sdf
from bpgo_jax.world.scenes import (
    ANCHORS,
    BACKGROUND,
    COLORS,
    IMAGE_SIZE,
    PALETTE,
    POSITIONS,
    SHAPES,
)

# Bounding-box half-extent of each shape in units of its radius.
_BOX_HALF = {"circle": 1.0, "square": SQUARE_HALF, "triangle": 1.0, "cross": 1.0}
_ANCHOR_XY = np.array([ANCHORS[p] for p in POSITIONS], np.float32)
_DIRECTIONS = PALETTE - BACKGROUND
_DIR_SQNORM = np.square(_DIRECTIONS).sum(-1)
_EIGHT_CONNECTED = np.ones((3, 3), bool)
_FIT_PAD = 2
_FIT_SHIFTS = np.array([-0.5, 0.0, 0.5], np.float32)
_FIT_SCALES = np.array([0.85, 0.92, 1.0], np.float32)


@dataclasses.dataclass(frozen=True)
class OracleConfig:
    """color_threshold: max RGB distance from the unmixed pixel colour to its
    palette colour; min_coverage: object fraction from which a pixel counts
    as object; min_area: smaller blobs are noise; large_extent: bounding-box
    extent (pixels) from which an object is large."""

    color_threshold: float = 0.2
    min_coverage: float = 0.5
    min_area: int = 8
    large_extent: float = 9.0


def _to_float(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"image shape {image.shape} is not [{IMAGE_SIZE}, {IMAGE_SIZE}, 3]")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    return np.clip(image.astype(np.float32), 0.0, 1.0)


def segment(image: np.ndarray, cfg: OracleConfig = OracleConfig()) -> np.ndarray:
    """int [H, W] palette index per pixel; -1 for background or unsure pixels.

    Each pixel is modelled as `alpha * colour + (1 - alpha) * background`
    (what anti-aliasing and blur produce). For every palette colour, alpha is
    the least-squares fit and the unmixed colour `bg + (pixel - bg) / alpha`
    must lie within `color_threshold` of it, so edge pixels are judged by
    hue, not brightness, and a pixel is object when alpha >= min_coverage.
    """
    offset = _to_float(image) - BACKGROUND  # [H, W, 3]
    alpha = offset @ _DIRECTIONS.T / _DIR_SQNORM  # [H, W, K]
    residual = offset[:, :, None, :] - alpha[..., None] * _DIRECTIONS
    error = np.linalg.norm(residual, axis=-1) / np.maximum(alpha, 1e-3)
    error = np.where(alpha >= cfg.min_coverage, error, np.inf)
    best = error.argmin(-1)
    return np.where(error.min(-1) < cfg.color_threshold, best, -1)


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """Best-fitting shape for a cropped boolean mask, and its IoU with that shape.

    Each shape's ideal mask is fitted over a small grid of radii and
    half-pixel shifts around the bounding box (blur erodes tips and corners,
    so the box alone misplaces e.g. a triangle); the best IoU wins.
    """
    m = np.pad(mask, _FIT_PAD)
    h, w = m.shape
    yy = np.arange(h, dtype=np.float32) - (h - 1) / 2
    xx = np.arange(w, dtype=np.float32) - (w - 1) / 2
    shift = _FIT_SHIFTS[None, :, None, None, None]
    dy = yy[None, None, None, :, None] - shift  # [1, shifts, 1, h, 1]
    dx = xx[None, None, None, None, :] - shift.reshape(1, 1, -1, 1, 1)  # [1, 1, shifts, 1, w]
    half = max(mask.shape) / 2.0
    area = m.sum()
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        r = (half * _FIT_SCALES / _BOX_HALF[shape])[:, None, None, None, None]
        ideal = shape_sdf(shape, dx, dy, r) < 0
        inter = (ideal & m).sum((-2, -1))
        iou = float((inter / (ideal.sum((-2, -1)) + area - inter)).max())
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou


def parse(image: np.ndarray, cfg: OracleConfig = OracleConfig()) -> list[dict[str, Any]]:
    """Objects detected in one image [32, 32, 3] (uint8, or float in [0, 1]).

    Each object: color, shape, size, position (the attribute names captions
    use), center (x, y), area, extent and shape_iou (fit quality).
    """
    labels = segment(image, cfg)
    objects = []
    for c in np.unique(labels[labels >= 0]):
        comps, n = ndimage.label(labels == c, structure=_EIGHT_CONNECTED)
        for sl, idx in zip(ndimage.find_objects(comps), range(1, n + 1), strict=True):
            crop = comps[sl] == idx
            area = int(crop.sum())
            if area < cfg.min_area:
                continue
            y0, y1 = sl[0].start, sl[0].stop - 1
            x0, x1 = sl[1].start, sl[1].stop - 1
            center = ((x0 + x1) / 2.0, (y0 + y1) / 2.0)
            extent = float(max(x1 - x0 + 1, y1 - y0 + 1))
            shape, iou = classify_shape(crop)
            near = np.argmin(np.square(_ANCHOR_XY - np.array(center, np.float32)).sum(-1))
            objects.append(
                {
                    "color": COLORS[int(c)],
                    "shape": shape,
                    "size": "large" if extent >= cfg.large_extent else "small",
                    "position": POSITIONS[int(near)],
                    "center": center,
                    "area": area,
                    "extent": extent,
                    "shape_iou": iou,
                }
            )
    return objects


def check(
    image: np.ndarray, constraints: Mapping[str, Any], cfg: OracleConfig = OracleConfig()
) -> bool:
    """True iff every constraint of the caption holds in the image."""
    C.validate(constraints)
    return C.holds(parse(image, cfg), constraints)


def accuracy(
    images: np.ndarray,
    constraints_list: Sequence[Mapping[str, Any]],
    cfg: OracleConfig = OracleConfig(),
) -> tuple[float, np.ndarray]:
    """(fraction of images whose caption holds, per-sample bools)."""
    if len(images) != len(constraints_list):
        raise ValueError(f"{len(images)} images but {len(constraints_list)} constraints")
    ok = np.array([check(im, c, cfg) for im, c in zip(images, constraints_list, strict=True)])
    return float(ok.mean()) if len(ok) else 0.0, ok
