"""One optimiser update from a batch of rollout samples.

Gradients are accumulated over micro-batches x trained denoising steps with a
single parameter-sized accumulator (no buffer per step). Each sample trains on
its own random subset of steps (DDPO's `timestep_fraction`), drawn from
`train.timestep_window` (default all steps). Non-finite loss
or gradients leave the state untouched and are reported.

`UpdateStep` runs the accumulation loop as a `lax.scan` or on the host, with
the same arithmetic.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bpgo_jax.advantages.forms import loss_crt_coef
from bpgo_jax.parallel.batching import split_chunks
from bpgo_jax.parallel.mesh import on_mesh
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


class StepOptions(NamedTuple):
    """Static settings of one update, shared by both accumulation loops."""

    model: Any
    sampler: Any
    optimizer: optax.GradientTransformation
    num_micro: int
    num_shards: int
    num_train_steps: int
    window: tuple[int, int]  # steps [start, stop) that training draws from
    clip_range: float
    crt_coef: float
    kl_beta: float
    kl_form: str
    ema_decay: float

    @property
    def count(self) -> int:
        return self.num_micro * self.num_train_steps


def step_options(
    config, layout: dict, num_shards: int, *, model, sampler, optimizer
) -> StepOptions:
    """`StepOptions` from a run config and its `config.batch_layout`.

    Only BPGO with CRT in auxiliary or append mode has a CRT term
    (`advantages.forms.loss_crt_coef`): GRPO, the DDPO tracker and CRT's replace
    mode train on one surrogate.
    """
    t = config.train
    return StepOptions(
        model=model,
        sampler=sampler,
        optimizer=optimizer,
        num_micro=layout["micro_per_update"],
        num_shards=num_shards,
        num_train_steps=layout["trained_steps"],
        window=layout["timestep_window"],
        clip_range=t.clip_range,
        crt_coef=loss_crt_coef(config),
        kl_beta=t.kl_beta,
        kl_form=t.kl_form,
        ema_decay=t.ema_decay,
    )


def make_optimizer(cfg) -> optax.GradientTransformation:
    """AdamW with global-norm clipping, from `config.train`.

    `warmup_updates` > 0 ramps the learning rate linearly from lr / N to lr
    over the first N updates: Adam's first steps move every weight by about
    lr whatever its gradient, which on noisy policy gradients is mostly noise.
    The count lives in the optimizer state, so a resumed run continues it.
    """
    lr = cfg.lr
    if cfg.get("warmup_updates", 0) > 0:
        n = cfg.warmup_updates
        lr = optax.linear_schedule(cfg.lr / n, cfg.lr, n - 1) if n > 1 else cfg.lr
    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.adam_eps, weight_decay=cfg.weight_decay),
    )


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _prepare(state: TrainState, batch: PolicyBatch, opts: StepOptions):
    """Micro-batches, each sample's trained step indices, and the next rng."""
    rng, perm_key = jax.random.split(jax.random.wrap_key_data(state.rng))
    batch_size = batch.outputs.shape[0]
    start, stop = opts.window
    perm_keys = jax.random.split(perm_key, batch_size)
    order = jax.vmap(lambda key: jax.random.permutation(key, stop - start))(perm_keys)
    order = order[:, : opts.num_train_steps] + start
    micro, micro_order = split_chunks((batch, order), opts.num_micro, opts.num_shards)
    return micro, micro_order, jax.random.key_data(rng)


def _accumulate(
    acc, i, trainable, frozen, ref_trainable, micro, micro_order, uncond, opts: StepOptions
):
    """Adds the gradient of item `i` of the flattened (micro-batch, step) loop to `acc`."""
    loss_fn = functools.partial(
        step_loss,
        model=opts.model,
        sampler=opts.sampler,
        clip_range=opts.clip_range,
        crt_coef=opts.crt_coef,
        kl_beta=opts.kl_beta,
        kl_form=opts.kl_form,
    )
    m, j = i // opts.num_train_steps, i % opts.num_train_steps
    mb = jax.tree.map(lambda x: x[m], micro)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable, frozen, ref_trainable, mb, uncond, micro_order[m][:, j]
    )
    return jax.tree.map(jnp.add, acc, grads), metrics


def _finish(state: TrainState, grads, metrics, rng, opts: StepOptions):
    """Averages, applies the update if everything is finite, reduces metrics."""
    grads = jax.tree.map(lambda g: g / opts.count, grads)
    metrics = {
        name: (m.max() if name.endswith("_max_dev") else m.mean()) for name, m in metrics.items()
    }

    def apply(state: TrainState) -> TrainState:
        updates, opt_state = opts.optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        ema = state.ema
        if opts.ema_decay:
            d = opts.ema_decay
            ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, trainable)
        return state._replace(
            step=state.step + 1, trainable=trainable, opt_state=opt_state, ema=ema
        )

    finite = _all_finite(grads) & jnp.isfinite(metrics["loss"])
    new = jax.lax.cond(finite, apply, lambda s: s, state)
    new = new._replace(rng=rng)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["update_skipped"] = (~finite).astype(jnp.float32)
    return new, metrics


def shuffle(batch: PolicyBatch, perm: jax.Array, *, num_updates: int) -> PolicyBatch:
    """Shuffles samples into `[num_updates, train_batch]` optimiser batches.

    Batch u holds samples `perm[u*b : (u+1)*b]` whatever the mesh, so a run
    updates on the same samples on 1 device as on 8.
    """
    return jax.tree.map(lambda x: x[perm].reshape(num_updates, -1, *x.shape[1:]), batch)


def jit_shuffle(num_updates: int, sharding: jax.sharding.NamedSharding):
    """`shuffle` compiled; `sharding` splits axis 1 (the samples) over the batch axes."""
    return jax.jit(functools.partial(shuffle, num_updates=num_updates), out_shardings=sharding)


def _gradient_sum_scan(state, batch, frozen, ref_trainable, uncond, *, opts: StepOptions):
    """`(sum of the item gradients, stacked item metrics, next rng)` in one `lax.scan`."""
    micro, micro_order, rng = _prepare(state, batch, opts)

    def body(acc, i):
        return _accumulate(
            acc, i, state.trainable, frozen, ref_trainable, micro, micro_order, uncond, opts
        )

    zeros = jax.tree.map(jnp.zeros_like, state.trainable)
    grads, metrics = jax.lax.scan(body, zeros, jnp.arange(opts.count))
    return grads, metrics, rng


def train_step(
    state: TrainState,
    batch: PolicyBatch,
    frozen: Params,
    ref_trainable: Params | None,
    uncond: Any,
    *,
    opts: StepOptions,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The whole update as one function: the accumulation loop is a `lax.scan`."""
    grads, metrics, rng = _gradient_sum_scan(state, batch, frozen, ref_trainable, uncond, opts=opts)
    return _finish(state, grads, metrics, rng, opts)


class UpdateStep:
    """One optimiser update, `(state, batch, frozen, ref_trainable, uncond) -> (state,
    metrics)`, on every backend; `accumulate` picks how the gradient loop runs.

    - "scan": `train_step`, one jitted program (GPU/TPU: one dispatch per update).
    - "host": the same arithmetic with the loop on the host around a jitted
      per-item gradient (the accumulator starts at zero and adds item by item in
      the same order). XLA:CPU runs a backward pass inside a while loop many
      times slower than as its own program (docs/performance.md), so "auto"
      picks it on CPU.
    `state` and the accumulator are donated, so no step holds two copies of
    either; output shardings are pinned to the state's, so nothing recompiles. The
    programs that call the model are traced on `metric_sharding`'s mesh (`on_mesh`).
    """

    def __init__(self, opts: StepOptions, *, accumulate: str, state_shardings, metric_sharding):
        if accumulate == "auto":
            accumulate = "host" if jax.default_backend() == "cpu" else "scan"
        self.opts, self.accumulate = opts, accumulate
        mesh = metric_sharding.mesh
        if accumulate == "scan":
            self._step = jax.jit(
                on_mesh(functools.partial(train_step, opts=opts), mesh),
                donate_argnums=(0,),
                out_shardings=(state_shardings, metric_sharding),
            )
            self._scan_sum = jax.jit(
                on_mesh(functools.partial(_gradient_sum_scan, opts=opts), mesh)
            )
            self.jitted = {"train_step": self._step}
            return
        self._prepare = jax.jit(functools.partial(_prepare, opts=opts))
        self._accumulate = jax.jit(
            on_mesh(functools.partial(_accumulate, opts=opts), mesh),
            donate_argnums=(0,),
            out_shardings=(state_shardings.trainable, metric_sharding),
        )
        self._zeros = jax.jit(
            lambda t: jax.tree.map(jnp.zeros_like, t), out_shardings=state_shardings.trainable
        )
        self._finish = jax.jit(
            functools.partial(_finish, opts=opts),
            donate_argnums=(0,),
            out_shardings=(state_shardings, metric_sharding),
        )
        self.jitted = {
            "update_prepare": self._prepare,
            "update_accumulate": self._accumulate,
            "update_finish": self._finish,
        }

    def __call__(self, state, batch, frozen, ref_trainable, uncond):
        if self.accumulate == "scan":
            return self._step(state, batch, frozen, ref_trainable, uncond)
        acc, metrics, rng = self.gradient_sum(state, batch, frozen, ref_trainable, uncond)
        return self._finish(state, acc, metrics, rng)

    def gradient_sum(self, state, batch, frozen, ref_trainable, uncond):
        """(sum of the `opts.count` item gradients, stacked item metrics, next rng)."""
        if self.accumulate == "scan":
            return self._scan_sum(state, batch, frozen, ref_trainable, uncond)
        micro, micro_order, rng = self._prepare(state, batch)
        acc = self._zeros(state.trainable)
        metrics = []
        for i in range(self.opts.count):
            acc, m = self._accumulate(
                acc,
                jnp.int32(i),
                state.trainable,
                frozen,
                ref_trainable,
                micro,
                micro_order,
                uncond,
            )
            metrics.append(m)
        metrics = jax.tree.map(lambda *xs: jnp.stack(xs), *metrics)
        return acc, metrics, rng
