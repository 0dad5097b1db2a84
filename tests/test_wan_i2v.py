"""Wan image-to-video (two A14B-style experts): parity with diffusers' WanImageToVideoPipeline.

A tiny random WanImageToVideoPipeline folder (UMT5, two 36-channel
transformers of one architecture, VAE, UniPC scheduler config with
`flow_shift`, `boundary_ratio`) is saved with `save_pretrained`, and a few
conditioning PNGs beside a `.jsonl` prompt file. Parity, float32: from one
initial noise, each guided Euler step of ours (the first by the high-noise
expert at guidance 5, the second by the low-noise one at guidance 3) equals
the pipeline's, the condition latents included; likewise Wan2.1 I2V's CLIP
image branch and Wan2.1 FLF2V's first and last frames. End to end: the tiny
config through the launcher on a 2 x 4 mesh, and on one device in this
process, with the same metrics (resuming is the engine's, tests/test_engine.py,
and a resumed run's first-frame priors are the checkpoint's,
tests/test_wan_ti2v.py).
"""

from __future__ import annotations

import json
import re
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
from commands import compile_cache, run_launch  # noqa: E402
from PIL import Image  # noqa: E402

from bpgo_jax import priors as prior_lib  # noqa: E402
from bpgo_jax.config import validate  # noqa: E402
from bpgo_jax.configs import wan_i2v, wan_i2v_tiny_test, wan_t2v  # noqa: E402
from bpgo_jax.errors import ConfigError, InputFileError  # noqa: E402
from bpgo_jax.models import build_model  # noqa: E402
from bpgo_jax.models.lora import LoraSpec  # noqa: E402
from bpgo_jax.models.wan.i2v import wan_i2v_model  # noqa: E402
from bpgo_jax.parallel import aot  # noqa: E402
from bpgo_jax.priors.first_frame import first_frame_priors, static_clips  # noqa: E402
from bpgo_jax.prompts import PromptSet, load_prompts  # noqa: E402
from bpgo_jax.prompts.images import condition_images  # noqa: E402
from bpgo_jax.rewards import build_reward_set  # noqa: E402
from bpgo_jax.rollout import samplers  # noqa: E402
from bpgo_jax.testing.sd_folders import jiggle  # noqa: E402
from bpgo_jax.train import train  # noqa: E402

pytestmark = pytest.mark.xdist_group("test_wan_i2v")

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4  # relative to the largest reference magnitude (at least 1)
FLOW_SHIFT = 3.0
BOUNDARY = 0.875  # step 0 (t = 1000) high-noise expert, step 1 (t = 750) low-noise
TEXT_LEN = 16
HEIGHT, WIDTH, FRAMES = 32, 48, 5
VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
I2V = dict(wan_folders.T2V, in_channels=36, text_dim=96)
PROMPTS = ["a photo of a cat", "a red dog in the snow"]


def _pipeline(folder: Path, seed: int = 0) -> diffusers.WanImageToVideoPipeline:
    torch.manual_seed(seed)
    tok = text_folders.t5_tokenizer()
    umt5 = transformers.UMT5EncoderModel(text_folders.t5_config(len(tok), umt5=True)).eval()
    pipe = diffusers.WanImageToVideoPipeline(
        tokenizer=tok,
        text_encoder=umt5,
        vae=jiggle(diffusers.AutoencoderKLWan(**VAE), seed + 2).eval(),
        scheduler=diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=FLOW_SHIFT
        ),
        transformer=wan_folders.transformer(I2V, seed + 3).eval(),
        transformer_2=wan_folders.transformer(I2V, seed + 4).eval(),
        boundary_ratio=BOUNDARY,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return pipe


write_prompts = wan_folders.write_prompts


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_i2v")
    pipe = _pipeline(root / "wan")
    prompts = write_prompts(root, PROMPTS, (HEIGHT, WIDTH))
    return root, pipe, prompts


def _close(ours, ref, tol: float = TOL) -> None:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max())
    assert err <= tol * scale, f"max error {err} > {tol} x {scale}"


def _model(root: Path, prompts: Path, name: str = "wan", text_len: int = TEXT_LEN, **kw):
    return wan_i2v_model(
        str(root / name),
        prompt_sets=[(str(prompts), load_prompts(prompts))],
        num_frames=FRAMES,
        resolution=(HEIGHT, WIDTH),
        max_sequence_length=text_len,
        guidance_scale=5.0,
        guidance_scale_2=3.0,
        **kw,
    )


# ------------------------------------------------------------------ parity


def _reference(
    pipe, root: Path, noise: np.ndarray, steps: int, text_len=TEXT_LEN, last=False, **call
):
    """The pipeline's condition `[B, F, H, W, 20]` and per-step latents from `noise`, one call
    per image (the pipeline takes one conditioning image; `last`: and its last frame)."""
    frames = [Image.open(root / "images" / f"{i}.png") for i in range(len(noise))]
    lasts = [
        Image.open(root / "images" / f"{i}_last.png") if last else None for i in range(len(noise))
    ]
    condition, seen = [], []
    for i, frame in enumerate(frames):
        processed = pipe.video_processor.preprocess(frame, height=HEIGHT, width=WIDTH)
        end = lasts[i] and pipe.video_processor.preprocess(lasts[i], height=HEIGHT, width=WIDTH)
        start = torch.from_numpy(noise[i : i + 1].transpose(0, 4, 1, 2, 3).copy())
        _, c = pipe.prepare_latents(
            processed.float(), 1, 16, HEIGHT, WIDTH, FRAMES, torch.float32, "cpu", None, start,
            None if end is None else end.float(),
        )  # fmt: skip
        condition.append(c.detach().numpy().transpose(0, 2, 3, 4, 1))

    def keep(pipe, i, t, kwargs):
        seen.append(kwargs["latents"].detach().numpy().transpose(0, 2, 3, 4, 1))
        return kwargs

    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)
    with torch.no_grad():
        for i, frame in enumerate(frames):
            pipe(
                image=frame,
                last_image=lasts[i],
                prompt=PROMPTS[i],
                height=HEIGHT,
                width=WIDTH,
                num_frames=FRAMES,
                num_inference_steps=steps,
                latents=torch.from_numpy(noise[i : i + 1].transpose(0, 4, 1, 2, 3).copy()),
                max_sequence_length=text_len,
                output_type="latent",
                callback_on_step_end=keep,
                **call,
            )
    per_step = [np.concatenate(seen[k::steps]) for k in range(steps)]
    return np.concatenate(condition), per_step


def _euler(model, steps: int):
    """The engine's ODE flow sampler at the model's scheduler shift (guidance: the model's)."""
    cfg = ml_collections.ConfigDict(
        dict(kind="flow", num_steps=steps, guidance_scale=1.0, noise="ode", noise_level=0.0)
    )
    cfg.shift = None
    cfg.sigmas = "diffusers"
    return samplers.make_sampler(cfg, model)


def _check_steps(model, trainable, frozen, cond, sampler, noise, seen) -> None:
    @jax.jit
    def step(x, k):
        t = jnp.full((len(x),), jnp.asarray(sampler.tables["model_t"])[k])
        out = model.predict(trainable, frozen, x, t, cond)
        return samplers.transition(sampler, jnp.full((len(x),), k), x, out)[0]

    x = noise
    for k in range(len(seen)):
        x = step(x, k)
        _close(x, seen[k])


@pytest.fixture
def no_ftfy(monkeypatch):
    """diffusers' I2V module calls ftfy.fix_text without its is_ftfy_available() guard; ftfy
    is not installed, and it leaves these ASCII prompts as they are."""
    from diffusers.pipelines.wan import pipeline_wan_i2v

    fix = types.SimpleNamespace(fix_text=lambda text: text)
    monkeypatch.setattr(pipeline_wan_i2v, "ftfy", fix, raising=False)


def test_guided_expert_steps_match_wan_image_to_video_pipeline(folder, no_ftfy):
    root, pipe, prompts = folder
    model, trainable, frozen = _model(root, prompts)
    assert model.latent_shape == (2, 4, 6, 16)
    assert set(trainable) == {"transformer", "transformer_2"}
    steps = 2
    noise = np.random.RandomState(0).standard_normal((2, *model.latent_shape)).astype(np.float32)
    condition, seen = _reference(pipe, root, noise, steps, guidance_scale=5.0, guidance_scale_2=3.0)

    cond = jax.jit(model.encode_text)(frozen, model.tokenize(PROMPTS))
    _close(cond["condition"], condition)
    sampler = _euler(model, steps)
    model_t = np.asarray(sampler.tables["model_t"])
    assert model_t[0] >= 875 > model_t[1]  # the switch falls between the two steps
    _check_steps(model, trainable, frozen, cond, sampler, noise, seen)

    # Rows on both sides of the boundary in one call take each its own expert.
    t_mixed = jnp.asarray([model_t[0], model_t[1]], jnp.float32)
    x1 = jnp.asarray(seen[0])
    mixed = jax.jit(model.predict)(trainable, frozen, x1, t_mixed, cond)
    for row, t in enumerate(model_t):
        alone = jax.jit(model.predict)(trainable, frozen, x1, jnp.full((2,), t), cond)
        _close(mixed[row], alone[row], 1e-6)


def _pipeline21(pipe, root: Path, name: str, transformer: dict):
    """A Wan2.1 I2V folder `root/name`: `pipe`'s UMT5 and VAE, a tiny CLIP vision tower (17
    tokens: 16 patches + class) and its processor, one transformer of config `transformer`."""
    torch.manual_seed(7)
    encoder_cfg = transformers.CLIPVisionConfig(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    out = diffusers.WanImageToVideoPipeline(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=pipe.vae,
        scheduler=pipe.scheduler,
        image_processor=transformers.CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        image_encoder=transformers.CLIPVisionModel(encoder_cfg).eval(),
        transformer=wan_folders.transformer(dict(transformer, text_dim=96), 11).eval(),
    )
    out.save_pretrained(str(root / name), safe_serialization=True)
    return out


def test_wan21_clip_image_branch_matches_the_pipeline(folder, no_ftfy):
    """Wan2.1 I2V: one transformer with the image branch, fed the folder's CLIP vision
    tower's penultimate states of the original (unresized) image. 512 text tokens: diffusers
    splits the image states off the text at "all but the last 512"."""
    root, pipe, prompts = folder
    pipe21 = _pipeline21(pipe, root, "wan21", wan_folders.I2V)
    model, trainable, frozen = _model(root, prompts, name="wan21", text_len=512)
    assert set(trainable) == {"transformer"} and "image_encoder" in frozen
    steps = 2
    noise = np.random.RandomState(1).standard_normal((2, *model.latent_shape)).astype(np.float32)
    _, seen = _reference(pipe21, root, noise, steps, text_len=512, guidance_scale=5.0)
    cond = jax.jit(model.encode_text)(frozen, model.tokenize(PROMPTS))
    with torch.no_grad():
        frames = [Image.open(root / "images" / f"{i}.png") for i in range(2)]
        embeds = pipe21.encode_image(frames, "cpu").numpy()
    _close(cond["image_embeds"], embeds)
    _check_steps(model, trainable, frozen, cond, _euler(model, steps), noise, seen)
    flf = wan_folders.write_prompts(root / "flf", PROMPTS, (HEIGHT, WIDTH), last=True)
    with pytest.raises(ConfigError, match="image branch reads one frame"):
        _model(root, flf, name="wan21", text_len=512)


def test_wan21_flf2v_first_and_last_frames_match_the_pipeline(folder, no_ftfy, tmp_path):
    """Wan2.1 FLF2V: the condition video [first, zeros, last] with the mask on both ends,
    and both frames' CLIP states through the image embedder's learned position table."""
    root, pipe, _ = folder
    flf = wan_folders.write_prompts(tmp_path, PROMPTS, (HEIGHT, WIDTH), last=True)
    pipe21 = _pipeline21(pipe, root, "flf2v", dict(wan_folders.FLF2V, pos_embed_seq_len=2 * 17))
    model, trainable, frozen = _model(root, flf, name="flf2v", text_len=512)
    assert "last_images" in frozen
    steps = 2
    noise = np.random.RandomState(2).standard_normal((2, *model.latent_shape)).astype(np.float32)
    condition, seen = _reference(
        pipe21, tmp_path, noise, steps, text_len=512, last=True, guidance_scale=5.0
    )
    cond = jax.jit(model.encode_text)(frozen, model.tokenize(PROMPTS))
    _close(cond["condition"], condition)
    assert float(cond["condition"][0, -1, 0, 0, 3]) == 1.0  # the last pixel frame's mask
    _check_steps(model, trainable, frozen, cond, _euler(model, steps), noise, seen)
    plain = wan_folders.write_prompts(tmp_path / "plain", PROMPTS, (HEIGHT, WIDTH))
    with pytest.raises(ConfigError, match="prompt 'a photo of a cat' has no last_image"):
        _model(root, plain, name="flf2v", text_len=512)


def test_lora_trains_the_chosen_expert_only(folder):
    root, _, prompts = folder
    spec = LoraSpec(rank=2, alpha=2.0, targets=(r".*/attn1/to_q/kernel",))
    model, trainable, frozen = _model(root, prompts, lora=spec, experts=("transformer_2",))
    assert set(trainable) == {"lora"} and set(trainable["lora"]) == {"transformer_2"}
    assert {"transformer", "transformer_2", "condition_images"} <= set(frozen)
    with pytest.raises(ConfigError, match=r"model.lora.experts=\('transformer_3',\)"):
        _model(root, prompts, lora=spec, experts=("transformer_3",))


def test_random_two_expert_model_builds_and_trains_one_expert(folder):
    """The preset path (random weights): both experts drawn, only `experts` trained."""
    from bpgo_jax.models.wan.vae_config import WanVAEConfig

    root, _, prompts = folder
    configs = dict(
        transformer=I2V,
        transformer_2=I2V,
        boundary_ratio=BOUNDARY,
        vae=WanVAEConfig(**{**VAE, "dim_mult": tuple(VAE["dim_mult"])}),
    )
    model, trainable, frozen = wan_i2v_model(
        configs,
        prompt_sets=[(str(prompts), load_prompts(prompts))],
        num_frames=FRAMES,
        resolution=(HEIGHT, WIDTH),
        max_sequence_length=TEXT_LEN,
        experts=("transformer",),
    )
    assert set(trainable) == {"transformer"} and "transformer_2" in frozen
    assert frozen["condition_images"].dtype == jnp.uint8
    cond = model.encode_text(frozen, model.tokenize(PROMPTS[:1]))
    x = jnp.zeros((1, *model.latent_shape))
    out = model.predict(trainable, frozen, x, jnp.asarray([500.0]), cond)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    with pytest.raises(ConfigError, match="prompt 'a horse' has no conditioning image"):
        model.tokenize(["a horse"])


def test_prompts_without_or_with_a_bad_image_are_refused_by_name(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"prompt": "a cat", "image": "missing.png"}) + "\n")
    with pytest.raises(InputFileError, match=r"p.jsonl:1: \"image\" 'missing.png' is not a file"):
        load_prompts(bad)
    (tmp_path / "first.png").write_bytes(b"")
    bad.write_text(json.dumps({"prompt": "a cat", "image": "first.png", "last_image": 3}) + "\n")
    with pytest.raises(InputFileError, match=r"p.jsonl:1: \"last_image\" must be a path, got 3"):
        load_prompts(bad)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    bad.write_text(json.dumps({"prompt": "a cat", "image": "broken.png"}) + "\n")
    with pytest.raises(InputFileError, match=r"p.jsonl: entry 1: cannot read image .*broken.png"):
        condition_images([(str(bad), load_prompts(bad))], 16, 16)
    plain = tmp_path / "plain.txt"
    plain.write_text("a cat\n")
    with pytest.raises(InputFileError, match=r"plain.txt: entry 1 \('a cat'\) has no \"image\""):
        condition_images([(str(plain), load_prompts(plain))], 16, 16)


# ------------------------------------------------------------------ first-frame prior


def test_first_frame_prior_is_the_reward_of_a_static_clip_and_stays_fixed():
    prompt_set = PromptSet(("red", "pink", "grey"), ({}, {}, {}), None)
    frames = np.full((3, 4, 4, 3), 128, np.uint8)  # grey: saturation 0
    frames[0] = (255, 0, 0)  # pure red: saturation 1
    frames[1] = (255, 51, 51)  # (1, 0.2, 0.2) in [0, 1]: saturation 0.8
    cfg = ml_collections.ConfigDict(dict(video_saturation=dict(weight=2.0, frames=2)))
    rewards = build_reward_set(cfg)
    assert static_clips(frames, 5).shape == (3, 5, 4, 4, 3)
    priors = first_frame_priors(
        frames, prompt_set, rewards, rewards.params(), num_frames=5, batch_size=2
    )
    np.testing.assert_allclose(priors, [2.0, 1.6, 0.0], atol=1e-6)
    state = prior_lib.init_prior_state(3, kind="first_frame", fixed_values=priors)
    seen = jnp.asarray([0.3, 0.9])
    after = prior_lib.update(state, jnp.asarray([0, 2]), seen, kind="first_frame")
    got = prior_lib.lookup(after, jnp.asarray([0, 1, 2]), kind="first_frame")
    np.testing.assert_allclose(got, priors)
    with pytest.raises(ValueError, match="kind='first_frame' needs fixed_values"):
        prior_lib.init_prior_state(3, kind="first_frame")


# ------------------------------------------------------------------ configs


def test_i2v_configs_name_the_paper_setting_and_fit_the_mesh(tmp_path):
    c = wan_i2v.get_config()
    assert (c.prior.kind, c.sample.group_size) == ("first_frame", 8)
    assert c.model.preset == "wan22_i2v_a14b"
    assert c.sample.guidance_scale == 1.0 and tuple(c.model.guidance_scales) == (5.0, 5.0)
    c.prompts.path = "p.jsonl"
    assert c.model.condition_prompts == "p.jsonl"  # follows prompts.path
    flags = re.findall(r"--config\.([\w.]+)=", wan_i2v.__doc__)
    for flag in flags:
        node = c
        for part in flag.split("."):
            assert part in node, f"--config.{flag} is not a config field"
            node = node[part]
    tiny = wan_i2v_tiny_test.get_config()
    tiny.model.init = str(tmp_path)
    for devices in (1, 8):
        validate(tiny, devices)
    c.model.init = "random"
    validate(c, 8)  # the paper config as shipped, with its first-frame prior
    c.sample.guidance_scale = 5.0
    with pytest.raises(ConfigError, match=r"sample.guidance_scale=5.0 must be 1.0 for image-to"):
        validate(c, 8)
    t2v = wan_t2v.get_config()
    t2v.model.init, t2v.prior.kind = "random", "first_frame"
    with pytest.raises(ConfigError, match="prior.kind='first_frame' scores each prompt's"):
        validate(t2v, 8)


def test_random_wan21_flf2v_preset_builds_with_its_clip_tower(tmp_path):
    """Wan2.1 FLF2V with random weights (`tiny_flf2v`; `wan21_flf2v_14b` and the I2V
    presets `tiny_i2v_21` / `wan21_i2v_14b` take the same path with one frame): the
    preset's CLIP tower is drawn, both frames' CLIP pixels are kept, and the image branch
    reads both frames' 17 states through the learned position table."""
    prompts = wan_folders.write_prompts(tmp_path, PROMPTS, (HEIGHT, WIDTH), last=True)
    c = wan_i2v_tiny_test.get_config()
    c.model.update(init="random", preset="tiny_flf2v", resolution=(HEIGHT, WIDTH))
    c.model.update(num_frames=FRAMES, vae=dict(base_dim=8, dim_mult=(1, 2, 2, 2)))
    c.prompts.path = str(prompts)
    c.mesh.shape = (1, 1)
    validate(c, 1)
    model, trainable, frozen = build_model(c.model, jax.random.key(0))
    # launch/compile.py's abstract build has the same tree, nothing drawn.
    _, a_trainable, a_frozen = aot.abstract_model(c.model)
    shapes = lambda tree: jax.tree.map(lambda x: (np.shape(x), np.dtype(x.dtype)), tree)
    assert shapes((a_trainable, a_frozen)) == shapes((trainable, frozen))
    assert set(trainable) == {"lora"} and set(trainable["lora"]) == {"transformer"}
    assert frozen["clip_pixels"].shape == (2 * len(PROMPTS), 32, 32, 3)  # first, then last
    assert "last_images" in frozen
    cond = jax.jit(model.encode_text)(frozen, model.tokenize(PROMPTS))
    assert cond["image_embeds"].shape == (2, 2 * 17, 24)
    x = jnp.zeros((2, *model.latent_shape))
    out = jax.jit(model.predict)(trainable, frozen, x, jnp.asarray([900.0, 100.0]), cond)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    c.model.preset = "tiny"  # a text-to-video preset for an image-to-video run
    with pytest.raises(ConfigError, match="image-to-video with random weights builds one of"):
        validate(c, 1)


def test_i2v_folder_without_condition_prompts_is_refused_by_name(folder):
    root, _, _ = folder
    c = wan_i2v_tiny_test.get_config()
    c.model.init = str(root / "wan")
    c.prompts.path = ""  # condition_prompts follows it
    with pytest.raises(ConfigError, match="is a WanImageToVideoPipeline folder: set config.model"):
        build_model(c.model, jax.random.key(0))
    c.prompts.path = str(root / "prompts.jsonl")
    c.model.guidance_scales = (5.0, 3.0, 2.0)
    with pytest.raises(ConfigError, match=r"model.guidance_scales=\(5.0, 3.0, 2.0\) must be"):
        build_model(c.model, jax.random.key(0))


# ------------------------------------------------------------------ end to end

E2E_PROMPTS = ["a cat", "a dog", "a red bird", "a fish in the sea"]
_TIMES = {"rollout_seconds", "train_seconds", "images_per_second"}


def _rows(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tiny_run_with_first_frame_priors_trains_on_policy_sharded_as_on_one_device(
    folder, tmp_path
):
    root, _, _ = folder
    model_dir = root / "wan"
    prompts = write_prompts(tmp_path, E2E_PROMPTS, (24, 40))  # resized to 16 x 16 on load
    common = [
        "--config=configs/wan_i2v_tiny_test.py",
        f"--config.model.init={model_dir}",
        f"--compile_cache={compile_cache()}",
        "--cpu_devices=8",
    ]
    with_priors = tmp_path / "with_priors.jsonl"
    proc = run_launch(
        "estimate_priors.py",
        *common,
        f"--config.prompts.path={prompts}",
        "--config.prior.kind=moving_average",  # the file has no priors yet
        "--base_weights",
        "--first_frame",
        f"--output={with_priors}",
        cwd=ROOT,
        pinned=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    entries = [json.loads(x) for x in with_priors.read_text().splitlines()]
    priors = np.asarray([e["prior"] for e in entries])
    assert [e["prompt"] for e in entries] == E2E_PROMPTS and np.all((priors > 0) & (priors < 1))

    workdir = tmp_path / "launch"
    proc = run_launch(
        "train.py",
        *common,
        f"--workdir={workdir}",
        f"--config.prompts.path={with_priors}",
        cwd=ROOT,
        pinned=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    launched = _rows(workdir)
    assert [r["epoch"] for r in launched] == [0, 1]
    for r in launched:
        assert r["onpolicy_ratio_max_dev"] == 0.0  # one update per epoch: on-policy
        assert np.isfinite(r["loss"]) and r["grad_norm"] > 0
        assert np.isfinite(r["reward_video_saturation_mean"]) and r["skipped_updates"] == 0
        np.testing.assert_allclose(r["prior_mean"], priors.mean(), rtol=1e-5)

    # The priors computed at the start instead of read, on one device (sharded = unsharded).
    c = wan_i2v_tiny_test.get_config()
    c.model.init = str(model_dir)
    c.prompts.path = str(with_priors)
    c.prior.kind = "first_frame"
    c.mesh.update(shape=(1, 1), num_devices=1)
    got = train(c, tmp_path / "one_device").records
    assert [r["epoch"] for r in got] == [0, 1]
    for a, b in zip(got, launched, strict=True):
        assert set(a) == set(b)
        for key in sorted(set(a) - _TIMES):
            # The loss is ~0, a mean of advantages of size 1: z-scores over groups whose reward
            # std is ~5e-3 magnify the rewards' rounding across shardings (~1e-7) ~200 times.
            atol = 1e-4 if key == "loss" else 1e-6
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=atol, err_msg=key)


def test_clip_vision_penultimate_states_match_transformers(tmp_path):
    """WanImageToVideoPipeline.encode_image's `hidden_states[-2]` of CLIPVisionModel."""
    from bpgo_jax.models.clip import load_clip_vision

    torch.manual_seed(5)
    cfg = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    model = transformers.CLIPVisionModel(cfg).eval()
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    pixels = np.random.RandomState(2).randn(2, 32, 32, 3).astype(np.float32)
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()),
                    output_hidden_states=True).hidden_states  # fmt: skip
    module, params = load_clip_vision(str(tmp_path), with_projection=False)
    _, _, states = module.apply({"params": params}, jnp.asarray(pixels), output_hidden_states=True)
    assert len(states) == len(ref) == 4
    _close(states[-2], ref[-2].numpy())
    _close(states[0], ref[0].numpy())
