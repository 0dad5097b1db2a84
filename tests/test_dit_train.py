"""FLUX and SD3.5 trained end to end, their configs, and the config checks of the flow DiTs.

One `launch/train.py` subprocess trains SD3.5's `*_tiny_test` twin (LoRA, 2
epochs) on a data 2 x fsdp 4 mesh of fake CPU devices from a tiny random
diffusers folder (`sd3_folders`); FLUX's twin (`flux_folders`) trains in this
process as a full fine-tune, its transformer FSDP-sharded, and must equal the
data-parallel run. Every update is on-policy (one per epoch), so its ratio must
be exactly 1. Resuming is the engine's (tests/test_engine.py): the state a DiT
run checkpoints is the same pytree as any run's. Both DiTs' LoRA adapters are
checked against their parameters in tests/test_flux_parity.py and
tests/test_sd3_parity.py; the launcher and the trainer are one code path for
every model.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import flux_folders  # noqa: E402  (tests/ folder)
import sd3_folders  # noqa: E402
from commands import launch_tiny_run  # noqa: E402

from bpgo_jax.config import check_inputs, validate  # noqa: E402
from bpgo_jax.configs import (  # noqa: E402
    flux_hps,
    flux_tiny_test,
    sd35_pickscore,
    sd35_tiny_test,
)
from bpgo_jax.errors import ConfigError  # noqa: E402
from bpgo_jax.models import build_model  # noqa: E402
from bpgo_jax.models.flux.pipeline import FLUX_ATTENTION_TARGETS  # noqa: E402
from bpgo_jax.models.sd.pipeline import random_params  # noqa: E402
from bpgo_jax.models.sd3.pipeline import SD3_ATTENTION_TARGETS  # noqa: E402
from bpgo_jax.rollout import samplers, schedules  # noqa: E402
from bpgo_jax.train import train  # noqa: E402

# The module fixtures (folders, launcher runs) build once: keep the file on one worker.
pytestmark = pytest.mark.xdist_group("test_dit_train")

TWINS = {"flux": "flux_tiny_test", "sd3": "sd35_tiny_test"}
CONFIGS = {
    "flux_hps": flux_hps,
    "flux_tiny_test": flux_tiny_test,
    "sd35_pickscore": sd35_pickscore,
    "sd35_tiny_test": sd35_tiny_test,
}
_TIMES = {"rollout_seconds", "train_seconds", "images_per_second"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("dit_train")
    flux_folders.dev_pipeline(root / "flux")
    sd3_folders.pipeline_folder(root / "sd3")
    return {"flux": str(root / "flux"), "sd3": str(root / "sd3"), "root": str(root)}


def _config(folders: dict, model: str, **overrides):
    c = CONFIGS[TWINS[model]].get_config()
    c.model.init = folders[model]
    for field, value in overrides.items():
        node = c
        *parents, leaf = field.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return c


def _rows(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_records(got: list[dict], want: list[dict]) -> None:
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for a, b in zip(got, want, strict=True):
        assert set(a) == set(b)
        for key in sorted(set(a) - _TIMES):
            if key == "loss":  # near-cancelling +-O(1) terms: compare on their scale
                np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-5, err_msg=key)
            else:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


# ------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_launcher_trains_sd3_lora_on_policy_on_a_2x4_mesh(folders):
    workdir = Path(folders["root"]) / "launch_sd3"
    proc = launch_tiny_run(TWINS["sd3"], workdir, folders["sd3"])
    assert "mesh {'data': 2, 'fsdp': 4} over 8 cpu device(s)" in proc.stderr
    records = _rows(workdir)
    assert [r["epoch"] for r in records] == [0, 1]
    for r in records:
        assert r["onpolicy_ratio_max_dev"] == 0.0  # one update per epoch: on-policy
        assert np.isfinite(r["loss"]) and r["grad_norm"] > 0  # LoRA B gets gradients
        assert np.isfinite(r["reward_saturation_mean"]) and r["skipped_updates"] == 0
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]


@pytest.mark.slow
def test_flux_full_fine_tune_fsdp_sharded_equals_data_parallel(folders, tmp_path):
    runs = {}
    for shape in ((2, 4), (8, 1)):
        config = _config(
            folders,
            "flux",
            **{"model.lora.rank": 0, "train.num_epochs": 1, "train.kl_beta": 0.01},
            **{"mesh.shape": shape},
        )
        runs[shape] = train(config, tmp_path / f"run_{shape[0]}x{shape[1]}")
    sharded, replicated = runs[(2, 4)], runs[(8, 1)]
    kernels = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(sharded.state.trainable)
        if "kernel" in jax.tree_util.keystr(path) and leaf.ndim >= 2
    ]
    assert any("fsdp" in str(k.sharding.spec) for k in kernels)  # the transformer is split
    (record,) = sharded.records
    assert record["onpolicy_ratio_max_dev"] == 0.0 and np.isfinite(record["kl_ref"])
    _assert_same_records(sharded.records, replicated.records)


# ------------------------------------------------------------------ configs


@pytest.mark.parametrize("name", ["flux_hps", "sd35_pickscore"])
def test_paper_configs_fit_one_and_eight_devices(name):
    c = CONFIGS[name].get_config()
    c.model.init = "random"
    for devices in (1, 8):
        validate(c, devices)
    if name == "flux_hps":
        assert (c.sample.group_size, c.prior.kind, c.model.remat) == (12, "moving_average", "full")
        assert (c.model.guidance, c.sample.guidance_scale, c.model.dtype) == (3.5, 1.0, "bfloat16")
        assert "hpsv2" in c.rewards and tuple(c.model.lora.targets) == FLUX_ATTENTION_TARGETS
    else:
        assert (c.sample.group_size, c.sample.num_steps, c.sample.guidance_scale) == (24, 10, 4.5)
        assert (c.model.lora.rank, c.model.lora.alpha, c.train.kl_beta) == (32, 64.0, 0.01)
        assert "pickscore" in c.rewards and tuple(c.model.lora.targets) == SD3_ATTENTION_TARGETS


def test_sd35_configs_sample_at_the_folder_scheduler_shift(folders):
    """Flow-GRPO samples SD3.5 at its scheduler's shift (3.0); the configs leave
    `sample.shift` unset so the folder's value is used."""
    assert sd35_pickscore.get_config().sample.shift is None
    c = _config(folders, "sd3")
    model, _, _ = build_model(c.model, jax.random.key(0))
    sampler = samplers.make_sampler(c.sample, model)
    sigmas = schedules.diffusers_flow_sigmas(c.sample.num_steps, sd3_folders.SHIFT)[:-1]
    want = sigmas.astype(np.float32) * np.float32(1000)
    np.testing.assert_array_equal(sampler.tables["model_t"], want)


@pytest.mark.parametrize("name", CONFIGS)
def test_docstring_commands_use_existing_fields(name):
    module = CONFIGS[name]
    c = module.get_config()
    flags = re.findall(r"--config\.([\w.]+)=", module.__doc__)
    assert "model.init" in flags
    for flag in flags:
        node = c
        for part in flag.split("."):
            assert part in node, f"{name}: --config.{flag} is not a config field"
            node = node[part]


# ------------------------------------------------------------------ config checks


def _dit(name: str, **overrides):
    c = (flux_tiny_test if name == "flux" else sd35_tiny_test).get_config()
    c.model.init = "random"
    c.model.preset = "tiny"
    for field, value in overrides.items():
        section, key = field.split(".")
        c[section][key] = value
    return c


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("flux", {"sample.kind": "ddim"}, "sample.kind='ddim': model.name='flux' needs"),
        ("sd3", {"model.resolution": 40}, "model.resolution=40 must be"),
        ("flux", {"model.resolution": (32, 40)}, "model.resolution=(32, 40) must be"),
        ("flux", {"model.preset": "pro"}, "model.preset='pro' is not one of"),
        ("sd3", {"model.preset": "dev"}, "model.preset='dev' is not one of"),
        ("flux", {"model.guidance": 0.0}, "model.guidance=0.0 must be"),
        ("flux", {"model.guidance": math.inf}, "model.guidance=inf must be"),
        ("sd3", {"model.max_sequence_length": -1}, "model.max_sequence_length=-1 must be"),
        ("sd3", {"model.text_cache": "/x.safetensors"}, "model.text_cache='/x.safetensors' needs"),
    ],
)
def test_bad_dit_model_fields_fail_naming_the_field(name, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(_dit(name, **overrides), 8)


def test_dit_resolutions_that_fit_pass():
    validate(_dit("flux", **{"model.resolution": (32, 48)}), 8)
    validate(_dit("sd3", **{"model.resolution": 48}), 8)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_dit_init_must_be_a_diffusers_folder(name, tmp_path):
    c = _dit(name, **{"model.init": str(tmp_path)})
    with pytest.raises(ConfigError, match="has no model_index.json"):
        check_inputs(c)
    (tmp_path / "model_index.json").write_text("{}")
    c.model.text_cache = str(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match=r"model.text_cache=.* is not a file"):
        check_inputs(c)
    c.model.text_cache = ""
    check_inputs(c)


# ------------------------------------------------------------------ random init


def test_random_init_scale_of_stacked_kernels_does_not_depend_on_depth():
    """A scanned `[layers, in, out]` kernel is `layers` kernels of fan-in `in`."""
    import flax.linen as nn

    from bpgo_jax.models.scan import Stack

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(64)(x)

    stds = []
    for layers in (1, 16):
        module = Stack(block=Block, length=layers)
        params = random_params(module, jax.random.key(0), np.float32, np.zeros((1, 64)))
        (kernel,) = [
            v for p, v in jax.tree_util.tree_leaves_with_path(params) if p[-1].key == "kernel"
        ]
        assert kernel.shape == (layers, 64, 64)
        stds.append(float(np.std(np.asarray(kernel)[0])))
    np.testing.assert_allclose(stds, 1 / 8, rtol=0.1)  # 1 / sqrt(64), at either depth
