"""The launchers' argument handling before absl parses the flags."""

from __future__ import annotations

from pathlib import Path

from bpgo_jax import runtime

SHIPPED = Path(runtime.__file__).resolve().parent / "configs" / "image.py"


def test_config_paths_are_resolved_up_to_the_double_dash_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: configs/image.py names the shipped one
    argv = [
        "train.py",
        "--config=configs/image.py:arg",
        "--config",
        "configs/image.py",
        "--",
        "--config=configs/image.py",
        "--config",
        "configs/image.py",
    ]
    assert runtime._resolve_config_args(argv) == [
        "train.py",
        f"--config={SHIPPED}:arg",
        "--config",
        str(SHIPPED),
        "--",
        "--config=configs/image.py",
        "--config",
        "configs/image.py",
    ]
