"""Advantages: GRPO group z-scores, BPGO's RAS/CRT terms and DDPO's per-prompt tracker."""

from bpgo_jax.advantages.bpgo import (
    BPGOAdvantages,
    advantage_metrics,
    bpgo_advantages,
    crt_rewards,
    ras_weights,
)
from bpgo_jax.advantages.grpo import grpo_advantages, zero_std_groups
from bpgo_jax.advantages.tracker import PerPromptStatTracker

__all__ = [
    "BPGOAdvantages",
    "PerPromptStatTracker",
    "advantage_metrics",
    "bpgo_advantages",
    "crt_rewards",
    "grpo_advantages",
    "ras_weights",
    "zero_std_groups",
]
