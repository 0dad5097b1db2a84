"""The post-training loop: prompts -> rollout -> rewards -> priors/advantages
-> update -> checkpoint/logs, one epoch at a time.

Every device computation is a jitted pure function with explicit shardings;
this module only moves data between them, keeps host-side counters and writes
files. Run it through `launch/train.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from bpgo_jax import advantages as adv_lib
from bpgo_jax import priors as prior_lib
from bpgo_jax.checkpoint import Checkpointer
from bpgo_jax.config import validate
from bpgo_jax.logs import RunLogger, truncate_metrics_after
from bpgo_jax.models import build_model
from bpgo_jax.parallel import mesh as mesh_lib
from bpgo_jax.parallel.batching import map_in_chunks
from bpgo_jax.prompts import host_slice, load_prompts, prompt_ids
from bpgo_jax.rewards import RewardSet, build_reward_set
from bpgo_jax.rollout import samplers
from bpgo_jax.update.loss import PolicyBatch
from bpgo_jax.update.step import (
    HostAccumulatedStep,
    TrainState,
    make_optimizer,
    step_options,
    train_step,
)

log = logging.getLogger("bpgo_jax")


class Preempted:
    """Set by SIGTERM; the loop checkpoints at the end of the epoch and exits."""

    def __init__(self):
        self.flag = False

    def __call__(self, signum, frame):
        del signum, frame
        self.flag = True
        log.warning("SIGTERM received: finishing this epoch, saving a checkpoint, exiting")


def _rollout(
    trainable,
    frozen,
    reward_params,
    tokens,
    uncond_tokens,
    sample_idx,
    epoch_key,
    aux,
    *,
    model,
    sampler,
    reward_set: RewardSet,
    num_chunks: int,
    num_shards: int,
    init_group: int = 1,
):
    """Samples one batch with log-probs, decodes it and scores the jittable rewards.

    `init_group` > 1: consecutive blocks of that many samples (a GRPO group)
    share their first sample's initial noise.
    """
    key = jax.random.wrap_key_data(epoch_key)
    sample_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))
    keys = sample_keys(sample_idx)
    init_keys = None if init_group == 1 else sample_keys(sample_idx - sample_idx % init_group)
    cond = model.encode_text(frozen, tokens)
    uncond = model.encode_text(frozen, uncond_tokens)
    traj = samplers.sample(
        model,
        sampler,
        trainable,
        frozen,
        cond,
        uncond,
        keys,
        num_chunks=num_chunks,
        num_shards=num_shards,
        init_keys=init_keys,
    )
    images = map_in_chunks(
        lambda z: model.decode(frozen, z), traj.latents[:, -1], num_chunks, num_shards
    )
    scores = reward_set.score_jittable(reward_params, images, aux)
    return traj.latents, traj.outputs, cond, images, scores


def _advantages(prior_state, ids, rewards, *, cfg, group_size: int):
    """Priors (looked up before they are updated), advantages and new priors."""
    groups = rewards.reshape(-1, group_size)
    kind = cfg.prior.kind
    clip = tuple(cfg.prior.clip) if cfg.prior.clip else None
    priors = prior_lib.lookup(prior_state, ids, kind=kind, clip=clip)
    a = cfg.advantage
    bpgo = a.method == "bpgo"
    out = adv_lib.bpgo_advantages(
        groups,
        priors,
        alpha=a.alpha if bpgo else 0.0,
        k=a.k,
        lam=a.lam,
        crt_coef=a.crt_coef if bpgo else 0.0,
        std=a.std,
        eps=a.eps,
        clip=a.clip,
        ras_clamp=tuple(a.ras_clamp) if a.ras_clamp else None,
        max_exp=a.max_exp,
    )
    if kind == "moving_average":
        prior_state = prior_lib.update(
            prior_state, ids, groups.mean(axis=1), kind=kind, decay=cfg.prior.decay
        )
    metrics = adv_lib.advantage_metrics(groups, out)
    metrics.update(
        prior_mean=priors.mean(),
        reward_minus_prior_mean=(groups.mean(axis=1) - priors).mean(),
        reward_mean=groups.mean(),
        reward_std=groups.std(),
        group_std_mean=groups.std(axis=1).mean(),
    )
    per_sample = lambda x: jnp.repeat(x, group_size) if x.ndim == 1 else x.reshape(-1)
    return (
        per_sample(out.advantages),
        per_sample(out.ras_weights),
        per_sample(out.crt_advantages),
        prior_state,
        metrics,
    )


def _shuffle(batch: PolicyBatch, perm, *, num_updates: int) -> PolicyBatch:
    """Shuffles samples into `[num_updates, train_batch]` optimiser batches.

    Batch u holds samples `perm[u*b : (u+1)*b]` whatever the mesh, so a run
    updates on the same samples on 1 device as on 8.
    """
    return jax.tree.map(lambda x: x[perm].reshape(num_updates, -1, *x.shape[1:]), batch)


def _gathered(model, mesh):
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


class Trainer:
    """Holds the compiled functions and host state of one run."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path):
        self.config = config
        self.workdir = Path(workdir)
        dist = config.distributed
        if dist.initialize:
            jax.distributed.initialize(
                coordinator_address=dist.coordinator_address or None,
                num_processes=dist.num_processes or None,
                process_id=dist.process_id if dist.process_id >= 0 else None,
            )
        devices = jax.devices()[: config.mesh.num_devices or None]
        self.mesh = mesh_lib.make_mesh(config.mesh.shape, config.mesh.axes, devices)
        self.shards = mesh_lib.num_batch_shards(self.mesh)
        log.info(
            "mesh %s over %d %s device(s)",
            dict(zip(self.mesh.axis_names, self.mesh.devices.shape, strict=True)),
            self.mesh.devices.size,
            devices[0].platform,
        )
        self.layout = validate(config, self.shards, jax.process_count())
        self.batch_sh = mesh_lib.batch_sharding(self.mesh)
        self.accumulate = config.train.accumulate
        if self.accumulate == "auto":
            self.accumulate = "host" if jax.default_backend() == "cpu" else "scan"
        self.repl = mesh_lib.replicated(self.mesh)
        self.batch_spec = P(mesh_lib.batch_axes(self.mesh))

        root = jax.random.key(config.seed)
        rules = tuple(tuple(r) for r in config.mesh.rules)
        self.model, trainable, frozen = build_model(
            config.model,
            jax.random.fold_in(root, 1),
            sharding_fn=mesh_lib.param_sharding_fn(self.mesh, rules),
        )
        if config.mesh.gather_params and self.mesh.shape.get("fsdp", 1) > 1:
            self.model = _gathered(self.model, self.mesh)
        self.sampler = samplers.make_sampler(config.sample, self.model)
        self.eval_sampler = self.sampler
        if config.eval.get("noise", ""):
            eval_sample = config.sample.copy_and_resolve_references()
            eval_sample.noise = config.eval.noise
            self.eval_sampler = samplers.make_sampler(eval_sample, self.model)
        self.rewards = build_reward_set(config.rewards)
        self.eval_rewards = build_reward_set(config.eval.rewards) if config.eval.rewards else None
        self.prompts = load_prompts(config.prompts.path)
        # (metric suffix, prompts): the main held-out set, then eval.extra_prompts.
        self.eval_sets = []
        if config.eval.prompts_path:
            self.eval_sets.append(("", load_prompts(config.eval.prompts_path)))
            extra = config.eval.get("extra_prompts", {})
            self.eval_sets += [("_" + name, load_prompts(extra[name])) for name in sorted(extra)]
        self.optimizer = make_optimizer(config.train)
        self.tracker = (
            adv_lib.PerPromptStatTracker(
                config.advantage.tracker.buffer_size, config.advantage.tracker.min_count
            )
            if config.advantage.method == "ddpo_tracker"
            else None
        )

        trainable = jax.device_put(trainable, mesh_lib.tree_shardings(trainable, self.mesh, rules))
        self.frozen = jax.device_put(frozen, mesh_lib.tree_shardings(frozen, self.mesh, rules))
        copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))
        needs_ref = config.train.kl_beta > 0 or config.prior.kind == "reference"
        self.ref_trainable = copy(trainable) if needs_ref else None
        prior = prior_lib.init_prior_state(
            len(self.prompts),
            kind=config.prior.kind,
            fixed_values=self.prompts.priors if config.prior.kind == "fixed" else None,
            init_value=config.prior.init_value,
        )
        state = TrainState(
            step=jax.device_put(jnp.zeros((), jnp.int32), self.repl),
            trainable=trainable,
            opt_state=jax.jit(self.optimizer.init)(trainable),
            ema=copy(trainable) if config.train.ema_decay else {},
            prior=jax.device_put(prior, self.repl),
            rng=jax.device_put(jax.random.key_data(jax.random.fold_in(root, 2)), self.repl),
        )
        self.state = state
        # Pinning the update's output shardings to its input shardings keeps the
        # state's layout fixed across steps (no recompilation after step one).
        self.state_sh = jax.tree.map(
            lambda x: (
                x.sharding if isinstance(x.sharding, jax.sharding.NamedSharding) else self.repl
            ),
            state,
        )
        self.state = jax.device_put(state, self.state_sh)
        self.reward_params = jax.device_put(self.rewards.params(), self.repl)
        self.eval_reward_params = (
            jax.device_put(self.eval_rewards.params(), self.repl) if self.eval_rewards else None
        )
        uncond = self.model.tokenize([config.sample.negative_prompt])
        self.uncond_tokens = jax.device_put(uncond, self.repl)
        self.uncond = jax.jit(self.model.encode_text)(self.frozen, self.uncond_tokens)
        self._compile()

        self.epoch, self.position, self.samples_seen = 0, 0, 0
        self.skipped, self.consecutive_skips = 0, 0
        self.logger = RunLogger(self.workdir, tensorboard=config.log.tensorboard)
        self.progress = self.logger.enabled and config.log.get("progress", True)
        self.ckpt = Checkpointer(
            self.workdir / "checkpoints",
            keep=config.checkpoint.keep,
            use_async=config.checkpoint.use_async,
        )
        self._maybe_restore()

    # ------------------------------------------------------------------ setup
    def _compile(self) -> None:
        cfg, lay = self.config, self.layout
        rollout = functools.partial(
            _rollout,
            model=self.model,
            sampler=self.sampler,
            num_shards=self.shards,
            num_chunks=lay["rollout_chunks"],
        )
        shared = cfg.sample.group_size if cfg.sample.get("shared_initial_noise", False) else 1
        self.rollout_fn = jax.jit(
            functools.partial(rollout, reward_set=self.rewards, init_group=shared)
        )
        if self.eval_rewards is not None:
            self.eval_fn = jax.jit(
                functools.partial(rollout, reward_set=self.eval_rewards, sampler=self.eval_sampler)
            )
        b = self.batch_sh
        self.adv_fn = jax.jit(
            functools.partial(_advantages, cfg=cfg, group_size=cfg.sample.group_size),
            out_shardings=(b, b, b, self.state_sh.prior, self.repl),
        )
        self.shuffle_fn = jax.jit(
            functools.partial(_shuffle, num_updates=lay["updates_per_inner_epoch"]),
            out_shardings=NamedSharding(self.mesh, P(None, mesh_lib.batch_axes(self.mesh))),
        )
        opts = step_options(
            cfg,
            lay,
            self.shards,
            model=self.model,
            sampler=self.sampler,
            optimizer=self.optimizer,
        )
        self._jitted = {
            "rollout": self.rollout_fn,
            "advantages": self.adv_fn,
            "shuffle": self.shuffle_fn,
        }
        if self.accumulate == "host":
            self.train_fn = HostAccumulatedStep(
                opts, state_shardings=self.state_sh, metric_sharding=self.repl
            )
            self._jitted.update({f"train_{k}": f for k, f in self.train_fn.jitted.items()})
        else:
            self.train_fn = jax.jit(
                functools.partial(train_step, opts=opts),
                donate_argnums=(0,),
                out_shardings=(self.state_sh, self.repl),
            )
            self._jitted["train_step"] = self.train_fn
        self._cache_sizes: dict[str, int] = {}

    def _meta(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "samples_seen": self.samples_seen,
            "skipped_updates": self.skipped,
            "consecutive_skips": self.consecutive_skips,
            "tracker": self.tracker.state_dict() if self.tracker else None,
        }

    def _maybe_restore(self) -> None:
        latest = self.ckpt.latest()
        if latest is None:
            return
        self.state, meta = self.ckpt.restore(latest, self.state)
        self.epoch, self.position = meta["epoch"], meta["position"]
        self.samples_seen = meta["samples_seen"]
        self.skipped, self.consecutive_skips = meta["skipped_updates"], meta["consecutive_skips"]
        if self.tracker is not None and meta.get("tracker"):
            self.tracker.load_state_dict(meta["tracker"])
        if self.logger.enabled:
            truncate_metrics_after(self.workdir / "metrics.jsonl", self.epoch)
        log.info("resumed from %s at epoch %d", self.workdir / "checkpoints", self.epoch)

    # ------------------------------------------------------------ host <-> device
    def _global(self, local: np.ndarray) -> jax.Array:
        """Builds a batch-sharded global array from this host's rows."""
        return jax.make_array_from_process_local_data(self.batch_sh, np.asarray(local))

    def _local(self, arr: jax.Array) -> np.ndarray:
        """This host's rows of a batch-sharded global array."""
        if jax.process_count() == 1:
            return np.asarray(arr)
        local = multihost_utils.global_array_to_host_local_array(arr, self.mesh, self.batch_spec)
        return np.asarray(local)

    # ------------------------------------------------------------------ phases
    def sample_prompts(
        self,
        ids: np.ndarray,
        prompt_set,
        *,
        per_prompt: int,
        fn,
        reward_set,
        reward_params,
        trainable,
        epoch_key,
        bar_desc: str,
    ):
        """`per_prompt` samples of each prompt `ids` (global), in rollout batches.

        Returns global `(latents, network outputs, cond, scores)` and this host's images
        and prompts. `len(ids) * per_prompt` must be a multiple of the rollout
        batch size.
        """
        g = per_prompt
        pc, pi = jax.process_count(), jax.process_index()
        local_ids = host_slice(ids, pi, pc)
        local_prompts = [prompt_set.prompts[i] for i in local_ids for _ in range(g)]
        local_meta = [prompt_set.metadata[i] for i in local_ids for _ in range(g)]
        first_index = pi * len(local_ids) * g
        per_call = self.config.sample.batch_size // pc
        outputs, host_scores, local_images = [], [], []
        starts = range(0, len(local_prompts), per_call)
        for start in tqdm(starts, desc=bar_desc, leave=False, disable=not self.progress):
            prompts = local_prompts[start : start + per_call]
            meta = local_meta[start : start + per_call]
            tokens = self._global(self.model.tokenize(prompts))
            index = self._global(
                np.arange(first_index + start, first_index + start + len(prompts), dtype=np.int32)
            )
            aux = jax.tree.map(self._global, reward_set.prepare(prompts, meta))
            out = fn(
                trainable,
                self.frozen,
                reward_params,
                tokens,
                self.uncond_tokens,
                index,
                epoch_key,
                aux,
            )
            images = self._local(out[3])
            host = {
                k: self._global(v) for k, v in reward_set.score_host(images, prompts, meta).items()
            }
            outputs.append(out)
            host_scores.append(host)
            local_images.append(images)
        cat = lambda *xs: jnp.concatenate(xs) if len(xs) > 1 else xs[0]
        latents, outs, cond, _, jit_scores = jax.tree.map(cat, *outputs)
        scores = {**jit_scores, **jax.tree.map(cat, *host_scores)}
        return latents, outs, cond, scores, np.concatenate(local_images), local_prompts

    def generate(self, ids, prompt_set, *, per_prompt, trainable, epoch_key, bar_desc):
        """`sample_prompts` scored by the training rewards (rollouts, sampling, priors)."""
        return self.sample_prompts(
            ids,
            prompt_set,
            per_prompt=per_prompt,
            fn=self.rollout_fn,
            reward_set=self.rewards,
            reward_params=self.reward_params,
            trainable=trainable,
            epoch_key=epoch_key,
            bar_desc=bar_desc,
        )

    def _total_reward(self, reward_set: RewardSet, scores: dict) -> jax.Array:
        return sum(w * scores[n] for n, w in zip(reward_set.names, reward_set.weights, strict=True))

    def _epoch_key(self, epoch: int, stream: int) -> jax.Array:
        key = jax.random.fold_in(
            jax.random.fold_in(jax.random.key(self.config.seed), epoch), stream
        )
        return jax.device_put(jax.random.key_data(key), self.repl)

    def _reference_priors(self, ids: np.ndarray) -> None:
        """Reference-policy rollouts for prompts whose anchor is still unknown."""
        needs = np.asarray(prior_lib.needs_reference(self.state.prior, jnp.asarray(ids)))
        if not needs.any():
            return
        *_, scores, _, _ = self.generate(
            ids,
            self.prompts,
            per_prompt=self.config.sample.group_size,
            trainable=self.ref_trainable,
            epoch_key=self._epoch_key(self.epoch, 1),
            bar_desc="reference rollout",
        )
        total = self._total_reward(self.rewards, scores)
        means = total.reshape(-1, self.config.sample.group_size).mean(axis=1)
        prior = prior_lib.update(self.state.prior, jnp.asarray(ids), means, kind="reference")
        self.state = self.state._replace(prior=jax.device_put(prior, self.state_sh.prior))

    def evaluate(self) -> dict:
        """Held-out prompt sets, one fixed-seed sample per prompt, scored by the eval rewards.

        Metrics of `eval.extra_prompts[NAME]` carry the suffix `_NAME`.
        """
        out = {}
        for suffix, prompt_set in self.eval_sets:
            out |= self._evaluate_set(prompt_set, suffix)
        return out

    def _evaluate_set(self, prompt_set, suffix: str) -> dict:
        cfg = self.config.eval
        n = min(cfg.num_prompts, len(prompt_set))
        bs = self.config.sample.batch_size
        count = -(-n // bs) * bs
        ids = np.arange(count) % len(prompt_set)
        params = (
            self.state.ema if cfg.use_ema and self.config.train.ema_decay else self.state.trainable
        )
        _, _, _, scores, images, prompts = self.sample_prompts(
            ids,
            prompt_set,
            per_prompt=1,
            fn=self.eval_fn,
            reward_set=self.eval_rewards,
            reward_params=self.eval_reward_params,
            trainable=params,
            epoch_key=self._epoch_key(0, 2),
            bar_desc="eval" + suffix,
        )
        out = {}
        for name in self.eval_rewards.names:
            key = cfg.rewards[name].get("log_as", f"eval_{name}") + suffix
            out[key] = float(np.asarray(scores[name])[:n].mean())
        k = self.config.log.num_images
        self.logger.images(f"eval{suffix}/images", images[:k], prompts[:k], self.samples_seen)
        return out

    def _check_recompiles(self) -> None:
        for name, fn in self._jitted.items():
            size = fn._cache_size()
            if name in self._cache_sizes and size > self._cache_sizes[name]:
                log.warning(
                    "%s was recompiled after the first epoch (%d compiled versions): "
                    "an input shape, dtype or sharding changed",
                    name,
                    size,
                )
            self._cache_sizes[name] = size

    def policy_batch(self, ids: np.ndarray, latents, outs, cond, total):
        """The update's batch of one rollout of prompts `ids`: its advantages (the
        DDPO tracker's, which records `total`, or BPGO/GRPO's against the current
        priors), the priors updated with it, and the advantage metrics."""
        g = self.config.sample.group_size
        ids_dev = jax.device_put(ids.astype(np.int32), self.repl)
        adv, w, crt, prior, adv_metrics = self.adv_fn(self.state.prior, ids_dev, total)
        if self.tracker is not None:
            all_prompts = [self.prompts.prompts[i] for i in ids for _ in range(g)]
            adv = jax.device_put(self.tracker.update(all_prompts, np.asarray(total)), self.batch_sh)
        return PolicyBatch(latents, outs, cond, adv, w, crt), prior, adv_metrics

    def run_epoch(self) -> dict:
        cfg, lay = self.config, self.layout
        n, g = cfg.sample.prompts_per_epoch, cfg.sample.group_size
        ids = prompt_ids(len(self.prompts), cfg.seed, self.position, n)
        if cfg.prior.kind == "reference":
            self._reference_priors(ids)

        t0 = time.perf_counter()
        latents, outs, cond, scores, images, prompts = self.generate(
            ids,
            self.prompts,
            per_prompt=g,
            trainable=self.state.trainable,
            epoch_key=self._epoch_key(self.epoch, 0),
            bar_desc="rollout",
        )
        total = self._total_reward(self.rewards, scores)
        jax.block_until_ready(total)
        rollout_s = time.perf_counter() - t0

        t1 = time.perf_counter()
        record: dict[str, Any] = {"epoch": self.epoch}
        finite = bool(np.all(np.isfinite(np.asarray(multihost_utils.process_allgather(total)))))
        if finite:
            batch, prior, adv_metrics = self.policy_batch(ids, latents, outs, cond, total)
            self.state = self.state._replace(prior=prior)
            step_metrics = []
            for inner in range(cfg.train.inner_epochs):
                perm = np.random.default_rng([cfg.seed, self.epoch, inner]).permutation(n * g)
                batches = self.shuffle_fn(batch, jax.device_put(perm, self.repl))
                for u in range(lay["updates_per_inner_epoch"]):
                    mb = jax.tree.map(lambda x, u=u: x[u], batches)
                    self.state, m = self.train_fn(
                        self.state, mb, self.frozen, self.ref_trainable, self.uncond
                    )
                    step_metrics.append(m)
            step_metrics = jax.device_get(step_metrics)
            skipped = int(sum(m["update_skipped"] for m in step_metrics))
            record.update(
                {
                    k: float(np.mean([m[k] for m in step_metrics]))
                    for k in step_metrics[0]
                    if k != "update_skipped"
                }
            )
            record["loss"] = record.pop("policy_loss")
            # The first update of an epoch is on-policy: its ratios must be exactly 1.
            record["onpolicy_ratio_max_dev"] = float(step_metrics[0]["ratio_max_dev"])
            record.update({k: float(v) for k, v in jax.device_get(adv_metrics).items()})
        else:
            skipped = 1
            record["non_finite_reward_count"] = int(np.sum(~np.isfinite(np.asarray(total))))
        self.skipped += skipped
        self.consecutive_skips = self.consecutive_skips + skipped if skipped else 0
        train_s = time.perf_counter() - t1

        self.position += n
        self.samples_seen += n * g
        record.update(
            samples_seen=self.samples_seen,
            rollout_seconds=rollout_s,
            train_seconds=train_s,
            images_per_second=n * g / rollout_s,
            skipped_updates=self.skipped,
        )
        for name in self.rewards.names:
            record[f"reward_{name}_mean"] = float(np.mean(np.asarray(scores[name])))
        if not finite or "reward_mean" not in record:
            record["reward_mean"] = float(np.nanmean(np.asarray(total)))
            record["reward_std"] = float(np.nanstd(np.asarray(total)))
        if self.logger.enabled and self.epoch % cfg.log.image_every == 0:
            k = cfg.log.num_images
            self.logger.images(
                "rollout/images", images[: k * g : g], prompts[: k * g : g], self.samples_seen
            )
        return record

    def train(self) -> list[dict]:
        cfg = self.config
        preempted = Preempted()
        previous = signal.signal(signal.SIGTERM, preempted)
        records = []
        try:
            bar = tqdm(
                range(self.epoch, cfg.train.num_epochs),
                desc="epochs",
                initial=self.epoch,
                total=cfg.train.num_epochs,
                disable=not self.progress,
            )
            if self.eval_rewards is not None and self.epoch == 0:
                # The starting policy's scores: the point every curve starts from.
                self.logger.metrics({"epoch": 0, "samples_seen": 0, **self.evaluate()})
            for epoch in bar:
                self.epoch = epoch
                record = self.run_epoch()
                last = epoch + 1 == cfg.train.num_epochs
                if self.eval_rewards is not None and (epoch % cfg.eval.every == 0 or last):
                    record.update(self.evaluate())
                self.logger.metrics(record)
                records.append(record)
                bar.set_postfix(reward=f"{record['reward_mean']:.4f}")
                if self.consecutive_skips > cfg.train.max_consecutive_skips:
                    raise RuntimeError(
                        f"{self.consecutive_skips} consecutive updates skipped for non-finite "
                        f"rewards, loss or gradients (train.max_consecutive_skips="
                        f"{cfg.train.max_consecutive_skips}); the last good checkpoint is in "
                        f"{self.workdir / 'checkpoints'}"
                    )
                self.epoch = epoch + 1
                if self.epoch % cfg.checkpoint.every == 0 or last or preempted.flag:
                    self.ckpt.save(self.epoch, self.state, self._meta(), force=True)
                self._check_recompiles()
                if preempted.flag:
                    break
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.ckpt.close()
            self.logger.close()
        return records
