"""Set-up of a run: devices and mesh, model, rewards, prompts, compiled stages, state.

`build_run` makes everything sampling needs (`Run`); `build_training` adds
what training needs (optimiser, compiled advantages / update stages, initial
`TrainState`). `load_policy` is the read-only path of the tools that sample a
checkpoint: it allocates no optimiser state and writes nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bpgo_jax import advantages as adv_lib
from bpgo_jax import priors as prior_lib
from bpgo_jax import runtime
from bpgo_jax.advantages.step import jit_advantages_step
from bpgo_jax.checkpoint import Checkpointer, workdir_path
from bpgo_jax.config import check_inputs, validate
from bpgo_jax.errors import ConfigError, WorkdirError
from bpgo_jax.models import build_model
from bpgo_jax.parallel import mesh as mesh_lib
from bpgo_jax.parallel.host import from_host
from bpgo_jax.prompts import PromptSet, check_prompt_lengths
from bpgo_jax.rewards import RewardSet, build_reward_set
from bpgo_jax.rollout import samplers
from bpgo_jax.rollout.step import Rollout, generate, jit_rollout_step
from bpgo_jax.update.step import TrainState, UpdateStep, jit_shuffle, make_optimizer, step_options

log = logging.getLogger("bpgo_jax")
Params = Any


@dataclasses.dataclass
class Run:
    """The parts of a run that do not change while it trains."""

    config: ml_collections.ConfigDict
    layout: dict  # `config.batch_layout`
    mesh: Mesh
    batch_sharding: NamedSharding
    replicated: NamedSharding
    num_shards: int
    model: Any  # models.interface.DiffusionModel
    sampler: samplers.Sampler
    eval_sampler: samplers.Sampler  # the sampler with eval.noise (the same by default)
    rewards: RewardSet
    reward_params: dict
    prompts: PromptSet
    # (metric suffix, prompts): eval.prompts_path (suffix ""), then eval.extra_prompts.
    eval_sets: list[tuple[str, PromptSet]]
    eval_rewards: RewardSet | None
    eval_reward_params: dict | None
    frozen: Params
    uncond_tokens: jax.Array
    uncond: Any  # negative-prompt conditioning, leading axis 1
    rollout_fn: Any  # rollout.step.rollout_step, compiled
    eval_fn: Any  # the same with the eval sampler and rewards (None without evaluation)
    progress: bool  # tqdm bars (process 0)

    def generate(
        self,
        ids: np.ndarray,
        prompt_set: PromptSet,
        *,
        per_prompt: int,
        trainable,
        epoch_key,
        desc: str = "rollout",
        evaluation: bool = False,
    ) -> Rollout:
        """`per_prompt` samples of prompts `ids`, scored by the training (or eval) rewards."""
        return generate(
            self.eval_fn if evaluation else self.rollout_fn,
            prompt_set,
            ids,
            per_prompt=per_prompt,
            batch_size=self.config.sample.batch_size,
            tokenize=self.model.tokenize,
            reward_set=self.eval_rewards if evaluation else self.rewards,
            reward_params=self.eval_reward_params if evaluation else self.reward_params,
            trainable=trainable,
            frozen=self.frozen,
            uncond_tokens=self.uncond_tokens,
            epoch_key=epoch_key,
            batch_sharding=self.batch_sharding,
            progress=self.progress,
            desc=desc,
        )

    def epoch_key(self, epoch: int, stream: int) -> jax.Array:
        """Replicated key data of (seed, epoch, stream): 0 rollout, 1 reference, 2 eval."""
        key = jax.random.fold_in(
            jax.random.fold_in(jax.random.key(self.config.seed), epoch), stream
        )
        return from_host(jax.random.key_data(key), self.replicated)


@dataclasses.dataclass
class Training:
    """What training adds to a `Run`: optimiser, compiled stages, reference policy."""

    optimizer: Any
    state_shardings: TrainState
    advantages_fn: Any  # advantages.step.advantages_step, compiled
    shuffle_fn: Any  # update.step.shuffle, compiled
    update: UpdateStep
    ref_trainable: Params | None  # the initial policy (KL term, reference priors)
    tracker: adv_lib.PerPromptStatTracker | None  # host state of advantage.method=ddpo_tracker


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """Joins the multi-process job `config.distributed` describes, when it asks to
    (the launchers' `--distributed` flags do the same and take precedence)."""
    dist = config.distributed
    if dist.initialize:
        runtime.initialize_distributed(
            dist.coordinator_address, dist.num_processes, dist.process_id
        )


def _gathered(model, mesh: Mesh):
    """The model with its parameters all-gathered before each network call.

    With an fsdp axis the SPMD partitioner may split the network's matmuls
    differently in the rollout and in the differentiated update; gathering
    first makes both compute the same per-device program, so on-policy ratios
    stay exactly 1. Optimiser state and gradients remain sharded.
    """
    replicated = NamedSharding(mesh, P())

    def predict(trainable, frozen, x, t, cond):
        gather = lambda tree: jax.lax.with_sharding_constraint(
            tree, jax.tree.map(lambda _: replicated, tree)
        )
        return model.predict(gather(trainable), gather(frozen), x, t, cond)

    return dataclasses.replace(model, predict=predict)


class Checked(NamedTuple):
    """What `check_run` found: the devices' mesh, the batch layout, the prompt files."""

    mesh: Mesh
    layout: dict  # `config.batch_layout`
    prompt_sets: dict[str, PromptSet]  # config field -> its prompts


def check_run(config: ml_collections.ConfigDict) -> Checked:
    """Every check that needs no model, so a bad field or file fails in a second,
    before anything is loaded, compiled or written."""
    initialize_distributed(config)
    if jax.process_count() > 1 and config.mesh.num_devices not in (0, jax.device_count()):
        raise ConfigError(
            f"mesh.num_devices={config.mesh.num_devices}: a run of {jax.process_count()} "
            "processes uses every device (0), each process its own"
        )
    devices = jax.devices()[: config.mesh.num_devices or None]
    layout = validate(config, len(devices), jax.process_count())
    prompt_sets = check_inputs(config)
    try:
        mesh = mesh_lib.make_mesh(config.mesh.shape, config.mesh.axes, devices)
    except ValueError as err:
        raise ConfigError(f"mesh: {err}") from None
    return Checked(mesh, layout, prompt_sets)


def build_run(
    config: ml_collections.ConfigDict, *, checked: Checked | None = None, progress: bool = True
) -> tuple[Run, Params]:
    """The run's mesh, validated layout, model, rewards, prompts and compiled
    rollouts; returns it with the model's initial trainable parameters (placed).
    `checked`: `check_run(config)`'s result when the caller has it."""
    mesh, layout, prompt_sets = checked or check_run(config)
    num_shards = mesh_lib.num_batch_shards(mesh)
    log.info(
        "mesh %s over %d %s device(s)",
        dict(zip(mesh.axis_names, mesh.devices.shape, strict=True)),
        mesh.devices.size,
        mesh.devices.flat[0].platform,
    )
    prompts = prompt_sets["prompts.path"]
    eval_sets = []
    if "eval.prompts_path" in prompt_sets:
        extra = sorted(config.eval.get("extra_prompts", {}))
        eval_sets = [("", prompt_sets["eval.prompts_path"])] + [
            ("_" + name, prompt_sets[f"eval.extra_prompts.{name}"]) for name in extra
        ]
    rewards = build_reward_set(config.rewards)
    eval_rewards = build_reward_set(config.eval.rewards) if config.eval.rewards else None

    rules = tuple(tuple(r) for r in config.mesh.rules)
    model, trainable, frozen = build_model(
        config.model,
        jax.random.fold_in(jax.random.key(config.seed), 1),
        sharding_fn=mesh_lib.param_sharding_fn(mesh, rules),
    )
    if config.mesh.gather_params and mesh.shape.get("fsdp", 1) > 1:
        model = _gathered(model, mesh)
    tokenizer = model.tokenize
    if hasattr(tokenizer, "count"):
        for field, prompt_set in prompt_sets.items():
            check_prompt_lengths(
                prompt_set.prompts,
                tokenizer.count,
                tokenizer.max_length,
                config.prompts.on_too_long,
                field,
            )
    trainable = from_host(trainable, mesh_lib.tree_shardings(trainable, mesh, rules))
    frozen = from_host(frozen, mesh_lib.tree_shardings(frozen, mesh, rules))

    batch_sharding = mesh_lib.batch_sharding(mesh)
    replicated = mesh_lib.replicated(mesh)
    sampler = samplers.make_sampler(config.sample, model)
    eval_sampler = sampler
    if config.eval.get("noise", ""):
        eval_sample = config.sample.copy_and_resolve_references()
        eval_sample.noise = config.eval.noise
        eval_sampler = samplers.make_sampler(eval_sample, model)
    compile_rollout = functools.partial(
        jit_rollout_step,
        model=model,
        num_chunks=layout["rollout_chunks"],
        num_shards=num_shards,
        batch_sharding=batch_sharding,
    )
    shared = config.sample.group_size if config.sample.get("shared_initial_noise", False) else 1
    uncond_tokens = from_host(model.tokenize([config.sample.negative_prompt]), replicated)
    run = Run(
        config=config,
        layout=layout,
        mesh=mesh,
        batch_sharding=batch_sharding,
        replicated=replicated,
        num_shards=num_shards,
        model=model,
        sampler=sampler,
        eval_sampler=eval_sampler,
        rewards=rewards,
        reward_params=from_host(rewards.params(), replicated),
        prompts=prompts,
        eval_sets=eval_sets,
        eval_rewards=eval_rewards,
        eval_reward_params=(from_host(eval_rewards.params(), replicated) if eval_rewards else None),
        frozen=frozen,
        uncond_tokens=uncond_tokens,
        uncond=jax.jit(mesh_lib.on_mesh(model.encode_text, mesh))(frozen, uncond_tokens),
        rollout_fn=compile_rollout(sampler=sampler, reward_set=rewards, init_group=shared),
        eval_fn=(
            compile_rollout(sampler=eval_sampler, reward_set=eval_rewards) if eval_rewards else None
        ),
        progress=progress and jax.process_index() == 0 and config.log.get("progress", True),
    )
    return run, trainable


def _initial_prior(run: Run, resuming: bool = False) -> prior_lib.PriorState:
    """The prior before any epoch; a resumed run restores its checkpointed one instead, so
    `resuming` skips the first-frame priors' computation (a reward pass over every prompt's
    static clip) and leaves zeros of their shape for the restore to fill."""
    config = run.config
    values = None
    if config.prior.kind == "fixed":
        values = run.prompts.priors
    elif config.prior.kind == "first_frame":
        from bpgo_jax.priors.first_frame import run_first_frame_priors

        # A resumed run's checkpointed priors replace these zeros.
        values = np.zeros(len(run.prompts), np.float32) if resuming else run_first_frame_priors(run)
    return prior_lib.init_prior_state(
        len(run.prompts),
        kind=config.prior.kind,
        fixed_values=values,
        init_value=config.prior.init_value,
    )


def init_opt_state(optimizer, trainable: Params, replicated: NamedSharding) -> Any:
    """The optimiser's initial state, each parameter-shaped leaf (Adam's moments)
    on its parameter's sharding and the rest (step counts) replicated.

    Plain `jit(optimizer.init)` leaves the moments, which depend on no input
    value, on one device; fsdp would then shard the parameters but keep
    two parameter-sized buffers whole on every device.
    """
    shardings = opt_state_shardings(optimizer, trainable, replicated)
    return jax.jit(optimizer.init, out_shardings=shardings)(trainable)


def opt_state_shardings(optimizer, trainable: Params, replicated: NamedSharding) -> Any:
    """The shardings `init_opt_state` gives: parameter-shaped leaves their parameter's,
    the rest `replicated` (`trainable` may be placed `ShapeDtypeStruct`s)."""
    return optax.tree_map_params(
        optimizer,
        lambda _, param: param.sharding,
        jax.eval_shape(optimizer.init, trainable),
        trainable,
        transform_non_params=lambda _: replicated,
    )


def build_training(
    run: Run, trainable: Params, *, resuming: bool = False
) -> tuple[Training, TrainState]:
    """Optimiser, compiled advantages / update stages and the initial `TrainState`.

    `resuming`: a checkpoint will replace the state, so what only a fresh start
    needs (the first-frame priors) is not computed.
    """
    config = run.config
    optimizer = make_optimizer(config.train)
    copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))
    needs_ref = config.train.kl_beta > 0 or config.prior.kind == "reference"
    prior = _initial_prior(run, resuming)
    root = jax.random.key(config.seed)
    state = TrainState(
        step=from_host(np.zeros((), np.int32), run.replicated),
        trainable=trainable,
        opt_state=init_opt_state(optimizer, trainable, run.replicated),
        ema=copy(trainable) if config.train.ema_decay else {},
        prior=from_host(prior, run.replicated),
        rng=from_host(jax.random.key_data(jax.random.fold_in(root, 2)), run.replicated),
    )
    # Pinning the update's output shardings to its input shardings keeps the
    # state's layout fixed across steps (no recompilation after step one).
    state_shardings = jax.tree.map(
        lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else run.replicated, state
    )
    state = from_host(state, state_shardings)
    opts = step_options(
        config,
        run.layout,
        run.num_shards,
        model=run.model,
        sampler=run.sampler,
        optimizer=optimizer,
    )
    batches = NamedSharding(run.mesh, P(None, mesh_lib.batch_axes(run.mesh)))
    tracker_cfg = config.advantage.tracker
    training = Training(
        optimizer=optimizer,
        state_shardings=state_shardings,
        advantages_fn=jit_advantages_step(
            config,
            batch_sharding=run.batch_sharding,
            prior_sharding=state_shardings.prior,
            replicated=run.replicated,
        ),
        shuffle_fn=jit_shuffle(run.layout["updates_per_inner_epoch"], batches),
        update=UpdateStep(
            opts,
            accumulate=config.train.accumulate,
            state_shardings=state_shardings,
            metric_sharding=run.replicated,
        ),
        ref_trainable=copy(trainable) if needs_ref else None,
        tracker=(
            adv_lib.PerPromptStatTracker(
                tracker_cfg.buffer_size, tracker_cfg.min_count, clip=config.advantage.clip
            )
            if config.advantage.method == "ddpo_tracker"
            else None
        ),
    )
    return training, state


@dataclasses.dataclass(frozen=True)
class Policy:
    """A run's sampling policy read from its workdir (or its base weights)."""

    run: Run
    trainable: Params  # the checkpoint's EMA weights when asked for and kept
    epoch: int  # epochs trained (0: base weights)


def load_policy(
    config: ml_collections.ConfigDict,
    workdir: str | Path | None,
    *,
    base_weights: bool = False,
    use_ema: bool = True,
) -> Policy:
    """The latest checkpoint's policy of `workdir`, for tools that only sample.

    Requires a checkpoint unless `base_weights` (then the config's `model.init`
    weights are used and `workdir` may be None). Reads only the parameters it
    samples with (no optimiser state) and never writes to the workdir.
    """
    directory = workdir_path(workdir) / "checkpoints" if workdir is not None else None
    if not base_weights and (directory is None or not directory.is_dir()):
        raise WorkdirError(
            f"{workdir} has no checkpoints/ (not a training run's workdir?); "
            "pass --base_weights to sample the config's initial weights instead"
        )
    run, trainable = build_run(config, progress=False)
    if base_weights:
        return Policy(run, trainable, 0)
    ema = bool(use_ema and config.train.ema_decay)
    rules = tuple(tuple(r) for r in config.mesh.rules)
    shardings = mesh_lib.tree_shardings(trainable, run.mesh, rules)
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), trainable, shardings
    )
    # Only the policy's parameters are read: every other leaf is skipped.
    skip = lambda tree: jax.tree.map(lambda _: ocp.PLACEHOLDER, tree)
    kept_ema = params if ema else skip(params) if config.train.ema_decay else {}
    like = TrainState(
        step=ocp.PLACEHOLDER,
        trainable=skip(params) if ema else params,
        opt_state=skip(jax.eval_shape(make_optimizer(config.train).init, params)),
        ema=kept_ema,
        # Every prior kind has this structure (and the first-frame one would score).
        prior=skip(
            jax.eval_shape(lambda: prior_lib.init_prior_state(len(run.prompts), kind="reference"))
        ),
        rng=ocp.PLACEHOLDER,
    )
    restored = Checkpointer(directory, keep=1, use_async=False, read_only=True).restore_latest(like)
    if restored is None:
        raise WorkdirError(
            f"{directory} holds no checkpoint; pass --base_weights to sample the config's "
            "initial weights instead"
        )
    epoch, state, _ = restored
    return Policy(run, state.ema if ema else state.trainable, epoch)
