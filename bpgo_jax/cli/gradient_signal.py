"""How much of one update's policy gradient is signal: gradients of independent rollouts.

    python launch/gradient_signal.py --config=configs/oracle_reward.py \
        --config.advantage.method=grpo --batches=6
    python launch/gradient_signal.py --config=configs/oracle_reward.py \
        --config.advantage.method=grpo --batches=6 --same_prompts \
        --config.train.timestep_window="(0,3)" --config.train.timestep_fraction=1.0

Draws `--batches` rollout batches of one epoch's size (`prompts_per_epoch` x
`group_size`) from the config's starting policy (or, with --workdir, a run's
latest checkpoint, read only), each with its own sampling
key (and, unless `--same_prompts`, its own prompts), and computes each
batch's update gradient (the config's loss, trained steps and layout; no
optimiser step). If every batch's gradient were pure noise, their pairwise
cosines would average 0; `signal_share` estimates the fraction of one
update's squared gradient that is the expected gradient
(`bpgo_jax.update.signal`). Prints one JSON line. (With
`advantage.method=ddpo_tracker` the tracker keeps its history across batches,
as in training.)
A run of N updates cannot move a policy much when this share is near 0:
Adam's early steps follow the sign of each coordinate, noise included.
"""

from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags

from bpgo_jax import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "A run whose latest checkpoint is measured.")
_BATCHES = flags.DEFINE_integer("batches", 6, "Independent rollout batches (>= 2).")
_SAME = flags.DEFINE_bool("same_prompts", False, "Every batch samples the same prompts.")
_CACHE = runtime.define_compile_cache_flag()
_CPU_DEVICES = runtime.define_cpu_devices_flag()
flags.adopt_module_key_flags(runtime)  # list them in --help
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    del argv
    runtime.start(_CPU_DEVICES.value, _CACHE.value)
    import jax
    import numpy as np

    from bpgo_jax.build import build_training, load_policy
    from bpgo_jax.errors import UserError
    from bpgo_jax.parallel.host import to_host
    from bpgo_jax.prompts import prompt_ids
    from bpgo_jax.train import policy_batch
    from bpgo_jax.update.signal import gradient_signal

    if _BATCHES.value < 2:
        raise UserError(f"--batches={_BATCHES.value} must be >= 2")
    cfg = _CONFIG.value
    cfg.eval.rewards, cfg.eval.prompts_path, cfg.eval.extra_prompts = {}, "", {}  # no evaluation
    # One update = one epoch's samples, whatever train.batch_size says; the host
    # accumulation loop exposes the gradient before the optimiser step.
    n, g = cfg.sample.prompts_per_epoch, cfg.sample.group_size
    cfg.train.batch_size = n * g
    cfg.train.accumulate = "host"
    policy = load_policy(cfg, _WORKDIR.value, base_weights=not _WORKDIR.value, use_ema=False)
    run = policy.run
    training, state = build_training(run, policy.trainable)
    grads, rewards, mixed = [], [], []
    for b in range(_BATCHES.value):
        ids = prompt_ids(len(run.prompts), cfg.seed + (0 if _SAME.value else b), 0, n)
        rollout = run.generate(
            ids,
            run.prompts,
            per_prompt=g,
            trainable=state.trainable,
            epoch_key=run.epoch_key(10_000 + b, 0),
            desc=f"rollout {b}",
        )
        total = run.rewards.total(rollout.scores)
        # Priors stay at the starting state: every batch sees the same ones.
        batch, _, _ = policy_batch(run, training, state.prior, ids, rollout, total)
        acc, _, _ = training.update.gradient_sum(
            state, batch, run.frozen, training.ref_trainable, run.uncond
        )
        leaves = jax.tree.leaves(to_host(acc))
        grads.append(np.concatenate([np.ravel(x).astype(np.float64) for x in leaves]))
        r = to_host(total).reshape(n, g)
        rewards.append(float(r.mean()))
        mixed.append(float((r.std(axis=1) > 0).mean()))
    stats = gradient_signal(np.stack(grads) / training.update.opts.count)
    print(
        json.dumps(
            {
                "batches": len(grads),
                "samples_per_batch": n * g,
                "same_prompts": _SAME.value,
                "trained_steps": run.layout["trained_steps"],
                "timestep_window": list(run.layout["timestep_window"]),
                **{k: v if k == "grad_norm_mean" else round(v, 4) for k, v in stats.items()},
                "reward_mean": [round(x, 4) for x in rewards],
                "mixed_group_fraction": [round(x, 4) for x in mixed],
            }
        )
    )


def run() -> None:
    runtime.run(main, __doc__)


if __name__ == "__main__":
    run()
