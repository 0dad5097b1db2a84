"""The SD noise schedule from `scheduler/scheduler_config.json`, and the DDIM step with eta.

Any diffusers DDPM-family scheduler config (DDIM, PNDM, DDPM, Euler, ...)
carries the same schedule fields; we read them the way
`DDIMScheduler.from_config` does (missing keys take DDIMScheduler's
defaults), because the policy-gradient sampler is DDIM with eta > 0 whatever
scheduler the checkpoint shipped with. Tables are computed once on the host in
float64 and stored as float32, so rollout and training read identical numbers.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bpgo_jax.models.sd.config import read_json

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _betas(raw: dict[str, Any], n: int) -> np.ndarray:
    if raw.get("trained_betas") is not None:
        betas = np.asarray(raw["trained_betas"], np.float64)
        if betas.shape != (n,):
            raise ValueError(f"scheduler trained_betas has {betas.shape[0]} entries, expected {n}")
        return betas
    kind = raw.get("beta_schedule", "linear")
    start, end = float(raw.get("beta_start", 0.0001)), float(raw.get("beta_end", 0.02))
    if kind == "linear":
        return np.linspace(start, end, n, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    if kind == "squaredcos_cap_v2":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)])
    raise ValueError(f"scheduler beta_schedule={kind!r} is not one of {BETA_SCHEDULES}")


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023: shift sqrt(alpha-bar) so the last step has zero SNR."""
    abar_sqrt = np.sqrt(np.cumprod(1.0 - betas))
    first, last = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


@dataclasses.dataclass(frozen=True, eq=False)
class Scheduler:
    """Schedule fields plus the float32 `alphas_cumprod` table `[num_train_timesteps]`."""

    num_train_timesteps: int
    beta_schedule: str
    beta_start: float
    beta_end: float
    prediction_type: str
    steps_offset: int
    set_alpha_to_one: bool
    timestep_spacing: str
    clip_sample: bool
    clip_sample_range: float
    rescale_betas_zero_snr: bool
    alphas_cumprod: np.ndarray
    final_alpha_cumprod: float
    class_name: str = "DDIMScheduler"

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        """Descending int64 train timesteps, exactly as `DDIMScheduler.set_timesteps`."""
        n, k = self.num_train_timesteps, num_inference_steps
        if not 1 <= k <= n:
            raise ValueError(f"num_inference_steps={k} must be in [1, num_train_timesteps={n}]")
        if self.timestep_spacing == "linspace":
            return np.linspace(0, n - 1, k).round()[::-1].copy().astype(np.int64)
        if self.timestep_spacing == "leading":
            ratio = n // k
            return (np.arange(0, k) * ratio).round()[::-1].astype(np.int64) + self.steps_offset
        return np.round(np.arange(n, 0, -n / k)).astype(np.int64) - 1  # trailing

    def prev_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """DDIM's previous timestep of each step (negative means `final_alpha_cumprod`)."""
        return self.timesteps(num_inference_steps) - self.num_train_timesteps // num_inference_steps

    def to_dict(self) -> dict[str, Any]:
        """The schedule as a plain config dict (the engine's `scheduler_config`)."""
        skip = ("alphas_cumprod", "final_alpha_cumprod", "class_name")
        out = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip
        }
        return out


def scheduler_from_dict(raw: dict[str, Any]) -> Scheduler:
    """Parses a diffusers scheduler config dict with `DDIMScheduler.from_config` semantics."""
    n = int(raw.get("num_train_timesteps", 1000))
    kind = raw.get("beta_schedule", "linear")
    if kind not in BETA_SCHEDULES and raw.get("trained_betas") is None:
        raise ValueError(f"scheduler beta_schedule={kind!r} is not one of {BETA_SCHEDULES}")
    prediction = raw.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ValueError(
            f"scheduler prediction_type={prediction!r} is not one of {PREDICTION_TYPES}"
        )
    spacing = raw.get("timestep_spacing", "leading")
    if spacing not in SPACINGS:
        raise ValueError(f"scheduler timestep_spacing={spacing!r} is not one of {SPACINGS}")
    if raw.get("thresholding", False):
        raise ValueError("scheduler thresholding=True is not supported")
    betas = _betas(raw, n)
    rescale = bool(raw.get("rescale_betas_zero_snr", False))
    if rescale:
        betas = _rescale_zero_terminal_snr(betas)
    abar = np.cumprod(1.0 - betas)
    set_one = bool(raw.get("set_alpha_to_one", True))
    return Scheduler(
        num_train_timesteps=n,
        beta_schedule=kind,
        beta_start=float(raw.get("beta_start", 0.0001)),
        beta_end=float(raw.get("beta_end", 0.02)),
        prediction_type=prediction,
        steps_offset=int(raw.get("steps_offset", 0)),
        set_alpha_to_one=set_one,
        timestep_spacing=spacing,
        clip_sample=bool(raw.get("clip_sample", True)),
        clip_sample_range=float(raw.get("clip_sample_range", 1.0)),
        rescale_betas_zero_snr=rescale,
        alphas_cumprod=abar.astype(np.float32),
        final_alpha_cumprod=float(np.float32(1.0 if set_one else abar[0])),
        class_name=str(raw.get("_class_name", "DDIMScheduler")),
    )


def load_scheduler(folder: str) -> Scheduler:
    """Reads `folder/scheduler_config.json` (a diffusers `scheduler/` subfolder)."""
    return scheduler_from_dict(read_json(os.path.join(folder, "scheduler_config.json")))


def _per_sample(value: jax.Array, ndim: int) -> jax.Array:
    """Scalar or `[B]` -> broadcastable against `[B, ...]` of rank `ndim`."""
    value = jnp.asarray(value)
    return value.reshape(value.shape + (1,) * (ndim - value.ndim)) if value.ndim else value


def ddim_step(
    tables: Scheduler,
    model_output: jax.Array,
    t: jax.Array,
    prev_t: jax.Array,
    x_t: jax.Array,
    eta: float,
    noise: jax.Array,
    prediction_type: str,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One DDIM step t -> prev_t with noise weight eta: `(x_prev, mean, std)`.

    `x_prev = mean + std * noise` is a draw from the Gaussian whose log-density
    the policy gradient needs (DDPO). `t`, `prev_t` are ints, scalar or `[B]`;
    `prev_t < 0` uses `final_alpha_cumprod`. Matches `DDIMScheduler.step(...,
    eta=eta, variance_noise=noise)` including `clip_sample`.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}")
    abar = jnp.asarray(tables.alphas_cumprod)
    t, prev_t = jnp.asarray(t), jnp.asarray(prev_t)
    a_t = abar[t]
    a_prev = jnp.where(prev_t >= 0, abar[jnp.maximum(prev_t, 0)], tables.final_alpha_cumprod)
    a_t, a_prev = _per_sample(a_t, x_t.ndim), _per_sample(a_prev, x_t.ndim)
    x_t, model_output = x_t.astype(jnp.float32), model_output.astype(jnp.float32)
    b_t = 1.0 - a_t
    if prediction_type == "epsilon":
        x0 = (x_t - jnp.sqrt(b_t) * model_output) / jnp.sqrt(a_t)
        eps = model_output
    elif prediction_type == "v_prediction":
        x0 = jnp.sqrt(a_t) * x_t - jnp.sqrt(b_t) * model_output
        eps = jnp.sqrt(a_t) * model_output + jnp.sqrt(b_t) * x_t
    else:
        x0 = model_output
        eps = (x_t - jnp.sqrt(a_t) * x0) / jnp.sqrt(b_t)
    if tables.clip_sample:
        x0 = jnp.clip(x0, -tables.clip_sample_range, tables.clip_sample_range)
    variance = (1.0 - a_prev) / b_t * (1.0 - a_t / a_prev)
    std = eta * jnp.sqrt(variance)
    mean = jnp.sqrt(a_prev) * x0 + jnp.sqrt(jnp.maximum(1.0 - a_prev - std**2, 0.0)) * eps
    return mean + std * noise.astype(jnp.float32), mean, std
