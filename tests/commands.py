"""Runs a `launch/` command in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_launch(
    script: str, *flags: str, cwd: Path | None = None, pinned: bool = False
) -> subprocess.CompletedProcess:
    """`python launch/SCRIPT FLAGS...` with stdout and stderr captured as text.

    `pinned`: on CPU with the hash seed pinned and a 10-minute limit, as the runs that
    train or sample do. LoRA factors are merged in set order, so without a pinned seed
    the traced program (and its compile-cache key) changes from process to process."""
    cmd = [sys.executable, str(ROOT / "launch" / script), *flags]
    if not pinned:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONHASHSEED="0")
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def compile_cache() -> str:
    """The tests' persistent compilation cache (tests/conftest.py), for `--compile_cache`."""
    return os.environ["JAX_COMPILATION_CACHE_DIR"]


def launch_tiny_run(
    config: str, workdir: Path, init: str, *flags: str
) -> subprocess.CompletedProcess:
    """`launch/train.py --config=configs/CONFIG.py` (a model's `*_tiny_test` twin) from the
    model folder `init` on 8 CPU devices, asserted to exit 0."""
    proc = run_launch(
        "train.py",
        f"--config=configs/{config}.py",
        f"--workdir={workdir}",
        f"--config.model.init={init}",
        f"--compile_cache={compile_cache()}",
        "--cpu_devices=8",
        *flags,
        cwd=ROOT,
        pinned=True,
    )
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
