"""The training and read-only commands end to end, as a user runs them.

`launch/train.py` with the DDPO tracker and reference priors across a SIGTERM
and a resume; `launch/estimate_priors.py` and `launch/sample.py` on its
checkpoint. The read-only tools must leave a run's workdir byte for byte
as it was. (Training on the priors `estimate_priors` writes, `prior.kind=fixed`:
tests/test_wan_i2v.py's launched run.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from commands import config_file, last_line, run_launch

from bpgo_jax.prompts import load_prompts


def _config_file(tmp_path: Path, **overrides) -> Path:
    """A config file with `tiny_config(tmp_path, **overrides)` for the commands."""
    return config_file(
        tmp_path / "tiny.py",
        "from tiny_config import tiny_config",
        f"tiny_config(Path({str(tmp_path)!r}), **{overrides!r})",
    )


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def _rows(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def _train(config: Path, workdir: Path, *flags: str):
    done = run_launch(
        "train.py", f"--config={config}", f"--workdir={workdir}", "--compile_cache=", *flags
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return _rows(workdir)


@pytest.mark.slow
def test_sigterm_resume_then_read_only_tools(tmp_path):
    """A DDPO-tracker run with reference priors, stopped by SIGTERM after epoch 0,
    refused with a changed config, resumed; then priors and samples from its
    checkpoint, the workdir left byte for byte as it was."""
    marker = tmp_path / "sigterm_sent"
    config = _config_file(
        tmp_path,
        **{
            "mesh.num_devices": 1,
            "advantage.method": "ddpo_tracker",
            "prior.kind": "reference",
            "rewards": {"saturation": {"weight": 1.0}, "sigterm_once": {"weight": 0.0}},
        },
    )
    # A host reward that sends SIGTERM the first time it runs (registered by the config).
    config.write_text(
        config.read_text() + "\n\nimport os, signal\nimport numpy as np\n"
        "from bpgo_jax.rewards.base import Reward, register\n\n\n"
        "def _score(images, prompts, metadata):\n"
        f"    if not os.path.exists({str(marker)!r}):\n"
        f"        open({str(marker)!r}, 'w').close()\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return np.zeros(len(images), np.float32)\n\n\n"
        "@register('sigterm_once')\n"
        "def _build(cfg):\n"
        "    return Reward(name='sigterm_once', jittable=False, fn=_score)\n"
    )
    run = tmp_path / "run"
    flags = (f"--config={config}", f"--workdir={run}", "--compile_cache=")
    done = run_launch("train.py", *flags)
    assert done.returncode == 75, done.stderr[-3000:]
    assert last_line(done.stderr).startswith("preempted: checkpoint of epoch 1")
    assert [r["epoch"] for r in _rows(run)] == [0]

    changed = run_launch("train.py", *flags, "--config.advantage.method=grpo")
    assert changed.returncode == 1 and "Traceback" not in changed.stderr
    line = last_line(changed.stderr)
    assert line.startswith("error: ") and "advantage.method 'ddpo_tracker' -> 'grpo'" in line, line
    assert "--allow_config_change" in line

    rows = _train(config, run)  # resumes: epoch 1 only, the tracker's history restored
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(r["onpolicy_ratio_max_dev"] == 0.0 and np.isfinite(r["loss"]) for r in rows)
    # The reference policy's rollouts anchored every prompt before its first group
    # (the prior left init_value 0.5), and the checkpointed anchors stay fixed.
    assert rows[0]["prior_mean"] != pytest.approx(0.5)
    assert rows[1]["prior_mean"] == pytest.approx(rows[0]["prior_mean"], abs=1e-6)
    before = _snapshot(run)

    # Priors from the checkpoint: one per prompt, a valid prompt file.
    priors = tmp_path / "priors.jsonl"
    done = run_launch(
        "estimate_priors.py",
        f"--config={config}",
        f"--workdir={run}",
        "--k=4",
        f"--output={priors}",
        "--compile_cache=",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with_priors = load_prompts(priors)
    assert len(with_priors) == 4 and np.all(np.isfinite(with_priors.priors))

    # Samples from the checkpoint: PNGs and a valid index; the run is untouched.
    out = tmp_path / "samples"
    done = run_launch(
        "sample.py",
        f"--config={config}",
        f"--workdir={run}",
        f"--outdir={out}",
        "--prompt=a red circle",
        "--num_per_prompt=4",
        "--compile_cache=",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    index = json.loads((out / "index.json").read_text())
    assert index["epoch"] == 2 and len(index["images"]) == 4
    assert all((out / e["file"]).is_file() for e in index["images"])
    assert _snapshot(run) == before

    # A directory without checkpoints is refused in one line and not written to.
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    done = run_launch(
        "sample.py",
        f"--config={config}",
        f"--workdir={empty}",
        f"--outdir={out}",
        "--prompt=x",
        "--compile_cache=",
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert last_line(done.stderr).startswith("error: ") and "--base_weights" in done.stderr
    assert list(empty.iterdir()) == []
