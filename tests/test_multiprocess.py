"""Runs across hosts and layouts.

- A multi-process run on this machine: two `launch/train.py` processes of 2
  CPU devices each, joined by `jax.distributed` (coordinator on 127.0.0.1,
  gloo collectives), as the hosts of a pod slice run. SIGTERM reaches one
  process during epoch 0: both finish the epoch, save one checkpoint together
  and exit with 75; the job run again resumes. The two parts give the metrics
  rows (rewards, advantages, priors, loss) and final parameters of one
  uninterrupted process with the same 4 devices, and only process 0 writes
  metrics. `launch/sample.py` as a job on its checkpoint writes every host's
  samples.
- A checkpoint written on one mesh restores onto another (full fine-tune and
  LoRA, optimiser state included).
- Meshes follow the hardware: CPU devices keep their order; the slices of a
  multi-slice TPU job go along the data axis.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from multiprocess_job import SIGTERM_REWARD, get_config, write_prompts
from PIL import Image
from tiny_config import tiny_config

from bpgo_jax.build import build_run, build_training
from bpgo_jax.checkpoint import Checkpointer
from bpgo_jax.models import save_params
from bpgo_jax.models.tiny import tiny_model
from bpgo_jax.parallel.mesh import BATCH_AXES, device_grid, make_mesh
from bpgo_jax.rewards.colour import saturation
from bpgo_jax.train import train

ROOT = Path(__file__).resolve().parents[1]
JOB_CONFIG = Path(__file__).resolve().parent / "multiprocess_job.py"
PROCESSES = 2
TIMEOUT_S = 300  # a job still running then is killed and the test fails
TIMING_KEYS = {"rollout_seconds", "train_seconds", "images_per_second"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """A launcher (`launch/train.py` unless `script`) as `PROCESSES` processes of one job,
    on 2 CPU devices each."""

    def __init__(self, tmp_path: Path, name: str, *flags: str, script: str = "train.py"):
        port = _free_port()
        self.logs = [tmp_path / f"{name}-{i}.log" for i in range(PROCESSES)]
        env = {
            **os.environ,
            # The config file imports jax: devices come from XLA_FLAGS, not --cpu_devices
            # (the other flags stay the tests', tests/conftest.py).
            "XLA_FLAGS": re.sub(
                r"--xla_force_host_platform_device_count=\d+",
                "--xla_force_host_platform_device_count=2",
                os.environ["XLA_FLAGS"],
            ),
            # Every program goes to the tests' compilation cache (`--compile_cache=`
            # leaves JAX's cache settings to the environment, tests/conftest.py's).
            # Only process 0 writes it (process 1's CPU cache keys differ: it compiles).
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        }
        self.procs = []
        for i, log in enumerate(self.logs):
            cmd = [
                sys.executable,
                str(ROOT / "launch" / script),
                f"--config={JOB_CONFIG}:{tmp_path}",
                "--compile_cache=",
                f"--coordinator=127.0.0.1:{port}",
                f"--num_processes={PROCESSES}",
                f"--process_id={i}",
                *flags,
            ]
            with open(log, "w") as out:
                self.procs.append(
                    subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
                )

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:  # by their ids, the ones this job started
            if p.poll() is None:
                p.kill()
            p.wait()

    def wait(self) -> list[tuple[int, str]]:
        """(exit code, output) of each process. A process that fails leaves the
        others waiting in a collective: once one has exited with neither 0 nor
        75, or at `TIMEOUT_S`, all are killed."""
        deadline = time.monotonic() + TIMEOUT_S
        with self:
            while any(p.poll() is None for p in self.procs):
                if time.monotonic() > deadline or any(
                    p.returncode not in (None, 0, 75) for p in self.procs
                ):
                    break
                time.sleep(0.2)
        results = [
            (p.returncode, log.read_text()) for p, log in zip(self.procs, self.logs, strict=True)
        ]
        for i, (code, text) in enumerate(results):
            assert code in (0, 75), f"process {i} exited with {code}:\n{text[-3000:]}"
        return results


def _rows(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING_KEYS} for x in lines]


def _params(tree) -> dict:
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _paths(tree) -> list:
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def _write_initial_weights(config, path: Path) -> None:
    """Seeded weights for the config's built-in model, drawn with numpy (LeCun
    normal kernels, N(0, 0.02) embeddings, unit norm scales, zero biases): the runs
    start from this file, so no process compiles Flax's random init, which
    takes XLA:CPU longer than the training programs."""
    shapes = jax.eval_shape(tiny_model(config.model).init, jax.random.key(0))
    rng = np.random.default_rng(config.seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "kernel" in name or "embedding" in name:
            scale = 1 / np.sqrt(np.prod(leaf.shape[:-1])) if "kernel" in name else 0.02
            return (scale * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        fill = 1.0 if "scale" in name else 0.0
        return np.full(leaf.shape, fill, leaf.dtype)

    save_params(path, *jax.tree_util.tree_map_with_path(draw, shapes))


@pytest.mark.slow
@pytest.mark.xdist_group("multiprocess")
def test_two_processes_match_one_and_resume_after_sigterm(tmp_path):
    write_prompts(tmp_path)
    config = get_config(str(tmp_path))
    init = tmp_path / "init.msgpack"
    _write_initial_weights(config, init)
    config.model.init = str(init)
    run = tmp_path / "run"
    flags = (
        f"--workdir={run}",
        f"--config.model.init={init}",
        f"--config.rewards.{SIGTERM_REWARD}.marker={tmp_path / 'sigterm_sent'}",
    )

    # SIGTERM reaches process 1 alone, during epoch 0's rollout.
    stopped = Job(tmp_path, "stopped", *flags).wait()
    assert [code for code, _ in stopped] == [75, 75]
    for _, text in stopped:
        assert _last_line(text).startswith("preempted: checkpoint of epoch 1"), text[-2000:]
    assert "SIGTERM received" in stopped[1][1] and "SIGTERM received" not in stopped[0][1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1"]
    assert [r["epoch"] for r in _rows(run)] == [0]

    # The reference (one process, the job's 4 devices) trains here meanwhile.
    with Job(tmp_path, "resumed", *flags) as resuming:
        config.mesh.num_devices = 4
        reference = train(config, tmp_path / "reference")
        resumed = resuming.wait()
    assert [code for code, _ in resumed] == [0, 0]
    rows, expected = _rows(run), _rows(tmp_path / "reference")
    assert [r["epoch"] for r in rows] == [0, 1]  # process 1 wrote no rows
    assert sorted(rows[0]) == sorted(expected[0])
    for got, want in zip(rows, expected, strict=True):
        # Within one float32 step of 1: at the tests' XLA:CPU optimisation level 0
        # (tests/conftest.py), 4 devices on an AVX2-only CPU round one ratio to
        # 1 - 2**-24; the default level users run is exact there.
        assert got["onpolicy_ratio_max_dev"] <= np.finfo(np.float32).eps
        for key, value in want.items():
            # Gloo's cross-process sums may add in another order than one process.
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-5, err_msg=key)
    # The job's last checkpoint, read onto the reference's mesh.
    ckpt = Checkpointer(run / "checkpoints", keep=1, use_async=False, read_only=True)
    step, state, _ = ckpt.restore_latest(reference.state)
    assert step == 2
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5),
        _params(state.trainable),
        _params(reference.state.trainable),
    )

    # launch/sample.py as a job on that checkpoint: process 0 writes every host's samples,
    # each file beside its own prompt and reward (recomputed from the PNG: 8-bit rounding).
    samples = tmp_path / "samples"
    prompts = ("a red circle", "a blue square")
    asked = [f"--prompt={p}" for p in prompts] + ["--num_per_prompt=4", f"--outdir={samples}"]
    Job(tmp_path, "sample", *flags[:2], *asked, script="sample.py").wait()
    index = json.loads((samples / "index.json").read_text())
    assert index["epoch"] == 2 and [e["prompt"] for e in index["images"]] == [
        p for p in prompts for _ in range(4)
    ]
    listed = np.asarray([e["rewards"]["saturation"] for e in index["images"]])
    pixels = np.stack([np.asarray(Image.open(samples / e["file"])) for e in index["images"]])
    recomputed = np.asarray(saturation(pixels.astype(np.float32) / 255))
    np.testing.assert_allclose(recomputed, listed, atol=5e-4)
    assert np.all(np.abs(recomputed[:, None] - listed[None]).argmin(axis=1) == np.arange(8))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_checkpoint_restores_onto_another_mesh(tmp_path, lora):
    """Saved from 8 devices with parameters, EMA and Adam moments split over fsdp,
    read on 2 devices of data parallelism (what `train` does on a resume):
    every leaf, bit for bit, on the new layout."""
    overrides = {
        "mesh.shape": (4, 2),
        "train.ema_decay": 0.9,
        "model.channels": (8,),  # one level: fewer programs to compile
        "model.attn_levels": (),
    }
    if lora:
        # The one level has no attention: the factors go on the middle block's.
        targets = (r"mid_attn/\w+_attn/(query|key|value|out)/kernel",)
        overrides["model.lora"] = {"rank": 2, "alpha": 4.0, "targets": targets}
    config = tiny_config(tmp_path, **overrides)
    _write_initial_weights(config, tmp_path / "init.msgpack")
    config.model.init = str(tmp_path / "init.msgpack")
    _, initial = build_training(*build_run(config))
    # Every leaf moved off its initial value (Adam's moments start at zero).
    written = jax.tree.map(lambda x: (x + 3).astype(x.dtype), initial)
    assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(written.opt_state))
    assert lora == any("lora_a" in jax.tree_util.keystr(p) for p, _ in _paths(written.trainable))
    saver = Checkpointer(tmp_path / "checkpoints", keep=1, use_async=False)
    saver.save(1, written, {"epoch": 1})
    saver.close()

    config.mesh.update(shape=(-1, 1), num_devices=2)
    _, like = build_training(*build_run(config))
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=1, use_async=False, read_only=True)
    step, state, meta = ckpt.restore_latest(like)
    assert step == 1 and meta == {"epoch": 1}
    jax.tree.map(np.testing.assert_array_equal, _params(state), _params(written))
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(like), strict=True):
        assert got.sharding == want.sharding and got.sharding.mesh.devices.size == 2


def test_cpu_meshes_keep_the_device_order():
    """The order single-process results were computed in."""
    devices = jax.devices()
    mesh = make_mesh((-1, 2), BATCH_AXES, devices)
    assert mesh.devices.tolist() == np.asarray(devices).reshape(-1, 2).tolist()


def test_the_slices_of_a_multi_slice_job_go_along_the_data_axis():
    # Device records as TPU runtimes describe them: two slices of 4, listed interleaved.
    devices = [
        SimpleNamespace(
            id=i, slice_index=i % 2, process_index=i % 2, platform="cpu", device_kind="cpu"
        )
        for i in range(8)
    ]
    grid = device_grid((4, 2), devices)
    assert [[d.slice_index for d in row] for row in grid] == [[0, 0], [0, 0], [1, 1], [1, 1]]
    assert sorted(d.id for d in grid.flat) == list(range(8))
    with pytest.raises(ValueError, match="2 slices"):
        device_grid((1, 8), devices)
