"""Writes per-prompt prior anchors: the mean reward of K rollouts per prompt.

    python launch/estimate_priors.py --config=configs/image.py --workdir=runs/base \
        --k=8 --output=prompts_with_priors.jsonl

Uses the latest checkpoint in --workdir (or the config's initial weights when
there is none) and the config's training reward. The output is the prompt
file with a `prior` field on every line; train with it through
`--config.prompts.path=prompts_with_priors.jsonl --config.prior.kind=fixed`.
"""

import json
import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from bpgo_jax import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (latest checkpoint is used).")
_K = flags.DEFINE_integer("k", 8, "Rollouts per prompt.")
_OUTPUT = flags.DEFINE_string("output", None, "Output .jsonl prompt file with priors.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Only the first N prompts (0: all).")
flags.mark_flags_as_required(["config", "workdir", "output"])


def main(argv):
    del argv
    runtime.quiet_absl()
    import jax
    import numpy as np

    from bpgo_jax.train import Trainer

    config = _CONFIG.value
    config.log.tensorboard = False
    try:
        trainer = Trainer(config, _WORKDIR.value)
    except ValueError as err:
        sys.exit(f"error: {err}")
    prompts = trainer.prompts
    n = min(_LIMIT.value or len(prompts), len(prompts))
    k, bs = _K.value, config.sample.batch_size
    if bs % k:
        sys.exit(f"error: sample.batch_size={bs} must be a multiple of --k={k}")
    count = -(-n // (bs // k)) * (bs // k)
    ids = np.arange(count) % len(prompts)
    _, _, _, scores, _, _ = trainer.generate(
        ids,
        prompts,
        per_prompt=k,
        trainable=trainer.state.trainable,
        epoch_key=jax.device_put(jax.random.key_data(jax.random.key(12345)), trainer.repl),
        bar_desc="prior rollouts",
    )
    total = np.asarray(trainer.rewards.total({n_: np.asarray(v) for n_, v in scores.items()}))
    priors = total.reshape(count, k).mean(axis=1)[:n]
    if jax.process_index() != 0:
        return
    out = Path(_OUTPUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for i in range(n):
            entry = {
                "prompt": prompts.prompts[i],
                "prior": float(priors[i]),
                "metadata": prompts.metadata[i],
            }
            f.write(json.dumps(entry) + "\n")
    print(f"wrote {n} priors (mean {priors.mean():.4f}, std {priors.std():.4f}) to {out}")


def run() -> None:
    runtime.run(main, __doc__)


if __name__ == "__main__":
    run()
