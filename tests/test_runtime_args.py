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


def test_commands_start_jax_on_the_cpu_without_libtpu_errors_where_no_tpu_is_attached():
    """With libtpu installed (the test extra) and JAX_PLATFORMS unset, a command on a
    machine where JAX finds only the CPU starts it there without libtpu's start-up
    errors. (On a machine with Google PCI devices, e.g. a GCE VM's gVNIC, the commands
    leave JAX to look for TPU chips: skipped there.)"""
    import os
    import subprocess
    import sys
    from glob import glob

    import pytest

    pytest.importorskip("libtpu")
    vendors = [Path(p).read_text().strip() for p in glob("/sys/bus/pci/devices/*/vendor")]
    if "0x1ae0" in vendors:
        pytest.skip("a Google PCI device: the commands let JAX look for TPU chips")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = (
        "from bpgo_jax import runtime\n"
        "runtime.prefer_cpu_without_accelerators()\n"
        "import jax\n"
        "print(jax.default_backend())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if proc.stdout.strip() != "cpu":
        pytest.skip(f"JAX found an accelerator ({proc.stdout.strip()})")
    assert "TPU" not in proc.stderr and "libtpu" not in proc.stderr, proc.stderr[-2000:]
