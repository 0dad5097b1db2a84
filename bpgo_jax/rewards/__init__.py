"""Rewards: registry, built-in rewards and weighted multi-reward composition."""

from __future__ import annotations

import importlib

from bpgo_jax.rewards import colour, jpeg, remote, video  # noqa: F401  (registers built-ins)
from bpgo_jax.rewards.base import Reward, build, names, register
from bpgo_jax.rewards.compose import RewardSet, build_reward_set

# Modules that register more rewards; imported when a config asks for a name
# that is not registered yet, so optional heavy dependencies load lazily.
PLUGIN_MODULES = (
    "bpgo_jax.world.rewards",
    "bpgo_jax.rewards.clip_rewards",
    "bpgo_jax.rewards.videoclip_xl",
)


def load_plugins(extra: tuple[str, ...] = ()) -> None:
    for module in (*PLUGIN_MODULES, *extra):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if module in extra or not err.name or not module.startswith(err.name):
                raise


__all__ = ["Reward", "RewardSet", "build", "build_reward_set", "load_plugins", "names", "register"]
