"""Wan2.1 text-to-video as a `DiffusionModel`: parity with diffusers' WanPipeline, training.

A tiny random WanPipeline folder (UMT5, transformer, VAE, Wan's UniPC
scheduler config with `flow_shift`) is saved with `save_pretrained`. Parity,
float32: from one initial noise, each guided (CFG 5, negative prompt "")
Euler step of ours equals WanPipeline's run with FlowMatchEuler at the
folder's shift, and `decode` equals its `output_type="np"` frames. End to
end: `configs/wan_tiny_test.py` trains through `launch/train.py` on a data 2
x fsdp 4 mesh (5 frames of 16 x 16, 2 steps, 2 epochs, the reference-model
prior), on-policy ratio exactly 1, and the same run on one device, stopped
after epoch 1 and resumed in this process, gives the launcher's metrics
(sharded = unsharded, resume = uninterrupted).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import text_folders  # noqa: E402  (tests/ folder)
import wan_folders  # noqa: E402
from commands import launch_tiny_run  # noqa: E402

from bpgo_jax.config import validate  # noqa: E402
from bpgo_jax.configs import wan_t2v, wan_tiny_test  # noqa: E402
from bpgo_jax.errors import ConfigError, WeightsError  # noqa: E402
from bpgo_jax.models import build_model  # noqa: E402
from bpgo_jax.models.wan import WAN_ATTENTION_TARGETS, preset, wan_model  # noqa: E402
from bpgo_jax.models.wan.pipeline import scheduler_from_dict  # noqa: E402
from bpgo_jax.models.wan.vae_config import WanVAEConfig  # noqa: E402
from bpgo_jax.rollout import samplers  # noqa: E402
from bpgo_jax.testing.sd_folders import jiggle  # noqa: E402
from bpgo_jax.train import train  # noqa: E402

pytestmark = pytest.mark.xdist_group("test_wan_pipeline")

TOL = 1e-4  # relative to the largest reference magnitude (at least 1)
FLOW_SHIFT = 3.0
TEXT_LEN = 16
VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
_TIMES = {"rollout_seconds", "train_seconds", "images_per_second"}


def _pipeline(folder: Path, seed: int = 0) -> diffusers.WanPipeline:
    torch.manual_seed(seed)
    tok = text_folders.t5_tokenizer()
    umt5 = transformers.UMT5EncoderModel(text_folders.t5_config(len(tok), umt5=True)).eval()
    transformer = wan_folders.transformer(dict(wan_folders.T2V, text_dim=96), seed + 1)
    pipe = diffusers.WanPipeline(
        tokenizer=tok,
        text_encoder=umt5,
        vae=jiggle(diffusers.AutoencoderKLWan(**VAE), seed + 2).eval(),
        scheduler=diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=FLOW_SHIFT
        ),
        transformer=transformer.eval(),
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return pipe


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, diffusers.WanPipeline]:
    root = tmp_path_factory.mktemp("wan_pipeline") / "wan"
    return root, _pipeline(root)


def _close(ours, ref, tol: float = TOL) -> None:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max())
    assert err <= tol * scale, f"max error {err} > {tol} x {scale}"


# ------------------------------------------------------------------ parity


def test_guided_euler_steps_and_decode_match_wan_pipeline(folder):
    path, pipe = folder
    frames, height, width, steps = 5, 32, 48, 2
    prompts = ["a photo of a cat", "a red dog in the snow"]
    model, trainable, frozen = wan_model(
        str(path), num_frames=frames, resolution=(height, width), max_sequence_length=TEXT_LEN
    )
    assert model.latent_shape == (2, 4, 6, 16)
    assert model.scheduler_config["shift"] == FLOW_SHIFT  # the UniPC folder's flow_shift
    noise = np.random.RandomState(0).standard_normal((2, *model.latent_shape)).astype(np.float32)

    # diffusers: WanPipeline with the Euler flow scheduler at the folder's shift.
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)
    seen = []

    def keep(pipe, i, t, kwargs):
        seen.append(kwargs["latents"].detach().numpy().transpose(0, 2, 3, 4, 1))
        return kwargs

    with torch.no_grad():
        video = pipe(
            prompt=prompts,
            height=height,
            width=width,
            num_frames=frames,
            num_inference_steps=steps,
            guidance_scale=5.0,
            latents=torch.from_numpy(noise.transpose(0, 4, 1, 2, 3).copy()),
            max_sequence_length=TEXT_LEN,
            output_type="np",
            callback_on_step_end=keep,
        ).frames

    # ours: the engine's guided prediction and flow step (ODE: no step noise).
    cfg = ml_collections.ConfigDict(
        dict(
            kind="flow",
            num_steps=steps,
            guidance_scale=5.0,
            noise="ode",
            noise_level=0.0,
            shift=None,  # the model's scheduler shift
            sigmas="diffusers",
        )
    )
    sampler = samplers.make_sampler(cfg, model)
    cond = model.encode_text(frozen, model.tokenize(prompts))
    uncond = model.encode_text(frozen, model.tokenize([""]))

    @jax.jit
    def step(x, k):
        t = jax.numpy.full((2,), jax.numpy.asarray(sampler.tables["model_t"])[k])
        out = samplers.guided_prediction(model, 5.0, trainable, frozen, x, t, cond, uncond)
        return samplers.transition(sampler, jax.numpy.full((2,), k), x, out)[0]

    x = noise
    for k in range(steps):
        x = step(x, k)
        _close(x, seen[k])
    _close(jax.jit(model.decode)(frozen, seen[-1]), video)
    assert video.shape == (2, frames, height, width, 3)


# ------------------------------------------------------------------ building


def test_build_model_reads_config_fields(folder):
    path, _ = folder
    c = wan_tiny_test.get_config()
    c.model.init = str(path)
    model, trainable, _ = build_model(c.model, jax.random.key(0))
    assert model.name == "wan" and model.latent_shape == (2, 2, 2, 16)
    assert set(trainable) == {"lora"}
    lora_paths = {
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(trainable)
    }
    assert any("attn1" in p for p in lora_paths) and any("attn2" in p for p in lora_paths)
    assert not any("ffn" in p for p in lora_paths)
    c.model.num_frames = 6
    with pytest.raises(ConfigError, match=r"num_frames=6 must be 1 \+ 4k"):
        build_model(c.model, jax.random.key(0))


def test_folder_with_the_wrong_pipeline_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "FluxPipeline", "transformer": ["d", "FluxTransformer2DModel"]})
    )
    with pytest.raises(WeightsError, match="transformer is a 'FluxTransformer2DModel'"):
        wan_model(str(tmp_path))


def test_scheduler_shift_from_unipc_or_euler_configs():
    unipc = {"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True, "flow_shift": 5.0}
    assert scheduler_from_dict(unipc)["shift"] == 5.0
    euler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}
    assert scheduler_from_dict(euler)["shift"] == 3.0
    with pytest.raises(ConfigError, match="without use_flow_sigmas"):
        scheduler_from_dict({**unipc, "use_flow_sigmas": False})
    with pytest.raises(ConfigError, match="DDIMScheduler"):
        scheduler_from_dict({"_class_name": "DDIMScheduler"})


def _tiny_preset() -> dict:
    """The tiny preset with a tiny VAE (the preset's is Wan2.1's full-width VAE)."""
    configs = preset("tiny")
    configs["vae"] = WanVAEConfig(**{**VAE, "dim_mult": tuple(VAE["dim_mult"])})
    return configs


def test_sample_shift_none_needs_a_model_scheduler_shift():
    c = ml_collections.ConfigDict(
        dict(kind="flow", num_steps=2, guidance_scale=1.0, noise="ode", noise_level=0.0)
    )
    c.shift = None
    model, _, _ = wan_model(_tiny_preset(), num_frames=1, resolution=16)
    assert samplers.scheduler_shift(model, None) == 3.0  # the presets' 480p flow_shift
    assert samplers.scheduler_shift(model, 2.0) == 2.0
    with pytest.raises(ConfigError, match="declares none"):
        samplers.make_sampler(c, dataclasses.replace(model, scheduler_config=None))


# ------------------------------------------------------------------ configs


def test_paper_config_fits_one_and_eight_devices():
    c = wan_t2v.get_config()
    c.model.init = "random"
    for devices in (1, 8):
        validate(c, devices)
    assert (c.sample.group_size, c.prior.kind, c.sample.guidance_scale) == (8, "reference", 5.0)
    assert c.sample.shift is None and c.model.num_frames == 33
    assert tuple(c.model.lora.targets) == WAN_ATTENTION_TARGETS
    flags = re.findall(r"--config\.([\w.]+)=", wan_t2v.__doc__)
    for flag in flags:
        node = c
        for part in flag.split("."):
            assert part in node, f"--config.{flag} is not a config field"
            node = node[part]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_frames", 8, "model.num_frames=8 must be 1 + 4k"),
        ("resolution", (16, 24), "model.resolution=(16, 24) must be"),
        ("preset", "wan22_t2v_a14b", "is an image-to-video or Wan2.2 model"),
        ("preset", "tiny_i2v_21", "is an image-to-video or Wan2.2 model"),
        ("vae_batch_chunk", -1, "model.vae_batch_chunk=-1 must be"),
    ],
)
def test_bad_wan_fields_fail_naming_the_field(field, value, message):
    c = wan_tiny_test.get_config()
    c.model.init = "random"
    c.model.preset = "tiny"
    c.model[field] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(c, 8)


def test_shift_none_is_refused_for_a_model_without_a_scheduler():
    from bpgo_jax.configs import sd_tiny_test

    c = sd_tiny_test.get_config()
    c.sample.shift = None
    with pytest.raises(ConfigError, match="sample.shift=None takes"):
        validate(c, 8)


# ------------------------------------------------------------------ end to end


def _rows(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tiny_run_trains_on_policy_and_sharded_equals_one_device(folder, tmp_path):
    path, _ = folder
    workdir = tmp_path / "launch"
    proc = launch_tiny_run("wan_tiny_test", workdir, str(path))
    assert "mesh {'data': 2, 'fsdp': 4} over 8 cpu device(s)" in proc.stderr
    launched = _rows(workdir)
    assert [r["epoch"] for r in launched] == [0, 1]
    for r in launched:
        assert r["onpolicy_ratio_max_dev"] == 0.0  # one update per epoch: on-policy
        assert np.isfinite(r["loss"]) and r["grad_norm"] > 0
        assert np.isfinite(r["reward_video_saturation_mean"]) and r["skipped_updates"] == 0
        assert 0 < r["prior_mean"] < 1  # the reference policy's mean frame saturation
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]

    # The same run on one device (resume = uninterrupted is the engine's, tests/test_engine.py).
    c = wan_tiny_test.get_config()
    c.model.init = str(path)
    c.mesh.update(shape=(1, 1), num_devices=1)
    got = train(c, tmp_path / "one_device").records
    assert [r["epoch"] for r in got] == [0, 1]
    for a, b in zip(got, launched, strict=True):
        assert set(a) == set(b)
        for key in sorted(set(a) - _TIMES):
            # The loss is ~0, a mean of +-O(1) terms: compare it on their scale.
            atol = 1e-4 if key == "loss" else 1e-6
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=atol, err_msg=key)
