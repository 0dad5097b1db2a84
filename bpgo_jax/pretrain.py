"""Pre-training of the built-in generator: rectified-flow loss on world pairs.

RL post-training needs a base model that already draws the world's scenes
but often gets the caption wrong, so there is reward signal to learn from.
This module holds the data batches (caption dropout included, so
classifier-free guidance works later), the jitted flow-matching step over
*all* parameters (the text encoder is only frozen during RL), the held-out
oracle evaluation with an RL sampler, and `train`, the loop
`launch/pretrain.py` runs. The loop is one of the family of RL's
(`bpgo_jax.train`): the same workdir checks and lock, config record,
Orbax `Checkpointer` and `RunLogger`, so re-running with the same workdir
resumes where it stopped and ends as an uninterrupted run does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from tqdm import tqdm

from bpgo_jax.checkpoint import (
    atomic_write,
    check_run_config,
    config_record,
    export_files,
    lock_workdir,
    prepare_workdir,
)
from bpgo_jax.errors import ConfigError, DivergedError, Preempted, WeightsError
from bpgo_jax.logs import RunLogger, captioned_grid, save_png
from bpgo_jax.models import load_params, save_params
from bpgo_jax.models.interface import DiffusionModel
from bpgo_jax.models.tiny import tiny_model
from bpgo_jax.parallel.host import to_host
from bpgo_jax.parallel.mesh import batch_sharding, make_mesh, replicated
from bpgo_jax.prompts import load_prompts
from bpgo_jax.rollout.samplers import make_sampler, sample
from bpgo_jax.world import oracle, reward_model
from bpgo_jax.world.data import sample_pairs

log = logging.getLogger("bpgo_jax")

Params = Any
TIME_SAMPLINGS = ("uniform", "logit_normal")


class PretrainState(NamedTuple):
    """Everything the step updates; `params` = {"trainable": ..., "frozen": ...}."""

    params: Params
    ema: Params  # exponential moving average of `params` (what gets shipped)
    opt_state: optax.OptState
    step: jax.Array


def pretrain_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
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
) -> PretrainState:
    """Fresh state from random weights, or from `params` = (trainable, frozen) to
    continue training earlier weights (optimizer moments restart)."""
    trainable, frozen = params if params is not None else model.init(rng)
    params = {"trainable": trainable, "frozen": frozen}
    ema = jax.tree.map(jnp.copy, params)  # own buffers: the step donates both
    return PretrainState(params, ema, optimizer.init(params), jnp.zeros((), jnp.int32))


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
) -> jax.Array:
    """Rectified-flow loss: regress the velocity `noise - x0` at `x_s = (1-s) x0 + s noise`.

    `images` are latents in [-1, 1]; the model sees timestep `1000 * s`, the
    convention the flow sampler uses at rollout time.
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
    return jnp.mean(jnp.square(velocity - (noise - images)))


def pretrain_step(
    model: DiffusionModel,
    optimizer: optax.GradientTransformation,
    ema_decay: float,
    time_sampling: str,
    time_shift: float,
    state: PretrainState,
    images: jax.Array,
    tokens: jax.Array,
    rng: jax.Array,
) -> tuple[PretrainState, dict[str, jax.Array]]:
    """One AdamW step on the flow loss; the step's noise is `fold_in(rng, step)`."""
    key = jax.random.fold_in(rng, state.step)
    loss_fn = functools.partial(
        flow_matching_loss,
        model,
        time_sampling=time_sampling,
        time_shift=time_shift,
    )
    loss, grads = jax.value_and_grad(loss_fn)(state.params, images, tokens, key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optax.incremental_update(params, state.ema, 1.0 - ema_decay)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
    return PretrainState(params, ema, opt_state, state.step + 1), metrics


def make_pretrain_step(
    model: DiffusionModel,
    optimizer: optax.GradientTransformation,
    ema_decay: float = 0.0,
    time_sampling: str = "uniform",
    time_shift: float = 1.0,
) -> Callable[..., tuple[PretrainState, dict[str, jax.Array]]]:
    """`step(state, images, tokens, rng) -> (state, metrics)`, jitted, state donated."""
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay={ema_decay} must lie in [0, 1)")
    if time_sampling not in TIME_SAMPLINGS:
        raise ValueError(f"time_sampling={time_sampling!r} is not one of {TIME_SAMPLINGS}")
    if time_shift <= 0.0:
        raise ValueError(f"time_shift={time_shift} must be positive")
    step = functools.partial(pretrain_step, model, optimizer, ema_decay, time_sampling, time_shift)
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
        images.append(to_host(out)[: min(batch_size, n - start)])
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


# ------------------------------------------------------------------ the loop
METRICS_FILE = "pretrain_metrics.jsonl"
# Fields of configs/pretrain.py that may change when a run resumes: they
# change what is written or how it is batched, not the trained weights or
# the evaluations (`evaluate_oracle` does not depend on its batch size).
NEUTRAL_FIELDS = (
    "log_every",
    "export_dir",
    "eval.num_images",
    "eval.batch_size",
    "checkpoint.*",
    "log.*",
)
# An Orbax checkpoint is written at every evaluation (and on SIGTERM); a
# config's optional `checkpoint` block overrides these.
CHECKPOINT_DEFAULTS = {"keep": 2, "use_async": True}


@dataclasses.dataclass
class Progress:
    """The host side of a pre-training run, checkpointed beside `PretrainState`."""

    step: int = 0  # steps done
    data_rng: dict | None = None  # the batch generator's state (numpy bit generator)
    evals: list[dict] = dataclasses.field(default_factory=list)
    last_loss: float | None = None  # the latest logged loss
    seconds: float = 0.0  # training time of every run of this workdir
    stopped: bool = False  # an evaluation reached eval.stop_accuracy


def image_model_block(cfg: ml_collections.ConfigDict) -> dict:
    """`config.model` as configs/image.py spells it (init: where the weights ship)."""
    return cfg.model.to_dict() | {"init": "bpgo_jax/world/assets/generator.msgpack"}


def run_lineage(init: str) -> list[dict]:
    """Earlier runs behind `init` (a WORKDIR/checkpoints/step_N.msgpack), oldest first.

    Read from each run's WORKDIR/run.json (or an exported generator's
    generator.json), so a model trained in several continued runs ships with
    every command that made it.
    """
    if init == "random":
        return []
    path = Path(init)
    run_file = path.resolve().parent.parent / "run.json"  # (parents[1] fails near the root)
    shipped = path.with_suffix(".json")  # an exported generator records its own lineage
    if not run_file.is_file() and shipped.is_file():
        info = json.loads(shipped.read_text())
        return info["continues"] + [{"command": info["command"], "steps": info["steps"]}]
    if not run_file.is_file():
        return [{"init": init}]
    prev = json.loads(run_file.read_text())
    steps = int(path.stem.removeprefix("step_")) if path.stem.startswith("step_") else None
    return prev["lineage"] + [{"command": prev["command"], "steps": steps}]


def text_init_record(cfg: ml_collections.ConfigDict) -> dict | None:
    """Where a fresh generator's text encoder came from, with the command that
    trained that tower when its workdir has one (launch/train_reward_model.py)."""
    if not cfg.text_init or cfg.model.init != "random":
        return None
    run_file = Path(cfg.text_init).resolve().parent / "run.json"
    command = json.loads(run_file.read_text())["command"] if run_file.is_file() else None
    return {"path": cfg.text_init, "command": command}


def export_path(workdir: Path, step: int) -> Path:
    """The EMA weights evaluated at `step` (what `pick_checkpoint` chooses among)."""
    return workdir / "checkpoints" / f"step_{step}.msgpack"


@contextlib.contextmanager
def sigterm_flag() -> Iterator[Callable[[], bool]]:
    """`preempted()` turns True once SIGTERM arrives (main thread only; elsewhere never)."""
    got = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield got.is_set
        return

    def handler(signum, frame):
        del signum, frame
        log.warning("SIGTERM received: saving a checkpoint after this step, then exiting")
        got.set()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield got.is_set
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(
    cfg: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    command: str,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Pre-trains the generator of `cfg` (configs/pretrain.py) in `workdir`.

    Writes WORKDIR/pretrain_metrics.jsonl (loss every `log_every` steps,
    held-out oracle accuracy at every evaluation), checkpoints/ (an Orbax
    checkpoint and the EMA weights, step_N.msgpack, at every evaluation),
    run.json (`command` and the runs behind `model.init`), and the shipped
    pick as generator.msgpack + generator.json + samples.png (also into
    `export_dir` when set). Re-running with the same workdir resumes from its
    latest checkpoint and ends with the weights and metrics an uninterrupted
    run gives; SIGTERM saves a checkpoint after the current step and raises
    `errors.Preempted` (the first loss row after that resume averages only
    the steps since it). `model.init` and `text_init` start a fresh workdir
    only: one with a checkpoint resumes it. Returns generator.json's record.
    """
    workdir = prepare_workdir(workdir)
    with lock_workdir(workdir):
        check_run_config(workdir, cfg, allow_change=allow_config_change, neutral=NEUTRAL_FIELDS)
        return _train(cfg, workdir, command)


def _train(cfg: ml_collections.ConfigDict, workdir: Path, command: str) -> dict[str, Any]:
    from bpgo_jax.checkpoint import Checkpointer  # (Orbax takes seconds to import)

    # One data axis over every device: each step's batch is split over them
    # and the parameters replicated (the model is small).
    mesh = make_mesh((-1,), ("data",))
    for field, size in (("train", cfg.train.batch_size), ("eval", cfg.eval.batch_size)):
        if size % mesh.size:
            raise ConfigError(
                f"config.{field}.batch_size={size} is not divisible by the {mesh.size} devices"
            )
    shard, replicate = batch_sharding(mesh), replicated(mesh)
    if cfg.model.name != "tiny_unet":
        raise ConfigError(f"config.model.name={cfg.model.name!r}: only tiny_unet is pre-trained")
    try:
        model = tiny_model(cfg.model)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    lineage = run_lineage(cfg.model.init)
    atomic_write(
        workdir / "run.json", json.dumps({"command": command, "lineage": lineage}, indent=1) + "\n"
    )

    tc = cfg.train
    optimizer = pretrain_optimizer(tc)
    rng = jax.random.key(cfg.seed)
    # The structure loaded weights must have (shapes only: a bad file fails at once).
    abstract = jax.eval_shape(model.init, rng)

    def load(field: str, path: str):
        try:
            return load_params(path, abstract)
        except ValueError as err:
            raise WeightsError(f"config.{field}: {err}") from err

    if cfg.model.init != "random":  # continue from earlier weights (a checkpoint)
        start_params = load("model.init", cfg.model.init)
    elif cfg.text_init:  # a fresh UNet over a CLIP-like model's text tower
        try:
            tower = reward_model.load(cfg.text_init)[0].get("text_tower")
            if tower is None:
                raise ValueError("no text_tower in it: not a WorldCLIP model")
            trainable, frozen = model.init(rng)
            start_params = (trainable, {"text": text_from_clip(frozen["text"], tower)})
        except ValueError as err:
            raise ConfigError(f"config.text_init={cfg.text_init!r}: {err}") from err
    else:
        start_params = model.init(rng)
    state = jax.device_put(init_state(model, optimizer, rng, start_params), replicate)
    step_fn = make_pretrain_step(model, optimizer, tc.ema_decay, tc.time_sampling, tc.time_shift)
    step_rng = jax.random.key(cfg.seed + 1)
    data_rng = np.random.default_rng(cfg.seed)

    heldout = load_prompts(cfg.eval.prompts_path)
    prompts = list(heldout.prompts)
    constraints = [m["constraints"] for m in heldout.metadata]
    compiled = make_generate(model, cfg.sample)

    def generate(trainable, frozen, tokens, keys):
        return compiled(trainable, frozen, *jax.device_put((tokens, keys), shard))

    def evaluate(ema, n):
        return evaluate_oracle(
            model,
            ema["trainable"],
            ema["frozen"],
            cfg.sample,
            prompts[:n],
            constraints[:n],
            seed=cfg.eval.seed,
            batch_size=cfg.eval.batch_size,
            generate=generate,
        )

    ckpt_cfg = {**CHECKPOINT_DEFAULTS, **(cfg.get("checkpoint") or {})}
    ckpt = Checkpointer(
        workdir / "checkpoints", keep=ckpt_cfg["keep"], use_async=ckpt_cfg["use_async"]
    )
    logger = RunLogger(
        workdir, cfg.get("log"), run_config=config_record(cfg), metrics_file=METRICS_FILE
    )
    try:
        # The state is replicated over the data-parallel mesh, so its host copy
        # is all of it: saved as host arrays, a checkpoint skips Orbax's
        # per-device bookkeeping (seconds per save for ~700 small tensors).
        progress = Progress()
        host_like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        restored = ckpt.restore_latest(host_like)
        if restored is not None:
            _, host_state, meta = restored
            state = jax.device_put(host_state, replicate)
            progress = Progress(**{f.name: meta[f.name] for f in dataclasses.fields(Progress)})
            data_rng.bit_generator.state = progress.data_rng
            log.info("resumed %s at step %d", workdir, progress.step)
        # Rows of steps after the checkpoint are computed again (all rows without one).
        logger.truncate_after(progress.step + 1, key="step")

        def save_checkpoint() -> None:
            progress.data_rng = data_rng.bit_generator.state
            ckpt.save(progress.step, to_host(state), dataclasses.asdict(progress), force=True)

        window, start = [], time.time() - progress.seconds
        first = tc.steps + 1 if progress.stopped else progress.step + 1  # (empty when done)
        with sigterm_flag() as preempted:
            bar = tqdm(
                range(first, tc.steps + 1),
                desc="pretrain",
                initial=first - 1,
                total=tc.steps,
                dynamic_ncols=True,
            )
            for step in bar:
                batch = sample_batch(
                    data_rng,
                    tc.batch_size,
                    model.tokenize,
                    cfg.data.caption_dropout,
                    cfg.data.split,
                )
                images, tokens = jax.device_put((batch["images"], batch["tokens"]), shard)
                state, metrics = step_fn(state, images, tokens, step_rng)
                progress.step = step
                window.append(metrics)
                if step % cfg.log_every == 0 or step == tc.steps:
                    got = to_host(window)
                    loss = float(np.mean([m["loss"] for m in got]))
                    if not np.isfinite(loss):
                        raise DivergedError(
                            f"pre-training loss is {loss} at step {step}; the last checkpoint "
                            f"is in {ckpt.directory}"
                        )
                    window = []
                    progress.seconds = time.time() - start
                    record = {"step": step, "loss": loss, "seconds": round(progress.seconds, 1)}
                    record["grad_norm"] = float(np.mean([m["grad_norm"] for m in got]))
                    ckpt.wait()  # a failed checkpoint save stops the run here
                    logger.metrics(record)
                    progress.last_loss = loss
                    bar.set_postfix(loss=f"{loss:.4f}")
                if step % cfg.eval.every == 0 or step == tc.steps:
                    acc = float(evaluate(state.ema, cfg.eval.num_prompts)[0])
                    save_params(
                        export_path(workdir, step), state.ema["trainable"], state.ema["frozen"]
                    )
                    progress.seconds = time.time() - start
                    record = {"step": step, "oracle_accuracy": acc, "seconds": progress.seconds}
                    progress.evals.append(record | {"loss": progress.last_loss})
                    ckpt.wait()
                    logger.metrics(record)
                    n = cfg.eval.num_prompts
                    tqdm.write(f"step {step}: held-out oracle accuracy {acc:.3f} ({n})")
                    # Good enough: more only eats RL headroom.
                    progress.stopped = acc >= cfg.eval.stop_accuracy
                    save_checkpoint()
                    if progress.stopped:
                        break
                elif preempted():
                    progress.seconds = time.time() - start
                    save_checkpoint()
                if preempted():
                    ckpt.wait()
                    raise Preempted(f"checkpoint of step {step} saved in {ckpt.directory}")
        ckpt.wait()

        return _ship(cfg, workdir, command, lineage, progress, state, evaluate, prompts)
    finally:
        try:
            ckpt.close()
        finally:
            logger.close()


def _ship(
    cfg: ml_collections.ConfigDict,
    workdir: Path,
    command: str,
    lineage: list[dict],
    progress: Progress,
    state: PretrainState,
    evaluate: Callable[[Params, int], tuple[float, np.ndarray, np.ndarray]],
    prompts: Sequence[str],
) -> dict[str, Any]:
    """Evaluates the picked checkpoint on `eval.final_num_prompts` and writes
    generator.msgpack, generator.json and samples.png (and the export copies)."""
    tc = cfg.train
    chosen = pick_checkpoint(progress.evals, cfg.eval.max_accuracy)
    ema = (state.ema["trainable"], state.ema["frozen"])
    trainable, frozen = load_params(export_path(workdir, chosen["step"]), ema)
    n = min(cfg.eval.final_num_prompts, len(prompts))
    acc, ok, images = evaluate({"trainable": trainable, "frozen": frozen}, n)
    k = min(cfg.eval.num_images, n)
    labels = [f"{'OK' if o else '--'} {p}" for o, p in zip(ok[:k], prompts[:k], strict=True)]
    save_png(workdir / "samples.png", captioned_grid(images[:k], labels))
    save_params(workdir / "generator.msgpack", trainable, frozen)
    info = {
        "model": image_model_block(cfg),
        "command": command,
        "continues": lineage,
        "steps": chosen["step"],
        "steps_all_runs": chosen["step"] + sum(r.get("steps") or 0 for r in lineage),
        "total_steps": tc.steps,
        "batch_size": tc.batch_size,
        "final_loss": chosen["loss"],
        "heldout_oracle_accuracy": acc,
        "heldout_num_prompts": n,
        "heldout_prompts": Path(cfg.eval.prompts_path).name,
        "eval_seed": cfg.eval.seed,
        "sampler": {
            k: cfg.sample[k]
            for k in ("kind", "num_steps", "noise", "noise_level", "shift", "guidance_scale")
        },
        "weights": f"EMA (decay {tc.ema_decay:g})",
        "text_init": text_init_record(cfg),
        "train_seconds": round(progress.evals[-1]["seconds"], 1),
        "evaluations": [{k: e[k] for k in ("step", "oracle_accuracy")} for e in progress.evals],
    }
    atomic_write(workdir / "generator.json", json.dumps(info, indent=1) + "\n")
    if cfg.export_dir:
        export_files(cfg.export_dir, workdir, ("generator.msgpack", "generator.json"))
    return info
