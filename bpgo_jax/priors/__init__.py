"""Per-prompt prior anchors for BPGO (fixed, moving-average, reference-policy, first-frame)."""

from bpgo_jax.priors.state import (
    KINDS,
    STATIC_KINDS,
    PriorState,
    init_prior_state,
    lookup,
    needs_reference,
    update,
)

__all__ = [
    "KINDS",
    "STATIC_KINDS",
    "PriorState",
    "init_prior_state",
    "lookup",
    "needs_reference",
    "update",
]
