"""Per-prompt prior anchors for BPGO (fixed, moving-average, reference-policy)."""

from bpgo_jax.priors.state import (
    KINDS,
    PriorState,
    init_prior_state,
    lookup,
    needs_reference,
    update,
)

__all__ = ["KINDS", "PriorState", "init_prior_state", "lookup", "needs_reference", "update"]
