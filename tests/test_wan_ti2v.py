"""Wan2.2 TI2V (first-frame blend): parity with diffusers' WanImageToVideoPipeline, training.

A tiny random TI2V folder (UMT5, one transformer reading and writing the
Wan2.2 VAE's latents, that VAE, `expand_timesteps=True`) is saved with
`save_pretrained`, and PNG frames beside a `.jsonl` prompt file. Parity,
float32: from one initial noise, each guided Euler step of ours (the first
latent frame held at the image's latent, its tokens at timestep 0) equals
the pipeline's on the frames it samples, and the final latents equal its
blended output. The sampler never draws the held frame and the log-ratio
does not read it; a tiny run through the trainer has on-policy ratio 1.
"""

from __future__ import annotations

import types
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import text_folders  # noqa: E402  (tests/ folder)
import wan_folders  # noqa: E402
from PIL import Image  # noqa: E402

from bpgo_jax.config import validate  # noqa: E402
from bpgo_jax.configs import wan_ti2v, wan_ti2v_tiny_test  # noqa: E402
from bpgo_jax.errors import ConfigError  # noqa: E402
from bpgo_jax.models.wan.i2v import wan_i2v_model  # noqa: E402
from bpgo_jax.prompts import load_prompts  # noqa: E402
from bpgo_jax.rollout import samplers  # noqa: E402
from bpgo_jax.testing.sd_folders import jiggle  # noqa: E402
from bpgo_jax.train import train  # noqa: E402

pytestmark = pytest.mark.xdist_group("test_wan_ti2v")

TOL = 1e-4  # relative to the largest reference magnitude (at least 1)
FLOW_SHIFT = 5.0  # TI2V-5B's
TEXT_LEN = 16
HEIGHT, WIDTH, FRAMES = 32, 64, 5
Z = wan_folders.VAE22["z_dim"]
PROMPTS = ["a photo of a cat", "a red dog in the snow"]
E2E_PROMPTS = ["a cat", "a dog", "a red bird", "a fish in the sea"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_ti2v")
    torch.manual_seed(0)
    tok = text_folders.t5_tokenizer()
    umt5 = transformers.UMT5EncoderModel(text_folders.t5_config(len(tok), umt5=True)).eval()
    pipe = diffusers.WanImageToVideoPipeline(
        tokenizer=tok,
        text_encoder=umt5,
        vae=jiggle(diffusers.AutoencoderKLWan(**wan_folders.VAE22), 2).eval(),
        scheduler=diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=FLOW_SHIFT
        ),
        transformer=wan_folders.transformer(dict(wan_folders.TI2V, text_dim=96), 3).eval(),
        expand_timesteps=True,
    )
    pipe.save_pretrained(str(root / "wan"), safe_serialization=True)
    prompts = wan_folders.write_prompts(root, PROMPTS, (HEIGHT, WIDTH))
    return root, pipe, prompts


@pytest.fixture
def no_ftfy(monkeypatch):
    """diffusers' I2V module calls ftfy.fix_text without its is_ftfy_available() guard."""
    from diffusers.pipelines.wan import pipeline_wan_i2v

    fix = types.SimpleNamespace(fix_text=lambda text: text)
    monkeypatch.setattr(pipeline_wan_i2v, "ftfy", fix, raising=False)


def _close(ours, ref, tol: float = TOL) -> None:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max())
    assert err <= tol * scale, f"max error {err} > {tol} x {scale}"


def _model(root: Path, prompts: Path):
    return wan_i2v_model(
        str(root / "wan"),
        prompt_sets=[(str(prompts), load_prompts(prompts))],
        num_frames=FRAMES,
        resolution=(HEIGHT, WIDTH),
        max_sequence_length=TEXT_LEN,
        guidance_scale=5.0,
    )


def _sampler(model, steps: int, noise: str = "ode", level: float = 0.0):
    cfg = ml_collections.ConfigDict(
        dict(kind="flow", num_steps=steps, guidance_scale=1.0, noise=noise, noise_level=level)
    )
    cfg.shift = None
    cfg.sigmas = "diffusers"
    return samplers.make_sampler(cfg, model)


def _reference(pipe, root: Path, noise: np.ndarray, steps: int):
    """The pipeline's image latents `[B, 1, h, w, z]`, per-step latents and blended output."""
    frames = [Image.open(root / "images" / f"{i}.png") for i in range(len(noise))]
    condition, seen, final = [], [], []

    def keep(pipe, i, t, kwargs):
        seen.append(kwargs["latents"].detach().numpy().transpose(0, 2, 3, 4, 1))
        return kwargs

    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)
    with torch.no_grad():
        for i, frame in enumerate(frames):
            start = torch.from_numpy(noise[i : i + 1].transpose(0, 4, 1, 2, 3).copy())
            processed = pipe.video_processor.preprocess(frame, height=HEIGHT, width=WIDTH)
            _, c, _ = pipe.prepare_latents(
                processed.float(), 1, Z, HEIGHT, WIDTH, FRAMES, torch.float32, "cpu", None, start
            )
            condition.append(c.numpy().transpose(0, 2, 3, 4, 1))
            out = pipe(
                image=frame,
                prompt=PROMPTS[i],
                height=HEIGHT,
                width=WIDTH,
                num_frames=FRAMES,
                num_inference_steps=steps,
                guidance_scale=5.0,
                latents=start,
                max_sequence_length=TEXT_LEN,
                output_type="latent",
                callback_on_step_end=keep,
            ).frames
            final.append(out.numpy().transpose(0, 2, 3, 4, 1))
    per_step = [np.concatenate(seen[k::steps]) for k in range(steps)]
    return np.concatenate(condition), per_step, np.concatenate(final)


def test_first_frame_blend_steps_match_wan_image_to_video_pipeline(folder, no_ftfy):
    root, pipe, prompts = folder
    model, trainable, frozen = _model(root, prompts)
    assert model.latent_shape == (2, 2, 4, Z) and set(trainable) == {"transformer"}
    steps = 2
    noise = np.random.RandomState(0).standard_normal((2, *model.latent_shape)).astype(np.float32)
    condition, seen, final = _reference(pipe, root, noise, steps)

    cond = jax.jit(model.encode_text)(frozen, model.tokenize(PROMPTS))
    _close(cond["condition"], condition)
    sampler = _sampler(model, steps)

    @jax.jit
    def step(x, k):
        t = jnp.full((len(x),), jnp.asarray(sampler.tables["model_t"])[k])
        out = model.predict(trainable, frozen, x, t, cond)
        mean = samplers.transition(sampler, jnp.full((len(x),), k), x, out)[0]
        return samplers.keep_held(mean, samplers.held(model, cond))

    x = samplers.keep_held(jnp.asarray(noise), samplers.held(model, cond))
    for k in range(steps):
        x = step(x, k)
        # The pipeline blends its latents into the transformer's input and at the end only.
        _close(x[:, 1:], seen[k][:, 1:])
        np.testing.assert_array_equal(x[:, :1], cond["condition"])
    _close(x, final)


def test_sampler_holds_the_first_frame_and_the_ratio_ignores_it(folder):
    root, _, prompts = folder
    model, trainable, frozen = _model(root, prompts)
    sampler = _sampler(model, 2, noise="flow_grpo", level=0.7)
    cond = jax.jit(model.encode_text)(frozen, model.tokenize(PROMPTS))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(2))
    run = jax.jit(lambda c: samplers.sample(model, sampler, trainable, frozen, c, None, keys))
    traj = run(cond)
    held = np.broadcast_to(np.asarray(cond["condition"])[:, None], traj.latents[:, :, :1].shape)
    np.testing.assert_array_equal(traj.latents[:, :, :1], held)  # every step, no noise
    assert float(jnp.abs(traj.latents[:, 1, 1:] - traj.latents[:, 0, 1:]).min()) > 0

    drawn = samplers.held(model, cond)[0]
    k = jnp.zeros((2,), jnp.int32)
    x, x_next, old = traj.latents[:, 0], traj.latents[:, 1], traj.outputs[:, 0]
    on_policy = samplers.log_ratio(sampler, k, x, x_next, old, old, drawn)[0]
    np.testing.assert_array_equal(on_policy, 0.0)
    # An output that differs on the held frame only leaves the ratio at 1 ...
    moved = old.at[:, 0].add(1.0)
    held_only = samplers.log_ratio(sampler, k, x, x_next, moved, old, drawn)[0]
    np.testing.assert_array_equal(held_only, 0.0)
    # ... which reading every position would not.
    assert np.all(np.asarray(samplers.log_ratio(sampler, k, x, x_next, moved, old)[0]) != 0)
    # On the drawn frames it is the plain mean over them.
    shifted = old.at[:, 1:].add(0.1)
    got = samplers.log_ratio(sampler, k, x, x_next, shifted, old, drawn)[0]
    full = samplers.log_ratio(sampler, k, x[:, 1:], x_next[:, 1:], shifted[:, 1:], old[:, 1:])[0]
    np.testing.assert_allclose(got, full, rtol=1e-6)


def test_ti2v_configs_validate_and_refuse_what_the_model_lacks(folder, tmp_path):
    root, _, prompts = folder
    c = wan_ti2v.get_config()
    assert c.model.preset == "wan22_ti2v_5b" and tuple(c.model.resolution) == (704, 1280)
    c.model.init = "random"
    c.prompts.path = str(prompts)
    validate(c, 8)
    c.model.lora.experts = ("transformer_2",)
    with pytest.raises(ConfigError, match="Wan2.2 TI2V-5B has one transformer"):
        validate(c, 8)
    c.model.lora.experts = ()
    c.model.resolution = (720, 1280)
    with pytest.raises(ConfigError, match="TI2V-5B needs multiples of 32"):
        validate(c, 8)
    flf = wan_folders.write_prompts(tmp_path, PROMPTS, (HEIGHT, WIDTH), last=True)
    with pytest.raises(ConfigError, match="TI2V conditions on the first frame only"):
        _model(root, flf)


def test_random_ti2v_preset_builds_and_holds_its_first_frame(folder):
    """The preset path (random weights, `expand_timesteps` in the preset dict)."""
    from bpgo_jax.models.wan.vae_config import wan_vae_config_from_dict

    _, _, prompts = folder
    vae = {k: v for k, v in wan_folders.VAE22.items() if k != "scale_factor_spatial"}
    configs = dict(
        transformer=dict(wan_folders.TI2V, text_dim=32),
        vae=wan_vae_config_from_dict(vae),
        expand_timesteps=True,
    )
    model, trainable, frozen = wan_i2v_model(
        configs,
        prompt_sets=[(str(prompts), load_prompts(prompts))],
        num_frames=FRAMES,
        resolution=(HEIGHT, WIDTH),
        max_sequence_length=8,
        guidance_scale=1.0,
    )
    assert set(trainable) == {"transformer"} and frozen["condition_images"].dtype == jnp.uint8
    cond = model.encode_text(frozen, model.tokenize(PROMPTS[:1]))
    assert cond["condition"].shape == (1, 1, 2, 4, Z)
    x = jnp.zeros((1, *model.latent_shape))
    out = model.predict(trainable, frozen, x, jnp.asarray([500.0]), cond)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    drawn, values = samplers.held(model, cond)
    assert drawn.shape == (1, 2, 2, 4, 1)
    assert not bool(drawn[0, 0].any()) and bool(drawn[0, 1].all())
    np.testing.assert_array_equal(values[:, 1], values[:, 0])  # the image latent, broadcast


@pytest.mark.slow
def test_tiny_ti2v_run_trains_on_policy(folder, tmp_path):
    root, _, _ = folder
    prompts = wan_folders.write_prompts(tmp_path, E2E_PROMPTS, (32, 32))
    c = wan_ti2v_tiny_test.get_config()
    c.model.init = str(root / "wan")
    c.prompts.path = str(prompts)
    c.train.num_epochs = 1
    rows = train(c, tmp_path / "run").records
    assert [r["epoch"] for r in rows] == [0]
    r = rows[0]
    assert r["onpolicy_ratio_max_dev"] == 0.0
    assert np.isfinite(r["loss"]) and r["grad_norm"] > 0
    assert 0 < r["prior_mean"] < 1  # the first frames' static-clip saturation


def test_first_frame_priors_are_computed_on_a_fresh_start_only(folder, tmp_path, caplog):
    """`build_training(resuming=True)` leaves the priors to the checkpoint: no reward pass."""
    from bpgo_jax.build import build_run, build_training

    root, _, _ = folder
    c = wan_ti2v_tiny_test.get_config()
    c.model.init = str(root / "wan")
    c.prompts.path = str(wan_folders.write_prompts(tmp_path, E2E_PROMPTS, (32, 32)))
    c.mesh.update(shape=(1, 1), num_devices=1)
    run, trainable = build_run(c, progress=False)
    line = "first-frame priors: scoring the static clips of 4 prompts"
    with caplog.at_level("INFO", logger="bpgo_jax"):
        _, fresh = build_training(run, trainable)
        assert caplog.messages.count(line) == 1
        _, resumed = build_training(run, trainable, resuming=True)
        assert caplog.messages.count(line) == 1
    values = np.asarray(fresh.prior.values)
    assert np.all((values > 0) & (values < 1))
    shapes = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype), s)  # noqa: E731
    assert shapes(resumed.prior) == shapes(fresh.prior)  # the restore's template
