"""Pre-trains the built-in generator with the rectified-flow loss; see configs/pretrain.py.

    python launch/pretrain.py --config=configs/pretrain.py --workdir=workdirs/pretrain \
        --cpu_devices=2

Writes WORKDIR/pretrain_metrics.jsonl (loss every `log_every` steps, held-out
oracle accuracy at every evaluation), checkpoints/step_N.msgpack, and the
shipped pick as generator.msgpack + generator.json + samples.png (also into
`export_dir` when set).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import ml_collections
from absl import flags
from ml_collections import config_flags

from bpgo_jax import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pre-training config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints, weights.")
_CACHE = runtime.define_compile_cache_flag()
_CPU_DEVICES = runtime.define_cpu_devices_flag(
    "N must divide train.batch_size and eval.batch_size."
)
flags.adopt_module_key_flags(runtime)  # list them in --help
flags.mark_flags_as_required(["config", "workdir"])


def image_model_block(cfg: ml_collections.ConfigDict) -> dict:
    """`config.model` as configs/image.py spells it (init: where the weights ship)."""
    return cfg.model.to_dict() | {"init": "bpgo_jax/world/assets/generator.msgpack"}


def run_lineage(init: str) -> list[dict]:
    """Earlier runs behind `init` (a WORKDIR/checkpoints/step_N.msgpack), oldest first.

    Read from each run's WORKDIR/run.json (or an exported generator's
    generator.json), so a model trained in several continued runs ships with
    every command that made it.
    """
    if init == "random":
        return []
    path = Path(init)
    run_file = path.resolve().parent.parent / "run.json"  # (parents[1] fails near the root)
    shipped = path.with_suffix(".json")  # an exported generator records its own lineage
    if not run_file.is_file() and shipped.is_file():
        info = json.loads(shipped.read_text())
        return info["continues"] + [{"command": info["command"], "steps": info["steps"]}]
    if not run_file.is_file():
        return [{"init": init}]
    prev = json.loads(run_file.read_text())
    steps = int(path.stem.removeprefix("step_")) if path.stem.startswith("step_") else None
    return prev["lineage"] + [{"command": prev["command"], "steps": steps}]


def text_init_record(cfg: ml_collections.ConfigDict) -> dict | None:
    """Where a fresh generator's text encoder came from, with the command that
    trained that tower when its workdir has one (launch/train_reward_model.py)."""
    if not cfg.text_init or cfg.model.init != "random":
        return None
    run_file = Path(cfg.text_init).resolve().parent / "run.json"
    command = json.loads(run_file.read_text())["command"] if run_file.is_file() else None
    return {"path": cfg.text_init, "command": command}


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def main(argv: list[str]) -> None:
    del argv
    runtime.set_cpu_devices(_CPU_DEVICES.value)
    runtime.enable_compile_cache(_CACHE.value)
    import jax
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from bpgo_jax import pretrain
    from bpgo_jax.logs import captioned_grid
    from bpgo_jax.models import load_params, save_params
    from bpgo_jax.models.tiny import tiny_model
    from bpgo_jax.parallel.mesh import batch_sharding, make_mesh, replicated
    from bpgo_jax.prompts import load_prompts
    from bpgo_jax.world import reward_model

    cfg: ml_collections.ConfigDict = _CONFIG.value
    # One data axis over every device: each step's batch is split over them
    # and the parameters replicated (the model is small).
    mesh = make_mesh((-1,), ("data",))
    for field, size in (("train", cfg.train.batch_size), ("eval", cfg.eval.batch_size)):
        if size % mesh.size:
            sys.exit(
                f"error: config.{field}.batch_size={size} is not divisible by the "
                f"{mesh.size} devices"
            )
    shard, replicate = batch_sharding(mesh), replicated(mesh)
    if cfg.model.name != "tiny_unet":
        sys.exit(f"error: config.model.name={cfg.model.name!r}: only tiny_unet is pre-trained here")
    try:
        model = tiny_model(cfg.model)
    except ValueError as err:
        sys.exit(f"error: {err}")
    workdir = Path(_WORKDIR.value)
    (workdir / "checkpoints").mkdir(parents=True, exist_ok=True)
    metrics_path = workdir / "pretrain_metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    command = " ".join(["python", *sys.argv])
    lineage = run_lineage(cfg.model.init)
    run = {"command": command, "lineage": lineage}
    (workdir / "run.json").write_text(json.dumps(run, indent=1) + "\n")

    tc = cfg.train
    optimizer = pretrain.make_optimizer(tc)
    rng = jax.random.key(cfg.seed)
    like = model.init(rng)  # the parameter structure any loaded weights must have

    def load(field: str, path: str):
        try:
            return load_params(path, like)
        except ValueError as err:
            sys.exit(f"error: config.{field}: {err}")

    start_params = None
    if cfg.model.init != "random":  # continue from earlier weights (a checkpoint)
        start_params = load("model.init", cfg.model.init)
    elif cfg.text_init:  # a fresh UNet over a CLIP-like model's text tower
        try:
            tower = reward_model.load(cfg.text_init)[0].get("text_tower")
            if tower is None:
                raise ValueError("no text_tower in it: not a WorldCLIP model")
            start_params = (like[0], {"text": pretrain.text_from_clip(like[1]["text"], tower)})
        except ValueError as err:
            sys.exit(f"error: config.text_init={cfg.text_init!r}: {err}")
    state = jax.device_put(
        pretrain.init_state(model, optimizer, rng, start_params or like), replicate
    )
    step_fn = pretrain.make_train_step(
        model, optimizer, tc.ema_decay, tc.time_sampling, tc.time_shift, cfg.distill.guidance_scale
    )
    distill = {}
    if cfg.distill.teacher:  # guidance distillation: the teacher's guided velocity is the target
        t_trainable, t_frozen = load("distill.teacher", cfg.distill.teacher)
        distill = {
            "teacher": {"trainable": t_trainable, "frozen": t_frozen},
            "empty_tokens": model.tokenize([""]),
        }
        distill = jax.device_put(distill, replicate)
    step_rng = jax.random.key(cfg.seed + 1)
    data_rng = np.random.default_rng(cfg.seed)

    heldout = load_prompts(cfg.eval.prompts_path)
    prompts = list(heldout.prompts)
    constraints = [m["constraints"] for m in heldout.metadata]
    compiled = pretrain.make_generate(model, cfg.sample)

    def generate(trainable, frozen, tokens, keys):
        return compiled(trainable, frozen, *jax.device_put((tokens, keys), shard))

    def evaluate(ema, n):
        tr, fr = ema["trainable"], ema["frozen"]
        return pretrain.evaluate_oracle(
            model,
            tr,
            fr,
            cfg.sample,
            prompts[:n],
            constraints[:n],
            seed=cfg.eval.seed,
            batch_size=cfg.eval.batch_size,
            generate=generate,
        )

    evals, window, losses = [], [], []
    start = time.time()
    print(f"data-parallel over {mesh.size} {jax.devices()[0].platform} device(s)")
    bar = tqdm(range(1, tc.steps + 1), desc="pretrain", dynamic_ncols=True)
    for step in bar:
        batch = pretrain.sample_batch(
            data_rng, tc.batch_size, model.tokenize, cfg.data.caption_dropout, cfg.data.split
        )
        images, tokens = jax.device_put((batch["images"], batch["tokens"]), shard)
        state, metrics = step_fn(state, images, tokens, step_rng, **distill)
        window.append(metrics)
        if step % cfg.log_every == 0 or step == tc.steps:
            got = jax.device_get(window)
            loss = float(np.mean([m["loss"] for m in got]))
            if not np.isfinite(loss):
                raise FloatingPointError(f"pre-training loss is {loss} at step {step}")
            window, elapsed = [], time.time() - start
            record = {"step": step, "loss": loss, "seconds": round(elapsed, 1)}
            record["grad_norm"] = float(np.mean([m["grad_norm"] for m in got]))
            append_jsonl(metrics_path, record)
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}")
        if step % cfg.eval.every == 0 or step == tc.steps:
            acc, _, _ = evaluate(state.ema, cfg.eval.num_prompts)
            path = workdir / "checkpoints" / f"step_{step}.msgpack"
            save_params(path, state.ema["trainable"], state.ema["frozen"])
            record = {"step": step, "oracle_accuracy": acc, "seconds": time.time() - start}
            evals.append(record | {"path": str(path), "loss": losses[-1] if losses else None})
            append_jsonl(metrics_path, record)
            tqdm.write(f"step {step}: held-out oracle accuracy {acc:.3f} ({cfg.eval.num_prompts})")
            if acc >= cfg.eval.stop_accuracy:  # good enough; more only eats RL headroom
                break

    chosen = pretrain.pick_checkpoint(evals, cfg.eval.max_accuracy)
    trainable, frozen = load_params(chosen["path"], (state.ema["trainable"], state.ema["frozen"]))
    n = min(cfg.eval.final_num_prompts, len(prompts))
    acc, ok, images = evaluate({"trainable": trainable, "frozen": frozen}, n)
    k = min(cfg.eval.num_images, n)
    labels = [f"{'OK' if o else '--'} {p}" for o, p in zip(ok[:k], prompts[:k], strict=True)]
    grid = captioned_grid(images[:k], labels)
    Image.fromarray(grid).save(workdir / "samples.png")
    save_params(workdir / "generator.msgpack", trainable, frozen)
    info = {
        "model": image_model_block(cfg),
        "command": command,
        "continues": lineage,
        "steps": chosen["step"],
        "steps_all_runs": chosen["step"] + sum(r.get("steps") or 0 for r in lineage),
        "total_steps": tc.steps,
        "batch_size": tc.batch_size,
        "final_loss": chosen["loss"],
        "heldout_oracle_accuracy": acc,
        "heldout_num_prompts": n,
        "heldout_prompts": Path(cfg.eval.prompts_path).name,
        "eval_seed": cfg.eval.seed,
        "sampler": {
            k: cfg.sample[k]
            for k in ("kind", "num_steps", "noise", "noise_level", "shift", "guidance_scale")
        },
        "weights": f"EMA (decay {tc.ema_decay:g})",
        "text_init": text_init_record(cfg),
        "distilled_from": (
            {"teacher": cfg.distill.teacher, "guidance_scale": cfg.distill.guidance_scale}
            if cfg.distill.teacher
            else None
        ),
        "train_seconds": round(evals[-1]["seconds"], 1),
        "evaluations": [{k: e[k] for k in ("step", "oracle_accuracy")} for e in evals],
    }
    (workdir / "generator.json").write_text(json.dumps(info, indent=1) + "\n")
    if cfg.export_dir:
        for name in ("generator.msgpack", "generator.json"):
            Path(cfg.export_dir).mkdir(parents=True, exist_ok=True)
            shutil.copy(workdir / name, Path(cfg.export_dir) / name)
    print(json.dumps({k: info[k] for k in ("steps", "final_loss", "heldout_oracle_accuracy")}))


def run() -> None:
    runtime.run(main, __doc__)


if __name__ == "__main__":
    run()
