"""Stable Diffusion through the real launcher, end to end, plus the SD run configs.

The e2e test writes tiny random diffusers / transformers folders with the
libraries' own `save_pretrained` (the layout real checkpoints have), then runs
`launch/train.py --config=configs/sd_tiny_test.py --cpu_devices=2` as a
subprocess on two CPU devices with the UNet kernels sharded over an fsdp axis: load ->
DDIM rollout with CFG -> CLIP score -> BPGO update of LoRA factors ->
checkpoint -> resume. (A full fine-tune, fsdp-sharded with a KL to the frozen
copy, runs end to end in tests/test_dit_train.py; the UNet's kernels landing on
their fsdp shards is `test_loaded_weights_land_on_their_rule_shardings`.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from commands import compile_cache, run_launch  # noqa: E402  (same tests/ folder)
from test_sd_parity import SD1_UNET  # noqa: E402

from bpgo_jax.config import batch_layout  # noqa: E402
from bpgo_jax.configs import sd_aesthetic, sd_jpeg, sd_pickscore, sd_tiny_test  # noqa: E402
from bpgo_jax.models.sd import sd_from_config  # noqa: E402
from bpgo_jax.parallel import mesh as mesh_lib  # noqa: E402
from bpgo_jax.prompts import load_prompts  # noqa: E402
from bpgo_jax.testing.sd_folders import save_sd_pipeline  # noqa: E402

# Its module-scoped fixtures build once: keep the file on one xdist worker.
pytestmark = pytest.mark.xdist_group("test_sd_train")

ROOT = Path(__file__).resolve().parents[1]
SD_CONFIGS = {"sd_aesthetic": sd_aesthetic, "sd_pickscore": sd_pickscore}


def _save_clip(folder: Path, tokenizer) -> None:
    """A tiny transformers CLIPModel with the SD tokenizer (ids must agree)."""
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    text = dict(small, vocab_size=len(tokenizer), max_position_embeddings=77, **ids)
    vision = dict(small, image_size=16, patch_size=8)
    torch.manual_seed(2)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    transformers.CLIPModel(cfg).eval().save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd_train")
    sd = save_sd_pipeline(root, SD1_UNET)
    _save_clip(root / "clip", sd["tokenizer"])
    return {"sd": sd["folder"], "clip": str(root / "clip")}


def _launch(folders: dict, workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    proc = run_launch(
        "train.py",
        "--config=configs/sd_tiny_test.py",
        f"--workdir={workdir}",
        f"--config.model.init={folders['sd']}",
        f"--config.rewards.clip_score.path={folders['clip']}",
        # The resumed run reuses the first run's executables instead of recompiling.
        f"--compile_cache={compile_cache()}",
        "--cpu_devices=2",  # replaces the 8 devices XLA_FLAGS ask for in this process
        *overrides,
        cwd=ROOT,
        pinned=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_lora_run_trains_on_policy_and_checkpoints(folders, tmp_path):
    """A launcher run of the SD pipeline; resuming is the launcher's own
    (tests/test_commands.py), whatever the model."""
    workdir = tmp_path / "run"
    proc = _launch(folders, workdir)
    assert "mesh {'data': 1, 'fsdp': 2} over 2 cpu device(s)" in proc.stderr
    first = _records(workdir)
    assert [r["epoch"] for r in first] == [0, 1]
    for r in first:
        assert np.isfinite(r["loss"]) and np.isfinite(r["reward_clip_score_mean"])
        assert np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0  # LoRA B gets gradients
        assert r["skipped_updates"] == 0
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
    # One update per epoch (train.batch_size = samples per epoch), so each
    # epoch's update is on-policy: the update must recompute the rollout's
    # log-probs bit for bit (ratio exactly 1).
    assert [r["onpolicy_ratio_max_dev"] for r in first] == [0.0, 0.0]


# ------------------------------------------------------------------ configs


@pytest.mark.parametrize("name", SD_CONFIGS)
def test_sd_configs_describe_a_ddpo_like_run(name):
    c = SD_CONFIGS[name].get_config()
    assert c.model.name == "sd" and "prediction_type" not in c.model  # the scheduler decides
    assert (c.sample.kind, c.sample.eta, c.sample.num_steps, c.sample.guidance_scale) == (
        "ddim",
        1.0,
        50,
        5.0,
    )
    assert (c.model.lora.rank, c.train.lr, c.train.clip_range) == (4, 3e-4, 1e-4)
    for devices in (1, 8):  # one GPU and one 8-GPU host fit the batch layout
        layout = batch_layout(c, devices)
        assert layout["samples_per_epoch"] == 256 and layout["trained_steps"] == 50
    assert len(load_prompts(c.prompts.path)) >= 40
    held_out = load_prompts(c.eval.prompts_path).prompts
    assert not set(held_out) & set(load_prompts(c.prompts.path).prompts)


@pytest.mark.parametrize("name", [*SD_CONFIGS, "sd_tiny_test", "sd_jpeg"])
def test_docstring_commands_use_existing_fields(name):
    """Every `--config.x.y=` in a config's docstring names a field the config has."""
    module = {**SD_CONFIGS, "sd_tiny_test": sd_tiny_test, "sd_jpeg": sd_jpeg}[name]
    c = module.get_config()
    flags = re.findall(r"--config\.([\w.]+)=", module.__doc__)
    assert "model.init" in flags or c.model.init == "random"
    for flag in flags:
        node = c
        for part in flag.split("."):
            assert part in node, f"{name}: --config.{flag} is not a config field"
            node = node[part]


def test_reward_paths_are_set_once_for_training_and_eval():
    c = sd_aesthetic.get_config()
    c.rewards.aesthetic.path = "/clip-l"
    c.rewards.aesthetic.head_path = "/head.safetensors"
    assert c.eval.rewards.aesthetic.path == "/clip-l"
    assert c.eval.rewards.aesthetic.head_path == "/head.safetensors"
    p = sd_pickscore.get_config()
    p.rewards.pickscore.tokenizer_path = "/clip-h"
    assert p.eval.rewards.pickscore.tokenizer_path == "/clip-h"


def test_mesh_rules_shard_unet_kernels_and_replicate_the_rest():
    c = sd_aesthetic.get_config()
    rules = tuple(tuple(r) for r in c.mesh.rules)
    mesh = mesh_lib.make_mesh((1, -1), c.mesh.axes)  # FSDP over the 8 test devices
    spec = lambda name, shape: mesh_lib.spec_for(name, shape, mesh, rules)
    conv = "unet/down_blocks_1/resnets_0/conv1/kernel"
    assert spec(conv, (3, 3, 320, 640)) == P(None, None, None, "fsdp")  # the largest dim
    assert spec("unet/up_blocks_1/attentions_0/proj_out/kernel", (640, 4)) == P("fsdp", None)
    assert spec("unet/conv_out/bias", (4,)) == P()
    assert spec("lora/down_blocks_0/attentions_0/to_q/kernel/lora_a", (320, 4)) == P()
    assert spec("text/embeddings/token_embedding/embedding", (49408, 768)) == P()
    assert len(jax.devices()) == 8


def test_sd_refuses_a_prediction_type_it_would_ignore(folders):
    cfg = ml_collections.ConfigDict(dict(name="sd", init=folders["sd"], prediction_type="flow"))
    with pytest.raises(ValueError, match="prediction_type='flow' is not used by SD"):
        sd_from_config(cfg, jax.random.key(0))
    cfg.prediction_type = "epsilon"  # agrees with the folder's scheduler: accepted
    model, _, _ = sd_from_config(cfg, jax.random.key(0))
    cfg = ml_collections.ConfigDict(
        dict(name="sd", init=folders["sd"], scheduler=dict(prediction_type="v_prediction"))
    )
    assert sd_from_config(cfg, jax.random.key(0))[0].prediction_type == "v_prediction"
    assert model.prediction_type == "epsilon"


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_loaded_weights_land_on_their_rule_shardings(folders, lora_rank):
    # What Trainer does: each tensor is placed as it is read, by the same rules
    # that shard the training state, so the later device_put moves nothing.
    c = sd_aesthetic.get_config()
    rules = tuple(tuple(r) for r in c.mesh.rules)
    mesh = mesh_lib.make_mesh((2, 4), c.mesh.axes)
    cfg = ml_collections.ConfigDict(dict(name="sd", init=folders["sd"], lora=dict(rank=lora_rank)))
    _, trainable, frozen = sd_from_config(
        cfg, jax.random.key(0), sharding_fn=mesh_lib.param_sharding_fn(mesh, rules)
    )
    unet = (frozen if lora_rank else trainable)["unet"]
    placed = {"unet": unet, "text": frozen["text"], "vae": frozen["vae"]}
    want = mesh_lib.tree_shardings(placed, mesh, rules)
    flat = jax.tree_util.tree_flatten_with_path(placed)[0]
    for (path, x), s in zip(flat, jax.tree.leaves(want), strict=True):
        name = jax.tree_util.keystr(path)
        assert x.sharding.is_equivalent_to(s, x.ndim), f"{name} on {x.sharding}, rules say {s}"
    kernel = unet["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    assert kernel.sharding.spec == P(None, None, None, "fsdp")
    assert len(kernel.addressable_shards[0].data.shape) == 4
    assert kernel.addressable_shards[0].data.shape[-1] == kernel.shape[-1] // 4
