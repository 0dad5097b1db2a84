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


FLOW_NOISE = ("flow_grpo", "dance", "cps", "ode")
FLOW_SIGMAS = ("shifted_linear", "diffusers")
# diffusers' `calculate_shift` defaults (FLUX.1's scheduler_config.json values).
DYNAMIC_SHIFT_DEFAULTS = {
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "time_shift_type": "exponential",
}


def time_shift(s: np.ndarray, shift: float) -> np.ndarray:
    """SD3's static time shift `shift * s / (1 + (shift - 1) * s)`."""
    return shift * s / (1 + (shift - 1) * s)


def flow_sigmas(num_steps: int, shift: float = 1.0) -> np.ndarray:
    """Noise levels 1 -> 0 (`num_steps + 1` values), with SD3's time shift.

    Its first `num_steps` values before the shift are FluxPipeline's
    `linspace(1, 1 / N, N)`, so with FLUX's shift it is FLUX's schedule.
    """
    return time_shift(np.linspace(1.0, 0.0, num_steps + 1), shift)


def dynamic_shift(image_seq_len: int, sched: dict | None = None) -> float:
    """FLUX's resolution-dependent shift at `image_seq_len` image tokens.

    mu is linear in the length (diffusers' `calculate_shift`: `base_shift` at
    `base_image_seq_len`, `max_shift` at `max_image_seq_len`, from the
    scheduler config `sched`, diffusers' defaults where absent). diffusers'
    exponential time shift e^mu / (e^mu + 1/s - 1) is the static shift with
    shift = e^mu (its "linear" one, mu / (mu + 1/s - 1), that with shift = mu),
    so this returns that one number.
    """
    c = {**DYNAMIC_SHIFT_DEFAULTS, **{k: v for k, v in (sched or {}).items() if v is not None}}
    slope = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
    mu = image_seq_len * slope + (c["base_shift"] - slope * c["base_image_seq_len"])
    if c["time_shift_type"] not in ("exponential", "linear"):
        raise ValueError(f"time_shift_type={c['time_shift_type']!r} is not exponential or linear")
    return math.exp(mu) if c["time_shift_type"] == "exponential" else mu


def diffusers_flow_sigmas(
    num_steps: int, shift: float = 1.0, dynamic: bool = False, num_train_timesteps: int = 1000
) -> np.ndarray:
    """`FlowMatchEulerDiscreteScheduler.set_timesteps(N)`'s sigmas, 0 appended (float64).

    Timesteps evenly spaced from sigma_max to sigma_min of the scheduler's
    train table times num_train_timesteps, divided back, then shifted. The
    train table is shifted too (sigma_min = shift(1 / num_train_timesteps),
    ~0.003 at SD3's 3.0) unless the shift is dynamic (`use_dynamic_shifting`:
    sigma_min = 1 / num_train_timesteps, then the time shift e / (e + 1/s - 1)
    with e = `shift`, as `dynamic_shift` gives it). SD3's pipeline calls
    this; FluxPipeline passes its own `linspace(1, 1/N, N)` (`flow_sigmas`).
    """
    # The train table's ends, float32 as the scheduler holds them.
    f32 = np.float32
    ends = f32(1) / f32([1, num_train_timesteps])
    if not dynamic:
        ends = f32(shift) * ends / (f32(1) + f32(shift - 1) * ends)
    top, bottom = (float(v) * num_train_timesteps for v in ends)
    s = np.linspace(top, bottom, num_steps) / num_train_timesteps
    s = shift / (shift + (1 / s - 1)) if dynamic else time_shift(s, shift)
    return np.concatenate([s, [0.0]])


def flow_schedule(
    num_steps: int, sigmas: str = "shifted_linear", shift: float = 1.0, dynamic: bool = False
) -> np.ndarray:
    """The `num_steps + 1` noise levels 1 -> 0 of `sample.sigmas`.

    "shifted_linear": `flow_sigmas`, evenly spaced in [1, 0], then shifted
    (FluxPipeline's schedule under FLUX's shift). "diffusers":
    `diffusers_flow_sigmas`, the scheduler's own spacing (SD3's pipeline).
    `dynamic`: `shift` is FLUX's resolution-dependent one (`dynamic_shift`).
    """
    if sigmas == "shifted_linear":
        return flow_sigmas(num_steps, shift)
    if sigmas == "diffusers":
        return diffusers_flow_sigmas(num_steps, shift, dynamic)
    raise ValueError(f"unknown flow sigmas {sigmas!r}; use one of {FLOW_SIGMAS}")


def sde_steps(num_steps: int, noise: str, sde_window: tuple = ()) -> tuple[int, int]:
    """[start, stop) of the steps that draw noise (possibly empty: start >= stop).

    The SDE window (`()`: every step), less CPS's last step, whose std
    sigma_next * sin(...) is 0 (sigma_next = 0); no step for "ode". Every step
    outside is the deterministic Euler step, with no log-probability to train.
    """
    start, stop = tuple(sde_window) or (0, num_steps)
    if noise == "cps":
        stop = min(stop, num_steps - 1)
    if noise == "ode":
        stop = start
    return start, stop


def flow_tables(
    num_steps: int,
    shift: float,
    noise: str,
    level: float,
    *,
    sigmas: str = "shifted_linear",
    dynamic: bool = False,
    sde_window: tuple = (),
) -> dict[str, np.ndarray]:
    """Coefficients of the rectified-flow step `mean = cx * x + cv * v`, `x' = mean + std * z`.

    The mean is linear in the network output v, as `samplers.log_ratio` needs.
    s / s' are the step's noise levels now / next, dt = s' - s < 0.

    noise="flow_grpo": Flow-GRPO's SDE, std_t = level * sqrt(s / (1 - s))
    (level ~ 0.7); the first step (s = 1) uses the next noise level in the
    denominator, so it stays finite. It is chosen by index: with SD3's shift,
    s_0 = shift / shift can round to 1 - 2 ulp, which a test `s >= 1` misses
    (std_t ~ 5e7). noise="dance": std_t = level (DanceGRPO's constant eta).
    For both the transition std is `std_t * sqrt(-dt)` and `sde_std` is std_t
    (Flow-GRPO's KL divides by it).

    noise="cps": Coefficients-Preserving Sampling (Flow-GRPO's `sde_type="cps"`):
    x0 = x - s v and x1 = x + (1 - s) v are the predicted sample and noise,
    std = s' sin(level pi / 2) (level in (0, 1]) and
    mean = (1 - s') x0 + sqrt(s'^2 - std^2) x1, so the coefficients of x0 and
    of the total noise stay (1 - s', s'). The last step (s' = 0) has std 0.
    `sde_std` is the transition std itself (Flow-GRPO's CPS KL divides by it).

    noise="ode": std 0. Steps outside `sde_window` ((start, stop); () = all)
    are that deterministic Euler step (cx = 1, cv = dt) whatever the noise.
    """
    s_all = flow_schedule(num_steps, sigmas, shift, dynamic)
    s, s_next = s_all[:-1], s_all[1:]
    dt = s_next - s
    if noise in ("flow_grpo", "dance"):
        if noise == "flow_grpo":
            denom_s = s.copy()
            denom_s[0] = s_all[1]
            std_t = level * np.sqrt(s / (1 - denom_s))
        else:
            std_t = np.full_like(s, level)
        cx = 1 + std_t**2 / (2 * s) * dt
        cv = (1 + std_t**2 * (1 - s) / (2 * s)) * dt
        std = std_t * np.sqrt(-dt)
    elif noise == "cps":
        std = s_next * math.sin(level * math.pi / 2)
        keep = np.sqrt(np.maximum(s_next**2 - std**2, 0.0))  # the kept share of x1
        cx = (1 - s_next) + keep
        cv = -s * (1 - s_next) + (1 - s) * keep
        std_t = std
    elif noise == "ode":
        std_t = std = np.zeros_like(s)
        cx, cv = np.ones_like(s), dt
    else:
        raise ValueError(f"unknown flow noise form {noise!r}; use one of {FLOW_NOISE}")
    start, stop = sde_steps(num_steps, noise, sde_window)
    ode = np.ones(num_steps, bool)
    ode[start:stop] = False
    cx, cv = np.where(ode, 1.0, cx), np.where(ode, dt, cv)
    std, std_t = np.where(ode, 0.0, std), np.where(ode, 0.0, std_t)
    # diffusers' timesteps are the float32 sigmas times 1000, in float32.
    model_t = s.astype(np.float32) * np.float32(1000) if sigmas == "diffusers" else 1000.0 * s
    tables = {
        "model_t": model_t.astype(np.float32),
        "cx": cx.astype(np.float32),
        "cv": cv.astype(np.float32),
        "std": std.astype(np.float32),
        "sde_std": std_t.astype(np.float32),
    }
    if np.any(tables["std"][~ode] <= 0):
        k = int(np.flatnonzero(~ode & (tables["std"] <= 0))[0])
        raise ValueError(
            f"flow step {k} of the SDE window has no noise in float32 (std {std[k]:.3g}): "
            f"raise sample.noise_level={level}"
        )
    return tables
