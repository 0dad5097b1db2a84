"""Writes per-prompt prior anchors: the mean reward of K rollouts per prompt.

    python launch/estimate_priors.py --config=configs/image.py --workdir=runs/base \
        --k=8 --output=prompts_with_priors.jsonl
    python launch/estimate_priors.py --config=configs/image.py --base_weights \
        --k=8 --output=prompts_with_priors.jsonl

Uses the latest checkpoint in --workdir (or, with --base_weights, the
config's initial weights) and the config's training reward; writes nothing to
the workdir. With --first_frame (image-to-video configs), each prior is
instead the reward of a static clip of the prompt's conditioning image
(`priors.first_frame`), and no rollout is sampled. The output is the prompt
file with a `prior` field on every line; train with it through
`--config.prompts.path=prompts_with_priors.jsonl --config.prior.kind=fixed`.
"""

import json
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from bpgo_jax import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (latest checkpoint is used).")
_BASE = flags.DEFINE_bool("base_weights", False, "Use the config's initial weights instead.")
_K = flags.DEFINE_integer("k", 8, "Rollouts per prompt.")
_OUTPUT = flags.DEFINE_string("output", None, "Output .jsonl prompt file with priors.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Only the first N prompts (0: all).")
_FIRST = flags.DEFINE_bool(
    "first_frame", False, "Priors of static clips of the prompts' conditioning images (I2V)."
)
_CACHE = runtime.define_compile_cache_flag()
_CPU_DEVICES = runtime.define_cpu_devices_flag()
_DISTRIBUTED = runtime.define_distributed_flags()
flags.adopt_module_key_flags(runtime)  # list them in --help
flags.mark_flags_as_required(["config", "output"])


def main(argv):
    del argv
    runtime.start(_CPU_DEVICES.value, _CACHE.value, _DISTRIBUTED)
    import jax
    import numpy as np

    from bpgo_jax.build import load_policy
    from bpgo_jax.checkpoint import atomic_write
    from bpgo_jax.errors import UserError

    if not _WORKDIR.value and not _BASE.value:
        raise UserError("give --workdir (a training run) or --base_weights")
    config = _CONFIG.value
    k, bs = _K.value, config.sample.batch_size
    if k < 1 or bs % k:
        raise UserError(f"sample.batch_size={bs} must be a multiple of --k={k}")
    out = Path(_OUTPUT.value)
    if out.resolve() == Path(config.prompts.path).resolve():
        raise UserError(f"--output={out} is the config's prompt file: write the priors elsewhere")
    policy = load_policy(config, _WORKDIR.value, base_weights=_BASE.value, use_ema=False)
    run, prompts = policy.run, policy.run.prompts
    n = min(_LIMIT.value or len(prompts), len(prompts))
    if _FIRST.value:
        from bpgo_jax.priors.first_frame import run_first_frame_priors

        priors = run_first_frame_priors(run, n)
    else:
        priors = _rollout_priors(run, policy, n, k, bs)
    if not np.all(np.isfinite(priors)):
        bad = np.flatnonzero(~np.isfinite(priors))[:8].tolist()
        raise UserError(f"non-finite rewards for prompt ids {bad}: no priors written")
    if jax.process_index() != 0:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps(
            {
                "prompt": prompts.prompts[i],
                "prior": float(priors[i]),
                "metadata": prompts.metadata[i],
            }
        )
        for i in range(n)
    ]
    atomic_write(out, "".join(line + "\n" for line in lines))
    print(f"wrote {n} priors (mean {priors.mean():.4f}, std {priors.std():.4f}) to {out}")


def _rollout_priors(run, policy, n: int, k: int, bs: int):
    """The mean reward of `k` rollouts of each of the first `n` prompts."""
    import jax
    import numpy as np

    from bpgo_jax.parallel.host import to_host

    count = -(-n // (bs // k)) * (bs // k)
    rollout = run.generate(
        np.arange(count) % len(run.prompts),
        run.prompts,
        per_prompt=k,
        trainable=policy.trainable,
        epoch_key=jax.device_put(jax.random.key_data(jax.random.key(12345)), run.replicated),
        desc="prior rollouts",
    )
    total = to_host(run.rewards.total(rollout.scores))
    return total.reshape(count, k).mean(axis=1)[:n]


def run() -> None:
    runtime.run(main, __doc__)


if __name__ == "__main__":
    run()
