"""The post-training loop: prompts -> rollout -> rewards -> priors/advantages ->
update -> checkpoint/logs, one epoch at a time.

Read `train` first, then `run_epoch`. Each device computation is a compiled
stage with explicit shardings, built in `bpgo_jax/build.py`:
`rollout.step.rollout_step` (sampling with log-probs, decoding, jittable
rewards), `advantages.step.advantages_step` (priors, BPGO/GRPO advantages) and
`update.step.UpdateStep` (one optimiser update). This module moves data
between them, keeps the host counters and writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from bpgo_jax import priors as prior_lib
from bpgo_jax.build import Run, Training, build_run, build_training, check_run
from bpgo_jax.checkpoint import (
    Checkpointer,
    check_run_config,
    config_record,
    lock_workdir,
    prepare_workdir,
)
from bpgo_jax.errors import DivergedError, Preempted
from bpgo_jax.logs import RunLogger
from bpgo_jax.parallel.host import from_host, to_host
from bpgo_jax.prompts import prompt_ids
from bpgo_jax.rollout.step import Rollout
from bpgo_jax.runtime import any_process
from bpgo_jax.update.loss import PolicyBatch
from bpgo_jax.update.step import TrainState

log = logging.getLogger("bpgo_jax")


@dataclasses.dataclass
class Progress:
    """Host-side counters, checkpointed beside the device state."""

    epoch: int = 0  # epochs finished
    position: int = 0  # prompts taken from the prompt stream
    samples_seen: int = 0
    skipped_updates: int = 0
    consecutive_skips: int = 0


class TrainResult(NamedTuple):
    records: list[dict]  # the metrics rows this call wrote
    state: TrainState  # the final device state


def train(
    config: ml_collections.ConfigDict, workdir: str | Path, *, allow_config_change: bool = False
) -> TrainResult:
    """Trains `config` in `workdir`, resuming from its latest checkpoint.

    The workdir is locked for the run; resuming with a config that differs in
    a field that changes results is refused unless `allow_config_change`.
    Raises `errors.Preempted` after saving a checkpoint when SIGTERM reaches
    any process (all processes of a multi-process run stop after the same
    epoch and save it together) and `errors.DivergedError` after too many
    non-finite updates in a row.
    """
    checked = check_run(config)  # bad inputs fail before the workdir is touched
    workdir = prepare_workdir(workdir)
    with lock_workdir(workdir):
        check_run_config(workdir, config, allow_change=allow_config_change)
        run, trainable = build_run(config, checked=checked)
        ckpt = Checkpointer(
            workdir / "checkpoints",
            keep=config.checkpoint.keep,
            use_async=config.checkpoint.use_async,
        )
        training, state = build_training(run, trainable, resuming=ckpt.latest() is not None)
        logger = RunLogger(workdir, config.log, run_config=config_record(config))
        try:
            state, progress = restore(ckpt, state, training)
            # Rows of epochs after the checkpoint (all rows without one) are redone.
            logger.truncate_after(progress.epoch)
            return _epochs(run, training, state, progress, ckpt, logger)
        finally:
            ckpt.close()
            logger.close()


def _epochs(
    run: Run,
    training: Training,
    state: TrainState,
    progress: Progress,
    ckpt: Checkpointer,
    logger: RunLogger,
) -> TrainResult:
    config, records = run.config, []
    with sigterm_flag() as preempted:
        if run.eval_fn is not None and progress.epoch == 0:
            # The starting policy's scores: the point every curve starts from.
            logger.metrics({"epoch": 0, "samples_seen": 0, **evaluate(run, state, logger, 0)})
        watch = RecompileWatch({"rollout": run.rollout_fn, **stage_functions(training)})
        num_epochs = config.train.num_epochs
        bar = tqdm(
            range(progress.epoch, num_epochs),
            desc="epochs",
            initial=progress.epoch,
            total=num_epochs,
            disable=not run.progress,
        )
        for epoch in bar:
            state, progress, record = run_epoch(run, training, state, progress, logger)
            last = progress.epoch == num_epochs
            if run.eval_fn is not None and (epoch % config.eval.every == 0 or last):
                record.update(evaluate(run, state, logger, progress.samples_seen))
            ckpt.wait()  # a failed save stops the run before a row passes it
            logger.metrics(record)
            records.append(record)
            bar.set_postfix(reward=f"{record['reward_mean']:.4f}")
            if progress.consecutive_skips > config.train.max_consecutive_skips:
                raise DivergedError(
                    f"{progress.consecutive_skips} consecutive updates skipped for non-finite "
                    "rewards, loss or gradients (train.max_consecutive_skips="
                    f"{config.train.max_consecutive_skips}); the last good checkpoint is in "
                    f"{ckpt.directory}"
                )
            # One decision per epoch, the same on every host, for the save and the exit.
            stop = preempted()
            if progress.epoch % config.checkpoint.every == 0 or last or stop:
                ckpt.save(progress.epoch, state, checkpoint_meta(progress, training), force=True)
            watch.check()
            if stop:
                raise Preempted(f"checkpoint of epoch {progress.epoch} saved in {ckpt.directory}")
    return TrainResult(records, state)


def run_epoch(
    run: Run, training: Training, state: TrainState, progress: Progress, logger: RunLogger
) -> tuple[TrainState, Progress, dict[str, Any]]:
    """One epoch: rollout, rewards, advantages, `train.inner_epochs` passes of updates."""
    cfg, epoch = run.config, progress.epoch
    n, g = cfg.sample.prompts_per_epoch, cfg.sample.group_size
    ids = prompt_ids(len(run.prompts), cfg.seed, progress.position, n)
    if cfg.prior.kind == "reference":
        state = reference_priors(run, training, state, ids, epoch)

    t0 = time.perf_counter()
    rollout = run.generate(
        ids,
        run.prompts,
        per_prompt=g,
        trainable=state.trainable,
        epoch_key=run.epoch_key(epoch, 0),
    )
    total = run.rewards.total(rollout.scores)
    total_host = to_host(total)
    rollout_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    record: dict[str, Any] = {"epoch": epoch}
    finite = bool(np.all(np.isfinite(total_host)))
    if finite:
        batch, prior, adv_metrics = policy_batch(run, training, state.prior, ids, rollout, total)
        state, step_metrics = update(run, training, state._replace(prior=prior), batch, epoch)
        skipped = int(sum(m["update_skipped"] for m in step_metrics))
        record.update(
            {
                k: float(np.mean([m[k] for m in step_metrics]))
                for k in step_metrics[0]
                if k not in ("update_skipped", "ratio_max_dev")
            }
        )
        # The first update of an epoch is on-policy: its ratios must be exactly 1.
        first = step_metrics[0]
        record["onpolicy_ratio_max_dev"] = float(first["ratio_max_dev"])
        if first["ratio_max_dev"] or first["approx_kl"]:
            log.warning(
                "epoch %d: the on-policy update's ratios deviate from 1 (max %.3g, approx_kl "
                "%.3g): its network outputs differ from the rollout's",
                epoch,
                first["ratio_max_dev"],
                first["approx_kl"],
            )
        record.update({k: float(v) for k, v in to_host(adv_metrics).items()})
    else:
        skipped = 1
        record["non_finite_reward_count"] = int(np.sum(~np.isfinite(total_host)))
    if skipped:
        log.warning(
            "epoch %d: %d update(s) skipped for non-finite rewards, loss or gradients",
            epoch,
            skipped,
        )
    train_s = time.perf_counter() - t1

    progress = dataclasses.replace(
        progress,
        epoch=epoch + 1,
        position=progress.position + n,
        samples_seen=progress.samples_seen + n * g,
        skipped_updates=progress.skipped_updates + skipped,
        consecutive_skips=progress.consecutive_skips + skipped if skipped else 0,
    )
    record.update(
        samples_seen=progress.samples_seen,
        rollout_seconds=rollout_s,
        train_seconds=train_s,
        images_per_second=n * g / rollout_s,
        skipped_updates=progress.skipped_updates,
    )
    for name in run.rewards.names:
        record[f"reward_{name}_mean"] = float(np.mean(to_host(rollout.scores[name])))
    if not finite:  # the statistics of the finite rewards (null when there are none)
        kept = total_host[np.isfinite(total_host)]
        record["reward_mean"] = float(kept.mean()) if kept.size else float("nan")
        record["reward_std"] = float(kept.std()) if kept.size else float("nan")
    if epoch % cfg.log.image_every == 0:
        k = cfg.log.num_images
        one_per_group = slice(0, k * g, g)
        logger.images(
            "rollout/images",
            rollout.images[one_per_group],
            rollout.prompts[one_per_group],
            progress.samples_seen,
        )
    return state, progress, record


def policy_batch(
    run: Run, training: Training, prior_state, ids: np.ndarray, rollout: Rollout, total
) -> tuple[PolicyBatch, prior_lib.PriorState, dict]:
    """The update's batch of one rollout of prompts `ids`: its advantages (BPGO /
    GRPO's against the current priors, or the DDPO tracker's, which records
    `total`), the priors updated with it, and the advantage metrics."""
    ids_dev = from_host(ids.astype(np.int32), run.replicated)
    adv, prior, metrics = training.advantages_fn(prior_state, ids_dev, total)
    advantages = adv.advantages
    if training.tracker is not None:
        g = run.config.sample.group_size
        prompts = [run.prompts.prompts[i] for i in ids for _ in range(g)]
        tracked = training.tracker.update(prompts, to_host(total))
        advantages = from_host(tracked, run.batch_sharding)
    batch = PolicyBatch(
        rollout.latents,
        rollout.outputs,
        rollout.cond,
        advantages,
        adv.ras_weights,
        adv.crt_advantages,
    )
    return batch, prior, metrics


def update(
    run: Run, training: Training, state: TrainState, batch: PolicyBatch, epoch: int
) -> tuple[TrainState, list[dict]]:
    """`train.inner_epochs` shuffled passes of optimiser updates over one epoch's samples."""
    cfg = run.config
    samples = run.layout["samples_per_epoch"]
    metrics = []
    for inner in range(cfg.train.inner_epochs):
        perm = np.random.default_rng([cfg.seed, epoch, inner]).permutation(samples)
        batches = training.shuffle_fn(batch, from_host(perm, run.replicated))
        for u in range(run.layout["updates_per_inner_epoch"]):
            mb = jax.tree.map(lambda x, u=u: x[u], batches)
            state, m = training.update(state, mb, run.frozen, training.ref_trainable, run.uncond)
            metrics.append(m)
    return state, to_host(metrics)


def reference_priors(
    run: Run, training: Training, state: TrainState, ids: np.ndarray, epoch: int
) -> TrainState:
    """Anchors prompts not seen before at the reference (initial) policy's mean reward."""
    ids_dev = from_host(ids.astype(np.int32), run.replicated)
    needs = to_host(prior_lib.needs_reference(state.prior, ids_dev))
    if not needs.any():
        return state
    g = run.config.sample.group_size
    rollout = run.generate(
        ids,
        run.prompts,
        per_prompt=g,
        trainable=training.ref_trainable,
        epoch_key=run.epoch_key(epoch, 1),
        desc="reference rollout",
    )
    means = run.rewards.total(rollout.scores).reshape(-1, g).mean(axis=1)
    prior = prior_lib.update(state.prior, ids_dev, means, kind="reference")
    return state._replace(prior=jax.device_put(prior, training.state_shardings.prior))


def evaluate(run: Run, state: TrainState, logger: RunLogger, samples_seen: int) -> dict:
    """Held-out prompt sets, one fixed-seed sample per prompt, scored by the eval rewards.

    Metrics of `eval.extra_prompts[NAME]` carry the suffix `_NAME`.
    """
    cfg = run.config
    use_ema = cfg.eval.use_ema and cfg.train.ema_decay
    params = state.ema if use_ema else state.trainable
    bs = cfg.sample.batch_size
    out = {}
    for suffix, prompt_set in run.eval_sets:
        n = min(cfg.eval.num_prompts, len(prompt_set))
        ids = np.arange(-(-n // bs) * bs) % len(prompt_set)
        rollout = run.generate(
            ids,
            prompt_set,
            per_prompt=1,
            trainable=params,
            epoch_key=run.epoch_key(0, 2),
            desc="eval" + suffix,
            evaluation=True,
        )
        for name in run.eval_rewards.names:
            key = cfg.eval.rewards[name].get("log_as", f"eval_{name}") + suffix
            out[key] = float(to_host(rollout.scores[name])[:n].mean())
        k = cfg.log.num_images
        logger.images(f"eval{suffix}/images", rollout.images[:k], rollout.prompts[:k], samples_seen)
    return out


def restore(
    ckpt: Checkpointer, state: TrainState, training: Training
) -> tuple[TrainState, Progress]:
    """The latest checkpoint's state and counters, or the initial ones."""
    restored = ckpt.restore_latest(state)
    if restored is None:
        return state, Progress()
    _, state, meta = restored
    progress = Progress(**{f.name: meta[f.name] for f in dataclasses.fields(Progress)})
    if training.tracker is not None and meta.get("tracker"):
        training.tracker.load_state_dict(meta["tracker"])
    log.info("resumed from %s at epoch %d", ckpt.directory, progress.epoch)
    return state, progress


def checkpoint_meta(progress: Progress, training: Training) -> dict:
    tracker = training.tracker.state_dict() if training.tracker else None
    return {**dataclasses.asdict(progress), "tracker": tracker}


def stage_functions(training: Training) -> dict[str, Any]:
    """The compiled training stages by name (for `RecompileWatch`)."""
    return {"advantages": training.advantages_fn, "shuffle": training.shuffle_fn} | {
        name: fn for name, fn in training.update.jitted.items()
    }


class RecompileWatch:
    """Warns when a compiled stage compiles again after the first epoch: an input
    shape, dtype or sharding changed, which costs a compilation every time."""

    def __init__(self, functions: dict[str, Any]):
        self.functions = functions
        self.sizes: dict[str, int] = {}

    def check(self) -> None:
        for name, fn in self.functions.items():
            size = fn._cache_size()
            if name in self.sizes and size > self.sizes[name]:
                log.warning("%s was recompiled (%d compiled versions)", name, size)
            self.sizes[name] = size


@contextlib.contextmanager
def sigterm_flag() -> Iterator[Callable[[], bool]]:
    """Yields `preempted()`: True on every host once SIGTERM has reached any of them
    (the epoch then finishes, a checkpoint is saved and the loop raises `Preempted`).

    Each host catches its own SIGTERM, and a pod's hosts may get theirs at
    different moments; `preempted()` is a collective (`runtime.any_process`),
    so every host must call it at the same point of the loop, and all of them
    then save together and stop after the same epoch.
    """
    received = []

    def handler(signum, frame):
        del signum, frame
        received.append(True)
        log.warning("SIGTERM received: finishing this epoch, saving a checkpoint, exiting")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield lambda: any_process(bool(received))
    finally:
        # None: the previous handler was not set from Python; the default stands in.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
