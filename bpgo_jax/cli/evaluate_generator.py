"""Exact-oracle accuracy of built-in generator weights (a .msgpack), and how
well the learned reward model ranks the generator's own samples.

    python launch/evaluate_generator.py --config=configs/pretrain.py \
        --weights=bpgo_jax/world/assets/generator.msgpack --num_prompts=256
    python launch/evaluate_generator.py --config=configs/pretrain.py \
        --weights=bpgo_jax/world/assets/generator.msgpack --config.sample.guidance_scale=3
    python launch/evaluate_generator.py --config=configs/pretrain.py \
        --weights=bpgo_jax/world/assets/generator.msgpack --num_prompts=64 --group_size=8 \
        --prompts_file=bpgo_jax/world/assets/prompts_train.jsonl

With --group_size=1 (default) this is launch/pretrain.py's evaluation (one
sample per held-out prompt, keys from `eval.seed`, the config's 10-step SDE
sampler), so numbers match generator.json and docs/world.md. Any
`--config.sample.*` field (guidance, steps, noise) can be changed. Accuracy is also given per
caption kind, and `failure_causes` gives the share of samples failing because of
each single constraint (`world.evaluate.failure_cause`: colour, shape, ... or
"several"). With --group_size=G > 1 each prompt gets G samples, as in a
GRPO group: `coverage` gives the shares of prompts never / always / at most
once right (`world.evaluate.group_coverage`), and the reward model's
agreement with the oracle on them is reported too (`group_agreement`).
Prints one JSON line; `--grid` also saves captioned samples (OK / -- is the
oracle's verdict).
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from bpgo_jax import runtime
from bpgo_jax.errors import ConfigError, UserError, WeightsError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pre-training config.", lock_config=True)
_WEIGHTS = flags.DEFINE_string("weights", None, "Generator weights (.msgpack).")
_NUM = flags.DEFINE_integer("num_prompts", 256, "Prompts to sample: the first N of the file.")
_GROUP = flags.DEFINE_integer("group_size", 1, "Samples per prompt (> 1: reward agreement too).")
_PROMPTS = flags.DEFINE_string("prompts_file", None, "World prompts (.jsonl); default eval's.")
_REWARD = flags.DEFINE_string("reward_model", "", "Reward model weights; '' = the shipped one.")
_GRID = flags.DEFINE_string("grid", None, "Optional PNG path for a grid of the first samples.")
_CACHE = runtime.define_compile_cache_flag()
flags.adopt_module_key_flags(runtime)  # list it in --help
flags.mark_flags_as_required(["config", "weights"])


def main(argv: list[str]) -> None:
    del argv
    runtime.enable_compile_cache(_CACHE.value)
    import jax
    import numpy as np

    from bpgo_jax import pretrain
    from bpgo_jax.logs import captioned_grid, save_png
    from bpgo_jax.models import load_params
    from bpgo_jax.models.tiny import tiny_model
    from bpgo_jax.prompts import load_prompts
    from bpgo_jax.world import reward_model
    from bpgo_jax.world.evaluate import failure_causes, group_agreement, group_coverage

    cfg = _CONFIG.value
    if not Path(_WEIGHTS.value).is_file():
        raise WeightsError(f"--weights={_WEIGHTS.value!r} is not a file")
    if _NUM.value < 1 or _GROUP.value < 1:
        raise UserError(f"--num_prompts={_NUM.value} and --group_size={_GROUP.value} must be >= 1")
    try:
        model = tiny_model(cfg.model)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    try:  # (shapes only: a file of another layout fails before anything compiles)
        like = jax.eval_shape(model.init, jax.random.key(0))
        trainable, frozen = load_params(_WEIGHTS.value, like)
    except ValueError as err:
        raise WeightsError(
            f"--weights: {err} (give the --config.model.* sizes it was trained with)"
        ) from err
    prompt_set = load_prompts(_PROMPTS.value or cfg.eval.prompts_path)
    if not all("constraints" in m for m in prompt_set.metadata):
        raise UserError("the prompt file needs world metadata ('constraints'), e.g. a world .jsonl")
    n, g = min(_NUM.value, len(prompt_set.prompts)), _GROUP.value
    prompts = [p for p in prompt_set.prompts[:n] for _ in range(g)]
    constraints = [m["constraints"] for m in prompt_set.metadata[:n] for _ in range(g)]
    acc, ok, images = pretrain.evaluate_oracle(
        model,
        trainable,
        frozen,
        cfg.sample,
        prompts,
        constraints,
        seed=cfg.eval.seed,
        batch_size=cfg.eval.batch_size,
    )
    if _GRID.value:
        k = min(cfg.eval.num_images, n * g)
        labels = [f"{'OK' if o else '--'} {p}" for o, p in zip(ok[:k], prompts[:k], strict=True)]
        save_png(_GRID.value, captioned_grid(images[:k], labels))
    result = {
        "weights": _WEIGHTS.value,
        "prompts": Path(_PROMPTS.value or cfg.eval.prompts_path).name,
        "oracle_accuracy": acc,
        "num_prompts": n,
        "group_size": g,
        "eval_seed": cfg.eval.seed,
        "guidance_scale": cfg.sample.guidance_scale,
        "sampler": cfg.sample.kind,
        "num_steps": cfg.sample.num_steps,
        "noise": cfg.sample.noise,
        "noise_level": cfg.sample.noise_level,
    }
    kinds = np.array([m.get("kind", "") for m in prompt_set.metadata[:n] for _ in range(g)])
    result["accuracy_by_kind"] = {
        kind: round(float(ok[kinds == kind].mean()), 4) for kind in sorted(set(kinds))
    }
    result["failure_causes"] = {
        k: round(v, 4) for k, v in failure_causes(images, constraints).items()
    }
    if g > 1:
        result["coverage"] = {k: round(v, 4) for k, v in group_coverage(ok.reshape(n, g)).items()}
        params, rm_cfg = reward_model.load(_REWARD.value or None)
        scores = reward_model.host_scorer(params, rm_cfg)(images, prompts)
        agreement = group_agreement(scores.reshape(n, g), ok.reshape(n, g))
        # NaN (no group with both verdicts) is written as null, keeping the line valid JSON.
        result["reward_model"] = {k: None if v != v else round(v, 4) for k, v in agreement.items()}
    print(json.dumps(result))


def run() -> None:
    runtime.run(main, __doc__)


if __name__ == "__main__":
    run()
