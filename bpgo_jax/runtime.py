"""Process set-up shared by the `launch/` commands."""

from __future__ import annotations

import logging
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
