"""FLUX.1 in Flax (transformer, loader, `DiffusionModel`, time shift) vs. diffusers' PyTorch.

Tiny random dev and schnell transformers and a whole tiny FluxPipeline
(`tests/flux_folders.py`) are saved with `save_pretrained`, loaded by our
loader and compared output for output in float32: the transformer alone,
then the pipeline's own sampling loop from the same initial noise (prompt
encoding, the velocity of each step, the Euler steps on the pipeline's
sigmas, the VAE decode). The real-size architectures are compared by
parameter name and shape against diffusers' model built on torch's meta device.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import flux_folders  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402

from bpgo_jax.errors import ConfigError, InputFileError, WeightsError  # noqa: E402
from bpgo_jax.models import build_model, text_cache, weights  # noqa: E402
from bpgo_jax.models.flux import (  # noqa: E402
    FLUX_ATTENTION_TARGETS,
    flux_model,
    flux_rope,
    flux_shift,
    load_flux,
    load_transformer,
    model_from_modules,
    modules_from_configs,
    param_shapes,
    preset,
    transformer_inputs,
)
from bpgo_jax.models.flux.config import DEV_SCHEDULER, flux_config_from_dict  # noqa: E402
from bpgo_jax.models.flux.pipeline import split_params  # noqa: E402
from bpgo_jax.models.flux.transformer import FluxTransformer2DModel  # noqa: E402
from bpgo_jax.models.lora import LoraSpec  # noqa: E402
from bpgo_jax.models.scan import STACKED  # noqa: E402
from bpgo_jax.models.t5 import T5EncoderModel, t5_config_from_dict  # noqa: E402
from bpgo_jax.models.text_stacks import load_text_stack  # noqa: E402
from bpgo_jax.parallel import mesh as mesh_lib  # noqa: E402
from bpgo_jax.rollout import samplers, schedules  # noqa: E402

TOL = 1e-5
T5_LEN = 24
HEIGHT, WIDTH = 64, 48  # latent 8 x 6, packed 4 x 3: rows and columns cannot be confused
GUIDANCE = 4.0  # not FluxPipeline's default, so the value is seen to flow through
PROMPTS = [
    "a photo of a cat",
    "a red dog on the mat in the snow with a blue cat on a red mat and a dog",  # cut
    "",
]

# Its module-scoped fixture builds once: keep the file on one xdist worker.
pytestmark = pytest.mark.xdist_group("test_flux_parity")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    pipe = flux_folders.dev_pipeline(root / "dev", seed=0)
    schnell = flux_folders.schnell_transformer(root / "schnell", seed=5)
    return {
        "pipe": pipe,
        "folder": str(root / "dev"),
        "schnell": schnell,
        "schnell_folder": str(root / "schnell"),
    }


@pytest.fixture(scope="module")
def dev_model(flux):
    """The tiny pipeline folder as our model, float32."""
    return flux_model(
        flux["folder"], resolution=(HEIGHT, WIDTH), max_sequence_length=T5_LEN, guidance=GUIDANCE
    )


def _close(ours, ref, tol: float = TOL) -> None:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max()))  # relative once magnitudes exceed 1
    err = float(np.abs(ours - ref).max())
    assert err <= tol * scale, f"max error {err} > {tol} x {scale}"


def _transformer_inputs(batch=2, text=7, h=4, w=3, seed=0):
    rs = np.random.RandomState(seed)
    return dict(
        x=rs.randn(batch, h * w, 64).astype(np.float32),
        text=rs.randn(batch, text, 96).astype(np.float32),
        pooled=rs.randn(batch, 32).astype(np.float32),
        sigma=np.array([0.3, 0.9], np.float32)[:batch],
        guidance=np.array([3.5, 2.0], np.float32)[:batch],
        h=h,
        w=w,
    )


def _torch_transformer(ref, inp, guidance: bool) -> np.ndarray:
    img_ids = diffusers.FluxPipeline._prepare_latent_image_ids(
        None, inp["h"], inp["w"], "cpu", torch.float32
    )
    with torch.no_grad():
        out = ref(
            hidden_states=torch.tensor(inp["x"]),
            encoder_hidden_states=torch.tensor(inp["text"]),
            pooled_projections=torch.tensor(inp["pooled"]),
            timestep=torch.tensor(inp["sigma"]),
            img_ids=img_ids,
            txt_ids=torch.zeros(inp["text"].shape[1], 3),
            guidance=torch.tensor(inp["guidance"]) if guidance else None,
            return_dict=False,
        )[0]
    return out.numpy()


def _ours_transformer(module, params, inp):
    rope = flux_rope(module.cfg, inp["text"].shape[1], inp["h"], inp["w"])
    g = inp["guidance"] if module.cfg.guidance_embeds else None
    args = (inp["x"], inp["text"], inp["pooled"], inp["sigma"], g, rope)
    return jax.jit(lambda p: module.apply({"params": p}, *args))(params)


# ---------------------------------------------------------------- transformer


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_transformer_matches_diffusers(flux, variant):
    """dev (guidance embedding) from the pipeline folder; schnell from a sharded checkpoint."""
    if variant == "dev":
        folder, ref = os.path.join(flux["folder"], "transformer"), flux["pipe"].transformer
    else:
        folder, ref = flux["schnell_folder"], flux["schnell"]
        assert os.path.isfile(
            os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
        )
    module, params = load_transformer(folder)
    assert module.cfg.guidance_embeds == (variant == "dev")
    q = params["transformer_blocks"][STACKED]["attn"]["to_q"]["kernel"]
    assert q.shape == (2, 32, 32)  # [layers, in, out]: the scanned stack
    inp = _transformer_inputs()
    _close(_ours_transformer(module, params, inp), _torch_transformer(ref, inp, variant == "dev"))


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_real_size_architecture_matches_diffusers(guidance):
    """Every parameter name and shape of FLUX.1's real config, against diffusers' own model
    built on the meta device (no memory): the loader would fill exactly this tree."""
    with torch.device("meta"):
        ref = diffusers.FluxTransformer2DModel(guidance_embeds=guidance)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    cfg = flux_config_from_dict(dict(ref.config))
    module = FluxTransformer2DModel(cfg)
    flat = weights.unstacked_shapes(weights.expected_shapes(module, *transformer_inputs(cfg)))
    ours = {
        weights.torch_name(path): weights.torch_shape(path[-1], tuple(leaf.shape))
        for path, leaf in flat.items()
    }
    assert ours == want
    n = sum(math.prod(s) for s in want.values())
    assert n == (11_901_408_320 if guidance else 11_891_178_560)


def test_bfloat16_load_and_predict(flux):
    """bf16 runs as diffusers' bf16 model does: sigma and guidance are rounded to bf16
    before the x1000 (a ~9% change of this tiny model's output), so ours tracks the
    torch model cast to bf16 far closer than either tracks float32."""
    folder = os.path.join(flux["folder"], "transformer")
    module, params = load_transformer(folder, dtype=jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    inp = _transformer_inputs(seed=1)
    out = np.asarray(_ours_transformer(module, params, inp), np.float32)
    ref32 = _torch_transformer(flux["pipe"].transformer, inp, True)
    ref16 = diffusers.FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    as16 = {k: v.astype(np.float32) for k, v in inp.items() if isinstance(v, np.ndarray)}
    with torch.no_grad():
        img_ids = diffusers.FluxPipeline._prepare_latent_image_ids(
            None, inp["h"], inp["w"], "cpu", torch.bfloat16
        )
        b16 = lambda a: torch.tensor(a).to(torch.bfloat16)
        ref = (
            ref16.eval()(
                hidden_states=b16(as16["x"]),
                encoder_hidden_states=b16(as16["text"]),
                pooled_projections=b16(as16["pooled"]),
                timestep=b16(as16["sigma"]),
                img_ids=img_ids,
                txt_ids=torch.zeros(inp["text"].shape[1], 3, dtype=torch.bfloat16),
                guidance=b16(as16["guidance"]),
                return_dict=False,
            )[0]
            .float()
            .numpy()
        )
    scale = np.abs(ref32).max()
    assert np.abs(out - ref).max() / scale < 2e-2
    assert np.abs(out - ref32).max() / scale > 3 * np.abs(out - ref).max() / scale


# ---------------------------------------------------------------- pipeline


def test_pipeline_steps_and_decode_match_flux_pipeline(flux, dev_model):
    """From the same initial noise: the pipeline's prompt encoding, both velocity predictions,
    both Euler steps (the engine's ODE sampler on `flux_shift`'s sigmas) and the decoded
    images equal FluxPipeline's own 2-step run."""
    pipe = flux["pipe"]
    model, trainable, frozen = dev_model
    assert model.latent_shape == (8, 6, 16) and model.image_seq_len == 12
    assert set(trainable) == {"transformer"} and set(frozen) == {"text", "vae"}
    batch, (h, w, c) = len(PROMPTS), model.latent_shape
    x0 = np.random.RandomState(1).randn(batch, h, w, c).astype(np.float32)
    packed = pipe._pack_latents(torch.tensor(x0).permute(0, 3, 1, 2), batch, c, h, w)

    velocities, latents = [], []
    hook = pipe.transformer.register_forward_hook(lambda m, a, out: velocities.append(out[0]))

    def on_step(pipeline, i, t, kw):
        latents.append(kw["latents"].clone())
        return kw

    with torch.no_grad():
        images = pipe(
            prompt=PROMPTS,
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=2,
            guidance_scale=GUIDANCE,
            latents=packed,
            max_sequence_length=T5_LEN,
            output_type="np",
            callback_on_step_end=on_step,
        ).images
    hook.remove()

    def unpack(z):
        return pipe._unpack_latents(z, HEIGHT, WIDTH, pipe.vae_scale_factor).permute(0, 2, 3, 1)

    shift = flux_shift(model.scheduler_config, model.image_seq_len)
    sample_cfg = ml_collections.ConfigDict(
        dict(
            kind="flow", num_steps=2, guidance_scale=1.0, noise="ode", noise_level=0.0, shift=shift
        )
    )
    sampler = samplers.make_sampler(sample_cfg, model)
    np.testing.assert_allclose(sampler.tables["model_t"], pipe.scheduler.timesteps, rtol=1e-6)

    cond = jax.jit(model.encode_text)(frozen, jnp.asarray(model.tokenize(PROMPTS)))
    predict = jax.jit(model.predict)
    x = jnp.asarray(x0)
    for k in range(2):
        t = jnp.full((batch,), sampler.tables["model_t"][k])
        v = predict(trainable, frozen, x, t, cond)
        _close(v, unpack(velocities[k]))
        x, std = samplers.transition(sampler, jnp.full((batch,), k), x, v)
        assert float(jnp.max(std)) == 0.0
        _close(x, unpack(latents[k]))
    decoded = jax.jit(model.decode)(frozen, x)
    assert decoded.shape == (batch, HEIGHT, WIDTH, 3) and decoded.dtype == jnp.float32
    _close(decoded, images)


@pytest.mark.parametrize("seq_len", [12, 256, 1024, 4096, 9000])
def test_flux_shift_gives_the_schedulers_sigmas(seq_len):
    """`flow_sigmas(N, flux_shift(...))` are FluxPipeline's sigmas at any resolution."""
    n = 5
    sched = diffusers.FlowMatchEulerDiscreteScheduler(**flux_folders.SCHEDULER)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=calculate_shift(seq_len))
    shift = flux_shift(DEV_SCHEDULER, seq_len)
    np.testing.assert_allclose(schedules.flow_sigmas(n, shift), sched.sigmas, rtol=2e-6, atol=1e-7)
    assert flux_shift(DEV_SCHEDULER, 4096) == pytest.approx(math.exp(1.15))
    assert flux_shift(DEV_SCHEDULER, 256) == pytest.approx(math.exp(0.5))


def test_flux_shift_static_and_linear_schedules():
    assert flux_shift({"shift": 1.0, "use_dynamic_shifting": False}, 4096) == 1.0  # schnell
    linear = {**DEV_SCHEDULER, "time_shift_type": "linear"}
    sched = diffusers.FlowMatchEulerDiscreteScheduler(**{**flux_folders.SCHEDULER, **linear})
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=calculate_shift(1024))
    np.testing.assert_allclose(
        schedules.flow_sigmas(4, flux_shift(linear, 1024)), sched.sigmas, rtol=2e-6
    )
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        flux_shift({"use_karras_sigmas": True}, 256)


# ---------------------------------------------------------------- LoRA, sharding, text cache


def test_lora_adapts_every_attention_projection_of_both_stacks(flux):
    mods, params = load_flux(flux["folder"], max_sequence_length=8)
    spec = LoraSpec(rank=2, alpha=4.0, targets=FLUX_ATTENTION_TARGETS)
    frozen = {"text": params["text"], "vae": params["vae"]}
    lora_model = model_from_modules(mods, resolution=32, lora=spec)
    trainable, frozen_lora = split_params(params["transformer"], frozen, spec, jax.random.key(3))
    assert set(trainable) == {"lora"} and set(frozen_lora) == {"transformer", "text", "vae"}
    factors = traverse_util.flatten_dict(trainable["lora"])
    double = ("to_q", "to_k", "to_v", "to_out_0", "add_q_proj", "add_k_proj", "add_v_proj")
    assert {"/".join(p[:-2]) for p in factors} == {
        *(f"transformer_blocks/stacked/attn/{n}" for n in (*double, "to_add_out")),
        *(f"single_transformer_blocks/stacked/attn/{n}" for n in ("to_q", "to_k", "to_v")),
    }
    a = trainable["lora"]["transformer_blocks"][STACKED]["attn"]["add_q_proj"]["kernel"]["lora_a"]
    assert a.shape == (2, 32, 2)  # a layer axis: one adapter per block

    base_model = model_from_modules(mods, resolution=32)
    x = np.random.RandomState(2).randn(2, *base_model.latent_shape).astype(np.float32)
    t = np.array([1000.0, 300.0], np.float32)
    rs = np.random.RandomState(3)
    cond = {
        "prompt_embeds": rs.randn(2, 8, 96).astype(np.float32),
        "pooled_prompt_embeds": rs.randn(2, 32).astype(np.float32),
    }
    base = jax.jit(base_model.predict)({"transformer": params["transformer"]}, frozen, x, t, cond)
    predict = jax.jit(lora_model.predict)
    at_init = predict(trainable, frozen_lora, x, t, cond)
    np.testing.assert_array_equal(at_init, base)  # B = 0: exactly the base model
    moved = jax.tree.map(lambda f: f + 0.05, trainable)
    assert float(jnp.abs(predict(moved, frozen_lora, x, t, cond) - at_init).max()) > 1e-3


def test_loaded_tensors_are_placed_by_the_mesh_rules(flux):
    mesh = mesh_lib.make_mesh((2, 4))  # data 2, fsdp 4
    rules = ((r"transformer/.*/kernel", "fsdp_auto"), (r".*", ()))
    sharding_fn = mesh_lib.param_sharding_fn(mesh, rules)
    _, trainable, frozen = flux_model(
        flux["folder"], resolution=32, max_sequence_length=8, sharding_fn=sharding_fn
    )
    _, plain, _ = flux_model(flux["folder"], resolution=32, max_sequence_length=8)
    tree = {**trainable, **frozen}
    for path, leaf in traverse_util.flatten_dict(tree).items():
        assert leaf.sharding.is_equivalent_to(sharding_fn(path, leaf.shape), leaf.ndim), path
    stacked = trainable["transformer"]["single_transformer_blocks"][STACKED]["proj_mlp"]["kernel"]
    assert stacked.shape == (2, 32, 128)
    assert stacked.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp")
    assert tree["text"]["t5"]["shared"]["embedding"].sharding.is_fully_replicated
    for path, leaf in traverse_util.flatten_dict(plain).items():
        want = traverse_util.flatten_dict(trainable)[path]
        np.testing.assert_array_equal(np.asarray(want), np.asarray(leaf))


def test_text_cache_replaces_the_encoders(flux, tmp_path):
    """A `launch/embed_prompts.py`-format cache of this folder: the model loads no text
    encoder, tokenizes prompts to cache rows and conditions exactly as the encoders do."""
    stack, params = load_text_stack("flux", flux["folder"], max_sequence_length=T5_LEN)
    prompts = [*PROMPTS, "a dog"]
    encoded = jax.jit(stack.encode)(params, jnp.asarray(stack.tokenizer(prompts)))
    path = str(tmp_path / "cache.safetensors")
    text_cache.write_cache(
        path,
        prompts,
        [{k: np.asarray(v) for k, v in encoded.items()}],
        fields={k: (v.shape, np.float32) for k, v in stack.output_shapes(params).items()},
        identity=text_cache.stack_identity("flux", flux["folder"], T5_LEN),
    )
    cached, _, cached_frozen = flux_model(
        flux["folder"],
        resolution=(HEIGHT, WIDTH),
        max_sequence_length=T5_LEN,
        text_cache=path,
    )
    assert set(cached_frozen) == {"vae", "text_cache"}
    asked = [PROMPTS[2], PROMPTS[0]]
    tokens = cached.tokenize(asked)
    assert tokens.shape == (2, 1) and tokens.dtype == np.int32
    got = jax.jit(cached.encode_text)(cached_frozen, jnp.asarray(tokens))
    for field, value in got.items():
        np.testing.assert_array_equal(value, np.asarray(encoded[field])[[2, 0]])
    assert cached.tokenize.count(PROMPTS[1]) == 1
    with pytest.raises(InputFileError, match="no embeddings for 1 prompt"):
        cached.tokenize.count("a prompt the cache lacks")
    with pytest.raises(InputFileError, match="does not match the config: max_sequence_length"):
        flux_model(flux["folder"], max_sequence_length=T5_LEN + 1, text_cache=path)


# ---------------------------------------------------------------- building and errors


def test_random_init_has_the_loaded_structure(flux):
    """Config dicts read from the folder build exactly the tree the loader fills, and
    `param_shapes` describes it without drawing a weight."""
    folder = flux["folder"]
    configs = {}
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        with open(os.path.join(folder, name, "config.json")) as f:
            configs[name] = json.load(f)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        configs["scheduler"] = json.load(f)
    mods = modules_from_configs(configs, max_sequence_length=T5_LEN)
    model = model_from_modules(mods, resolution=32)
    trainable, frozen = model.init(jax.random.key(1))
    loaded_mods, params = load_flux(folder, max_sequence_length=T5_LEN)
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), tree)
    assert shapes(trainable["transformer"]) == shapes(params["transformer"])
    assert shapes(frozen) == shapes({"text": params["text"], "vae": params["vae"]})
    assert shapes(param_shapes(mods)) == shapes((trainable, frozen))
    assert mods.scheduler == loaded_mods.scheduler
    assert mods.scheduler["use_dynamic_shifting"] and mods.scheduler["shift"] == 3.0


def test_real_size_presets_are_described_without_memory():
    """FLUX.1-dev's full parameter tree (transformer, VAE, CLIP-L, T5-XXL) as shapes only."""
    mods = modules_from_configs(preset("dev"), jnp.bfloat16, remat="full")
    assert mods.transformer.remat == "full"
    spec = LoraSpec(rank=16, alpha=16.0, targets=FLUX_ATTENTION_TARGETS)
    trainable, frozen = param_shapes(mods, spec)
    count = lambda tree: sum(math.prod(a.shape) for a in jax.tree.leaves(tree))
    assert count(frozen["transformer"]) == 11_901_408_320
    assert 4.7e9 < count(frozen["text"]["t5"]) < 4.8e9  # T5-v1.1-XXL's encoder
    assert {a.dtype for a in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert {a.dtype for a in jax.tree.leaves(trainable)} == {jnp.dtype(jnp.float32)}


def test_build_model_and_config_errors(flux, tmp_path):
    cfg = ml_collections.ConfigDict(
        dict(
            name="flux",
            init=flux["folder"],
            dtype="float32",
            resolution=32,
            lora=dict(rank=2, alpha=0.0, targets=()),
            attention="xla",
            remat="dots",
            max_sequence_length=8,
            text_cache="",
            guidance=2.0,
        )
    )
    model, trainable, frozen = build_model(cfg, jax.random.key(0))
    assert model.name == "flux" and model.prediction_type == "flow"
    assert set(trainable) == {"lora"} and model.latent_shape == (4, 4, 16)
    assert model.tokenize(["a cat"]).shape == (1, 16 + 8)  # CLIP's 16 ids, then T5's 8
    tiny = ml_collections.ConfigDict(dict(name="flux", init="random", preset="tiny", resolution=32))
    model, trainable, frozen = build_model(tiny, jax.random.key(0))
    assert set(trainable) == {"transformer"} and model.latent_shape == (4, 4, 16)
    for field, value, match in (
        ("prediction_type", "epsilon", "FLUX predicts the flow velocity"),
        ("preset", "pro", "config.model.preset"),
        ("text_cache", "/some/cache.safetensors", "model.text_cache needs model.init"),
        ("resolution", 40, "multiple of 16"),
    ):
        bad = ml_collections.ConfigDict({**tiny.to_dict(), field: value})
        with pytest.raises(ConfigError, match=match):
            build_model(bad, jax.random.key(0))


def test_loader_names_bad_folders(flux, tmp_path):
    src = os.path.join(flux["folder"], "transformer")
    bad = str(tmp_path / "transformer")
    shutil.copytree(src, bad)
    with open(os.path.join(bad, "config.json")) as f:
        raw = json.load(f)
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump({**raw, "axes_dims_rope": [4, 4, 4]}, f)
    with pytest.raises(WeightsError, match="axes_dims_rope=.* must sum to attention_head_dim=16"):
        load_transformer(bad)
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump({**raw, "num_single_layers": 3}, f)
    with pytest.raises(WeightsError, match=r"missing tensor\(s\) single_transformer_blocks\.2\."):
        load_transformer(bad)
    folder = shutil.copytree(
        flux["folder"], tmp_path / "pipe", ignore=shutil.ignore_patterns("*.safetensors")
    )
    index = json.loads((folder / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "SD3Transformer2DModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="is not FLUX.1"):
        flux_model(str(folder))
    with pytest.raises(WeightsError, match="missing folder"):
        flux_model(str(tmp_path / "nowhere"))


def test_t5_runs_through_the_attention_dispatch(flux):
    """T5's attention is `models.attention`'s: the config's kernel reaches it, and one that
    this backend lacks is refused by name."""
    stack, _ = load_text_stack("flux", flux["folder"], max_sequence_length=8, attention="xla")
    assert stack.modules["t5"].attention == "xla"
    with open(os.path.join(flux["folder"], "text_encoder_2", "config.json")) as f:
        cfg = t5_config_from_dict(json.load(f))
    with pytest.raises(ConfigError, match="model.attention='cudnn' needs a GPU"):
        T5EncoderModel(cfg, attention="cudnn").init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
