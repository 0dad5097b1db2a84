"""The flow schedule an SD3 / SD3.5 folder declares (`scheduler/scheduler_config.json`).

SD3 pipelines run `FlowMatchEulerDiscreteScheduler` with a static time
shift (3.0 for SD3-medium and SD3.5): `set_timesteps(N)` spaces N timesteps
linearly between `sigma_max` and `sigma_min` of the scheduler's shifted
1000-entry training table (`sigma_min = shift(1/1000)`, ~0.003 at shift 3),
shifts them a second time and appends 0. The sampler computes exactly these
levels under `sample.sigmas="diffusers"` (`rollout.schedules.
diffusers_flow_sigmas`) with `sample.shift` set to the folder's shift; this
module reads and checks the folder's config, so that options outside SD3's
static-shift schedule are refused by name instead of ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bpgo_jax.errors import ConfigError

DEFAULT_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}  # SD3 / SD3.5 folders
# FlowMatchEulerDiscreteScheduler options that change the levels, and their inactive values.
_INACTIVE = {
    "use_dynamic_shifting": False,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "stochastic_sampling": False,
}


def check_scheduler_config(raw: Mapping[str, Any], where: str = "scheduler config") -> dict:
    """A folder's `scheduler_config.json` as `{"num_train_timesteps", "shift"}`.

    Options that would change the levels (`use_dynamic_shifting`,
    `shift_terminal`, Karras / exponential / beta sigmas, ...) are refused by
    name: SD3's schedule is the static shift.
    """
    cls = raw.get("_class_name", "FlowMatchEulerDiscreteScheduler")
    if cls != "FlowMatchEulerDiscreteScheduler":
        raise ConfigError(f"{where} is a {cls!r}, expected 'FlowMatchEulerDiscreteScheduler'")
    for key, inactive in _INACTIVE.items():
        value = raw.get(key, inactive)
        if value != inactive and not (inactive is False and value is None):
            raise ConfigError(f"{where}: {key}={value!r} is not supported")
    out = dict(DEFAULT_SCHEDULER)
    for key in out:
        if raw.get(key) is not None:
            out[key] = type(out[key])(raw[key])
    return out
