"""Trains the world reward model (WorldCLIP) with the SigLIP loss; see configs/reward_model.py.

    python launch/train_reward_model.py --config=configs/reward_model.py --workdir=W

Writes WORKDIR/metrics.jsonl (loss and validation ROC-AUCs at every
evaluation), checkpoints/ (an Orbax checkpoint at every evaluation),
run.json (the command) and reward_model.msgpack + .json (also into
`export_dir` when set). Re-running with the same --workdir resumes from its
latest checkpoint and ends with the weights an uninterrupted run gives; a
workdir is locked against a second run, and resuming with a config that
changes results is refused unless --allow_config_change is given.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Be gentle on shared laptops: one XLA thread unless the caller says otherwise.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import flags
from tqdm import tqdm

from bpgo_jax import runtime
from bpgo_jax.checkpoint import (
    atomic_write,
    check_run_config,
    config_record,
    export_files,
    lock_workdir,
    prepare_workdir,
)
from bpgo_jax.errors import DivergedError
from bpgo_jax.logs import RunLogger
from bpgo_jax.world import reward_model as rm
from bpgo_jax.world.data import Degradation, degrade, sample_pairs
from bpgo_jax.world.evaluate import reward_agreement, reward_eval_set

log = logging.getLogger("bpgo_jax")

# Fields of configs/reward_model.py that may change when a run resumes.
NEUTRAL_FIELDS = ("export_dir", "checkpoint.*", "log.*")
# An Orbax checkpoint is written at every evaluation; a config's optional
# `checkpoint` block overrides these.
CHECKPOINT_DEFAULTS = {"keep": 2, "use_async": True}


@dataclasses.dataclass
class Progress:
    """The host side of a reward-model run, checkpointed beside params and optimiser."""

    step: int = 0  # steps done
    rng: dict | None = None  # the batch generator's state (numpy bit generator)
    last: dict | None = None  # the latest evaluation's metrics row
    seconds: float = 0.0  # training time of every run of this workdir
    stopped: bool = False  # an evaluation reached target_auc


def augment(
    images: np.ndarray, rng: np.random.Generator, cfg: ml_collections.ConfigDict
) -> np.ndarray:
    """float32 batch in [0, 1]; with probability cfg.prob, randomly degraded."""
    if rng.random() >= cfg.prob:
        return images.astype(np.float32) / 255.0
    d = Degradation(
        noise=float(rng.uniform(0.0, cfg.max_noise)),
        blur=float(rng.uniform(0.0, cfg.max_blur)) if rng.random() < 0.5 else 0.0,
        color_jitter=cfg.color_jitter,
    )
    return degrade(images, rng, d)


def reward_model_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with linear warm-up, cosine decay and global-norm clipping."""
    warmup = min(cfg.warmup_steps, cfg.max_steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, cfg.max_steps)
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, weight_decay=cfg.weight_decay),
    )


def make_reward_model_step(
    model_cfg: rm.RewardModelConfig, opt: optax.GradientTransformation
) -> Callable[..., tuple[Any, optax.OptState, jax.Array]]:
    """Jitted `step(params, opt_state, images, tokens) -> (params, opt_state, loss)`."""

    def step(params, opt_state, images, tokens):
        loss, grads = jax.value_and_grad(rm.siglip_loss)(params, model_cfg, images, tokens)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def train(
    cfg: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    command: str,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Trains the reward model of `cfg` in `workdir` (resuming); returns the last metrics row."""
    workdir = prepare_workdir(workdir)
    with lock_workdir(workdir):
        check_run_config(workdir, cfg, allow_change=allow_config_change, neutral=NEUTRAL_FIELDS)
        return _train(cfg, workdir, command)


def _train(cfg: ml_collections.ConfigDict, workdir: Path, command: str) -> dict[str, Any]:
    from bpgo_jax.checkpoint import Checkpointer  # (Orbax takes seconds to import)

    # The command, so a generator whose text encoder starts from this model
    # (launch/pretrain.py --config.text_init) can record how it was made.
    atomic_write(workdir / "run.json", json.dumps({"command": command}, indent=1) + "\n")
    model_cfg = rm.RewardModelConfig.from_dict(cfg.model.to_dict())
    tok = rm.tokenizer(model_cfg)
    rng = np.random.default_rng(cfg.seed)
    eval_set = reward_eval_set(np.random.default_rng(cfg.seed + 1), cfg.eval_scenes, cfg.eval_split)

    params = rm.init_params(model_cfg, jax.random.key(cfg.seed))
    opt = reward_model_optimizer(cfg)
    state = {"params": params, "opt_state": opt.init(params)}
    step_fn = make_reward_model_step(model_cfg, opt)
    scorer = rm.batch_scorer(model_cfg)

    ckpt_cfg = {**CHECKPOINT_DEFAULTS, **(cfg.get("checkpoint") or {})}
    ckpt = Checkpointer(
        workdir / "checkpoints", keep=ckpt_cfg["keep"], use_async=ckpt_cfg["use_async"]
    )
    logger = RunLogger(workdir, cfg.get("log"), run_config=config_record(cfg))
    try:
        # Host arrays: a single-device model saves and restores fastest as such.
        progress = Progress()
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        restored = ckpt.restore_latest(like)
        if restored is not None:
            _, host_state, meta = restored
            state = jax.device_put(host_state)
            progress = Progress(**{f.name: meta[f.name] for f in dataclasses.fields(Progress)})
            rng.bit_generator.state = progress.rng
            log.info("resumed %s at step %d", workdir, progress.step)
        logger.truncate_after(progress.step + 1, key="step")

        params, opt_state = state["params"], state["opt_state"]
        start = time.time() - progress.seconds
        first = cfg.max_steps + 1 if progress.stopped else progress.step + 1  # (empty when done)
        bar = tqdm(range(first, cfg.max_steps + 1), desc="reward model", initial=first - 1)
        for step in bar:
            images, captions, _ = sample_pairs(rng, cfg.batch_size, "train")
            x = augment(images, rng, cfg.augment)
            params, opt_state, loss = step_fn(params, opt_state, x, tok(captions))
            loss = float(loss)
            progress.step = step
            if not np.isfinite(loss):
                raise DivergedError(
                    f"reward-model loss is {loss} at step {step}; the last checkpoint is in "
                    f"{ckpt.directory}"
                )
            if step % cfg.eval_every and step != cfg.max_steps:
                continue
            result = reward_agreement(functools.partial(scorer, params), eval_set)
            progress.seconds = time.time() - start
            record = {"step": step, "loss": loss, "seconds": progress.seconds}
            record |= {f"auc_{k}": v["auc"] for k, v in result.items()}
            ckpt.wait()  # a failed checkpoint save stops the run here
            logger.metrics(record)
            progress.last = record
            progress.stopped = result["all"]["auc"] >= cfg.target_auc
            progress.rng = rng.bit_generator.state
            host = jax.device_get({"params": params, "opt_state": opt_state})
            ckpt.save(step, host, dataclasses.asdict(progress), force=True)
            bar.set_postfix(loss=f"{loss:.3f}", auc=f"{result['all']['auc']:.3f}")
            if progress.stopped:
                break
        ckpt.wait()
    finally:
        try:
            ckpt.close()
        finally:
            logger.close()

    tmp = workdir / ".reward_model.tmp.msgpack"
    rm.save(tmp, params, model_cfg)  # weights + .json config, renamed into place
    os.replace(tmp.with_suffix(".json"), workdir / "reward_model.json")
    os.replace(tmp, workdir / "reward_model.msgpack")
    if cfg.export_dir:
        export_files(cfg.export_dir, workdir, ("reward_model.msgpack", "reward_model.json"))
    return progress.last


def define_flags() -> None:
    """The command's flags, defined when it runs rather than on import (other code
    imports `train` from here; module-level flags would clash with other
    commands' flags of the same name in its process)."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Reward-model config.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Where weights, checkpoints and metrics go.")
    flags.DEFINE_boolean(
        "allow_config_change",
        False,
        "Resume a workdir whose config.json differs in fields that change results.",
    )
    runtime.define_compile_cache_flag()
    flags.adopt_module_key_flags(runtime)  # list it in --help
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    runtime.start(0, flags.FLAGS.compile_cache, log_info=True)  # JAX is imported already
    args = flags.FLAGS
    last = train(
        args.config,
        args.workdir,
        command=" ".join(["python", *sys.argv]),
        allow_config_change=args.allow_config_change,
    )
    print(json.dumps(last))


def run() -> None:
    define_flags()
    runtime.run(main, __doc__)


if __name__ == "__main__":
    run()
