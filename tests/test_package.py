"""The built wheel works on its own: modules, configs and assets ship, and commands run.

The wheel is built from a copy of the sources and installed into a fresh venv
whose other packages are this interpreter's (nothing is downloaded); every
command runs from a directory outside the checkout with PYTHONPATH unset, so
anything that works only from the source tree (or through the editable
install) fails here.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Files the wheel must hold: the modules and the package data pyproject.toml declares.
SHIPPED_SUFFIXES = {".py", ".json", ".jsonl", ".msgpack", ".safetensors", ".txt"}
# One epoch of configs/image.py on a tiny random-init UNet: 8 samples, 8 eval prompts per set.
TINY_EPOCH = (
    "--config.train.num_epochs=1",
    "--config.sample.num_steps=2",
    "--config.sample.prompts_per_epoch=2",
    "--config.sample.group_size=4",
    "--config.sample.batch_size=8",
    "--config.train.batch_size=8",
    "--config.train.micro_batch_size=8",
    "--config.train.timestep_window=(0,2)",
    "--config.eval.num_prompts=8",
    "--config.model.init=random",
    "--config.model.channels=(8,16)",
    "--config.model.attn_levels=(1,)",
    "--config.model.heads=2",
    "--config.model.text_width=16",
    "--config.model.text_depth=1",
    "--config.log.tensorboard=False",
    "--config.log.progress=False",
    "--compile_cache=",
)

# Its module-scoped fixtures build once: keep the file on one xdist worker.
pytestmark = pytest.mark.xdist_group("test_package")


def _dist_name(requirement: str) -> str:
    """The normalised distribution name of a PEP 508 requirement string."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group()
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_top_level_modules(root: Path) -> dict[str, list[str]]:
    """Third-party top-level module -> the files importing it, over every module under root."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "bpgo_jax":
                    found.setdefault(top, []).append(str(path.relative_to(root.parent)))
    return found


def test_every_imported_package_is_a_declared_dependency():
    """`pip install .` (plus the non-test extras) brings everything the package imports;
    `bpgo_jax.testing`, the helpers of tests and benchmarks, may use the test extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = {_dist_name(r) for r in project["dependencies"]}
    declared |= {_dist_name(r) for name, reqs in extras.items() if name != "test" for r in reqs}
    with_test = declared | {_dist_name(r) for r in extras["test"]}
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for module, files in _imported_top_level_modules(ROOT / "bpgo_jax").items():
        dists = {_dist_name(d) for d in providers.get(module, [])}
        for where in files:
            if not dists & (with_test if where.startswith("bpgo_jax/testing/") else declared):
                missing.setdefault(module, where)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def _ok(cmd: list, cwd: Path) -> str:
    """stdout of cmd, which must exit 0; the checkout is off the path, one CPU device
    (the tests' other XLA flags stay: tests/conftest.py)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env["XLA_FLAGS"])
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [str(c) for c in cmd]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv holding the freshly built wheel; commands run in VENV/../outside."""
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "src"  # a copy, so building leaves no build/ or egg-info in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "bpgo_jax", src / "bpgo_jax", ignore=ignore)
    (tmp / "outside").mkdir()
    pip = [sys.executable, "-m", "pip"]
    _ok([*pip, "wheel", src, "--no-deps", "--no-build-isolation", "-q", "-w", tmp], tmp)
    (wheel,) = tmp.glob("bpgo_jax-*.whl")
    env_dir = tmp / "venv"
    _ok([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", env_dir], tmp)
    python = env_dir / "bin" / "python"
    if sys.prefix != sys.base_prefix:
        # Run from a venv: --system-site-packages reaches the base interpreter's
        # packages only, so add this venv's, after the new venv's own.
        purelib = _ok([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp)
        Path(purelib.strip(), "parent.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # The parent's pip installs into the venv it runs in; --ignore-installed
    # leaves the parent's (editable) install alone.
    _ok([python, "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", wheel], tmp)
    return env_dir


def _installed(venv: Path) -> dict[str, str]:
    script = (
        "import json, bpgo_jax, bpgo_jax.configs.image as image; "
        "print(json.dumps({'package': bpgo_jax.__file__, 'generator': str(image.GENERATOR)}))"
    )
    return json.loads(_ok([venv / "bin" / "python", "-c", script], venv.parent / "outside"))


@pytest.mark.slow
def test_installed_package_and_configs_import_from_the_venv(venv):
    found = _installed(venv)
    package = Path(found["package"]).resolve().parent
    assert package.is_relative_to(venv.resolve()), found
    # configs/image.py falls back to a random init when the generator is
    # missing: the wheel must ship it.
    generator = Path(found["generator"]).resolve()
    assert generator.is_file() and generator.is_relative_to(package)


@pytest.mark.slow
def test_wheel_ships_every_module_and_data_file(venv):
    package = Path(_installed(venv)["package"]).parent

    def files(root: Path) -> set[str]:
        return {
            str(p.relative_to(root))
            for p in root.rglob("*")
            if p.suffix in SHIPPED_SUFFIXES and "__pycache__" not in p.parts
        }

    expected = files(ROOT / "bpgo_jax")
    assert {"world/assets/reward_model.msgpack", "configs/prompts/simple_animals.txt"} <= expected
    assert files(package) == expected


@pytest.mark.slow
def test_installed_bpgo_train_runs_one_epoch_of_the_shipped_config(venv):
    bpgo_train, outside = venv / "bin" / "bpgo-train", venv.parent / "outside"
    assert "--workdir" in _ok([bpgo_train, "--help"], outside)
    _ok([bpgo_train, "--config=configs/image.py", "--workdir=W", *TINY_EPOCH], outside)
    lines = (outside / "W" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    trained = [r for r in records if "reward_mean" in r]
    assert len(trained) == 1 and trained[0]["epoch"] == 0
    # The shipped test prompt files were scored by the oracle.
    assert {"oracle_accuracy", "oracle_accuracy_heldout"} <= records[-1].keys()


@pytest.mark.slow
def test_installed_world_commands_parse_flags_and_reproduce_the_prompt_files(venv):
    outside = venv.parent / "outside"
    out = outside / "prompts"
    _ok([venv / "bin" / "bpgo-make-world-prompts", f"--out_dir={out}"], outside)
    for split in ("train", "val", "heldout", "test_val", "test_heldout"):
        name = f"prompts_{split}.jsonl"
        assert (out / name).read_bytes() == (ROOT / "bpgo_jax/world/assets" / name).read_bytes()
    usage = _ok([venv / "bin" / "python", "-m", "bpgo_jax.world.evaluate", "--help"], outside)
    assert "--[no]skip_oracle" in usage and "--reward_model" in usage
