"""Samples images from a run's latest checkpoint (or the config's weights).

    python launch/sample.py --config=configs/image.py --workdir=runs/image \
        --outdir=samples --prompt="a red circle" --prompt="two blue squares" --num_per_prompt=4
    python launch/sample.py --config=configs/image.py --workdir=runs/image \
        --outdir=samples --prompts_file=bpgo_jax/world/assets/prompts_heldout.jsonl

Writes `OUTDIR/NNNNN.png` and `OUTDIR/index.json` (file, prompt, seed index and
the config's rewards for each image).
"""

import json
import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from bpgo_jax import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory whose latest checkpoint is used.")
_OUTDIR = flags.DEFINE_string("outdir", None, "Where PNGs and index.json go.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A .txt or .jsonl prompt file.")
_NUM = flags.DEFINE_integer("num_per_prompt", 1, "Images per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_EMA = flags.DEFINE_bool("use_ema", True, "Use EMA weights when the run kept them.")
flags.mark_flags_as_required(["config", "workdir", "outdir"])


def main(argv):
    del argv
    runtime.quiet_absl()
    import jax
    import numpy as np
    from PIL import Image

    from bpgo_jax.prompts import PromptSet, load_prompts
    from bpgo_jax.train import Trainer

    if _PROMPTS_FILE.value:
        prompts = load_prompts(_PROMPTS_FILE.value)
    elif _PROMPT.value:
        prompts = PromptSet(tuple(_PROMPT.value), tuple({} for _ in _PROMPT.value), None)
    else:
        sys.exit("error: give --prompt (repeatable) or --prompts_file")
    config = _CONFIG.value
    config.log.tensorboard = False
    try:
        trainer = Trainer(config, _WORKDIR.value)
    except ValueError as err:
        sys.exit(f"error: {err}")
    n, k, bs = len(prompts), _NUM.value, config.sample.batch_size
    count = -(-n * k // bs) * bs // k if (bs % k == 0) else None
    if count is None:
        sys.exit(f"error: sample.batch_size={bs} must be a multiple of --num_per_prompt={k}")
    ids = np.arange(count) % n
    state = trainer.state
    params = state.ema if _EMA.value and config.train.ema_decay else state.trainable
    _, _, _, scores, images, texts = trainer.generate(
        ids,
        prompts,
        per_prompt=k,
        trainable=params,
        epoch_key=jax.device_put(jax.random.key_data(jax.random.key(_SEED.value)), trainer.repl),
        bar_desc="sampling",
    )
    if jax.process_index() != 0:
        return
    out = Path(_OUTDIR.value)
    out.mkdir(parents=True, exist_ok=True)
    scores = {name: np.asarray(v) for name, v in scores.items()}
    index = []
    for i in range(n * k):
        name = f"{i:05d}.png"
        Image.fromarray((np.clip(images[i], 0, 1) * 255).round().astype(np.uint8)).save(out / name)
        index.append(
            {
                "file": name,
                "prompt": texts[i],
                "sample": i % k,
                "rewards": {r: float(v[i]) for r, v in scores.items()},
            }
        )
    (out / "index.json").write_text(json.dumps({"epoch": trainer.epoch, "images": index}, indent=1))
    print(f"wrote {n * k} images to {out}")


def run() -> None:
    runtime.run(main, __doc__)


if __name__ == "__main__":
    run()
