"""Flax SD3 / SD3.5 (transformer, schedule, loader, DiffusionModel) vs. the diffusers reference.

Tiny random transformers and a whole `StableDiffusion3Pipeline` are written
with `save_pretrained(safe_serialization=True)`, loaded by our loader and
compared output for output in float32: the transformer alone (SD3 and
SD3.5: q-k norms, dual attention, a context-pre-only last block, a cropped
position table), the folder's scheduler config, and, from the prompts'
text, two of the engine's guided ODE steps over diffusers' levels and the
decode, against the pipeline itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import sd3_folders  # noqa: E402

from bpgo_jax.errors import ConfigError, InputFileError, WeightsError  # noqa: E402
from bpgo_jax.models import build_model, text_cache, weights  # noqa: E402
from bpgo_jax.models import lora as lora_lib  # noqa: E402
from bpgo_jax.models.lora import LoraSpec  # noqa: E402
from bpgo_jax.models.scan import STACKED  # noqa: E402
from bpgo_jax.models.sd3 import (  # noqa: E402
    SD3_ATTENTION_TARGETS,
    SD3Transformer2DModel,
    block_runs,
    check_scheduler_config,
    load_transformer,
    preset,
    sd3_config_from_dict,
    sd3_model,
    stack_map,
)
from bpgo_jax.models.sd3.transformer import example_inputs  # noqa: E402
from bpgo_jax.parallel import mesh as mesh_lib  # noqa: E402
from bpgo_jax.rollout import samplers  # noqa: E402

TOL = 1e-5
T5_LEN = 24
PROMPTS = ["a photo of a cat", "a red dog on the mat in the snow"]
NEGATIVE = "a blue mat"
GUIDANCE = 4.5  # Flow-GRPO's SD3.5 guidance scale
RESOLUTION = 16  # 8x8 latents: a 4x4 patch grid, cropped from the 8x8 table

# Its module-scoped fixture builds once: keep the file on one xdist worker.
pytestmark = pytest.mark.xdist_group("test_sd3_parity")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    return {
        "sd3": (
            sd3_folders.transformer_folder(root / "sd3", sd3_folders.SD3, seed=3),
            str(root / "sd3"),
        ),
        "sd35": (
            sd3_folders.transformer_folder(root / "sd35", sd3_folders.SD35, seed=4),
            str(root / "sd35"),
        ),
        "pipeline": (sd3_folders.pipeline_folder(root / "pipe"), str(root / "pipe")),
    }


def _close(ours, ref, tol: float = TOL) -> None:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max()))  # relative once magnitudes exceed 1
    err = float(np.abs(ours - ref).max())
    assert err <= tol * scale, f"max error {err} > {tol} x {scale}"


def _nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x))).permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------- schedule


def test_scheduler_config_refuses_options_it_does_not_implement():
    ok = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config
    assert check_scheduler_config(dict(ok)) == {"num_train_timesteps": 1000, "shift": 3.0}
    with pytest.raises(ConfigError, match="use_dynamic_shifting=True"):
        check_scheduler_config({**ok, "use_dynamic_shifting": True})
    with pytest.raises(ConfigError, match="shift_terminal=0.1"):
        check_scheduler_config({**ok, "shift_terminal": 0.1})
    with pytest.raises(ConfigError, match="'DDIMScheduler'"):
        check_scheduler_config({"_class_name": "DDIMScheduler"})


# ---------------------------------------------------------------- transformer


@pytest.mark.parametrize("kind", ["sd3", "sd35"])
def test_transformer_matches_diffusers(kind, folders):
    """Non-square latents (a 4x2 patch grid cropped from the table), two timesteps."""
    ref, folder = folders[kind]
    module, params = load_transformer(folder)
    cfg = module.cfg
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 8, 4, cfg.in_channels)).astype(np.float32)
    t = np.array([1000.0, 317.25], np.float32)
    ctx = rng.standard_normal((2, 5, cfg.joint_attention_dim)).astype(np.float32)
    pooled = rng.standard_normal((2, cfg.pooled_projection_dim)).astype(np.float32)
    got = jax.jit(module.apply)({"params": params}, x, t, ctx, pooled)
    with torch.no_grad():
        want = ref(
            hidden_states=_nchw(x),
            timestep=torch.from_numpy(t),
            encoder_hidden_states=torch.from_numpy(ctx),
            pooled_projections=torch.from_numpy(pooled),
            return_dict=False,
        )[0]
    _close(got, _nhwc(want))
    # Identical blocks are scanned; the last (context-pre-only) block is not.
    n = cfg.num_layers
    runs = {"sd3": {"joint_blocks": n - 1}, "sd35": {"dual_blocks": 2, "joint_blocks": 1}}[kind]
    for name, length in runs.items():
        assert params[name][STACKED]["attn"]["to_q"]["kernel"].shape[0] == length
    last = params[f"transformer_blocks_{n - 1}"]
    assert "to_add_out" not in last["attn"] and "ff_context" not in last
    assert ("attn2" in params["dual_blocks"][STACKED]) if kind == "sd35" else True


def test_block_runs_split_dual_attention_into_scanned_runs():
    cfg = sd3_config_from_dict(dict(sd3_folders.SD35, num_layers=7, dual_attention_layers=(0, 3)))
    runs = [(r.name, r.start, r.length, r.dual_attention) for r in block_runs(cfg)]
    assert runs == [
        ("dual_blocks_0", 0, 1, True),
        ("joint_blocks_0", 1, 2, False),
        ("dual_blocks_1", 3, 1, True),
        ("joint_blocks_1", 4, 2, False),
    ]
    one = sd3_config_from_dict(dict(sd3_folders.SD3, num_layers=1))
    assert block_runs(one) == ()


def test_transformer_config_refusals(tmp_path):
    with pytest.raises(ValueError, match="qk_norm='layer_norm'"):
        sd3_config_from_dict(dict(sd3_folders.SD3, qk_norm="layer_norm"))
    with pytest.raises(ValueError, match="caption_projection_dim=24 must equal"):
        sd3_config_from_dict(dict(sd3_folders.SD3, caption_projection_dim=24))
    with pytest.raises(ValueError, match=r"keys \['use_foo'\]"):
        sd3_config_from_dict(dict(sd3_folders.SD3, use_foo=True))
    with pytest.raises(ValueError, match="expected 'SD3Transformer2DModel'"):
        sd3_config_from_dict({"_class_name": "FluxTransformer2DModel"})
    assert sd3_config_from_dict(dict(sd3_folders.SD3, out_channels=None)).out_channels == 16


# ---------------------------------------------------------------- the DiffusionModel


def _reference_steps(pipe, x0: np.ndarray, steps: int, num_taken: int):
    """diffusers' own run from latents `x0`: the transformer's raw outputs and the
    latents after each of the first `num_taken` steps, and the decoded image after them."""
    raw, latents = [], []
    hook = pipe.transformer.register_forward_hook(lambda mod, args, out: raw.append(out[0]))

    def on_step(p, i, t, kw):
        latents.append(kw["latents"].clone())
        if i + 1 == num_taken:
            p._interrupt = True  # the remaining steps are skipped, the decode still runs
        return kw

    try:
        with torch.no_grad():
            image = pipe(
                prompt=PROMPTS,
                negative_prompt=NEGATIVE,
                height=RESOLUTION,
                width=RESOLUTION,
                num_inference_steps=steps,
                guidance_scale=GUIDANCE,
                latents=_nchw(x0),
                max_sequence_length=T5_LEN,
                output_type="np",
                callback_on_step_end=on_step,
            ).images
    finally:
        hook.remove()
    guided = []
    for out in raw:
        uncond, text = out.chunk(2)
        guided.append(_nhwc(uncond + GUIDANCE * (text - uncond)))
    return guided, [_nhwc(x) for x in latents], image


@dataclasses.dataclass
class Loaded:
    """The pipeline folder's model, with jitted functions shared by the tests (one compile)."""

    model: Any
    trainable: Any
    frozen: Any

    def __post_init__(self):
        self.encode = jax.jit(self.model.encode_text)
        self.predict = jax.jit(self.model.predict)

    def cond(self, prompts: list[str]) -> dict:
        return self.encode(self.frozen, jnp.asarray(self.model.tokenize(prompts)))


@pytest.fixture(scope="module")
def loaded(folders) -> Loaded:
    _, folder = folders["pipeline"]
    return Loaded(*sd3_model(folder, resolution=RESOLUTION, max_sequence_length=T5_LEN))


def test_guided_euler_steps_and_decode_match_the_pipeline(folders, loaded):
    """From the prompts' text: tokenize, encode, CFG with the negative prompt, predict at
    t = 1000 sigma, two of the engine's ODE steps over the diffusers levels
    (`sample.sigmas="diffusers"`), decode with shift and scale."""
    pipe, _ = folders["pipeline"]
    model, trainable, frozen = loaded.model, loaded.trainable, loaded.frozen
    assert model.latent_shape == (8, 8, 16) and model.prediction_type == "flow"
    steps, taken = 6, 2
    x0 = np.random.default_rng(6).standard_normal((2, *model.latent_shape)).astype(np.float32)
    want_v, want_x, want_image = _reference_steps(pipe, x0, steps, taken)

    sample = ml_collections.ConfigDict(
        dict(
            kind="flow",
            num_steps=steps,
            guidance_scale=GUIDANCE,
            noise="ode",
            noise_level=0.0,
            shift=model.scheduler_config["shift"],
            sigmas="diffusers",
        )
    )
    sampler = samplers.make_sampler(sample, model)
    cond, uncond = loaded.cond(PROMPTS), loaded.cond([NEGATIVE])

    @jax.jit
    def step(x, k):
        t = jnp.full((2,), jnp.asarray(sampler.tables["model_t"])[k])
        v = samplers.guided_prediction(
            model, sampler.guidance_scale, trainable, frozen, x, t, cond, uncond
        )
        mean, std = samplers.transition(sampler, jnp.full((2,), k), x, v)
        return v, mean, std

    x = jnp.asarray(x0)
    for k in range(taken):
        v, x, std = step(x, k)
        _close(v, want_v[k])
        _close(x, want_x[k])
        assert float(jnp.max(std)) == 0.0
    _close(jax.jit(model.decode)(frozen, x), want_image)


def test_random_init_has_the_loaded_structure(folders, loaded):
    """`init` from the folder's own config dicts builds the tree the loader fills."""
    _, folder = folders["pipeline"]
    model, trainable, frozen = loaded.model, loaded.trainable, loaded.frozen
    configs = {
        name: weights.read_json(f"{folder}/{name}/config.json")
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    }
    configs["scheduler"] = {"shift": 3.0}
    rand, rand_trainable, rand_frozen = sd3_model(
        configs, rng=jax.random.key(1), resolution=RESOLUTION, max_sequence_length=T5_LEN
    )
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    assert shapes(rand_trainable) == shapes(trainable)
    assert shapes(rand_frozen) == shapes(frozen)
    assert rand.latent_shape == model.latent_shape


def test_lora_on_stacked_attention_and_sharded_loading(folders, loaded):
    """LoRA factors on every joint-attention projection (stacked ones with a layer axis, and
    the last block's), none on attn2 or the MLPs; `predict` runs the merged weights. Each
    tensor is placed by the mesh rules as it is read, a stack's layer axis never sharded."""
    _, folder = folders["pipeline"]
    mesh = mesh_lib.make_mesh((1, 8))
    spec = LoraSpec(rank=2, alpha=4.0, targets=SD3_ATTENTION_TARGETS)
    model, trainable, frozen = sd3_model(
        folder,
        resolution=RESOLUTION,
        max_sequence_length=T5_LEN,
        lora=spec,
        sharding_fn=mesh_lib.param_sharding_fn(mesh, ((".*/kernel", "fsdp_auto"), (".*", ()))),
        rng=jax.random.key(2),
    )
    factors = {"/".join(p) for p in traverse_util.flatten_dict(trainable["lora"])}
    assert "dual_blocks/stacked/attn/to_q/kernel/lora_a" in factors
    assert "joint_blocks/stacked/attn/to_add_out/kernel/lora_b" in factors
    assert "transformer_blocks_3/attn/add_k_proj/kernel/lora_a" in factors
    assert not any("attn2" in f or "ff" in f for f in factors)
    lora_a = trainable["lora"]["dual_blocks"][STACKED]["attn"]["to_q"]["kernel"]["lora_a"]
    assert lora_a.shape == (2, 16, 2)  # [layers, in, rank]
    kernel = frozen["transformer"]["dual_blocks"][STACKED]["attn"]["to_q"]["kernel"]
    assert kernel.sharding.spec == P(None, None, "fsdp")  # per layer [16, 16]: out over 8
    clip = frozen["text"]["clip_l"]["text_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]
    assert clip.sharding.spec == P(None, "fsdp")

    # Non-zero B: the LoRA model's output is the base model's with merged kernels.
    one = jax.devices()[0]
    rng = np.random.default_rng(7)
    factors = jax.tree.map(
        lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32), trainable["lora"]
    )
    base = jax.device_put(frozen["transformer"], one)
    merged = lora_lib.merge(base, factors, alpha=spec.alpha, rank=spec.rank)
    x = jnp.asarray(rng.standard_normal((2, *model.latent_shape)).astype(np.float32))
    t = jnp.array([1000.0, 250.0])
    cond = loaded.cond(PROMPTS)
    frozen = {**loaded.frozen, "transformer": base}
    got = jax.jit(model.predict)({"lora": factors}, frozen, x, t, cond)
    want = loaded.predict({"transformer": merged}, loaded.frozen, x, t, cond)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    base_out = loaded.predict(loaded.trainable, loaded.frozen, x, t, cond)
    assert float(jnp.abs(got - base_out).max()) > 1e-2  # the factors do change the output


def test_text_cache_replaces_the_encoders(folders, loaded, tmp_path):
    """A cache written from the folder's text stack conditions the model exactly as the
    encoders do; a cache of another T5 length is refused."""
    _, folder = folders["pipeline"]
    batches = [
        {k: np.asarray(v) for k, v in loaded.cond(chunk).items()} for chunk in (PROMPTS, [NEGATIVE])
    ]
    fields = {k: (v.shape[1:], np.dtype(np.float32)) for k, v in batches[0].items()}
    path = str(tmp_path / "cache.safetensors")
    identity = text_cache.stack_identity("sd3", folder, T5_LEN)
    text_cache.write_cache(path, [*PROMPTS, NEGATIVE], batches, fields=fields, identity=identity)

    cached, _, cached_frozen = sd3_model(
        folder, resolution=RESOLUTION, max_sequence_length=T5_LEN, text_cache=path
    )
    assert "text" not in cached_frozen and set(cached_frozen["text_cache"]) == set(fields)
    got = jax.jit(cached.encode_text)(
        cached_frozen, jnp.asarray(cached.tokenize([NEGATIVE, PROMPTS[1]]))
    )
    for key, value in got.items():  # the encoders' rows, as written
        want = np.concatenate([batches[1][key], batches[0][key][1:]])
        np.testing.assert_array_equal(np.asarray(value), want)
    with pytest.raises(InputFileError, match="no embeddings for 1 prompt"):
        cached.tokenize(["a dog"])
    with pytest.raises(InputFileError, match="max_sequence_length 24"):
        sd3_model(folder, resolution=RESOLUTION, max_sequence_length=16, text_cache=path)


def test_bfloat16_load_and_predict(folders, loaded):
    """Smoke: bfloat16 weights and compute give a float32 velocity near the float32 one."""
    _, folder = folders["pipeline"]
    model, trainable, frozen = sd3_model(
        folder, dtype=jnp.bfloat16, resolution=RESOLUTION, max_sequence_length=T5_LEN
    )
    kernel = trainable["transformer"]["joint_blocks"][STACKED]["ff"]["net_2"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    x = jnp.asarray(np.random.default_rng(8).standard_normal((2, *model.latent_shape)), jnp.float32)
    t = jnp.array([1000.0, 400.0])
    cond = jax.jit(model.encode_text)(frozen, jnp.asarray(model.tokenize(PROMPTS)))
    got = jax.jit(model.predict)(trainable, frozen, x, t, cond)
    want = loaded.predict(loaded.trainable, loaded.frozen, x, t, loaded.cond(PROMPTS))
    assert got.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(got)))
    _close(got, want, tol=0.1)


def test_build_model_and_config_errors(folders, tmp_path):
    """`build_model` reaches SD3 (random tiny preset); bad fields fail by name."""
    cfg = ml_collections.ConfigDict(
        dict(name="sd3", init="random", preset="tiny", dtype="float32", resolution=16)
    )
    model, trainable, frozen = build_model(cfg, jax.random.key(0))
    assert model.name == "sd3" and model.latent_shape == (8, 8, 16)
    assert set(trainable) == {"transformer"} and {"vae", "text"} <= set(frozen)
    _, folder = folders["pipeline"]
    bad = [
        (dict(prediction_type="epsilon"), ConfigError, "predicts the flow velocity"),
        (dict(preset="sd9"), ConfigError, "unknown SD3 preset 'sd9'"),
        (dict(resolution=18), ConfigError, "resolution=18 must be a multiple of 4"),
        (dict(resolution=64), ConfigError, "more than the transformer's pos_embed_max_size=8"),
        (dict(text_cache="x.safetensors"), ConfigError, "text_cache needs model.init"),
        (dict(init=str(tmp_path / "nowhere")), WeightsError, "neither 'random' nor"),
    ]
    for fields, error, message in bad:
        with pytest.raises(error, match=message):
            build_model(ml_collections.ConfigDict({**cfg.to_dict(), **fields}), jax.random.key(0))
    with pytest.raises(WeightsError, match="expected 'FlowMatchEulerDiscreteScheduler'"):
        broken = tmp_path / "broken"
        _copy_with_scheduler(folder, broken, "DDIMScheduler")
        sd3_model(str(broken))


def _copy_with_scheduler(folder: str, dst, cls: str) -> None:
    import json
    import shutil

    shutil.copytree(folder, dst)
    index = json.loads((dst / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", cls]
    (dst / "model_index.json").write_text(json.dumps(index))


def test_remat_wraps_every_block_and_keeps_the_output(folders):
    """`remat` reaches the scanned runs and the last block (a `remat` region per run and one
    for the last block in the traced program), and the forward pass is unchanged."""
    _, folder = folders["sd35"]
    base, params = load_transformer(folder)
    rng = np.random.default_rng(9)
    args = (
        rng.standard_normal((1, 4, 4, 16)).astype(np.float32),
        np.array([500.0], np.float32),
        rng.standard_normal((1, 3, 96)).astype(np.float32),
        rng.standard_normal((1, 52)).astype(np.float32),
    )
    full = dataclasses.replace(base, remat="full")

    def checkpoints(module) -> int:
        return str(jax.make_jaxpr(module.apply)({"params": params}, *args)).count("remat2[")

    assert checkpoints(base) == 0
    assert checkpoints(full) == 3  # dual_blocks, joint_blocks, transformer_blocks_3
    got = jax.jit(full.apply)({"params": params}, *args)
    want = jax.jit(base.apply)({"params": params}, *args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


@pytest.mark.parametrize("name", ["sd3_medium", "sd35_medium", "sd35_large"])
def test_real_presets_have_diffusers_tensors_name_by_name(name):
    """The real-size architectures (random-weight presets): every tensor of diffusers'
    model of the same config, by name and torch shape, and no other."""
    cfg = sd3_config_from_dict(preset(name)["transformer"])
    with torch.device("meta"):
        ref = diffusers.SD3Transformer2DModel(**preset(name)["transformer"])
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != "pos_embed.pos_embed"}
    module = SD3Transformer2DModel(cfg)
    expected = weights.expected_shapes(module, *example_inputs(cfg))
    flat = weights.unstacked_shapes(expected, stack_map(cfg))
    got = {
        weights.torch_name(p): weights.torch_shape(p[-1], tuple(s.shape)) for p, s in flat.items()
    }
    assert got == want
