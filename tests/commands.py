"""Runs a `launch/` command in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_launch(script: str, *flags: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python launch/SCRIPT FLAGS...` with stdout and stderr captured as text."""
    cmd = [sys.executable, str(ROOT / "launch" / script), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)


def launch_tiny_run(
    config: str, workdir: Path, init: str, cache: str, *flags: str
) -> subprocess.CompletedProcess:
    """`launch/train.py --config=configs/CONFIG.py` (a model's `*_tiny_test` twin) from the
    model folder `init` on 8 CPU devices, asserted to exit 0. The hash seed is pinned:
    LoRA factors are merged in set order, so the traced program (and its compile-cache
    key) would otherwise change from process to process."""
    cmd = [
        sys.executable,
        str(ROOT / "launch" / "train.py"),
        f"--config=configs/{config}.py",
        f"--workdir={workdir}",
        f"--config.model.init={init}",
        f"--compile_cache={cache}",
        "--cpu_devices=8",
        *flags,
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONHASHSEED="0")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def config_file(path: Path, imports: str, expression: str) -> Path:
    """Writes a config file whose `get_config()` returns `expression`, evaluated after
    `imports` with the tests' folder on the path (for a command to read)."""
    path.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "from pathlib import Path\n"
        f"{imports}\n\n\n"
        "def get_config():\n"
        f"    return {expression}\n"
    )
    return path


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""
