"""Per-step tables of the samplers, computed once on the host in float64.

Rollout and training read the same float32 tables, so the transition mean and
standard deviation of a step are the same numbers in both places. This is the
one implementation of diffusers' DDPM-family schedule maths (beta schedules,
`trained_betas`, zero-terminal-SNR rescaling, timestep spacings); schedule
dicts use diffusers' `scheduler_config.json` keys, and model loaders
(`bpgo_jax.models.sd.scheduler`) only resolve a checkpoint's config into one.
"""

from __future__ import annotations

import math

import numpy as np

# SD 1.x's schedule: what a DDIM model that declares no `scheduler_config` gets,
# and the base that a partial `scheduler_config` overrides.
DEFAULT_DDPM = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "timestep_spacing": "leading",
}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")


def betas(sched: dict) -> np.ndarray:
    """diffusers' betas, as float64: `trained_betas` if given, else `beta_schedule`.

    `rescale_betas_zero_snr` applies Lin et al. 2023 (zero SNR at the last step).
    """
    n = sched["num_train_timesteps"]
    if sched.get("trained_betas") is not None:
        out = np.asarray(sched["trained_betas"], np.float64)
        if out.shape != (n,):
            raise ValueError(
                f"scheduler trained_betas has shape {out.shape}, expected ({n},) "
                "(num_train_timesteps)"
            )
    else:
        kind = sched.get("beta_schedule", "linear")
        start, end = float(sched.get("beta_start", 0.0001)), float(sched.get("beta_end", 0.02))
        if kind == "linear":
            out = np.linspace(start, end, n, dtype=np.float64)
        elif kind == "scaled_linear":
            out = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
        elif kind == "squaredcos_cap_v2":
            f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
            out = np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)])
        else:
            raise ValueError(f"scheduler beta_schedule={kind!r} is not one of {BETA_SCHEDULES}")
    if sched.get("rescale_betas_zero_snr", False):
        out = _rescale_zero_terminal_snr(out)
    return out


def _rescale_zero_terminal_snr(b: np.ndarray) -> np.ndarray:
    """Shifts and scales sqrt(alpha-bar) so the last step has zero SNR."""
    root = np.sqrt(np.cumprod(1.0 - b))
    first, last = root[0], root[-1]
    abar = ((root - last) * first / (first - last)) ** 2
    return 1.0 - np.concatenate([abar[:1], abar[1:] / abar[:-1]])


def alphas_cumprod(sched: dict) -> np.ndarray:
    """alpha-bar of every train timestep, float64."""
    return np.cumprod(1.0 - betas(sched))


def final_alpha_cumprod(sched: dict, abar: np.ndarray) -> float:
    """alpha-bar "before" timestep 0, where the last DDIM step lands."""
    return 1.0 if sched.get("set_alpha_to_one", False) else float(abar[0])


def ddim_timesteps(sched: dict, num_steps: int) -> np.ndarray:
    """Descending int64 train timesteps of a `num_steps` run (`DDIMScheduler.set_timesteps`)."""
    n = sched["num_train_timesteps"]
    if not 1 <= num_steps <= n:
        raise ValueError(f"num_inference_steps={num_steps} must be in [1, num_train_timesteps={n}]")
    spacing = sched.get("timestep_spacing", "leading")
    if spacing == "leading":
        ratio = n // num_steps
        ts = (np.arange(num_steps) * ratio).round()[::-1] + sched.get("steps_offset", 0)
    elif spacing == "trailing":
        ts = np.round(np.arange(n, 0, -n / num_steps)) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, n - 1, num_steps).round()[::-1]
    else:
        raise ValueError(f"scheduler timestep_spacing={spacing!r} is not one of {SPACINGS}")
    return ts.astype(np.int64)


def ddim_tables(sched: dict, num_steps: int, eta: float) -> dict[str, np.ndarray]:
    """alpha-bar now / previous, the transition std and the model timestep per step."""
    abar = alphas_cumprod(sched)
    n = sched["num_train_timesteps"]
    ts = ddim_timesteps(sched, num_steps)
    prev = ts - n // num_steps  # DDIM's previous timestep, whatever the spacing
    final = final_alpha_cumprod(sched, abar)
    a = abar[ts]
    a_prev = np.where(prev >= 0, abar[np.clip(prev, 0, None)], final)
    var = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    std = eta * np.sqrt(var)
    if eta > 0 and np.any(std <= 0):
        k = int(np.flatnonzero(std <= 0)[0])
        raise ValueError(
            f"sample.eta > 0 but DDIM step {k} (timestep {ts[k]}) has zero noise, so no "
            "log-probability to train: the last step is deterministic when it lands on "
            "alpha-bar = 1 (set_alpha_to_one=True) or starts at timestep 0 (e.g. "
            "timestep_spacing='linspace', or 'leading' with steps_offset=0); set "
            "model.scheduler.set_alpha_to_one=False / timestep_spacing / steps_offset"
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

    noise="flow_grpo": std_t = level * sqrt(s / (1 - s)) (level ~ 0.7); the first
    step (s = 1) uses the next noise level in the denominator, so it stays
    finite. It is chosen by index: with SD3's shift, s_0 = shift / shift can
    round to 1 - 2 ulp, which a test `s >= 1` misses (std_t ~ 5e7).
    noise="dance": std_t = level (DanceGRPO's constant eta). noise="ode": 0.
    The transition std is `std_t * sqrt(-dt)`; `sde_std` is std_t itself
    (Flow-GRPO's KL divides by it).
    """
    s_all = flow_sigmas(num_steps, shift)
    s, s_next = s_all[:-1], s_all[1:]
    dt = s_next - s
    if noise == "flow_grpo":
        denom_s = s.copy()
        denom_s[0] = s_all[1]
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
        "sde_std": std_t.astype(np.float32),
    }
