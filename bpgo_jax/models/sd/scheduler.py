"""The SD noise schedule from `scheduler/scheduler_config.json`.

Any diffusers DDPM-family scheduler config (DDIM, PNDM, DDPM, Euler, ...)
carries the same schedule fields; we read them the way
`DDIMScheduler.from_config` does (missing keys take DDIMScheduler's
defaults), because the policy-gradient sampler is DDIM with eta > 0 whatever
scheduler the checkpoint shipped with. The maths (beta schedules, zero-SNR
rescaling, timestep spacings, the DDIM step) lives once in
`bpgo_jax.rollout.schedules` / `bpgo_jax.rollout.samplers`, which the engine
trains with; this module resolves and validates a checkpoint's config into
the complete schedule dict (`Scheduler.to_dict()`, the model's
`scheduler_config`) that they read.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from bpgo_jax.models.weights import read_json
from bpgo_jax.rollout import schedules

BETA_SCHEDULES = schedules.BETA_SCHEDULES
SPACINGS = schedules.SPACINGS
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# `DDIMScheduler.__init__` defaults (diffusers 0.2x-0.4x), which `from_config` fills in.
DDIM_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    clip_sample=True,
    set_alpha_to_one=True,
    steps_offset=0,
    prediction_type="epsilon",
    clip_sample_range=1.0,
    timestep_spacing="leading",
    rescale_betas_zero_snr=False,
)


@dataclasses.dataclass(frozen=True, eq=False)
class Scheduler:
    """A complete, validated DDPM-family schedule (diffusers key names)."""

    num_train_timesteps: int
    beta_schedule: str
    beta_start: float
    beta_end: float
    trained_betas: tuple[float, ...] | None
    prediction_type: str
    steps_offset: int
    set_alpha_to_one: bool
    timestep_spacing: str
    clip_sample: bool
    clip_sample_range: float
    rescale_betas_zero_snr: bool
    class_name: str = "DDIMScheduler"

    def to_dict(self) -> dict[str, Any]:
        """The schedule as a plain config dict (the engine's `scheduler_config`)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del out["class_name"]
        if self.trained_betas is not None:
            out["trained_betas"] = list(self.trained_betas)
        return out

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """float32 `[num_train_timesteps]`, as diffusers stores it."""
        return schedules.alphas_cumprod(self.to_dict()).astype(np.float32)

    @property
    def final_alpha_cumprod(self) -> float:
        abar = schedules.alphas_cumprod(self.to_dict())
        return float(np.float32(schedules.final_alpha_cumprod(self.to_dict(), abar)))

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        """Descending int64 train timesteps, exactly as `DDIMScheduler.set_timesteps`."""
        return schedules.ddim_timesteps(self.to_dict(), num_inference_steps)


def scheduler_from_dict(raw: dict[str, Any]) -> Scheduler:
    """Parses a diffusers scheduler config dict with `DDIMScheduler.from_config` semantics."""
    if raw.get("thresholding", False):
        raise ValueError("scheduler thresholding=True is not supported")
    c = {key: raw.get(key, default) for key, default in DDIM_DEFAULTS.items()}
    if c["trained_betas"] is None and c["beta_schedule"] not in BETA_SCHEDULES:
        raise ValueError(
            f"scheduler beta_schedule={c['beta_schedule']!r} is not one of {BETA_SCHEDULES}"
        )
    if c["prediction_type"] not in PREDICTION_TYPES:
        raise ValueError(
            f"scheduler prediction_type={c['prediction_type']!r} is not one of {PREDICTION_TYPES}"
        )
    if c["timestep_spacing"] not in SPACINGS:
        raise ValueError(
            f"scheduler timestep_spacing={c['timestep_spacing']!r} is not one of {SPACINGS}"
        )
    out = Scheduler(
        num_train_timesteps=int(c["num_train_timesteps"]),
        beta_schedule=str(c["beta_schedule"]),
        beta_start=float(c["beta_start"]),
        beta_end=float(c["beta_end"]),
        trained_betas=None if c["trained_betas"] is None else tuple(map(float, c["trained_betas"])),
        prediction_type=c["prediction_type"],
        steps_offset=int(c["steps_offset"]),
        set_alpha_to_one=bool(c["set_alpha_to_one"]),
        timestep_spacing=c["timestep_spacing"],
        clip_sample=bool(c["clip_sample"]),
        clip_sample_range=float(c["clip_sample_range"]),
        rescale_betas_zero_snr=bool(c["rescale_betas_zero_snr"]),
        class_name=str(raw.get("_class_name", "DDIMScheduler")),
    )
    schedules.betas(out.to_dict())  # fails now, not at sampling, on bad trained_betas
    return out


def load_scheduler(folder: str) -> Scheduler:
    """Reads `folder/scheduler_config.json` (a diffusers `scheduler/` subfolder)."""
    return scheduler_from_dict(read_json(os.path.join(folder, "scheduler_config.json")))
