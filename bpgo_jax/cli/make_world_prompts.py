"""Writes the world's prompt files (deterministic; re-running reproduces them byte for byte).

    python launch/make_world_prompts.py  # -> assets/prompts_{train,val,heldout}.jsonl

Each line: {"prompt": str, "metadata": {"constraints": {...}, "split": str, "kind": str}}.
Prompts are unique within a file. "val" prompts come from the train grammar
(train colour-shape pairs and templates) but never occur in the train file:
they measure what RL on train prompts does for unseen prompts of the same
distribution. "heldout" prompts name a held-out colour-shape pair or use
held-out templates: a harder, out-of-distribution probe.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from absl import flags

from bpgo_jax import runtime
from bpgo_jax.world import constraints as C
from bpgo_jax.world.grammar import sample_prompt

ASSETS = Path(__file__).resolve().parents[1] / "world" / "assets"


def make_prompts(split: str, n: int, seed: int) -> list[dict]:
    """n distinct prompts of `split` with their metadata."""
    rng = np.random.default_rng([seed, ("train", "heldout").index(split)])
    seen, out = set(), []
    for _ in range(100 * n):
        caption, cons = sample_prompt(rng, split)
        if caption in seen:
            continue
        seen.add(caption)
        meta = {"constraints": cons, "split": split, "kind": C.kind(cons)}
        out.append({"prompt": caption, "metadata": meta})
        if len(out) == n:
            return out
    raise ValueError(f"could not find {n} distinct {split} prompts")


def with_split(prompt: dict, split: str) -> dict:
    return {**prompt, "metadata": {**prompt["metadata"], "split": split}}


def define_flags() -> None:
    """The command's flags, defined when it runs rather than on import.

    Other code imports `make_prompts` from here; module-level flags would
    clash with other commands' flags of the same name (`--seed`) in its process.
    """
    flags.DEFINE_string("out_dir", str(ASSETS), "Where the prompt files go.")
    flags.DEFINE_integer("num_train", 2000, "Prompts in prompts_train.jsonl.")
    flags.DEFINE_integer("num_val", 256, "Prompts in prompts_val.jsonl.")
    flags.DEFINE_integer("num_heldout", 256, "Prompts in prompts_heldout.jsonl.")
    flags.DEFINE_integer("seed", 0, "Seed of the prompt grammar's sampler.")


def main(argv: list[str]) -> None:
    del argv
    args = flags.FLAGS
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_val = make_prompts("train", args.num_train + args.num_val, args.seed)
    files = {
        "train": train_val[: args.num_train],
        "val": [with_split(p, "val") for p in train_val[args.num_train :]],
        "heldout": make_prompts("heldout", args.num_heldout, args.seed),
    }
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
