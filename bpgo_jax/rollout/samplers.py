"""Stochastic samplers that return the log-probability of every step they take.

The policy-gradient update needs `log p(x_{t-1} | x_t, c)` of each transition,
under the same Gaussian the sampler drew from. `transition` gives that
Gaussian's mean and std for step k; `sample` runs the whole trajectory in one
`lax.scan`; the update recomputes `transition` for stored steps. Both reach the
network only through `guided_prediction`, evaluated in chunks of a fixed
per-device size, and the update compares its recomputed output with the
stored one (`log_ratio`), so on-policy ratios are exactly 1.

Log-prob convention (every sampler, CPS included): the exact Gaussian
log-density of the step, averaged over the non-batch dimensions (DDPO's
convention, `gaussian_logprob`). Flow-GRPO's CPS code keeps only
`-(x' - mean)^2`: it drops the additive `-log std - log sqrt(2 pi)`, which
cancels in any ratio of two policies' densities of one step, and also the
factor 1 / (2 std^2), which does not: its log-ratio is 2 std^2 times the exact
one (a per-step rescaling of what the PPO clip range bounds). Both are 0
on-policy. Steps with std 0 (ODE steps outside `sample.sde_window`, CPS's
last step) have no density; config validation keeps them out of training.

Held positions: a model may hold some latent positions fixed at values it
derives from the conditioning (`held`: Wan2.2 TI2V's first latent frame, the
conditioning image's latent, as the pipeline's first-frame blend). The
sampler writes those values there at every step instead of drawing them (no
step noise), and the log-probs and ratios average over the drawn positions
only: the policy samples nothing else, so nothing else enters its ratio.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bpgo_jax.errors import ConfigError
from bpgo_jax.models.interface import DiffusionModel
from bpgo_jax.parallel.batching import map_in_chunks
from bpgo_jax.rollout import schedules

Params = Any


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Static sampler description; `tables` are per-step float32 arrays."""

    kind: str  # "ddim" | "flow"
    prediction_type: str
    num_steps: int
    guidance_scale: float
    tables: dict[str, np.ndarray] = dataclasses.field(hash=False, compare=False)
    clip_sample: float | None = None
    # The tables' values, derived: samplers that differ only in noise must not
    # compare (or hash) equal, or a jit cache would hand one the other's program.
    table_values: tuple = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        values = tuple((k, tuple(np.asarray(v).tolist())) for k, v in sorted(self.tables.items()))
        object.__setattr__(self, "table_values", values)

    def __hash__(self):  # static argument of jitted functions
        key = (self.kind, self.prediction_type, self.num_steps, self.guidance_scale)
        return hash((*key, self.clip_sample, self.table_values))


def make_sampler(cfg, model: DiffusionModel) -> Sampler:
    """Builds the sampler of `config.sample` for `model`.

    A sample block without the flow fields `sigmas`, `dynamic_shift` or
    `sde_window` (configs/pretrain.py pins one) gets their defaults;
    `shift=None` takes the model's (`scheduler_shift`).
    """
    if cfg.kind == "ddim":
        if model.prediction_type == "flow":
            raise ValueError("sample.kind='ddim' needs an epsilon/v/sample model, this one is flow")
        sched = dict(schedules.DEFAULT_DDPM, **(model.scheduler_config or {}))
        tables = schedules.ddim_tables(sched, cfg.num_steps, cfg.eta)
        clip = sched.get("clip_sample_range", 1.0) if sched.get("clip_sample", False) else None
    elif cfg.kind == "flow":
        if model.prediction_type != "flow":
            raise ValueError(
                f"sample.kind='flow' needs a flow model, this one predicts {model.prediction_type}"
            )
        dynamic = bool(getattr(cfg, "dynamic_shift", False))
        tables = schedules.flow_tables(
            cfg.num_steps,
            flow_shift(model) if dynamic else scheduler_shift(model, getattr(cfg, "shift", 1.0)),
            cfg.noise,
            cfg.noise_level,
            sigmas=getattr(cfg, "sigmas", "shifted_linear"),
            dynamic=dynamic,
            sde_window=tuple(getattr(cfg, "sde_window", ()) or ()),
        )
        clip = None
    else:
        raise ValueError(f"sample.kind={cfg.kind!r} is not 'ddim' or 'flow'")
    return Sampler(cfg.kind, model.prediction_type, cfg.num_steps, cfg.guidance_scale, tables, clip)


def scheduler_shift(model: DiffusionModel, shift: float | None) -> float:
    """`shift`, or where it is None the static shift of the model's scheduler config
    (e.g. Wan's `flow_shift`: 3.0 for its 480p folders, 5.0 for 720p)."""
    if shift is not None:
        return float(shift)
    value = (getattr(model, "scheduler_config", None) or {}).get("shift")
    if value is None:
        raise ConfigError(
            f"sample.shift=None takes the shift of the model's scheduler config, and model "
            f"{getattr(model, 'name', '?')!r} declares none: set sample.shift"
        )
    return float(value)


def flow_shift(model: DiffusionModel) -> float:
    """FLUX's resolution-dependent shift (`sample.dynamic_shift`) for `model`.

    From the model's image sequence length (`model.image_seq_len`) and the
    end points of its diffusers `scheduler_config`.
    """
    seq_len = getattr(model, "image_seq_len", None)
    if not seq_len:
        raise ConfigError(
            f"sample.dynamic_shift=True needs the model's image sequence length, and "
            f"model {getattr(model, 'name', '?')!r} gives none (a FLUX model does); "
            "set sample.dynamic_shift=False and a static sample.shift"
        )
    return schedules.dynamic_shift(seq_len, getattr(model, "scheduler_config", None))


def guided_prediction(model, guidance_scale, trainable, frozen, x, t, cond, uncond):
    """Network output with classifier-free guidance (one batched call of 2B rows).

    `uncond` is the negative-prompt conditioning with a leading axis of 1.
    """
    if guidance_scale == 1.0:
        return model.predict(trainable, frozen, x, t, cond)
    uncond = jax.tree.map(lambda u: jnp.broadcast_to(u, (x.shape[0], *u.shape[1:])), uncond)
    both = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond, cond)
    out = model.predict(trainable, frozen, jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
    out_u, out_c = jnp.split(out, 2)
    return out_u + guidance_scale * (out_c - out_u)


def transition(sampler: Sampler, k: jax.Array, x: jax.Array, out: jax.Array):
    """Mean and std of the Gaussian step k -> k+1 given the network output.

    `k` is a per-sample int array [B] of step indices.
    """
    tab = {name: jnp.asarray(v)[k] for name, v in sampler.tables.items()}
    bshape = (-1,) + (1,) * (x.ndim - 1)
    col = lambda name: tab[name].reshape(bshape)
    if sampler.kind == "flow":
        mean = col("cx") * x + col("cv") * out
    else:
        a = col("alpha")
        if sampler.prediction_type == "epsilon":
            eps = out
            x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
        elif sampler.prediction_type == "v_prediction":
            x0 = jnp.sqrt(a) * x - jnp.sqrt(1 - a) * out
            eps = jnp.sqrt(a) * out + jnp.sqrt(1 - a) * x
        else:  # "sample"
            x0 = out
            eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
        if sampler.clip_sample is not None:
            x0 = jnp.clip(x0, -sampler.clip_sample, sampler.clip_sample)
        mean = jnp.sqrt(col("alpha_prev")) * x0 + col("dir_coef") * eps
    return mean, col("std")


Held = tuple[jax.Array, jax.Array]  # (drawn: bool mask, values [B, *latent])


def held(model: DiffusionModel, cond: Any) -> Held | None:
    """`model.hold(cond)` for a model that holds latent positions fixed, else None.

    `hold` returns a bool mask broadcastable to `[B, *latent_shape]`, True where
    the sampler draws, and the held positions' values `[B, *latent_shape]`.
    """
    hold = getattr(model, "hold", None)
    return None if hold is None else hold(cond)


def keep_held(x: jax.Array, hold: Held | None) -> jax.Array:
    """`x` with the held positions set to their values (exactly; `x` where none are held)."""
    if hold is None:
        return x
    drawn, values = hold
    return jnp.where(drawn, x, values.astype(x.dtype))


def position_mean(v: jax.Array, drawn: jax.Array | None = None) -> jax.Array:
    """`v` `[B, ...]` averaged over its non-batch dims, or over the `drawn` positions only."""
    axes = tuple(range(1, v.ndim))
    if drawn is None:
        return v.mean(axis=axes)
    drawn = jnp.broadcast_to(drawn, v.shape)
    return jnp.where(drawn, v, 0.0).sum(axis=axes) / drawn.sum(axis=axes).astype(v.dtype)


def gaussian_logprob(
    x_next: jax.Array, mean: jax.Array, std: jax.Array, drawn: jax.Array | None = None
) -> jax.Array:
    """log N(x_next; mean, std^2), averaged over non-batch dims (DDPO convention), or over
    the `drawn` positions of a model that holds the others (`held`).

    The policy's log-probability of a step; the update never computes it, only
    `log_ratio`, its exact difference between two policies.
    """
    lp = -((x_next - mean) ** 2) / (2 * std**2) - jnp.log(std) - 0.5 * math.log(2 * math.pi)
    return position_mean(lp, drawn)


def log_ratio(sampler: Sampler, k, x, x_next, out, old_out, drawn: jax.Array | None = None):
    """log p_new(x_next) - log p_old(x_next) of step k, and the new mean.

    The stored quantity is the behaviour policy's network output, not a
    log-prob: the step mean is linear in the output, so the new mean is the old
    one plus `delta`, the linear part applied to `out - old_out`, and

        log p_new - log p_old = mean(delta * (2 (x_next - mu_old) - delta)) / (2 std^2)

    is exactly 0 whenever the recomputed output equals the rollout's bit for
    bit, however XLA fuses or reorders the arithmetic around it (a difference
    of two rounded log-probs, or of two separately rounded means, is not).
    `drawn`: the positions the sampler draws (`held`), the only ones averaged.
    """
    old_mean, std = transition(sampler, k, x, old_out)
    if sampler.clip_sample is None:
        delta, _ = transition(sampler, k, jnp.zeros_like(x), out - old_out)
    else:  # clipping x0 makes the mean non-linear in the output
        delta = transition(sampler, k, x, out)[0] - old_mean

    terms = delta * (2 * (x_next - old_mean) - delta) / (2 * std**2)
    return position_mean(terms, drawn), old_mean + delta, std


class Trajectory(NamedTuple):
    """One rollout, batch-major. `latents[:, k]` is the input of step k."""

    latents: jax.Array  # [B, T + 1, *latent]
    outputs: jax.Array  # [B, T, *latent] guided network output of each step


def initial_noise(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, 0), shape))(keys)


def step_noise(keys: jax.Array, k: int | jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Noise of step k; a function of the sample's own key only (batch-independent)."""
    return jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, k + 1), shape))(keys)


def sample(
    model: DiffusionModel,
    sampler: Sampler,
    trainable: Params,
    frozen: Params,
    cond: Any,
    uncond: Any,
    keys: jax.Array,
    *,
    num_chunks: int = 1,
    num_shards: int = 1,
    init_keys: jax.Array | None = None,
) -> Trajectory:
    """Runs the whole trajectory in one `lax.scan`.

    `keys` [B] are per-sample PRNG keys: a sample's noise depends on its key
    only, so results do not depend on batch size or sharding. `init_keys` [B]
    (default `keys`) draw the initial noise instead, e.g. one key per group.
    Positions the model holds (`held`) keep their values at every step.
    """
    shape = model.latent_shape
    batch = keys.shape[0]
    hold = held(model, cond)

    def predict_chunk(args):
        x, t, c = args
        return guided_prediction(model, sampler.guidance_scale, trainable, frozen, x, t, c, uncond)

    def body(x, k):
        t = jnp.full((batch,), jnp.asarray(sampler.tables["model_t"])[k])
        out = map_in_chunks(predict_chunk, (x, t, cond), num_chunks, num_shards)
        mean, std = transition(sampler, jnp.full((batch,), k), x, out)
        x_next = keep_held(mean + std * step_noise(keys, k, shape), hold)
        return x_next, (x_next, out)

    x0 = keep_held(initial_noise(keys if init_keys is None else init_keys, shape), hold)
    _, (xs, outs) = jax.lax.scan(body, x0, jnp.arange(sampler.num_steps))
    latents = jnp.concatenate([x0[:, None], jnp.moveaxis(xs, 0, 1)], axis=1)
    return Trajectory(latents, jnp.moveaxis(outs, 0, 1))
