"""Every bad input to the training command is one line naming the field, early.

Most rows call `validate` or `check_inputs` in-process on configs/image.py's
config with one override applied. The rows that need the real command line
(flag parsing: unknown fields, config files, a key a locked config lacks,
`--help`) run `launch/train.py`, which fails before jax is imported.
Every row also checks that nothing was created or changed.
"""

from __future__ import annotations

import copy
import importlib
import logging
import re
import shlex
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags
from tiny_config import apply_overrides

from bpgo_jax.config import ConfigError, check_inputs, validate
from bpgo_jax.prompts import check_prompt_lengths

ROOT = Path(__file__).resolve().parents[1]


def _config(module: str, overrides: dict) -> ml_collections.ConfigDict:
    """`bpgo_jax.configs.<module>.get_config()` with dotted-key overrides applied."""
    return apply_overrides(
        importlib.import_module(f"bpgo_jax.configs.{module}").get_config(), overrides
    )


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _fill(value, tmp: Path):
    """`{tmp}` in a string (or in the strings of a dict or tuple) becomes the test's folder."""
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp))
    if isinstance(value, dict):
        return {k: _fill(v, tmp) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_fill(v, tmp) for v in value)
    return value


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """Bad prompt files and weights paths, under `tmp_path`."""
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a red circle"}\n{not json\n')
    (tmp_path / "noprompt.jsonl").write_text('{"prompt": "a"}\n\n{"text": "b"}\n')
    (tmp_path / "prior.jsonl").write_text('{"prompt": "a", "prior": "high"}\n')
    (tmp_path / "mixed.jsonl").write_text('{"prompt": "a", "prior": 0.5}\n{"prompt": "b"}\n')
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("a red circle\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "weights.msgpack").write_bytes(b"")
    return tmp_path


# (config module, overrides, the exact message of the ConfigError)
VALIDATE_ROWS = [
    ({"checkpoint.every": 0}, "checkpoint.every=0 must be an integer >= 1 (save every N epochs)"),
    (
        {"checkpoint.keep": 0},
        "checkpoint.keep=0 must be an integer >= 1 (0 would delete every checkpoint)",
    ),
    ({"eval.every": 0}, "eval.every=0 must be an integer >= 1 (evaluate every N epochs)"),
    ({"eval.num_prompts": 0}, "eval.num_prompts=0 must be an integer >= 1"),
    (
        {"log.image_every": 0},
        "log.image_every=0 must be an integer >= 1 (log images every N epochs)",
    ),
    ({"log.num_images": 0}, "log.num_images=0 must be an integer >= 1"),
    ({"train.batch_size": 0}, "train.batch_size=0 must be an integer >= 1"),
    ({"sample.batch_size": 0}, "sample.batch_size=0 must be an integer >= 1"),
    ({"train.micro_batch_size": 0}, "train.micro_batch_size=0 must be an integer >= 1"),
    ({"train.num_epochs": 0}, "train.num_epochs=0 must be an integer >= 1"),
    ({"train.inner_epochs": 0}, "train.inner_epochs=0 must be an integer >= 1"),
    ({"train.lr": -1e-4}, "train.lr=-0.0001 must be a finite number > 0"),
    ({"train.lr": float("inf")}, "train.lr=inf must be a finite number > 0"),
    ({"train.b2": 1.0}, "train.b2=1.0 must be a finite number in [0, 1)"),
    ({"train.adam_eps": 0.0}, "train.adam_eps=0.0 must be a finite number > 0"),
    ({"train.max_grad_norm": 0.0}, "train.max_grad_norm=0.0 must be a finite number > 0"),
    ({"seed": -1}, "seed=-1 must be an integer >= 0 (it seeds numpy's prompt order)"),
    ({"sample.num_steps": 0}, "sample.num_steps=0 must be an integer >= 1"),
    (
        {"sample.group_size": 0},
        "sample.group_size=0 must be an integer >= 2 (GRPO needs a group to compare)",
    ),
    ({"sample.guidance_scale": -1.0}, "sample.guidance_scale=-1.0 must be a finite number >= 0"),
    ({"sample.shift": 0.0}, "sample.shift=0.0 must be a finite number > 0"),
    (
        {"sample.noise_level": 0.0},
        "sample.noise_level=0.0 must be > 0: a deterministic sampler has no log-probability "
        "to train",
    ),
    (
        {"sample.kind": "ddim"},
        "sample.kind='ddim' does not fit model.prediction_type='flow': the flow sampler needs "
        "a flow model, ddim any other",
    ),
    ({"prior.init_value": float("nan")}, "prior.init_value=nan must be a finite number"),
    (
        {"prior.clip": (1.0, 0.0)},
        "prior.clip=(1.0, 0.0) must be None or (low, high) with low <= high",
    ),
    (
        {"advantage.eps": 0.0},
        "advantage.eps=0.0 must be a finite number > 0 (it keeps the std division finite)",
    ),
    (
        {"advantage.clip": 0.0},
        "advantage.clip=0.0 must be a finite number > 0 (or None: no clipping)",
    ),
    (
        {"advantage.tracker.min_count": 64},
        "advantage.tracker.min_count=64 must be <= advantage.tracker.buffer_size=32",
    ),
    (
        {"prompts.on_too_long": "truncate"},
        "prompts.on_too_long='truncate' is not one of ('warn', 'error')",
    ),
    (
        {"log.wandb.mode": "dryrun"},
        "log.wandb.mode='dryrun' is not one of ('online', 'offline', 'disabled')",
    ),
    (
        {"mesh.axes": ("data", "model")},
        "mesh.axes: unknown axis 'model', known: ('data', 'fsdp', 'context')",
    ),
    (
        {"mesh.axes": ("data", "fsdpp")},
        "mesh.axes: unknown axis 'fsdpp', known: ('data', 'fsdp', 'context'); did you mean 'fsdp'?",
    ),
    (
        {"mesh.shape": (2, 2, 1)},
        "mesh.shape=(2, 2, 1) and mesh.axes=('data', 'fsdp') must have the same length",
    ),
    (
        {"mesh.rules": ((".*", ("model",)),)},
        "mesh.rules: spec ('model',) of '.*' must be 'fsdp_auto' or a tuple of mesh axes "
        "('data', 'fsdp') or None, one per array dimension",
    ),
    ({"model.heads": 3}, "model.text_width=64 must be divisible by model.heads=3"),
    (
        {"model.name": "sdxl"},
        "model.name='sdxl' is not one of ('tiny_unet', 'sd', 'flux', 'sd3', 'wan')",
    ),
    (
        {"model.init": ""},
        "model.init is empty: set it to 'random' or to the weights (a .msgpack file for "
        "tiny_unet, a diffusers folder for sd)",
    ),
    ({"rewards": {"world_clip": {"path": ""}}}, "config.rewards.world_clip.weight is missing"),
    (
        {"rewards": {"world_clipp": {"weight": 1.0}}},
        "config.rewards.world_clipp: unknown reward; did you mean 'world_clip'?",
    ),
    (
        {"plugins": ("bpgo_jax.world.rewardz",)},
        "plugins: no module named 'bpgo_jax.world.rewardz'; did you mean 'bpgo_jax.world.rewards'?",
    ),
]

# check_inputs rows: (config module, overrides, message); `{tmp}` is the `files` folder.
INPUT_ROWS = [
    (
        "image",
        {"prompts.path": ""},
        "prompts.path is empty: name a .txt (one prompt a line) or .jsonl prompt file",
    ),
    (
        "image",
        {"prompts.path": "{tmp}/missing.txt"},
        "prompts.path: prompt file {tmp}/missing.txt does not exist",
    ),
    (
        "image",
        {"prompts.path": "{tmp}/bad.jsonl"},
        "prompts.path: {tmp}/bad.jsonl:2: not valid JSON (Expecting property name enclosed "
        "in double quotes)",
    ),
    (
        "image",
        {"prompts.path": "{tmp}/noprompt.jsonl"},
        'prompts.path: {tmp}/noprompt.jsonl:3: needs a string field "prompt"',
    ),
    (
        "image",
        {"prompts.path": "{tmp}/prior.jsonl"},
        "prompts.path: {tmp}/prior.jsonl:1: \"prior\" must be a finite number, got 'high'",
    ),
    (
        "image",
        {"prompts.path": "{tmp}/mixed.jsonl"},
        "prompts.path: {tmp}/mixed.jsonl: some prompts have a prior and some not (entry 2 lacks)",
    ),
    (
        "image",
        {"prompts.path": "{tmp}/empty.txt"},
        "prompts.path: prompt file {tmp}/empty.txt holds no prompts",
    ),
    (
        "image",
        {"prompts.path": "{tmp}/latin1.txt"},
        "prompts.path: prompt file {tmp}/latin1.txt is not UTF-8 text (invalid continuation byte)",
    ),
    (
        "image",
        {"eval.prompts_path": "{tmp}/folder"},
        "eval.prompts_path: prompt file {tmp}/folder is a directory",
    ),
    (
        "image",
        {"eval.extra_prompts": {"heldout": "{tmp}/gone.jsonl"}},
        "eval.extra_prompts.heldout: prompt file {tmp}/gone.jsonl does not exist",
    ),
    (
        "image",
        {"prior.kind": "fixed", "prompts.path": "{tmp}/ok.txt"},
        "prior.kind='fixed' needs a \"prior\" on every entry of prompts.path='{tmp}/ok.txt' "
        "(a .jsonl file)",
    ),
    (
        "image",
        {"model.init": "{tmp}/missing.msgpack"},
        "model.init='{tmp}/missing.msgpack' is not a file: the built-in model's weights are one "
        ".msgpack file (or 'random')",
    ),
    (
        "image",
        {"model.init": "{tmp}/folder"},
        "model.init='{tmp}/folder' is not a file: the built-in model's weights are one .msgpack "
        "file (or 'random')",
    ),
    (
        "sd_tiny_test",
        {"model.init": "{tmp}/weights.msgpack"},
        "model.init='{tmp}/weights.msgpack' is not a directory: SD weights are a diffusers "
        "folder (or 'random')",
    ),
    (
        "sd_tiny_test",
        {"model.init": "{tmp}/folder"},
        "model.init='{tmp}/folder' is not a diffusers folder: it has no model_index.json",
    ),
    (
        "image",
        {"rewards": {"world_clip": {"weight": 1.0, "path": "{tmp}/rm.msgpack"}}},
        "rewards.world_clip.path='{tmp}/rm.msgpack' does not exist",
    ),
    (
        "image",
        {"eval.rewards": {"world_clip": {"weight": 1.0, "path": "{tmp}/rm.msgpack"}}},
        "eval.rewards.world_clip.path='{tmp}/rm.msgpack' does not exist",
    ),
    (
        "sd_tiny_test",
        {
            "model.init": "random",
            "rewards": {"clip_score": {"weight": 1.0, "path": "", "tokenizer_path": "{tmp}/tok"}},
        },
        "rewards.clip_score.tokenizer_path='{tmp}/tok' does not exist",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), VALIDATE_ROWS)
def test_validate_rejects(tmp_path, overrides, message):
    config = _config("image", overrides)
    before, tree = copy.deepcopy(config), _tree(tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(config, num_devices=1)
    assert str(err.value) == message
    assert repr(config.to_dict()) == repr(before.to_dict())  # validation changes nothing
    assert _tree(tmp_path) == tree


@pytest.mark.parametrize(("module", "overrides", "message"), INPUT_ROWS)
def test_check_inputs_rejects(files, module, overrides, message):
    config = _config(module, _fill(overrides, files))
    before, tree = copy.deepcopy(config), _tree(files)
    with pytest.raises(ConfigError) as err:
        check_inputs(config)
    assert str(err.value) == _fill(message, files)
    assert config == before
    assert _tree(files) == tree  # nothing created, nothing removed or rewritten


def test_plugin_missing_a_dependency_is_named(tmp_path, monkeypatch):
    """A plugin that exists but imports something absent is told apart from a typo."""
    (tmp_path / "bad_inputs_plugin.py").write_text("import bad_inputs_absent_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = _config("image", {"plugins": ("bad_inputs_plugin",)})
    with pytest.raises(ConfigError) as err:
        validate(config, num_devices=1)
    assert str(err.value) == (
        "plugins: module 'bad_inputs_plugin' imports 'bad_inputs_absent_dependency', which is "
        "not installed"
    )


@pytest.mark.parametrize("module", ["image", "oracle_reward", "sd_tiny_test"])
def test_shipped_configs_pass(module):
    """The checks reject bad values only: the shipped configs pass both."""
    config = _config(module, {"model.init": "random"} if module.startswith("sd") else {})
    validate(config, num_devices=1)
    loaded = check_inputs(config)
    assert "prompts.path" in loaded and len(loaded["prompts.path"]) > 0


def _launch(*args: str, workdir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "launch/train.py", f"--workdir={workdir}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)


LOCKED_KEY = (
    "--config.rewards.jpeg_compressibility.weight: config.rewards has no entry "
    "'jpeg_compressibility' (entries: clip_score); a new entry goes in a config file, or in "
    "the whole dict, which replaces config.rewards (list every entry to keep): "
    "--config.rewards=\"{'jpeg_compressibility': {'weight': 1}}\""
)

# Command rows: flags after --workdir, and stderr's exact last line.
COMMAND_ROWS = [
    (
        ["--config=configs/image.py", "--config.train.lrr=1"],
        "error: --config.train.lrr: config.train has no field 'lrr'; did you mean 'lr'?",
    ),
    (
        ["--config=configs/image.py", "--config.rewards.world_clipp.weight=1"],
        "error: --config.rewards.world_clipp.weight: config.rewards has no entry 'world_clipp'; "
        "did you mean 'world_clip'? (entries: world_clip); a new entry goes in a config file, "
        "or in the whole dict, which replaces config.rewards (list every entry to keep): "
        "--config.rewards=\"{'world_clipp': {'weight': 1}}\"",
    ),
    (
        ["--config=configs/imag.py", "--config.train.lr=1e-3"],
        "error: --config=configs/imag.py: no such config file; did you mean 'configs/image.py'?",
    ),
    (
        ["--config=configs/sd_tiny_test.py", "--config.rewards.jpeg_compressibility.weight=1"],
        "error: " + LOCKED_KEY,
    ),
    (
        ["--config={tmp}/broken.py"],
        "error: --config={tmp}/broken.py: {tmp}/broken.py line 2: '{' was never closed",
    ),
]


@pytest.mark.parametrize(("args", "last_line"), COMMAND_ROWS)
def test_command_rejects(tmp_path, args, last_line):
    (tmp_path / "broken.py").write_text("def get_config():\n    return {'a': 1\n")
    tree = _tree(tmp_path)
    workdir = tmp_path / "run"
    proc = _launch(*_fill(tuple(args), tmp_path), workdir=workdir)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "Traceback" not in output
    assert proc.stderr.strip().splitlines()[-1] == _fill(last_line, tmp_path)
    assert not workdir.exists()
    assert _tree(tmp_path) == tree


def test_command_names_missing_required_flags(tmp_path):
    proc = subprocess.run(
        [sys.executable, "launch/train.py"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: missing required flag(s): --config, --workdir (see --help)"
    ]


@pytest.mark.parametrize("flag", ["--help", "--helpfull"])
def test_help_exits_zero(flag):
    proc = subprocess.run(
        [sys.executable, "launch/train.py", flag],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Post-trains a generator" in proc.stdout
    assert "--workdir" in proc.stdout and "--config" in proc.stdout


def test_whole_dict_override_adds_a_reward_to_a_locked_config():
    """The fix the locked-key error suggests works: the dict replaces config.rewards."""
    suggested = shlex.split(LOCKED_KEY[LOCKED_KEY.rindex("--config.rewards=") :])[0]
    path = str(ROOT / "bpgo_jax" / "configs" / "sd_tiny_test.py")
    argv = ["train", f"--config={path}", suggested, "--config.model.init=random"]
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
    values(argv)
    config = holder.value
    assert config.rewards.to_dict() == {"jpeg_compressibility": {"weight": 1}}
    validate(config, num_devices=1)


def _words(prompt: str) -> int:
    return len(re.findall(r"\w+", prompt))


PROMPTS = ["a red circle", "a very small blue square on the left", "a cat"]


def test_long_prompts_are_an_error_when_asked():
    with pytest.raises(ConfigError) as err:
        check_prompt_lengths(PROMPTS, _words, 4, "error", "eval.prompts_path")
    assert str(err.value) == (
        "eval.prompts_path: 1 of 3 prompts have more than the 4 tokens the text encoder "
        "reads, the first: 'a very small blue square on the left' (8 tokens); shorten them, or set "
        "prompts.on_too_long='warn' to cut them"
    )


def test_long_prompts_warn_once(caplog):
    with caplog.at_level(logging.WARNING, logger="bpgo_jax"):
        check_prompt_lengths(
            [*PROMPTS, "one two three four five"], _words, 4, "warn", "prompts.path"
        )
    assert [r.name for r in caplog.records] == ["bpgo_jax"]
    assert caplog.records[0].getMessage() == (
        "prompts.path: 2 of 4 prompts have more than the 4 tokens the text encoder reads and "
        "are cut to that length, e.g. 'a very small blue square on the left' (8 tokens)"
    )


def test_prompts_that_fit_pass_silently(caplog):
    with caplog.at_level(logging.WARNING, logger="bpgo_jax"):
        check_prompt_lengths(PROMPTS, _words, 8, "error", "prompts.path")
        check_prompt_lengths(PROMPTS, _words, 8, "warn", "prompts.path")
    assert caplog.records == []
    with pytest.raises(ConfigError, match=r"prompts.on_too_long='cut' is not one of"):
        check_prompt_lengths(PROMPTS, _words, 8, "cut", "prompts.path")
