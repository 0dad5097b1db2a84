"""bpgo-jax against an eager PyTorch DDPO loop: one RL epoch, side by side.

    python benchmarks/vs_pytorch.py
    python benchmarks/vs_pytorch.py --repeats=3 --epochs=3 --threads=2
    python benchmarks/vs_pytorch.py --attention=xla   # XLA's attention kernel on our side

Writes a random SD-layout diffusers folder (a 5.8 M-parameter UNet with
blocks 64/128/128 on 16x16x4 latents, a tiny VAE and CLIP text encoder), then
alternates, `--repeats` times: `launch/train.py --config=configs/sd_vs_pytorch.py`
on it, and benchmarks/ddpo_peer.py (ddpo-pytorch's algorithm in eager
PyTorch) on the same folder, each `--epochs` epochs in a fresh process. Both
do the same work per epoch: 16 samples of 10 DDIM steps (eta 1, no guidance)
in UNet calls of 8 rows, decode, JPEG reward, then a forward and backward of
every (sample, step) in micro-batches of 8 and one AdamW update of the full
UNet, in float32.

Prints per-stage medians over all epochs but each run's first (which holds
the compilation), the peer/ours ratios (above 1: bpgo-jax is faster), the
first epoch's time (our first run starts with an empty persistent compilation
cache, the later ones read it) and each side's peak RSS. Before timing it checks that the
two sides do the same work: the UNet calls and rows of each stage (counted on
the peer, derived from the config's batch layout on ours), the timesteps, and
one text encoding and UNet forward of the same weights (they must agree to
1e-4 of their scale).

torch's OpenMP threads spin while they wait, which makes runs beside other
jobs 5-30x slower and erratic: the peer runs with OMP_WAIT_POLICY=PASSIVE
(`--omp_wait_policy`; '' leaves torch's default, faster on an idle machine).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the same-weights check runs here
_REPEATS = flags.DEFINE_integer("repeats", 3, "Alternating runs of each side.")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Epochs per run (the first is reported apart).")
_THREADS = flags.DEFINE_integer("threads", os.cpu_count() or 1, "torch threads of the peer.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for the model and runs (a temp dir).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 1, "Our --cpu_devices.")
_ATTENTION = flags.DEFINE_enum(
    "attention", "auto", ["auto", "xla", "blocked"], "Our model.attention (auto: blocked on CPU)."
)
_OMP_WAIT = flags.DEFINE_string(
    "omp_wait_policy", "PASSIVE", "The peer's OMP_WAIT_POLICY ('' leaves torch's default)."
)

PROMPTS = ["a cat", "a dog", "a photo of a cat", "a photo of a dog", "a cat on a mat"] * 2


def _config():
    from bpgo_jax.configs.sd_vs_pytorch import get_config

    return get_config()


def _run_with_rss(cmd: list[str], env: dict) -> tuple[str, float, float]:
    """`cmd`'s stdout, wall seconds and peak resident memory in GB (from wait4)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            sys.exit(f"{' '.join(cmd[1:3])} failed ({proc.returncode}):\n{err.read()[-3000:]}")
        return out.read(), wall, usage.ru_maxrss / 1e6  # kB -> GB


def write_folder(root: Path) -> str:
    from bpgo_jax.testing.sd_folders import UNET_6M, save_sd_pipeline

    return save_sd_pipeline(root, UNET_6M)["folder"]


def expected_unet_work(config) -> dict:
    """UNet calls and rows per epoch of our run, from its batch layout: the rollout
    calls the network on `sample.batch_size` rows split into `rollout_chunks`
    micro-batches at each step; the update differentiates each micro-batch at
    each trained step."""
    from bpgo_jax.config import batch_layout

    layout = batch_layout(config, 1)
    steps, mb = config.sample.num_steps, config.train.micro_batch_size
    rollout_calls = layout["rollout_calls"] * layout["rollout_chunks"] * steps
    updates = layout["updates_per_inner_epoch"] * config.train.inner_epochs
    update_calls = updates * layout["micro_per_update"] * layout["trained_steps"]
    return {
        "rollout": {"calls": rollout_calls, "rows": rollout_calls * mb},
        "update": {"calls": update_calls, "rows": update_calls * mb},
    }


def check_same_model(folder: str, config) -> list[int]:
    """One text encoding and one UNet forward of both sides' loaded weights agree;
    returns our sampler's model timesteps."""
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from bpgo_jax.models import build_model
    from bpgo_jax.rollout import samplers

    cfg = config.model.copy_and_resolve_references()
    cfg.init = folder
    model, trainable, frozen = build_model(cfg, jax.random.key(0))
    tokens = np.asarray(model.tokenize(PROMPTS[:2]))
    cond = jax.jit(model.encode_text)(frozen, jnp.asarray(tokens))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *model.latent_shape)).astype(np.float32)
    t = np.asarray([901.0, 301.0], np.float32)
    ours = jax.jit(model.predict)(trainable, frozen, jnp.asarray(x), jnp.asarray(t), cond)
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    with torch.no_grad():
        ref_cond = text(torch.from_numpy(tokens).long())[0]
        ref = unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), ref_cond).sample
    for name, a, b in (
        ("text encoding", np.asarray(cond), ref_cond.numpy()),
        ("UNet forward", np.asarray(ours), ref.permute(0, 2, 3, 1).numpy()),
    ):
        err = float(np.abs(a - b).max()) / max(1.0, float(np.abs(b).max()))
        if not err <= 1e-4:
            sys.exit(f"the two sides' {name} differs by {err:.2e} of its scale")
        print(f"same weights: {name} agrees to {err:.1e} of its scale")
    sampler = samplers.make_sampler(config.sample, model)
    return [int(round(float(v))) for v in np.asarray(sampler.tables["model_t"])]


def run_ours(folder: str, prompts: Path, workdir: Path, epochs: int, cache: Path) -> dict:
    cmd = [
        sys.executable,
        "launch/train.py",
        "--config=configs/sd_vs_pytorch.py",
        f"--workdir={workdir}",
        f"--config.model.init={folder}",
        f"--config.prompts.path={prompts}",
        f"--config.train.num_epochs={epochs}",
        f"--config.model.attention={_ATTENTION.value}",
        f"--cpu_devices={_CPU_DEVICES.value}",
        f"--config.mesh.num_devices={_CPU_DEVICES.value}",  # a data-parallel mesh over them
        "--config.mesh.shape=(-1,1)",
        f"--compile_cache={cache}",  # empty for the first run, then filled
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    _, wall, rss = _run_with_rss(cmd, env)
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    epochs_ = [{k: r[k] for k in ("rollout_seconds", "train_seconds")} for r in rows]
    return {"epochs": epochs_, "wall": wall, "rss_gb": rss}


def run_peer(folder: str, prompts: Path, epochs: int, config) -> dict:
    s, t = config.sample, config.train
    cmd = [
        sys.executable,
        "benchmarks/ddpo_peer.py",
        f"--folder={folder}",
        f"--prompts={prompts}",
        f"--epochs={epochs}",
        f"--threads={_THREADS.value}",
        f"--num_steps={s.num_steps}",
        f"--eta={s.eta}",
        f"--prompts_per_epoch={s.prompts_per_epoch}",
        f"--group_size={s.group_size}",
        f"--batch_size={s.batch_size}",
        f"--micro_batch_size={t.micro_batch_size}",
        f"--lr={t.lr}",
        f"--weight_decay={t.weight_decay}",
        f"--clip_range={t.clip_range}",
        f"--adv_clip={config.advantage.clip}",
        f"--max_grad_norm={t.max_grad_norm}",
    ]
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if _OMP_WAIT.value:
        env["OMP_WAIT_POLICY"] = _OMP_WAIT.value
    out, wall, rss = _run_with_rss(cmd, env)
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "wall": wall, "rss_gb": rss}


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(e[key] for r in runs for e in r["epochs"][1:])


def main(argv: list[str]) -> None:
    del argv
    config = _config()
    if _EPOCHS.value < 2:
        sys.exit("--epochs must be >= 2: the first epoch of a run is reported apart")
    root = Path(_WORKDIR.value or tempfile.mkdtemp(prefix="vs_pytorch_"))
    root.mkdir(parents=True, exist_ok=True)
    folder = write_folder(root)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    ours_t = check_same_model(folder, config)

    ours_runs, peer_runs = [], []
    for rep in range(_REPEATS.value):
        ours_runs.append(
            run_ours(folder, prompts, root / f"ours_{rep}", _EPOCHS.value, root / "xla_cache")
        )
        peer_runs.append(run_peer(folder, prompts, _EPOCHS.value, config))
        o, p = ours_runs[-1]["epochs"][-1], peer_runs[-1]["epochs"][-1]
        print(
            f"repeat {rep}: ours {o['rollout_seconds']:.2f} + {o['train_seconds']:.2f} s, "
            f"peer {p['rollout_seconds']:.2f} + {p['train_seconds']:.2f} s (last epoch)",
            flush=True,
        )

    want = expected_unet_work(config)
    for run in peer_runs:
        for epoch in run["epochs"]:
            if epoch["unet"] != want:
                sys.exit(f"different work: the peer ran {epoch['unet']}, ours {want}")
    if peer_runs[0]["timesteps"] != ours_t:
        sys.exit(f"different timesteps: peer {peer_runs[0]['timesteps']}, ours {ours_t}")
    print(f"same work per epoch: {want}; timesteps {ours_t}")

    rows = []
    for stage, key in (("rollout", "rollout_seconds"), ("update", "train_seconds")):
        rows.append((stage, _median(ours_runs, key), _median(peer_runs, key)))
    whole = lambda runs: statistics.median(
        e["rollout_seconds"] + e["train_seconds"] for r in runs for e in r["epochs"][1:]
    )
    rows.append(("epoch", whole(ours_runs), whole(peer_runs)))
    first = lambda run: run["epochs"][0]["rollout_seconds"] + run["epochs"][0]["train_seconds"]
    n = _REPEATS.value * (_EPOCHS.value - 1)
    print(f"\nmedians of {n} epochs per side (the first of each run left out), seconds")
    print(f"{'stage':<14}{'bpgo-jax':>10}{'PyTorch':>10}{'peer/ours':>11}")
    for stage, ours, peer in rows:
        print(f"{stage:<14}{ours:>10.2f}{peer:>10.2f}{peer / ours:>11.2f}")
    print(f"{'first epoch':<14}{first(ours_runs[0]):>10.2f}{first(peer_runs[0]):>10.2f}"
          "   (first run: an empty compilation cache)")  # fmt: skip
    if len(ours_runs) > 1:
        warm = lambda runs: statistics.median(first(r) for r in runs[1:])
        print(f"{'first, warm':<14}{warm(ours_runs):>10.2f}{warm(peer_runs):>10.2f}"
              "   (later runs: programs read from the cache)")  # fmt: skip
    print(
        f"{'process wall':<14}{statistics.median(r['wall'] for r in ours_runs):>10.1f}"
        f"{statistics.median(r['wall'] for r in peer_runs):>10.1f}"
    )
    print(
        f"{'peak RSS, GB':<14}{max(r['rss_gb'] for r in ours_runs):>10.2f}"
        f"{max(r['rss_gb'] for r in peer_runs):>10.2f}"
    )
    print(f"(peer: {_THREADS.value} torch threads, OMP_WAIT_POLICY="
          f"{_OMP_WAIT.value or 'unset'}; ours: {_CPU_DEVICES.value} CPU device(s))")  # fmt: skip


if __name__ == "__main__":
    app.run(main)
