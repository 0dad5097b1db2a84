"""Trains the world reward model (WorldCLIP) with the SigLIP loss; see configs/reward_model.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Be gentle on shared laptops: one XLA thread unless the caller says otherwise.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)
import functools
import json
import time

import jax
import ml_collections
import numpy as np
import optax
from absl import flags
from ml_collections import config_flags
from tqdm import tqdm

from bpgo_jax import runtime
from bpgo_jax.world import reward_model as rm
from bpgo_jax.world.data import Degradation, degrade, sample_pairs
from bpgo_jax.world.evaluate import reward_agreement, reward_eval_set

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where weights and metrics go", required=True)


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


def make_train_step(model_cfg: rm.RewardModelConfig, opt: optax.GradientTransformation):
    def step(params, opt_state, images, tokens):
        loss, grads = jax.value_and_grad(rm.siglip_loss)(params, model_cfg, images, tokens)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def main(argv: list[str]) -> None:
    del argv
    cfg = _CONFIG.value
    workdir = Path(_WORKDIR.value)
    workdir.mkdir(parents=True, exist_ok=True)
    # The command, so a generator whose text encoder starts from this model
    # (launch/pretrain.py --config.text_init) can record how it was made.
    run = {"command": " ".join(["python", *sys.argv])}
    (workdir / "run.json").write_text(json.dumps(run, indent=1) + "\n")
    model_cfg = rm.RewardModelConfig.from_dict(cfg.model.to_dict())
    tok = rm.tokenizer(model_cfg)
    rng = np.random.default_rng(cfg.seed)
    eval_set = reward_eval_set(np.random.default_rng(cfg.seed + 1), cfg.eval_scenes, cfg.eval_split)

    params = rm.init_params(model_cfg, jax.random.key(cfg.seed))
    warmup = min(cfg.warmup_steps, cfg.max_steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, cfg.max_steps)
    opt = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, weight_decay=cfg.weight_decay),
    )
    opt_state = opt.init(params)
    train_step = make_train_step(model_cfg, opt)
    scorer = rm.batch_scorer(model_cfg)

    history, start = [], time.time()
    bar = tqdm(range(1, cfg.max_steps + 1), desc="reward model")
    for step in bar:
        images, captions, _ = sample_pairs(rng, cfg.batch_size, "train")
        x = augment(images, rng, cfg.augment)
        params, opt_state, loss = train_step(params, opt_state, x, tok(captions))
        loss = float(loss)
        if not np.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}")
        if step % cfg.eval_every and step != cfg.max_steps:
            continue
        result = reward_agreement(functools.partial(scorer, params), eval_set)
        record = {"step": step, "loss": loss, "seconds": time.time() - start}
        record |= {f"auc_{k}": v["auc"] for k, v in result.items()}
        history.append(record)
        bar.set_postfix(loss=f"{loss:.3f}", auc=f"{result['all']['auc']:.3f}")
        if result["all"]["auc"] >= cfg.target_auc:
            break

    rm.save(workdir / "reward_model.msgpack", params, model_cfg)
    if cfg.export_dir:
        rm.save(Path(cfg.export_dir) / "reward_model.msgpack", params, model_cfg)
    (workdir / "metrics.json").write_text(json.dumps(history, indent=1) + "\n")
    print(json.dumps(history[-1]))


def run() -> None:
    runtime.run(main, __doc__)


if __name__ == "__main__":
    run()
