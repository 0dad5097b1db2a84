"""Runs a `launch/` command in a subprocess, as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_launch(script: str, *flags: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python launch/SCRIPT FLAGS...` with stdout and stderr captured as text."""
    cmd = [sys.executable, str(ROOT / "launch" / script), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)


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
