"""Per-step tables of the samplers, computed once on the host in float64.

Rollout and training read the same float32 tables, so the transition mean and
standard deviation of a step are the same numbers in both places.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_DDPM = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "timestep_spacing": "leading",
}


def alphas_cumprod(sched: dict) -> np.ndarray:
    """diffusers' beta schedules, as float64."""
    n = sched["num_train_timesteps"]
    kind = sched["beta_schedule"]
    if kind == "linear":
        betas = np.linspace(sched["beta_start"], sched["beta_end"], n, dtype=np.float64)
    elif kind == "scaled_linear":
        betas = np.linspace(sched["beta_start"] ** 0.5, sched["beta_end"] ** 0.5, n) ** 2
    elif kind == "squaredcos_cap_v2":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)])
    else:
        raise ValueError(f"unknown beta_schedule {kind!r}")
    return np.cumprod(1.0 - betas)


def ddim_timesteps(sched: dict, num_steps: int) -> np.ndarray:
    """Descending train timesteps of a `num_steps` DDIM run (diffusers' spacings)."""
    n = sched["num_train_timesteps"]
    spacing = sched.get("timestep_spacing", "leading")
    if spacing == "leading":
        ratio = n // num_steps
        ts = (np.arange(num_steps) * ratio).round()[::-1] + sched.get("steps_offset", 0)
    elif spacing == "trailing":
        ts = np.round(np.arange(n, 0, -n / num_steps)) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, n - 1, num_steps).round()[::-1]
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}")
    return ts.astype(np.int64)


def ddim_tables(sched: dict, num_steps: int, eta: float) -> dict[str, np.ndarray]:
    """alpha-bar now / previous, the transition std and the model timestep per step."""
    abar = alphas_cumprod(sched)
    n = sched["num_train_timesteps"]
    ts = ddim_timesteps(sched, num_steps)
    prev = ts - n // num_steps
    final = 1.0 if sched.get("set_alpha_to_one", False) else abar[0]
    a = abar[ts]
    a_prev = np.where(prev >= 0, abar[np.clip(prev, 0, None)], final)
    var = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    std = eta * np.sqrt(var)
    if eta > 0 and np.any(std <= 0):
        raise ValueError(
            "sample.eta > 0 but a DDIM step has zero noise (set_alpha_to_one=True makes the last "
            "step deterministic); set model.scheduler.set_alpha_to_one=False"
        )
    return {
        "model_t": ts.astype(np.float32),
        "alpha": a.astype(np.float32),
        "alpha_prev": a_prev.astype(np.float32),
        "std": std.astype(np.float32),
        "dir_coef": np.sqrt(np.maximum(1 - a_prev - std**2, 0.0)).astype(np.float32),
    }


def flow_sigmas(num_steps: int, shift: float = 1.0) -> np.ndarray:
    """Noise levels 1 -> 0 (`num_steps + 1` values), with SD3's time shift."""
    s = np.linspace(1.0, 0.0, num_steps + 1)
    return shift * s / (1 + (shift - 1) * s)


def flow_tables(num_steps: int, shift: float, noise: str, level: float) -> dict[str, np.ndarray]:
    """Coefficients of the rectified-flow SDE step `mean = cx * x + cv * v`.

    noise="flow_grpo": std_t = level * sqrt(s / (1 - s)) (level ~ 0.7); at s = 1
    the denominator uses the next noise level, so the first step stays finite.
    noise="dance": std_t = level (DanceGRPO's constant eta). noise="ode": 0.
    The transition std is `std_t * sqrt(-dt)`.
    """
    s_all = flow_sigmas(num_steps, shift)
    s, s_next = s_all[:-1], s_all[1:]
    dt = s_next - s
    if noise == "flow_grpo":
        denom_s = np.where(s >= 1.0, s_all[1], s)
        std_t = level * np.sqrt(s / (1 - denom_s))
    elif noise == "dance":
        std_t = np.full_like(s, level)
    elif noise == "ode":
        std_t = np.zeros_like(s)
    else:
        raise ValueError(f"unknown flow noise form {noise!r}; use flow_grpo, dance or ode")
    cx = 1 + std_t**2 / (2 * s) * dt
    cv = (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    return {
        "model_t": (1000.0 * s).astype(np.float32),
        "cx": cx.astype(np.float32),
        "cv": cv.astype(np.float32),
        "std": (std_t * np.sqrt(-dt)).astype(np.float32),
    }
