"""Process set-up shared by the `launch/` commands."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

DEFAULT_COMPILE_CACHE = str(Path.home() / ".cache" / "bpgo_jax" / "xla")


def quiet_absl() -> None:
    """Hides absl INFO lines (Orbax logs several per checkpoint save); ours stay."""
    logging.getLogger("absl").setLevel(logging.WARNING)


def enable_compile_cache(path: str) -> None:
    """JAX's persistent compilation cache at `path` ('' leaves it off).

    Programs that took over 2 s to compile are stored, so a resumed or repeated
    run, or the next run of a study, skips compiling them.
    """
    if not path:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


def define_cpu_devices_flag(note: str = ""):
    """The launchers' `--cpu_devices=N` flag (read it before jax is imported)."""
    from absl import flags

    return flags.DEFINE_integer(
        "cpu_devices",
        0,
        "Split the host CPU into N XLA devices that share each batch (CPU runs; 0 = as "
        "XLA_FLAGS say, one by default); XLA:CPU runs one program on about one core, so N = "
        f"the cores uses them all (README 'Speed'). {note}".strip(),
    )


def define_compile_cache_flag():
    """The launchers' `--compile_cache=DIR` flag (see `enable_compile_cache`)."""
    from absl import flags

    return flags.DEFINE_string(
        "compile_cache",
        DEFAULT_COMPILE_CACHE,
        "Persistent XLA compilation cache ('' disables); a resumed or repeated run, or the "
        "next run of a study, skips compiling.",
    )


def set_cpu_devices(n: int) -> None:
    """Splits the host CPU into `n` XLA devices; 0 leaves XLA_FLAGS as they are.

    XLA:CPU runs one of our programs on little more than one core, so a run
    on one CPU device leaves the other cores idle. With `n` devices the mesh
    shards every batch over `n` programs that run at once (README "Speed":
    ~1.6x per epoch with 2 on two cores). GPU/TPU runs are unaffected: their
    devices are the accelerators. Must run before jax is imported.
    """
    if n <= 0:
        return
    if "jax" in sys.modules:
        raise RuntimeError("set_cpu_devices must run before jax is imported")
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", "")
    )
    os.environ["XLA_FLAGS"] = f"{flags.strip()} --xla_force_host_platform_device_count={n}".strip()
