"""Samples images or videos from a run's latest checkpoint (or the config's base weights).

    python launch/sample.py --config=configs/image.py --workdir=runs/image \
        --outdir=samples --prompt="a red circle" --prompt="two blue squares" --num_per_prompt=4
    python launch/sample.py --config=configs/image.py --workdir=runs/image \
        --outdir=samples --prompts_file=bpgo_jax/world/assets/prompts_heldout.jsonl
    python launch/sample.py --config=configs/image.py --base_weights --outdir=base_samples \
        --prompt="a red circle"

Writes `OUTDIR/NNNNN.png` and `OUTDIR/index.json` (file, prompt, sample index
and the config's rewards of each image; a non-finite reward is null). A
video model writes `NNNNN.gif` and, with imageio-ffmpeg installed,
`NNNNN.mp4` at --fps (index fields `file`: the GIF, `mp4`, `frames`). Reads
the workdir only: nothing there is written, and a workdir without a
checkpoint is refused unless --base_weights is given.
"""

import json
import math
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from bpgo_jax import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory whose latest checkpoint is used.")
_BASE = flags.DEFINE_bool("base_weights", False, "Sample the config's initial weights instead.")
_OUTDIR = flags.DEFINE_string("outdir", None, "Where PNGs (GIFs, MP4s) and index.json go.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A .txt or .jsonl prompt file.")
_NUM = flags.DEFINE_integer("num_per_prompt", 1, "Images per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_EMA = flags.DEFINE_bool("use_ema", True, "Use EMA weights when the run kept them.")
_FPS = flags.DEFINE_float("fps", 16.0, "Frame rate of written videos (video models).")
_CACHE = runtime.define_compile_cache_flag()
_CPU_DEVICES = runtime.define_cpu_devices_flag()
_DISTRIBUTED = runtime.define_distributed_flags()
flags.adopt_module_key_flags(runtime)  # list them in --help
flags.mark_flags_as_required(["config", "outdir"])


def main(argv):
    del argv
    runtime.start(_CPU_DEVICES.value, _CACHE.value, _DISTRIBUTED)
    import jax
    import numpy as np

    from bpgo_jax.build import load_policy
    from bpgo_jax.errors import UserError
    from bpgo_jax.logs import save_sample
    from bpgo_jax.parallel.host import to_host
    from bpgo_jax.prompts import PromptSet, load_prompts, sample_prompts
    from bpgo_jax.rollout.step import all_hosts_images

    if not _WORKDIR.value and not _BASE.value:
        raise UserError("give --workdir (a training run) or --base_weights")
    if _PROMPTS_FILE.value:
        prompts = load_prompts(_PROMPTS_FILE.value)
    elif _PROMPT.value:
        prompts = PromptSet(tuple(_PROMPT.value), tuple({} for _ in _PROMPT.value), None)
    else:
        raise UserError("give --prompt (repeatable) or --prompts_file")
    config = _CONFIG.value
    n, k, bs = len(prompts), _NUM.value, config.sample.batch_size
    if k < 1 or bs % k:
        raise UserError(f"sample.batch_size={bs} must be a multiple of --num_per_prompt={k}")
    if not _FPS.value > 0:
        raise UserError(f"--fps={_FPS.value} must be positive")
    policy = load_policy(config, _WORKDIR.value, base_weights=_BASE.value, use_ema=_EMA.value)
    run = policy.run
    count = -(-n * k // bs) * bs // k
    key = jax.device_put(jax.random.key_data(jax.random.key(_SEED.value)), run.replicated)
    ids = np.arange(count) % n
    rollout = run.generate(
        ids,
        prompts,
        per_prompt=k,
        trainable=policy.trainable,
        epoch_key=key,
        desc="sampling",
    )
    # Collectives: every process gathers, then process 0 writes every host's samples.
    scores = to_host(rollout.scores)
    images = all_hosts_images(rollout.images, run.batch_sharding, bs)
    texts = [prompts.prompts[i] for i in sample_prompts(ids, k, np.arange(len(ids) * k))]
    if jax.process_index() != 0:
        return
    out = Path(_OUTDIR.value)
    out.mkdir(parents=True, exist_ok=True)
    finite = lambda x: float(x) if math.isfinite(x) else None
    index = []
    for i in range(n * k):
        files = save_sample(out, f"{i:05d}", images[i], _FPS.value)
        index.append(
            {
                **files,
                "prompt": texts[i],
                "sample": i % k,
                "rewards": {r: finite(v[i]) for r, v in scores.items()},
            }
        )
    text = json.dumps({"epoch": policy.epoch, "images": index}, indent=1, allow_nan=False)
    (out / "index.json").write_text(text)
    kind = "videos" if np.ndim(images) == 5 else "images"
    print(f"wrote {n * k} {kind} to {out}")


def run() -> None:
    runtime.run(main, __doc__)


if __name__ == "__main__":
    run()
