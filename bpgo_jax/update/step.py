"""One optimiser update from a batch of rollout samples, as one jitted function.

Gradients are accumulated inside jit over micro-batches and trained denoising
steps with a single parameter-sized carry (no buffer per step). Each sample
trains on its own random subset of steps (DDPO's `timestep_fraction`).
Non-finite loss or gradients leave the state untouched and are reported.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bpgo_jax.parallel.batching import split_chunks
from bpgo_jax.update.loss import PolicyBatch, step_loss

Params = Any


class TrainState(NamedTuple):
    """Everything the update changes; a pytree checkpointed as a whole."""

    step: jax.Array
    trainable: Params
    opt_state: Any
    ema: Params  # {} when EMA is off
    prior: Any  # bpgo_jax.priors.PriorState
    rng: jax.Array  # raw uint32 key data, checkpointable


def make_optimizer(cfg) -> optax.GradientTransformation:
    """AdamW with global-norm clipping, from `config.train`."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(cfg.lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.adam_eps, weight_decay=cfg.weight_decay),
    )


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def train_step(
    state: TrainState,
    batch: PolicyBatch,
    frozen: Params,
    ref_trainable: Params | None,
    uncond: Any,
    *,
    model,
    sampler,
    optimizer: optax.GradientTransformation,
    num_micro: int,
    num_shards: int,
    num_train_steps: int,
    clip_range: float,
    crt_coef: float,
    kl_beta: float,
    ema_decay: float,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """Accumulates gradients over `num_micro` micro-batches x `num_train_steps` steps."""
    rng, perm_key = jax.random.split(jax.random.wrap_key_data(state.rng))
    batch_size, total_steps = batch.outputs.shape[:2]
    # Each sample trains its own random `num_train_steps` of the trajectory.
    perm_keys = jax.random.split(perm_key, batch_size)
    order = jax.vmap(lambda key: jax.random.permutation(key, total_steps))(perm_keys)
    order = order[:, :num_train_steps]

    loss_fn = functools.partial(
        step_loss,
        model=model,
        sampler=sampler,
        clip_range=clip_range,
        crt_coef=crt_coef,
        kl_beta=kl_beta,
    )
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    micro, micro_order = split_chunks((batch, order), num_micro, num_shards)

    def one_step(acc, i):
        # Item i of the flattened (micro-batch, trained step) loop.
        m, j = i // num_train_steps, i % num_train_steps
        mb = jax.tree.map(lambda x: x[m], micro)
        (_, metrics), grads = grad_fn(
            state.trainable, frozen, ref_trainable, mb, uncond, micro_order[m][:, j]
        )
        return jax.tree.map(jnp.add, acc, grads), metrics

    zeros = jax.tree.map(jnp.zeros_like, state.trainable)
    count = num_micro * num_train_steps
    grads, metrics = jax.lax.scan(one_step, zeros, jnp.arange(count))
    grads = jax.tree.map(lambda g: g / count, grads)
    metrics = {
        name: (m.max() if name.endswith("_max_dev") else m.mean()) for name, m in metrics.items()
    }

    def apply(state: TrainState) -> TrainState:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        ema = state.ema
        if ema_decay:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, trainable)
        return state._replace(
            step=state.step + 1, trainable=trainable, opt_state=opt_state, ema=ema
        )

    finite = _all_finite(grads) & jnp.isfinite(metrics["policy_loss"])
    new = jax.lax.cond(finite, apply, lambda s: s, state)
    new = new._replace(rng=jax.random.key_data(rng))
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["update_skipped"] = (~finite).astype(jnp.float32)
    return new, metrics
