"""Process set-up shared by the `launch/` commands."""

from __future__ import annotations

import ast
import difflib
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

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
        f"the cores uses them all (docs/performance.md). {note}".strip(),
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
    shards every batch over `n` programs that run at once (docs/performance.md:
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


class DistributedFlags(NamedTuple):
    """The launchers' multi-process flags (`define_distributed_flags`)."""

    distributed: Any  # absl FlagHolder[bool]
    coordinator: Any  # FlagHolder[str]
    num_processes: Any  # FlagHolder[int]
    process_id: Any  # FlagHolder[int]

    def initialize(self) -> None:
        """`initialize_distributed` with the flags' values, when any flag asks for it."""
        asked = (
            self.distributed.value
            or self.coordinator.value
            or self.num_processes.value
            or self.process_id.value >= 0
        )
        if asked:
            initialize_distributed(
                self.coordinator.value, self.num_processes.value, self.process_id.value
            )


def define_distributed_flags() -> DistributedFlags:
    """`--distributed`, `--coordinator`, `--num_processes`, `--process_id`: how one
    process of a multi-process job (a TPU pod's hosts, a GPU cluster's nodes)
    finds the others."""
    from absl import flags

    return DistributedFlags(
        flags.DEFINE_bool(
            "distributed",
            False,
            "Run as one process of a multi-process job (jax.distributed.initialize); on Cloud "
            "TPU pods, SLURM, Open MPI and GKE the values below are detected. Implied by any "
            "of them.",
        ),
        flags.DEFINE_string(
            "coordinator",
            "",
            "HOST:PORT where process 0 serves the job's coordinator, the same for every "
            "process ('' = JAX_COORDINATOR_ADDRESS or detected).",
        ),
        flags.DEFINE_integer(
            "num_processes", 0, "Processes in the job (0 = detected).", lower_bound=0
        ),
        flags.DEFINE_integer(
            "process_id",
            -1,
            "This process's id in 0 .. num_processes-1 (-1 = detected).",
            lower_bound=-1,
        ),
    )


def initialize_distributed(
    coordinator: str = "", num_processes: int = 0, process_id: int = -1
) -> None:
    """Joins a multi-process job (`jax.distributed.initialize`); unset values
    ('', 0, -1) are detected by JAX (Cloud TPU, SLURM, Open MPI, GKE).

    Call before anything touches a device. A second call is a no-op. CPU
    hosts exchange collectives through gloo (accelerators are unaffected),
    so a job of CPU processes, e.g. on one machine, runs the same program.
    Raises `ConfigError` when the values are missing or do not fit.
    """
    import jax

    if jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator or None,
            num_processes=num_processes or None,
            process_id=process_id if process_id >= 0 else None,
        )
    except ValueError as err:
        raise errors.ConfigError(
            f"multi-process set-up: {err} (give --coordinator=HOST:PORT, --num_processes and "
            "--process_id where the cluster is not detected)"
        ) from None


def start(
    cpu_devices: int,
    compile_cache: str,
    distributed: DistributedFlags | None = None,
    *,
    log_info: bool = False,
) -> None:
    """A command's set-up, before it imports JAX: `cpu_devices` CPU devices (0: as
    XLA_FLAGS say), absl's INFO lines hidden, the persistent compilation cache,
    INFO logging of our own lines (`log_info`, the training commands) and the
    multi-process job (`distributed`, the commands that take those flags)."""
    set_cpu_devices(cpu_devices)
    quiet_absl()
    if log_info:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    enable_compile_cache(compile_cache)
    if distributed is not None:
        distributed.initialize()


def any_process(flag: bool) -> bool:
    """`flag` of any process, the same answer on every process: one decision for a job.

    A collective in a multi-process job: every process must call it at the
    same point. Free in a single process.
    """
    import jax

    if jax.process_count() == 1:
        return bool(flag)
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(bool(flag)))))


def all_processes(flag: bool) -> bool:
    """`flag` of every process (see `any_process`)."""
    return not any_process(not flag)


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
    """argv with each `--config=configs/X.py` resolved (`resolve_config_path`); the
    arguments after `--` are not flags of this command and are kept as given."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        if arg.startswith("--config="):
            arg = "--config=" + resolve_config_path(arg[len("--config=") :])
        elif i > 0 and argv[i - 1] == "--config":
            arg = resolve_config_path(arg)
        out.append(arg)
    return out


_HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "?")


def _asks_for_help(argv: list[str]) -> bool:
    for arg in argv[1:]:
        if arg == "--":
            return False
        if arg.startswith("-") and arg.lstrip("-").split("=", 1)[0] in _HELP_FLAGS:
            return True
    return False


def _fail(message: str) -> NoReturn:
    """Prints `error: <message>` as one line and exits with `errors.EXIT_ERROR`."""
    print("error: " + message.replace("\n", " "), file=sys.stderr)
    sys.exit(errors.EXIT_ERROR)


def _close(word: str, options) -> str:
    """'; did you mean X?' (difflib) or ''."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _config_flag_names() -> list[str]:
    """Names of the `DEFINE_config_file` flags."""
    from absl import flags
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser

    return [
        name for name in flags.FLAGS if isinstance(flags.FLAGS[name].parser, ConfigFileFlagParser)
    ]


def _flag_value(argv: list[str], name: str) -> str | None:
    """The last value given to `--name` in argv (`--name=V` or `--name V`), else None."""
    found = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        for prefix in (f"--{name}", f"-{name}"):
            if arg.startswith(prefix + "="):
                found = arg[len(prefix) + 1 :]
            elif arg == prefix and i + 1 < len(argv):
                found = argv[i + 1]
    return found


def _overrides(argv: list[str], name: str) -> list[tuple[str, str | None]]:
    """(field path, raw value) of every `--NAME.path[=value]` in argv."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        match = re.match(rf"-{{1,2}}(no)?{re.escape(name)}\.([^=]+)(=(.*))?$", arg, re.S)
        if not match:
            continue
        value = match.group(4)
        if value is None and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            value = argv[i + 1]
        out.append((match.group(2), value))
    return out


def _missing_config_file(name: str, value: str) -> str:
    path = value.partition(":")[0]
    if not path:
        return f"--{name} is empty: give a config file, e.g. --{name}=configs/image.py"
    if Path(path).is_dir():
        return f"--{name}={value}: {path} is a directory, not a config file"
    if Path(path).exists():
        return f"--{name}={value}: {path} cannot be read"
    shipped = sorted(
        f"configs/{p.name}"
        for p in _SHIPPED_CONFIGS.glob("*.py")
        if "def get_config(" in p.read_text()
    )
    beside = Path(path).parent
    local = [str(p) for p in beside.glob("*.py")] if beside.is_dir() else []
    hint = _close(path, [*local, *shipped]) or f"; shipped configs: {', '.join(shipped)}"
    return f"--{name}={value}: no such config file{hint}"


def _example(rest: tuple, raw: str | None) -> object:
    """The dict a field flag's path and value stand for: ('a', 'b'), '1' -> {'a': {'b': 1}}."""
    try:
        value: object = ast.literal_eval(raw) if raw is not None else True
    except (ValueError, SyntaxError):
        value = raw
    for part in reversed(rest):
        value = {part: value}
    return value


# Config dicts whose keys are names the user picks (rewards, prompt sets).
_NAMED_ENTRIES = ("rewards", "extra_prompts")


def _bad_override(name: str, config, path: str, raw: str | None) -> str | None:
    """Why `--NAME.path` names no field of `config` (one line), or None if it does."""
    from ml_collections import ConfigDict, config_flags

    try:
        parts = config_flags.config_path.split(path)
    except ValueError:
        return f"--{name}.{path}: not a field path (write --{name}.a.b=VALUE)"
    node, where = config, name
    for depth, part in enumerate(parts):
        if isinstance(node, ConfigDict | dict):
            if part in node:
                node, where = node[part], f"{where}.{part}"
                continue
            keys = list(node.keys())
            named = str(parts[depth - 1]) in _NAMED_ENTRIES if depth else False
            if named or all(isinstance(v, ConfigDict | dict) for v in node.values()):
                # A dict of named entries (rewards, eval.extra_prompts): a locked
                # config cannot gain an entry through a field flag.
                whole = _example(parts[depth:], raw)
                have = f"entries: {', '.join(map(str, keys))}" if keys else "it is empty"
                return (
                    f"--{name}.{path}: {where} has no entry {part!r}{_close(part, keys)} "
                    f"({have}); a new entry goes in a config file, or in the whole dict, which "
                    f'replaces {where} (list every entry to keep): --{where}="{whole!r}"'
                )
            listed = _close(part, keys) or f"; its fields: {', '.join(map(str, keys))}"
            return f"--{name}.{path}: {where} has no field {part!r}{listed}"
        if isinstance(node, list | tuple) and isinstance(part, int):
            if -len(node) <= part < len(node):
                node, where = node[part], f"{where}[{part}]"
                continue
            return f"--{name}.{path}: {where} has {len(node)} entries, no [{part}]"
        if node is None:
            return f"--{name}.{path}: {where} is None, not a block of fields"
        if isinstance(part, str) and hasattr(node, part):
            node, where = getattr(node, part), f"{where}.{part}"
            continue
        return f"--{name}.{path}: {where} is a {type(node).__name__}, not a block of fields"
    return None


def _override_error(argv: list[str]) -> str | None:
    """One line for the first `--CONFIG.path` override that names no field, if any."""
    from absl import flags

    for name in _config_flag_names():
        value = _flag_value(argv, name)
        if value is None:
            continue
        try:
            config = flags.FLAGS[name].parser.parse(value)
            _ = config.keys()
        except Exception:  # noqa: BLE001 (the file itself fails: `_config_file_error` says why)
            if not Path(value.partition(":")[0]).is_file():
                return _missing_config_file(name, value)
            continue
        for path, raw in _overrides(argv, name):
            message = _bad_override(name, config, path, raw)
            if message:
                return message
    return None


def _config_file_error(argv: list[str], err: BaseException) -> str | None:
    """`--config=FILE: FILE line N: ValueError: ...` for an error raised by a config file."""
    root = err  # the first exception of the chain: raised by the file's own code
    while root.__context__ is not None:
        root = root.__context__
    for name in _config_flag_names():
        value = _flag_value(argv, name) or ""
        path = value.partition(":")[0]
        if not path or not Path(path).is_file():
            continue
        target = Path(path).resolve()
        if isinstance(root, AttributeError) and root.name == "get_config":
            return f"--{name}={value}: {path} defines no get_config()"
        if isinstance(root, SyntaxError) and Path(root.filename or "").resolve() == target:
            return f"--{name}={value}: {path} line {root.lineno}: {root.msg}"
        lines = [
            f.lineno
            for f in traceback.extract_tb(root.__traceback__)
            if Path(f.filename).resolve() == target
        ]
        if lines:
            return f"--{name}={value}: {path} line {lines[-1]}: {type(root).__name__}: {root}"
    return None


def _flags_error(err: Exception) -> str:
    """absl's flag error as one line; required flags named plainly."""
    text = str(err)
    missing = re.findall(r"Flag --(\S+) must have a value other than None", text)
    if missing:
        return f"missing required flag(s): {', '.join('--' + m for m in missing)} (see --help)"
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parser for `app.run`, with every bad flag one `error:` line (exit 1).

    Covers unknown flags and config fields (with a "did you mean"), missing or
    broken config files, bad values and missing required flags; `--help` and
    `--helpfull` print their usage and exit 0.
    """
    from absl import flags

    try:
        rest = flags.FLAGS(argv)
    except SystemExit as exc:
        # absl's help flags print their text during parsing and exit 1.
        if exc.code == 1 and _asks_for_help(argv):
            raise SystemExit(0) from None
        raise
    except flags.Error as err:
        _fail(_config_file_error(argv, err) or _override_error(argv) or _flags_error(err))
    except (KeyError, AttributeError, IndexError, OSError, SyntaxError) as err:
        # ml_collections resolves `--config.a.b` overrides while parsing.
        message = _override_error(argv) or _config_file_error(argv, err)
        if message is None:
            raise
        _fail(message)
    # A config file that failed to load only raises when its value is read.
    for name in _config_flag_names():
        try:
            getattr(flags.FLAGS[name].value, "keys", None)
        except OSError:
            _fail(_missing_config_file(name, _flag_value(argv, name) or ""))
    return rest


_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips (and other Google devices) on the PCI bus
_GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")
_PLUGIN_NAMESPACE = "jax_plugins"  # where other PJRT plugins install themselves


def prefer_cpu_without_accelerators() -> None:
    """JAX_PLATFORMS=cpu where nothing but the CPU can run JAX.

    With libtpu installed (the `tpu` and `test` extras) JAX looks for TPU chips
    when it starts and, on a machine without them, prints libtpu's
    initialisation errors before it falls back to the CPU. So where
    JAX_PLATFORMS is unset, no GPU plugin is installed and neither a Google
    PCI device (as TPU chips are) nor a TPU device file exists, the commands
    ask for the CPU directly. Anything that could be a TPU leaves JAX to look.
    """
    import importlib.metadata
    import importlib.util
    from glob import glob

    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return
    if any(importlib.util.find_spec(name) for name in (*_GPU_PLUGINS, _PLUGIN_NAMESPACE)):
        return
    if importlib.metadata.entry_points(group="jax_plugins"):
        return
    if glob("/dev/accel*") or glob("/dev/vfio/*"):
        return
    for vendor in glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR:
                return
        except OSError:
            return
    os.environ["JAX_PLATFORMS"] = "cpu"


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
        prefer_cpu_without_accelerators()
        try:
            main(argv)
        except errors.UserError as err:
            _fail(str(err))
        except errors.Preempted as err:
            print(f"preempted: {err}", file=sys.stderr)
            sys.exit(errors.EXIT_PREEMPTED)

    app.run(guarded, argv=_resolve_config_args(sys.argv), flags_parser=parse_flags)
