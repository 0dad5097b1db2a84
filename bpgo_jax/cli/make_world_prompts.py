"""Writes the world's prompt files (deterministic; re-running reproduces them byte for byte).

    python launch/make_world_prompts.py  # -> bpgo_jax/world/assets/prompts_*.jsonl

Files: prompts_{train,val,heldout,test_val,test_heldout}.jsonl.

Each line: {"prompt": str, "metadata": {"constraints": {...}, "split": str, "kind": str}}.
Prompts are unique within a file. "val" prompts come from the train grammar
(train colour-shape pairs and templates) but never occur in the train file:
they measure what RL on train prompts does for unseen prompts of the same
distribution. "heldout" prompts name a held-out colour-shape pair or use
held-out templates: a harder, out-of-distribution probe.

"val" and "heldout" have served for tuning and early stopping (they are the
dev sets); "test_val" and "test_heldout" are the test sets the RL configs and
the study report on. Each continues its grammar's stream of distinct prompts
past the dev set, skipping every prompt of the other files and every caption
of the shipped reward models' early-stopping sets (`selection_captions`), so
no test prompt has chosen anything.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from absl import flags

from bpgo_jax import runtime
from bpgo_jax.world import constraints as C
from bpgo_jax.world.grammar import sample_prompt

ASSETS = Path(__file__).resolve().parents[1] / "world" / "assets"
# Seeds of the WorldCLIP runs whose early-stopping sets (configs/reward_model.py:
# `eval_scenes` fresh `eval_split` scenes, rng seed + 1) chose shipped weights:
# the shipped reward model (seed 0) and the generator's text tower (seed 1,
# generator.json "text_init").
SELECTION_SEEDS = (0, 1)


def distinct_prompts(split: str, seed: int) -> Iterator[dict]:
    """The grammar's stream of distinct prompts of `split`, with their metadata."""
    rng = np.random.default_rng([seed, ("train", "heldout").index(split)])
    seen = set()
    misses = 0
    while misses < 100_000:  # a stream this long without a new caption: the grammar is spent
        caption, cons = sample_prompt(rng, split)
        if caption in seen:
            misses += 1
            continue
        misses = 0
        seen.add(caption)
        yield {
            "prompt": caption,
            "metadata": {"constraints": cons, "split": split, "kind": C.kind(cons)},
        }


def make_prompts(
    split: str, n: int, seed: int, *, skip: int = 0, exclude: frozenset[str] = frozenset()
) -> list[dict]:
    """n distinct prompts of `split`: the stream's after its first `skip`, less `exclude`."""
    out = []
    for i, prompt in enumerate(distinct_prompts(split, seed)):
        if i < skip or prompt["prompt"] in exclude:
            continue
        out.append(prompt)
        if len(out) == n:
            return out
    raise ValueError(f"could not find {n} distinct {split} prompts")


def selection_captions(seeds: tuple[int, ...] = SELECTION_SEEDS) -> frozenset[str]:
    """Every caption of the reward-model early-stopping sets of runs with these seeds."""
    from bpgo_jax.configs.reward_model import get_config
    from bpgo_jax.world.evaluate import reward_eval_set

    cfg = get_config()
    out = set()
    for seed in seeds:  # as cli/train_reward_model.py draws it
        rng = np.random.default_rng(seed + 1)
        out.update(reward_eval_set(rng, cfg.eval_scenes, cfg.eval_split)["captions"])
    return frozenset(out)


def with_split(prompt: dict, split: str) -> dict:
    return {**prompt, "metadata": {**prompt["metadata"], "split": split}}


def prompt_files(
    seed: int = 0,
    num_train: int = 2000,
    num_val: int = 256,
    num_heldout: int = 256,
    num_test_val: int = 512,
    num_test_heldout: int = 512,
) -> dict[str, list[dict]]:
    """File name stem (`prompts_STEM.jsonl`) -> its prompts."""
    train_val = make_prompts("train", num_train + num_val, seed)
    heldout = make_prompts("heldout", num_heldout, seed)
    used = frozenset(p["prompt"] for p in train_val + heldout) | selection_captions()
    test_val = make_prompts("train", num_test_val, seed, skip=len(train_val), exclude=used)
    test_heldout = make_prompts("heldout", num_test_heldout, seed, skip=num_heldout, exclude=used)
    return {
        "train": train_val[:num_train],
        "val": [with_split(p, "val") for p in train_val[num_train:]],
        "heldout": heldout,
        "test_val": [with_split(p, "test_val") for p in test_val],
        "test_heldout": [with_split(p, "test_heldout") for p in test_heldout],
    }


def define_flags() -> None:
    """The command's flags, defined when it runs rather than on import.

    Other code imports `make_prompts` from here; module-level flags would
    clash with other commands' flags of the same name (`--seed`) in its process.
    """
    flags.DEFINE_string("out_dir", str(ASSETS), "Where the prompt files go.")
    flags.DEFINE_integer("num_train", 2000, "Prompts in prompts_train.jsonl.")
    flags.DEFINE_integer("num_val", 256, "Prompts in prompts_val.jsonl.")
    flags.DEFINE_integer("num_heldout", 256, "Prompts in prompts_heldout.jsonl.")
    flags.DEFINE_integer("num_test_val", 512, "Prompts in prompts_test_val.jsonl.")
    flags.DEFINE_integer("num_test_heldout", 512, "Prompts in prompts_test_heldout.jsonl.")
    flags.DEFINE_integer("seed", 0, "Seed of the prompt grammar's sampler.")


def main(argv: list[str]) -> None:
    del argv
    args = flags.FLAGS
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = prompt_files(
        args.seed,
        args.num_train,
        args.num_val,
        args.num_heldout,
        args.num_test_val,
        args.num_test_heldout,
    )
    for split, prompts in files.items():
        path = out_dir / f"prompts_{split}.jsonl"
        lines = [json.dumps(p, sort_keys=True) for p in prompts]
        path.write_text("\n".join(lines) + "\n")
        print(f"wrote {len(lines)} prompts to {path}")


def run() -> None:
    define_flags()
    runtime.run(main, __doc__)


if __name__ == "__main__":
    run()
