"""The one interface every generator plugs into.

The engine never sees a Flax module: it drives a `DiffusionModel`, a frozen
bundle of pure functions over explicit parameter pytrees. Parameters are split
into `trainable` (what the optimiser updates: full denoiser weights, or LoRA
factors) and `frozen` (text encoder, autoencoder, LoRA base weights). Keeping
modules out of jit signatures lets the same rollout / update code serve the
tiny built-in model, Stable Diffusion and later video models.

Conventions (shared by all implementations):
- `tokenize` runs on the host and returns int32 `[B, L]` token ids.
- `encode_text(frozen, tokens)` returns the conditioning pytree whose leaves
  have a leading batch axis (e.g. hidden states `[B, L, D]`).
- `predict(trainable, frozen, x_t, t, cond)` returns the network output for
  latents `x_t` `[B, *latent_shape]` at model timesteps `t` `[B]` (float32):
  the discrete train timestep (0..num_train_timesteps-1) for DDPM-family
  models, `1000 * sigma` for rectified-flow models. What the output means is
  `prediction_type`: "epsilon", "v_prediction", "sample" or "flow" (velocity
  `noise - x0`, with `x_s = (1 - s) * x0 + s * noise`).
- `latent_shape` is any rank, channels last: `(h, w, c)` for images,
  `(f, h, w, c)` for video (Wan); the engine's noise, log-probs and ratios
  treat every non-batch dim alike.
- `decode(frozen, latents)` returns float32 images `[B, H, W, 3]` in [0, 1],
  or for a video model frames `[B, F, H, W, 3]` in [0, 1]: what every reward
  then receives (`rewards.video` wraps image rewards to score frames).
- `init(rng)` returns `(trainable, frozen)` with fresh random weights;
  loaders for real weights return the same pair.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

Params = Any  # a pytree of arrays
Cond = Any  # a pytree of arrays with a leading batch axis

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


@dataclasses.dataclass(frozen=True)
class DiffusionModel:
    """Pure functions of a text-conditional latent diffusion / flow model."""

    name: str
    latent_shape: tuple[int, ...]
    prediction_type: str
    tokenize: Callable[[Sequence[str]], np.ndarray]
    encode_text: Callable[[Params, jax.Array], Cond]
    predict: Callable[[Params, Params, jax.Array, jax.Array, Cond], jax.Array]
    decode: Callable[[Params, jax.Array], jax.Array]
    init: Callable[[jax.Array], tuple[Params, Params]]
    # Optional: the diffusers-style noise schedule the model was trained with
    # (e.g. {"beta_schedule": "scaled_linear", "beta_start": ..., ...}); the
    # sampler builds its tables from it when present.
    scheduler_config: dict | None = None

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"model.prediction_type={self.prediction_type!r} is not one of {PREDICTION_TYPES}"
            )
