"""Advantages: GRPO group z-scores, BPGO's RAS/CRT forms and DDPO's per-prompt tracker."""

from bpgo_jax.advantages.bpgo import (
    BPGOAdvantages,
    advantage_metrics,
    bayes_weights,
    binary_crt_rewards,
    bpgo_advantages,
    crt_rewards,
    loss_terms,
    ras_weights,
    sign_std_weights,
)
from bpgo_jax.advantages.forms import (
    PRESETS,
    Forms,
    crt_function,
    loss_crt_coef,
    ras_function,
    resolve_forms,
)
from bpgo_jax.advantages.grpo import grpo_advantages, zero_std_groups
from bpgo_jax.advantages.tracker import PerPromptStatTracker

__all__ = [
    "PRESETS",
    "BPGOAdvantages",
    "Forms",
    "PerPromptStatTracker",
    "advantage_metrics",
    "bayes_weights",
    "binary_crt_rewards",
    "bpgo_advantages",
    "crt_function",
    "crt_rewards",
    "grpo_advantages",
    "loss_crt_coef",
    "loss_terms",
    "ras_function",
    "ras_weights",
    "resolve_forms",
    "sign_std_weights",
    "zero_std_groups",
]
