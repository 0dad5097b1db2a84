"""Per-prompt prior anchors R_prior as an explicit, jittable, checkpointable pytree.

Four kinds (`kind` is static configuration):
  fixed          - offline values, e.g. the prompt file's per-prompt `prior`
                   (mean reward of K base-model rollouts); never updated.
  first_frame    - image-to-video: the reward of a static clip of each prompt's
                   conditioning frame (`priors.first_frame`), computed once at
                   the start; then kept as `fixed` is.
  moving_average - EMA of the prompt's past group-mean rewards (BPGO's T2I setup).
  reference      - running mean of the frozen reference policy's rewards for
                   the prompt (BPGO's T2V setup); `needs_reference` tells the
                   engine which prompts still need reference rollouts.
Unseen prompts fall back to a global value of the same kind (the initial value
until anything has been seen).

Order matters: within an epoch call `lookup` BEFORE `update`. The prior is an
expectation formed before seeing the group; if it already contained the
group's own mean, RAS would compare the group with itself.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bpgo_jax.parallel.host import to_host

KINDS = ("fixed", "moving_average", "reference", "first_frame")
STATIC_KINDS = ("fixed", "first_frame")  # values given at init, never updated


class PriorState(NamedTuple):
    """values/counts per prompt id; global_value/global_count for unseen prompts."""

    values: jax.Array  # float32 [P]
    counts: jax.Array  # int32 [P]: groups seen (1 for fixed)
    global_value: jax.Array  # float32 []
    global_count: jax.Array  # int32 []


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"prior kind must be one of {KINDS}, got {kind!r}")


def _concrete(x: object) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_ids(state: PriorState, prompt_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int32 ids [N] and a validity mask; out-of-range ids raise eagerly when concrete."""
    ids = jnp.asarray(prompt_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"prompt_ids must be a 1-D integer array, got {ids.dtype}{ids.shape}")
    num = state.values.shape[0]
    if _concrete(prompt_ids):
        host = to_host(ids)  # ids may be a global array split over other processes
        bad = host[(host < 0) | (host >= num)]
        if bad.size:
            raise ValueError(f"prompt_ids out of range [0, {num}): {bad[:8].tolist()}")
    ids = ids.astype(jnp.int32)
    return ids, (ids >= 0) & (ids < num)


def init_prior_state(
    num_prompts: int,
    *,
    kind: str,
    fixed_values: np.ndarray | None = None,
    init_value: float = 0.0,
) -> PriorState:
    """Fresh state for `num_prompts` prompt ids; `fixed_values` [P] is required for the
    `STATIC_KINDS` ("fixed": the prompt file's priors, "first_frame": `first_frame_priors`)."""
    _check_kind(kind)
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    if kind in STATIC_KINDS:
        if fixed_values is None:
            raise ValueError(
                f"kind={kind!r} needs fixed_values (the prompts' `prior` field, or the "
                "first-frame rewards)"
            )
        v = np.asarray(fixed_values, dtype=np.float32)
        if v.shape != (num_prompts,):
            raise ValueError(f"fixed_values must have shape [{num_prompts}], got {v.shape}")
        if not np.all(np.isfinite(v)):
            missing = np.flatnonzero(~np.isfinite(v))[:8].tolist()
            raise ValueError(f"fixed_values has NaN/inf priors at prompt ids {missing}")
        return PriorState(
            values=jnp.asarray(v),
            counts=jnp.ones(num_prompts, jnp.int32),
            global_value=jnp.asarray(v.mean(), jnp.float32),
            global_count=jnp.asarray(num_prompts, jnp.int32),
        )
    if fixed_values is not None:
        raise ValueError(
            f"fixed_values is only used with kind='fixed' or 'first_frame', got kind={kind!r}"
        )
    return PriorState(
        values=jnp.full(num_prompts, init_value, jnp.float32),
        counts=jnp.zeros(num_prompts, jnp.int32),
        global_value=jnp.asarray(init_value, jnp.float32),
        global_count=jnp.asarray(0, jnp.int32),
    )


def lookup(
    state: PriorState,
    prompt_ids: jax.Array,
    *,
    kind: str,
    clip: tuple[float, float] | None = None,
) -> jax.Array:
    """Priors [N] for `prompt_ids`: the prompt's own value if seen, else the global one.

    Ids outside [0, P) raise when concrete and give NaN under jit, so a bad id
    surfaces as a NaN loss instead of silently reading another prompt's prior.
    `clip` bounds the result (e.g. (0.05, 0.95) for rewards in [0, 1]).
    """
    _check_kind(kind)
    if clip is not None and not clip[0] <= clip[1]:
        raise ValueError(f"clip must be (low, high) with low <= high, got {clip}")
    ids, valid = _check_ids(state, prompt_ids)
    safe = jnp.where(valid, ids, 0)
    # Fixed states have every count at 1, so this reads their own values.
    prior = jnp.where(state.counts[safe] > 0, state.values[safe], state.global_value)
    if clip is not None:
        prior = jnp.clip(prior, clip[0], clip[1])
    return jnp.where(valid, prior, jnp.nan)


def needs_reference(state: PriorState, prompt_ids: jax.Array) -> jax.Array:
    """Bool [N]: prompts with no reference rewards yet (the engine samples them first)."""
    ids, valid = _check_ids(state, prompt_ids)
    return valid & (state.counts[jnp.where(valid, ids, 0)] == 0)


def update(
    state: PriorState,
    prompt_ids: jax.Array,
    group_mean_rewards: jax.Array,
    *,
    kind: str,
    decay: float | None = None,
) -> PriorState:
    """New state after observing one group-mean reward per entry of `prompt_ids`.

    Duplicate ids in one batch are averaged first, then each prompt gets a
    single update. moving_average: first visit sets the value, later ones
    value <- decay * value + (1 - decay) * mean; the global value is the same
    EMA of the batch's mean of group means. reference: `group_mean_rewards`
    must come from the reference policy; values become running means
    (weighted by groups seen), and so does the global value. fixed, first_frame: unchanged.
    Ids outside [0, P) are dropped.
    """
    _check_kind(kind)
    if kind in STATIC_KINDS:
        return state
    if kind == "moving_average":
        if decay is None:
            raise ValueError("kind='moving_average' needs decay")
        if _concrete(decay) and not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
    ids, valid = _check_ids(state, prompt_ids)
    means = jnp.asarray(group_mean_rewards, jnp.float32)
    if means.shape != ids.shape:
        raise ValueError(
            f"group_mean_rewards must have shape {ids.shape} like prompt_ids, got {means.shape}"
        )
    num = state.values.shape[0]
    # Invalid ids go to index `num`, which mode="drop" discards.
    target = jnp.where(valid, ids, num)
    means = jnp.where(valid, means, 0.0)
    sums = jnp.zeros(num, jnp.float32).at[target].add(means, mode="drop")
    n = jnp.zeros(num, jnp.int32).at[target].add(1, mode="drop")
    seen = n > 0
    batch_sum = jnp.sum(means)
    batch_n = jnp.sum(valid.astype(jnp.int32))
    if kind == "moving_average":
        batch_mean = sums / jnp.maximum(n, 1)
        ema = decay * state.values + (1.0 - decay) * batch_mean
        first = jnp.where(state.counts > 0, ema, batch_mean)
        values = jnp.where(seen, first, state.values)
        g_mean = batch_sum / jnp.maximum(batch_n, 1)
        g_ema = decay * state.global_value + (1.0 - decay) * g_mean
        g_new = jnp.where(state.global_count > 0, g_ema, g_mean)
        global_value = jnp.where(batch_n > 0, g_new, state.global_value)
    else:
        total = state.counts + n
        running = (state.values * state.counts + sums) / jnp.maximum(total, 1)
        values = jnp.where(seen, running, state.values)
        g_total = state.global_count + batch_n
        g_running = (state.global_value * state.global_count + batch_sum) / jnp.maximum(g_total, 1)
        global_value = jnp.where(batch_n > 0, g_running, state.global_value)
    return PriorState(
        values=values.astype(jnp.float32),
        counts=state.counts + n,
        global_value=global_value.astype(jnp.float32),
        global_count=state.global_count + batch_n,
    )
