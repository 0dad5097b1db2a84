"""How much of an update's gradient is its expectation, from independent draws of it.

Used by `launch/gradient_signal.py` to check, before a long run, whether one
update's policy gradient carries signal or is mostly sampling noise.
"""

from __future__ import annotations

import itertools

import numpy as np


def gradient_signal(grads: np.ndarray) -> dict[str, float]:
    """Statistics of K independent gradient draws `grads` [K, P] of one update.

    With g_b = g + n_b (n_b zero-mean, independent), E|mean_b g_b|^2 =
    |g|^2 + (E|g_b|^2 - |g|^2) / K, so `signal_share` = |g|^2 / E|g_b|^2 is
    estimated as (r - 1/K) / (1 - 1/K) with r = |mean|^2 / mean |g_b|^2; it is
    about 0 for pure noise (can be slightly negative) and 1 without noise.
    """
    grads = np.asarray(grads, np.float64)
    k = grads.shape[0]
    if grads.ndim != 2 or k < 2:
        raise ValueError(f"grads {grads.shape} must be [K, P] with K >= 2 draws")
    norms = np.linalg.norm(grads, axis=1)
    cos = [
        grads[i] @ grads[j] / (norms[i] * norms[j]) for i, j in itertools.combinations(range(k), 2)
    ]
    mean = grads.mean(axis=0)
    ratio = float(mean @ mean / np.mean(norms**2))
    return {
        "cosine_mean": float(np.mean(cos)),
        "cosine_sd": float(np.std(cos)),
        "mean_sq_over_sq": ratio,
        "noise_only": 1.0 / k,
        "signal_share": (ratio - 1.0 / k) / (1.0 - 1.0 / k),
        "grad_norm_mean": float(norms.mean()),
    }
