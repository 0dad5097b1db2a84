"""Pre-training of the built-in generator: rectified-flow loss on world pairs.

RL post-training needs a base model that already draws the world's scenes
but often gets the caption wrong, so there is reward signal to learn from.
This module holds the pure parts of making one: the host-side data batches
(caption dropout included, so classifier-free guidance works later), the
jitted flow-matching step over *all* parameters (the text encoder is only
frozen during RL), and the held-out oracle evaluation with an RL sampler.
`launch/pretrain.py` drives them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from bpgo_jax.models.interface import DiffusionModel
from bpgo_jax.rollout.samplers import guided_prediction, make_sampler, sample
from bpgo_jax.world import oracle
from bpgo_jax.world.data import sample_pairs

Params = Any
TIME_SAMPLINGS = ("uniform", "logit_normal")


class TrainState(NamedTuple):
    """Everything the step updates; `params` = {"trainable": ..., "frozen": ...}."""

    params: Params
    ema: Params  # exponential moving average of `params` (what gets shipped)
    opt_state: optax.OptState
    step: jax.Array


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with linear warm-up, cosine decay and global-norm clipping.

    Weight decay skips vectors (biases, norm scales): decaying them only hurts.
    With `cfg.freeze_text` the text encoder (`params["frozen"]`) gets no
    updates, as a pretrained CLIP text encoder stays frozen under a real UNet.
    """
    warmup = min(cfg.warmup_steps, cfg.steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, warmup, cfg.steps, end_value=cfg.lr * cfg.final_lr_fraction
    )
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask),
    )
    if not cfg.get("freeze_text", False):
        return adamw
    labels = lambda params: {k: "train" if k == "trainable" else "freeze" for k in params}
    return optax.multi_transform({"train": adamw, "freeze": optax.set_to_zero()}, labels)


def text_from_clip(text: Params, tower: Params) -> Params:
    """The generator's text encoder initialised from a CLIP-like text tower.

    A text encoder trained with the flow loss alone learns words slowly (a
    linear probe on the shipped flow generator's pooled text features reads an
    object's shape 78% of the time, on the reward model's text tower 98%), so,
    as Stable Diffusion builds on CLIP's, the generator can start from
    WorldCLIP's (`bpgo_jax.world.reward_model`: same tokenizer, layer
    layout and names). Every parameter the two share by name and shape is
    copied; the generator's deeper layers keep their initialisation with
    zeroed output projections, so they start as the identity and the copied
    features reach the UNet unchanged.
    """
    flat = traverse_util.flatten_dict(text, sep="/")
    donor = traverse_util.flatten_dict(tower, sep="/")
    shared = [k for k, v in flat.items() if k in donor and donor[k].shape == v.shape]
    if "token_embedding/embedding" not in shared:
        raise ValueError("the text tower does not match the generator's text encoder")
    out = {k: jnp.asarray(donor[k]) if k in shared else v for k, v in flat.items()}
    copied = {k.split("/")[0] for k in shared}
    for k, v in flat.items():
        layer, _, rest = k.partition("/")
        output = layer.startswith("mlp_out_") or (layer.startswith("attn_") and rest[:4] == "out/")
        if output and layer not in copied:
            out[k] = jnp.zeros_like(v)
    return traverse_util.unflatten_dict(out, sep="/")


def init_state(
    model: DiffusionModel,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    params: tuple[Params, Params] | None = None,
) -> TrainState:
    """Fresh state from random weights, or from `params` = (trainable, frozen) to
    continue training earlier weights (optimizer moments restart)."""
    trainable, frozen = params if params is not None else model.init(rng)
    params = {"trainable": trainable, "frozen": frozen}
    ema = jax.tree.map(jnp.copy, params)  # own buffers: the step donates both
    return TrainState(params, ema, optimizer.init(params), jnp.zeros((), jnp.int32))


def sample_times(rng: jax.Array, n: int, kind: str, shift: float = 1.0) -> jax.Array:
    """Noise levels s in (0, 1): uniform or SD3's logit-normal, then time-shifted.

    `shift > 1` warps s -> shift*s / (1 + (shift-1)*s) (the sampler's shift
    formula): more training at high noise, where layout and the caption's
    colours and shapes are decided.
    """
    if kind == "uniform":
        s = jax.random.uniform(rng, (n,), minval=1e-3, maxval=1.0)
    elif kind == "logit_normal":
        s = jax.nn.sigmoid(jax.random.normal(rng, (n,)))
    else:
        raise ValueError(f"time_sampling={kind!r} is not one of {TIME_SAMPLINGS}")
    return shift * s / (1.0 + (shift - 1.0) * s)


def flow_matching_loss(
    model: DiffusionModel,
    params: Params,
    images: jax.Array,
    tokens: jax.Array,
    rng: jax.Array,
    time_sampling: str = "uniform",
    time_shift: float = 1.0,
    teacher: Params | None = None,
    empty_tokens: jax.Array | None = None,
    guidance_scale: float = 1.0,
) -> jax.Array:
    """Rectified-flow loss: regress the velocity `noise - x0` at `x_s = (1-s) x0 + s noise`.

    `images` are latents in [-1, 1]; the model sees timestep `1000 * s`, the
    convention the flow sampler uses at rollout time. With `teacher` params
    the target is instead the teacher's classifier-free-guided velocity
    `v(empty) + guidance_scale * (v(caption) - v(empty))` at the same `x_s`
    (guidance distillation): the student then follows captions as the
    guided teacher does at the cost of one network call per step, which is
    what RL rollouts and updates pay for. Dropped (empty) captions get the
    teacher's unconditional velocity, so the student keeps working with CFG.
    """
    if model.prediction_type != "flow":
        raise ValueError(f"pre-training needs a flow model, got {model.prediction_type!r}")
    k_noise, k_time = jax.random.split(rng)
    noise = jax.random.normal(k_noise, images.shape, images.dtype)
    s = sample_times(k_time, images.shape[0], time_sampling, time_shift)
    s_b = s.reshape((-1,) + (1,) * (images.ndim - 1))
    x_s = (1.0 - s_b) * images + s_b * noise
    cond = model.encode_text(params["frozen"], tokens)
    velocity = model.predict(params["trainable"], params["frozen"], x_s, 1000.0 * s, cond)
    if teacher is None:
        target = noise - images
    else:
        t_cond = model.encode_text(teacher["frozen"], tokens)
        t_empty = model.encode_text(teacher["frozen"], empty_tokens)
        target = jax.lax.stop_gradient(
            guided_prediction(
                model,
                guidance_scale,
                teacher["trainable"],
                teacher["frozen"],
                x_s,
                1000.0 * s,
                t_cond,
                t_empty,
            )
        )
    return jnp.mean(jnp.square(velocity - target))


def train_step(
    model: DiffusionModel,
    optimizer: optax.GradientTransformation,
    ema_decay: float,
    time_sampling: str,
    time_shift: float,
    guidance_scale: float,
    state: TrainState,
    images: jax.Array,
    tokens: jax.Array,
    rng: jax.Array,
    teacher: Params | None = None,
    empty_tokens: jax.Array | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One AdamW step on the flow loss; the step's noise is `fold_in(rng, step)`."""
    key = jax.random.fold_in(rng, state.step)
    loss_fn = functools.partial(
        flow_matching_loss,
        model,
        time_sampling=time_sampling,
        time_shift=time_shift,
        teacher=teacher,
        empty_tokens=empty_tokens,
        guidance_scale=guidance_scale,
    )
    loss, grads = jax.value_and_grad(loss_fn)(state.params, images, tokens, key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optax.incremental_update(params, state.ema, 1.0 - ema_decay)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
    return TrainState(params, ema, opt_state, state.step + 1), metrics


def make_train_step(
    model: DiffusionModel,
    optimizer: optax.GradientTransformation,
    ema_decay: float = 0.0,
    time_sampling: str = "uniform",
    time_shift: float = 1.0,
    guidance_scale: float = 1.0,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """`step(state, images, tokens, rng[, teacher, empty_tokens]) -> (state, metrics)`.

    Jitted, state donated. Given `teacher` params and the empty prompt's
    `empty_tokens` [1, L], it distils the teacher's guided velocity at
    `guidance_scale` (see `flow_matching_loss`).
    """
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay={ema_decay} must lie in [0, 1)")
    if time_sampling not in TIME_SAMPLINGS:
        raise ValueError(f"time_sampling={time_sampling!r} is not one of {TIME_SAMPLINGS}")
    if time_shift <= 0.0:
        raise ValueError(f"time_shift={time_shift} must be positive")
    if guidance_scale < 1.0:
        raise ValueError(f"guidance_scale={guidance_scale} must be >= 1")
    step = functools.partial(
        train_step, model, optimizer, ema_decay, time_sampling, time_shift, guidance_scale
    )
    return jax.jit(step, donate_argnums=(0,))


def drop_captions(captions: Sequence[str], rng: np.random.Generator, p: float) -> list[str]:
    """Each caption replaced by the empty prompt with probability `p` (for CFG)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption_dropout={p} must lie in [0, 1]")
    keep = rng.random(len(captions)) >= p
    return [c if k else "" for c, k in zip(captions, keep, strict=True)]


def sample_batch(
    rng: np.random.Generator,
    batch_size: int,
    tokenize: Callable[[Sequence[str]], np.ndarray],
    caption_dropout: float = 0.1,
    split: str = "train",
) -> dict[str, np.ndarray]:
    """World pairs as model inputs: images in [-1, 1] and (possibly dropped) caption ids."""
    images, captions, _ = sample_pairs(rng, batch_size, split)
    x = images.astype(np.float32) / 127.5 - 1.0
    return {"images": x, "tokens": tokenize(drop_captions(captions, rng, caption_dropout))}


def make_generate(
    model: DiffusionModel, sample_cfg: ml_collections.ConfigDict
) -> Callable[[Params, Params, np.ndarray, jax.Array], jax.Array]:
    """Jitted `generate(trainable, frozen, tokens, keys) -> images [B, H, W, 3] in [0, 1]`.

    Uses the RL rollout sampler of `sample_cfg` itself, so accuracy measured
    with a run's sampler is the accuracy that run starts from.
    """
    sampler = make_sampler(sample_cfg, model)
    negative = model.tokenize([sample_cfg.negative_prompt])

    def generate(trainable, frozen, tokens, keys):
        cond = model.encode_text(frozen, tokens)
        uncond = model.encode_text(frozen, jnp.asarray(negative))
        traj = sample(model, sampler, trainable, frozen, cond, uncond, keys)
        return model.decode(frozen, traj.latents[:, -1])

    return jax.jit(generate)


def evaluate_oracle(
    model: DiffusionModel,
    trainable: Params,
    frozen: Params,
    sample_cfg: ml_collections.ConfigDict,
    prompts: Sequence[str],
    constraints: Sequence[Mapping[str, Any]],
    *,
    seed: int = 0,
    batch_size: int = 64,
    generate: Callable | None = None,
) -> tuple[float, np.ndarray, np.ndarray]:
    """(exact-oracle accuracy, per-prompt bools, images) of one sample per prompt.

    Sample i uses key `split(key(seed), N)[i]`, and the sampler's noise depends
    on that key only, so results do not depend on `batch_size`. The last batch
    is padded to `batch_size` to avoid a recompile. Pass `generate` (from
    `make_generate`) to reuse a compiled sampler across calls.
    """
    if len(prompts) != len(constraints):
        raise ValueError(f"{len(prompts)} prompts but {len(constraints)} constraints")
    if not prompts:
        raise ValueError("evaluate_oracle needs at least one prompt")
    generate = generate or make_generate(model, sample_cfg)
    n = len(prompts)
    keys = jax.random.split(jax.random.key(seed), n)
    tokens = model.tokenize(list(prompts))
    images = []
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size).clip(max=n - 1)
        out = generate(trainable, frozen, tokens[idx], keys[idx])
        images.append(np.asarray(out)[: min(batch_size, n - start)])
    images = np.concatenate(images)
    acc, ok = oracle.accuracy(images, constraints)
    return acc, ok, images


def pick_checkpoint(evals: Sequence[Mapping[str, Any]], max_accuracy: float) -> Mapping[str, Any]:
    """The last evaluation with `oracle_accuracy <= max_accuracy`, else the first.

    RL needs headroom: a base model that already satisfies most prompts
    leaves little reward variance to learn from.
    """
    if not evals:
        raise ValueError("pick_checkpoint needs at least one evaluation")
    ok = [e for e in evals if e["oracle_accuracy"] <= max_accuracy]
    return ok[-1] if ok else evals[0]
