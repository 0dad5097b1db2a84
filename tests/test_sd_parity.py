"""Flax SD (UNet, VAE, scheduler, loader, pipeline) vs. diffusers' PyTorch reference.

Tiny random diffusers pipelines are written to temp folders with
`save_pretrained(safe_serialization=True)` exactly as real checkpoints are,
then loaded by our loader and compared output for output (fp32, 1e-4).
"""

from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from bpgo_jax.models.sd import (  # noqa: E402
    load_scheduler,
    load_sd,
    load_unet,
    load_vae,
    scheduler_from_dict,
    sd_model,
)
from bpgo_jax.models.sd.config import unet_config_from_dict  # noqa: E402
from bpgo_jax.models.sd.pipeline import model_from_modules, modules_from_configs  # noqa: E402
from bpgo_jax.rollout import samplers  # noqa: E402
from bpgo_jax.testing.sd_folders import VAE, save_sd_pipeline  # noqa: E402

TOL = 1e-4
_CA, _DOWN, _CAUP, _UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
# SD1: 1x1-conv projections, `attention_head_dim` = 8 heads in every block.
SD1_UNET = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    down_block_types=(_CA, _DOWN),
    up_block_types=(_UP, _CAUP),
    norm_num_groups=32,
)
# SD2: linear projections, per-block heads (the reversed order matters in the up path),
# plus non-default time-embedding options and two transformer layers.
SD2_UNET = dict(
    sample_size=8,
    block_out_channels=(16, 32),
    layers_per_block=(1, 2),
    cross_attention_dim=24,
    attention_head_dim=(2, 4),
    down_block_types=(_CA, _CA),
    up_block_types=(_CAUP, _CAUP),
    norm_num_groups=8,
    use_linear_projection=True,
    transformer_layers_per_block=(2, 1),
    flip_sin_to_cos=False,
    freq_shift=1,
)
# Its module-scoped fixtures build once: keep the file on one xdist worker.
pytestmark = pytest.mark.xdist_group("test_sd_parity")
PROMPTS = ["a photo of a cat", "hi", "photo photo photo"]


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return save_sd_pipeline(tmp_path_factory.mktemp("sd1"), SD1_UNET)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return save_sd_pipeline(
        tmp_path_factory.mktemp("sd2"), SD2_UNET, act="gelu", prediction="v_prediction", seed=1
    )


def _nchw(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x)).permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def _close(ours, ref, tol: float = TOL) -> None:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max()))  # relative once magnitudes exceed 1
    assert float(np.abs(ours - ref).max()) <= tol * scale


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_pipeline_matches_diffusers(variant, request):
    """tokenize / encode_text / predict / decode of `sd_model(folder)` vs. the torch parts."""
    ref = request.getfixturevalue(variant)
    model, trainable, frozen = sd_model(ref["folder"])
    assert set(trainable) == {"unet"} and set(frozen) == {"text", "vae"}
    assert model.latent_shape == (8, 8, 4)
    want = "epsilon" if variant == "sd1" else "v_prediction"
    assert model.prediction_type == want
    assert model.scheduler_config["prediction_type"] == want
    assert model.scheduler_config["steps_offset"] == 1

    tokens = model.tokenize(PROMPTS)
    expect = ref["tokenizer"](PROMPTS, padding="max_length", max_length=77, truncation=True)
    np.testing.assert_array_equal(tokens, np.asarray(expect["input_ids"]))
    assert tokens.dtype == np.int32

    cond = jax.jit(model.encode_text)(frozen, jnp.asarray(tokens))
    with torch.no_grad():
        hidden = ref["text_encoder"](torch.tensor(tokens, dtype=torch.long)).last_hidden_state
    _close(cond, hidden)

    rs = np.random.RandomState(3)
    x = rs.randn(3, *model.latent_shape).astype(np.float32)
    t = np.array([1.0, 421.0, 999.0], np.float32)
    out = jax.jit(model.predict)(trainable, frozen, x, t, cond)
    with torch.no_grad():
        expect = ref["unet"](_nchw(x), torch.tensor(t), torch.tensor(np.asarray(cond))).sample
    _close(out, _nhwc(expect))

    images = jax.jit(model.decode)(frozen, x)
    with torch.no_grad():
        pixels = ref["vae"].decode(_nchw(x) / VAE["scaling_factor"]).sample
    _close(images, np.clip((_nhwc(pixels) + 1) / 2, 0, 1))
    assert images.shape == (3, 16, 16, 3) and images.dtype == jnp.float32


def test_vae_encode_matches_diffusers(sd1):
    ckpt = load_sd(sd1["folder"])
    pixels = np.random.RandomState(4).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    encode = jax.jit(lambda p, x: ckpt.vae.apply({"params": p}, x, method="encode"))
    mean, logvar = encode(ckpt.params["vae"], pixels)
    with torch.no_grad():
        dist = sd1["vae"].encode(_nchw(pixels)).latent_dist
    _close(mean, _nhwc(dist.mean))
    _close(logvar, _nhwc(dist.logvar))


def test_random_init_has_the_loaded_structure(sd2):
    """`model.init` from the folder's config dicts builds exactly the tree the loader fills."""
    folder = sd2["folder"]
    configs = {}
    for name, sub in (("unet", "unet"), ("vae", "vae"), ("text_encoder", "text_encoder")):
        with open(os.path.join(folder, sub, "config.json")) as f:
            configs[name] = json.load(f)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        configs["scheduler"] = json.load(f)
    configs["tokenizer"] = os.path.join(folder, "tokenizer")
    model = model_from_modules(modules_from_configs(configs))
    trainable, frozen = model.init(jax.random.key(1))
    ckpt = load_sd(folder)
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    assert shapes(trainable["unet"]) == shapes(ckpt.params["unet"])
    assert shapes(frozen) == shapes({"text": ckpt.params["text"], "vae": ckpt.params["vae"]})
    assert model.prediction_type == "v_prediction"


def test_bfloat16_load_and_predict(sd1):
    model, trainable, frozen = sd_model(sd1["folder"], dtype=jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves((trainable, frozen))} == {jnp.dtype(jnp.bfloat16)}
    x = np.random.RandomState(5).randn(2, *model.latent_shape).astype(np.float32)
    t = np.array([10.0, 700.0], np.float32)
    cond = np.random.RandomState(6).randn(2, 77, 32).astype(np.float32)
    out = np.asarray(jax.jit(model.predict)(trainable, frozen, x, t, cond))
    with torch.no_grad():
        ref = _nhwc(sd1["unet"](_nchw(x), torch.tensor(t), torch.tensor(cond)).sample)
    assert out.dtype == np.float32
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    assert 1e-4 < rel < 5e-2  # bf16 really ran, and still tracks the fp32 reference


# ---------------------------------------------------------------- scheduler


@pytest.mark.parametrize(
    "kw",
    [
        dict(beta_schedule="linear"),
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        dict(beta_schedule="squaredcos_cap_v2", set_alpha_to_one=False),
        dict(beta_schedule="scaled_linear", rescale_betas_zero_snr=True, num_train_timesteps=500),
        dict(trained_betas=np.linspace(2e-4, 0.03, 200).tolist(), num_train_timesteps=200),
    ],
    ids=["linear", "scaled_linear", "cosine", "zero_snr", "trained_betas"],
)
def test_scheduler_tables_match_diffusers(tmp_path, kw):
    ref = diffusers.DDIMScheduler(**kw)
    ref.save_pretrained(str(tmp_path))
    ours = load_scheduler(str(tmp_path))
    np.testing.assert_allclose(
        ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-7
    )
    assert ours.alphas_cumprod.dtype == np.float32
    assert ours.final_alpha_cumprod == pytest.approx(float(ref.final_alpha_cumprod), rel=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_match_diffusers(spacing, offset):
    kw = dict(timestep_spacing=spacing, steps_offset=offset)
    ref = diffusers.DDIMScheduler(**kw)
    ours = scheduler_from_dict(dict(ref.config))
    for steps in (1, 7, 20, 50, 999):
        ref.set_timesteps(steps)
        np.testing.assert_array_equal(ours.timesteps(steps), ref.timesteps.numpy())
    with pytest.raises(ValueError, match="num_inference_steps=1001"):
        ours.timesteps(1001)


def test_scheduler_defaults_follow_ddim_from_config():
    """A PNDM-style config without DDIM keys gets DDIMScheduler's defaults, as in diffusers."""
    raw = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "skip_prk_steps": True}
    ref = diffusers.DDIMScheduler.from_config(raw)
    ours = scheduler_from_dict(raw)
    assert ours.clip_sample is ref.config.clip_sample is True
    assert ours.set_alpha_to_one is ref.config.set_alpha_to_one is True
    assert ours.prediction_type == ref.config.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="beta_schedule='cubic'"):
        scheduler_from_dict({"beta_schedule": "cubic"})
    with pytest.raises(ValueError, match="timestep_spacing='middle'"):
        scheduler_from_dict({"timestep_spacing": "middle"})


ENGINE_SCHEDULES = {
    "epsilon": {},  # the folder's own SD schedule
    "v_clip": dict(prediction_type="v_prediction", clip_sample=True, clip_sample_range=0.8),
    "v_zero_snr_trailing": dict(
        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"
    ),
    "trained_betas": dict(trained_betas=np.linspace(1e-4, 0.03, 1000).tolist()),
}


@pytest.mark.parametrize("overrides", ENGINE_SCHEDULES.values(), ids=ENGINE_SCHEDULES.keys())
def test_engine_ddim_step_matches_diffusers(sd1, overrides):
    """The sampler that trains (`make_sampler` + `transition`) vs. `DDIMScheduler.step(eta=1)`.

    The schedule travels the real path: folder -> `sd_model` (+ overrides) ->
    `model.scheduler_config` -> the engine's tables. Each row of the batch
    takes a different step, as in training, where samples train their own steps.
    """
    steps = 10
    model, _, _ = sd_model(sd1["folder"], scheduler_overrides=overrides)
    cfg = ml_collections.ConfigDict(dict(kind="ddim", num_steps=steps, eta=1.0, guidance_scale=1.0))
    sampler = samplers.make_sampler(cfg, model)
    ref = diffusers.DDIMScheduler.from_pretrained(
        os.path.join(sd1["folder"], "scheduler"), **overrides
    )
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(sampler.tables["model_t"], ref.timesteps.numpy())

    rs = np.random.RandomState(7)
    x, out, noise = (rs.randn(steps, 4, 4, 3).astype(np.float32) for _ in range(3))
    transition = jax.jit(functools.partial(samplers.transition, sampler))
    mean, std = transition(jnp.arange(steps), x, out)
    got = mean + std * noise
    logp = samplers.gaussian_logprob(got, mean, std)
    for k, t in enumerate(ref.timesteps.tolist()):
        row = lambda a, k=k: torch.tensor(a[k : k + 1])
        step = functools.partial(ref.step, row(out), t, row(x), eta=1.0)
        prev = t - ref.config.num_train_timesteps // steps
        expect_std = float(ref._get_variance(t, prev)) ** 0.5
        plain = step(variance_noise=torch.zeros(1, 4, 4, 3))
        expect_mean = plain.prev_sample.numpy()[0]
        zero_snr_first = bool(overrides.get("rescale_betas_zero_snr")) and k == 0
        if np.isnan(expect_mean).all():
            assert zero_snr_first
        if zero_snr_first:
            # Zero terminal SNR: diffusers takes sqrt(1 - a_prev - std^2) of a value that is 0
            # up to rounding (NaN below 0, ~1e-7 above it, by platform and version); the
            # engine clamps it to exactly 0, so compare with that analytic step.
            x0 = plain.pred_original_sample.numpy()[0]
            expect_mean = float(ref.alphas_cumprod[prev]) ** 0.5 * x0
            expect = expect_mean + expect_std * noise[k]
        else:
            expect = step(variance_noise=row(noise)).prev_sample.numpy()[0]
        _close(got[k], expect, 1e-5)
        _close(mean[k], expect_mean, 1e-5)
        # diffusers builds its tables in float32, we in float64 (then store float32).
        assert float(std[k].squeeze()) == pytest.approx(expect_std, rel=1e-4)
        density = -((expect - expect_mean) ** 2) / (2 * expect_std**2) - np.log(expect_std)
        expect_logp = float(np.mean(density - 0.5 * np.log(2 * np.pi)))
        assert float(logp[k]) == pytest.approx(expect_logp, rel=1e-4, abs=1e-4)
    assert ref.timesteps[-1] - ref.config.num_train_timesteps // steps < 0  # final alpha used


@pytest.mark.parametrize(
    "overrides",
    [
        dict(set_alpha_to_one=True),  # the last step lands on alpha-bar = 1
        dict(timestep_spacing="linspace"),  # the last step starts at timestep 0
        dict(steps_offset=0),  # "leading" without offset also ends at timestep 0
    ],
    ids=["alpha_to_one", "linspace", "no_offset"],
)
def test_engine_refuses_a_deterministic_step(sd1, overrides):
    """A zero-variance DDIM step has no log-probability to train: refused by name."""
    model, _, _ = sd_model(sd1["folder"], scheduler_overrides=overrides)
    cfg = ml_collections.ConfigDict(dict(kind="ddim", num_steps=4, eta=1.0, guidance_scale=1.0))
    with pytest.raises(ValueError, match="DDIM step 3 .* has zero noise"):
        samplers.make_sampler(cfg, model)


# ---------------------------------------------------------------- loader


def _copy_unet(src_folder: str, dst) -> str:
    dst = str(dst)
    shutil.copytree(os.path.join(src_folder, "unet"), dst)
    return dst


def _edit_weights(folder: str, edit) -> None:
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    tensors = safetensors_numpy.load_file(path)
    edit(tensors)
    safetensors_numpy.save_file(tensors, path)


def test_loader_names_missing_unexpected_and_misshapen_tensors(sd1, tmp_path):
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    missing = _copy_unet(sd1["folder"], tmp_path / "missing")
    _edit_weights(missing, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"missing tensor\\(s\\) {name}"):
        load_unet(missing)

    extra = _copy_unet(sd1["folder"], tmp_path / "extra")
    _edit_weights(extra, lambda t: t.update({"mid_block.bonus.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match="unexpected tensor 'mid_block.bonus.weight'"):
        load_unet(extra)

    bad = _copy_unet(sd1["folder"], tmp_path / "bad")
    _edit_weights(bad, lambda t: t.update({"conv_in.bias": np.zeros(7, np.float32)}))
    with pytest.raises(ValueError, match=r"'conv_in.bias'.*shape \(7,\).*expects \(32,\)"):
        load_unet(bad)


def test_loader_refuses_pickles_and_reports_missing_files(sd1, tmp_path):
    unet = _copy_unet(sd1["folder"], tmp_path / "pickled")
    os.rename(
        os.path.join(unet, "diffusion_pytorch_model.safetensors"),
        os.path.join(unet, "diffusion_pytorch_model.bin"),
    )
    with pytest.raises(ValueError, match="refusing pickle.*safe_serialization=True"):
        load_unet(unet)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="refusing pickle.*model.ckpt"):
        load_sd(str(ckpt))
    with pytest.raises(ValueError, match="missing folder"):
        load_sd(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="missing file .*model_index.json"):
        load_sd(str(tmp_path))
    partial = tmp_path / "partial"
    shutil.copytree(sd1["folder"], partial)
    shutil.rmtree(partial / "vae")
    with pytest.raises(ValueError, match="missing file .*vae.*config.json"):
        load_sd(str(partial))


def test_sharded_checkpoint_loads_like_single_file(sd1, tmp_path):
    sd1["unet"].save_pretrained(str(tmp_path), safe_serialization=True, max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "diffusion_pytorch_model.safetensors.index.json")
    _, sharded = load_unet(str(tmp_path))
    _, single = load_unet(os.path.join(sd1["folder"], "unet"))
    jax.tree.map(np.testing.assert_array_equal, sharded, single)


def test_sharding_fn_places_each_tensor(sd1):
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("fsdp",))
    seen = []

    def sharding_fn(path, shape):
        seen.append(path)
        spec = [None] * len(shape)
        if shape and shape[-1] % len(jax.devices()) == 0:
            spec[-1] = "fsdp"
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    ckpt = load_sd(sd1["folder"], sharding_fn=sharding_fn)
    assert {p[0] for p in seen} == {"unet", "vae", "text"}
    kernel = ckpt.params["unet"]["conv_in"]["kernel"]  # [3, 3, 4, 32]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    assert len(kernel.addressable_shards) == len(jax.devices())
    plain = load_sd(sd1["folder"])
    jax.tree.map(np.testing.assert_array_equal, ckpt.params, plain.params)


def test_loader_reads_legacy_vae_names_and_variants(sd1, tmp_path):
    """Pre-0.14 VAE attention names (query/key/value/proj_attn) and `variant` files."""
    legacy = str(tmp_path / "legacy")
    shutil.copytree(os.path.join(sd1["folder"], "vae"), legacy)
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def to_legacy(tensors):
        for key in list(tensors):
            for new, old in renames.items():
                if f"attentions.0.{new}." in key:
                    tensors[key.replace(new, old)] = tensors.pop(key)

    _edit_weights(legacy, to_legacy)
    _, params = load_vae(legacy)
    _, expect = load_vae(os.path.join(sd1["folder"], "vae"))
    jax.tree.map(np.testing.assert_array_equal, params, expect)

    variant = str(tmp_path / "variant")
    sd1["unet"].save_pretrained(variant, safe_serialization=True, variant="fp16")
    with pytest.raises(
        ValueError, match="missing file .*diffusion_pytorch_model.safetensors.*fp16"
    ):
        load_unet(variant)
    _, params = load_unet(variant, variant="fp16")
    assert params["conv_in"]["kernel"].shape == (3, 3, 4, 32)


def test_unet_config_semantics():
    """diffusers' resolution of per-block settings, and refusals by name."""
    sd2 = unet_config_from_dict(
        {"attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280]}
    )
    assert sd2.num_heads == (5, 10, 20, 20)  # heads; 64 channels per head everywhere
    assert [c // h for c, h in zip(sd2.block_out_channels, sd2.num_heads, strict=True)] == [64] * 4
    sd1 = unet_config_from_dict({"attention_head_dim": 8, "layers_per_block": 2})
    assert sd1.num_heads == (8,) * 4 and sd1.layers_per_block == (2,) * 4
    with pytest.raises(ValueError, match="num_attention_heads=8 is not supported"):
        unet_config_from_dict({"num_attention_heads": 8})
    with pytest.raises(ValueError, match="addition_embed_type='text_time' is not supported"):
        unet_config_from_dict({"addition_embed_type": "text_time"})  # SDXL
    with pytest.raises(ValueError, match="attention_head_dim=\\[8, 8\\] needs one entry"):
        unet_config_from_dict({"attention_head_dim": [8, 8]})
    with pytest.raises(ValueError, match="not divisible by norm_num_groups=32"):
        unet_config_from_dict({"block_out_channels": [48, 64, 64, 64]})


def test_scheduler_overrides_on_a_loaded_folder(sd1):
    model, _, _ = sd_model(sd1["folder"], scheduler_overrides={"prediction_type": "v_prediction"})
    assert model.prediction_type == "v_prediction"
    assert model.scheduler_config["beta_schedule"] == "scaled_linear"  # the rest is kept
    assert model.scheduler_config["set_alpha_to_one"] is False
