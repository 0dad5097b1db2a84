"""Process set-up shared by the `launch/` commands."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from bpgo_jax import errors

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


_SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def resolve_config_path(value: str) -> str:
    """`configs/NAME.py[:arg]` names a shipped config when no such file exists here.

    So `--config=configs/image.py` works from a checkout and from an installed
    wheel alike; a user's own file of that path takes precedence.
    """
    path, sep, arg = value.partition(":")
    if Path(path).exists():
        return value
    shipped = (
        _SHIPPED_CONFIGS / Path(path).relative_to("configs")
        if path.startswith("configs/")
        else None
    )
    if shipped is not None and shipped.is_file():
        return f"{shipped}{sep}{arg}"
    return value


def _resolve_config_args(argv: list[str]) -> list[str]:
    out = []
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            arg = "--config=" + resolve_config_path(arg[len("--config=") :])
        elif i > 0 and argv[i - 1] == "--config":
            arg = resolve_config_path(arg)
        out.append(arg)
    return out


def run(main: Callable[[list[str]], None], doc: str | None = None) -> None:
    """`absl.app.run(main)` for a command: a `UserError` becomes one `error:` line.

    `doc` (the command module's docstring) is the `--help` text. A preempted
    run exits with `errors.EXIT_PREEMPTED` so a scheduler requeues it.
    """
    from absl import app, flags

    if doc is not None:
        sys.modules["__main__"].__doc__ = doc
    # `--help` lists the key flags of the script being run: make the command
    # module's flags (and those it adopted) the script's own.
    for flag in flags.FLAGS.get_key_flags_for_module(main.__module__):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

    def guarded(argv: list[str]) -> None:
        try:
            main(argv)
        except errors.UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(errors.EXIT_ERROR)
        except errors.Preempted as err:
            print(f"preempted: {err}", file=sys.stderr)
            sys.exit(errors.EXIT_PREEMPTED)

    app.run(guarded, argv=_resolve_config_args(sys.argv))
