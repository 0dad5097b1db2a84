"""The Wan2.1 / Wan2.2 transformer in Flax vs. diffusers' `WanTransformer3DModel`.

Tiny random transformers (`tests/wan_folders.py`: T2V, the two A14B experts,
2.1 I2V with its image branch, FLF2V's image position table) are saved with
`save_pretrained`, read by our loader and compared output for output in
float32 on `[B, F, H, W, C]` latents of 3 x 8 x 8 (a 3 x 4 x 4 patch grid),
with one timestep per sample and per token (Wan2.2 TI2V's expanded
timesteps). The real-size architectures are compared by parameter name and
shape against diffusers' model built on torch's meta device.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import wan_folders  # noqa: E402

from bpgo_jax.errors import ConfigError, WeightsError  # noqa: E402
from bpgo_jax.models import weights  # noqa: E402
from bpgo_jax.models.scan import STACKED  # noqa: E402
from bpgo_jax.models.wan import (  # noqa: E402
    IMAGE_LEN,
    PRESETS,
    TEXT_LEN,
    abstract_call,
    example_inputs,
    expanded_timesteps,
    first_frame_mask,
    init_wan_transformer,
    latent_shape,
    load_wan_transformer,
    param_shapes,
    preset,
    wan_config_from_dict,
    wan_transformer,
)
from bpgo_jax.models.wan.config import config_to_dict  # noqa: E402

TOL = 1e-5
BATCH, FRAMES, HEIGHT, WIDTH = 2, 3, 8, 8  # patch grid 3 x 4 x 4: 48 tokens
TIMESTEPS = np.array([937.5, 261.0], np.float32)

# Its module-scoped fixture builds once: keep the file on one xdist worker.
pytestmark = pytest.mark.xdist_group("test_wan_parity")


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    high, low = wan_folders.a14b_experts(root / "a14b", seed=0)
    return {
        "a14b": str(root / "a14b"),
        "t2v": high,
        "t2v_2": low,
        "i2v": wan_folders.save_transformer(root / "i2v", wan_folders.I2V, seed=2),
        "flf2v": wan_folders.save_transformer(root / "flf2v", wan_folders.FLF2V, seed=3),
        "root": root,
    }


def _apply(module, params, *args):
    return module.apply({"params": params}, *args)


# One compilation per module config and input shapes, shared by the tests.
_forward = jax.jit(_apply, static_argnums=0)


def _inputs(channels: int, text: int = 7, seed: int = 0):
    rs = np.random.RandomState(seed)
    x = rs.randn(BATCH, FRAMES, HEIGHT, WIDTH, channels).astype(np.float32)
    return x, rs.randn(BATCH, text, 32).astype(np.float32)


def _torch(ref, x, t, text, image=None) -> np.ndarray:
    """diffusers' forward on channels-first video, returned channels last."""
    with torch.no_grad():
        out = ref(
            hidden_states=torch.tensor(x).permute(0, 4, 1, 2, 3),
            timestep=torch.tensor(np.asarray(t)),
            encoder_hidden_states=torch.tensor(text),
            encoder_hidden_states_image=None if image is None else torch.tensor(image),
            return_dict=False,
        )[0]
    return out.permute(0, 2, 3, 4, 1).numpy()


def _close(ours, ref, tol: float = TOL) -> None:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max()))  # relative once magnitudes exceed 1
    err = float(np.abs(ours - ref).max())
    assert err <= tol * scale, f"max error {err} > {tol} x {scale}"


# ---------------------------------------------------------------- forward parity


def test_t2v_matches_diffusers(wan):
    """Wan2.1 T2V (and Wan2.2 A14B's high-noise expert) from a pipeline folder."""
    module, params = load_wan_transformer(wan["a14b"])
    q = params["blocks"][STACKED]["attn1"]["to_q"]["kernel"]
    assert q.shape == (2, 32, 32)  # [layers, in, out]: one scanned stack
    x, text = _inputs(16)
    out = _forward(module, params, x, TIMESTEPS, text, None)
    assert out.shape == (BATCH, FRAMES, HEIGHT, WIDTH, 16)
    _close(out, _torch(wan["t2v"], x, TIMESTEPS, text))


def test_second_expert_is_read_from_transformer_2(wan):
    """`expert="transformer_2"` reads the low-noise expert; a transformer folder loads as is."""
    x, text = _inputs(16, seed=1)
    low, low_params = load_wan_transformer(wan["a14b"], expert="transformer_2")
    out = _forward(low, low_params, x, TIMESTEPS, text, None)
    _close(out, _torch(wan["t2v_2"], x, TIMESTEPS, text))
    high, high_params = load_wan_transformer(os.path.join(wan["a14b"], "transformer"))
    assert high == low  # one architecture (and one compilation)
    assert float(np.abs(out - _forward(high, high_params, x, TIMESTEPS, text, None)).max()) > 0.1


@pytest.mark.parametrize("variant", ["i2v", "flf2v"])
def test_image_branch_matches_diffusers(wan, variant):
    """Wan2.1 I2V: 36 channels in, 257 CLIP tokens through the image embedder and the
    separate `add_k_proj` / `add_v_proj` attention. diffusers prepends them to the 512 text
    tokens; FLF2V's two frames come batch-interleaved there, concatenated here."""
    ref = wan[variant]
    module, params = load_wan_transformer(str(wan["root"] / variant))
    assert module.cfg.has_image_branch and module.cfg.in_channels == 36
    x, text = _inputs(36, text=TEXT_LEN, seed=2)
    frames = 1 if variant == "i2v" else 2
    image = np.random.RandomState(3).randn(BATCH * frames, IMAGE_LEN, 24).astype(np.float32)
    ours_image = image.reshape(BATCH, frames * IMAGE_LEN, 24)
    out = _forward(module, params, x, TIMESTEPS, text, ours_image)
    assert out.shape == (BATCH, FRAMES, HEIGHT, WIDTH, 16)
    _close(out, _torch(ref, x, TIMESTEPS, text, image))


def test_per_token_timesteps_match_diffusers(wan):
    """Wan2.2 TI2V: `expanded_timesteps` is the pipelines' `(mask[0][0][:, ::2, ::2] *
    t).flatten()`, and a `[B, L]` timestep runs diffusers' per-token modulation (first-frame
    tokens at t = 0); uniform per-token timesteps give the per-sample output."""
    module, params = load_wan_transformer(wan["a14b"])
    x, text = _inputs(16, seed=4)
    torch_mask = torch.ones(1, 16, FRAMES, HEIGHT, WIDTH)  # the i2v pipeline's first_frame_mask
    torch_mask[:, :, 0] = 0
    np.testing.assert_array_equal(first_frame_mask(x.shape[1:]), torch_mask[0, 0].numpy())
    per_token = expanded_timesteps(TIMESTEPS, first_frame_mask(x.shape[1:]), module.cfg)
    uniform = expanded_timesteps(TIMESTEPS, np.ones((FRAMES, HEIGHT, WIDTH)), module.cfg)
    for i, t in enumerate(TIMESTEPS):
        want = (torch_mask[0][0][:, ::2, ::2] * torch.tensor(t)).flatten().numpy()
        np.testing.assert_array_equal(per_token[i], want)
        np.testing.assert_array_equal(uniform[i], np.full(48, t, np.float32))
    out = _forward(module, params, x, per_token, text, None)
    _close(out, _torch(wan["t2v"], x, per_token, text))
    per_sample = _forward(module, params, x, TIMESTEPS, text, None)
    _close(_forward(module, params, x, uniform, text, None), per_sample)
    assert float(np.abs(out - per_sample)[:, 0].max()) > 1e-2  # frame 0 saw t = 0


def test_bfloat16_smoke(wan):
    """Loaded in bfloat16: every weight bf16, the output finite and near the float32 one."""
    module, params = load_wan_transformer(wan["a14b"], dtype=jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    x, text = _inputs(16, seed=5)
    out = _forward(module, params, x, TIMESTEPS, text, None)
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out, np.float32)
    ref = _torch(wan["t2v"], x, TIMESTEPS, text)
    assert np.isfinite(out).all()
    assert np.abs(out - ref).max() / np.abs(ref).max() < 3e-2


# ---------------------------------------------------------------- scan and remat


def test_remat_full_gives_the_same_outputs_and_gradients():
    """The block stack under `remat="full"` recomputes each block in the backward pass:
    values and parameter gradients equal those of `remat="none"`."""
    x, text = _inputs(16, seed=6)
    weight = np.random.RandomState(7).randn(*x.shape).astype(np.float32)

    def loss(module, params):
        return jnp.sum(_apply(module, params, x, TIMESTEPS, text, None) * weight)

    results = {}
    for remat in ("none", "full"):
        module, params = init_wan_transformer(wan_folders.T2V, jax.random.key(0), remat=remat)
        results[remat] = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)(
            module, params
        )
    (v0, g0), (v1, g1) = results["none"], results["full"]
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    flat0, flat1 = traverse_util.flatten_dict(g0), traverse_util.flatten_dict(g1)
    assert flat0.keys() == flat1.keys()
    assert ("blocks", STACKED, "ffn", "net_2", "kernel") in flat0
    for path, g in flat0.items():
        scale = max(float(np.abs(g).max()), 1e-6)
        assert float(np.abs(flat1[path] - g).max()) <= 1e-5 * scale, path


# ---------------------------------------------------------------- real sizes and presets

# diffusers' parameter counts of the published transformers (per expert for Wan2.2 A14B):
# the nominal 1.3B is 1.42e9, 14B 14.3e9, 5B 5.0e9; 2.1 I2V's image branch adds
# 40 blocks x 2 x 5120^2 k / v weights (and the image embedder) to the 14B: 16.4e9.
COUNTS = {
    "wan21_t2v_1_3b": 1_418_996_800,
    "wan21_t2v_14b": 14_288_491_584,
    "wan21_i2v_14b": 16_394_878_784,
    "wan22_t2v_a14b": 14_288_491_584,
    "wan22_i2v_a14b": 14_288_901_184,
    "wan22_ti2v_5b": 4_999_787_712,
    "tiny": 40_864,
    "wan21_flf2v_14b": 16_395_536_704,
    "tiny_i2v_21": 49_224,
    "tiny_flf2v": 50_040,
}
CLIP_COUNTS = {"wan21_i2v_14b": 630_766_080, "wan21_flf2v_14b": 630_766_080}  # ViT-H/14


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_real_size_presets_match_diffusers(name):
    """Every parameter name and shape of the preset, against diffusers' own model on the
    meta device (no memory): the loader would fill exactly this tree."""
    configs = preset(name)
    with torch.device("meta"):
        ref = diffusers.WanTransformer3DModel(**configs["transformer"])
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    cfg = wan_config_from_dict(dict(ref.config))
    assert cfg == wan_config_from_dict(configs["transformer"])
    assert wan_config_from_dict(config_to_dict(cfg)) == cfg
    module = wan_transformer(cfg)
    flat = weights.unstacked_shapes(weights.expected_shapes(module, *example_inputs(cfg)))
    ours = {
        weights.torch_name(path): weights.torch_shape(path[-1], tuple(leaf.shape))
        for path, leaf in flat.items()
    }
    assert ours == want
    assert sum(math.prod(s) for s in want.values()) == COUNTS[name]
    if configs.get("image_encoder"):  # Wan2.1 I2V / FLF2V: the CLIP tower, as transformers'
        from bpgo_jax.models.clip import CLIPVisionModel, VisionConfig
        from bpgo_jax.models.clip.loaders import vision_inputs

        with torch.device("meta"):
            tower = transformers.CLIPVisionModel(
                transformers.CLIPVisionConfig(**configs["image_encoder"])
            )
        vision = VisionConfig(**configs["image_encoder"])
        shapes = jax.eval_shape(
            lambda: CLIPVisionModel(vision).init(jax.random.key(0), vision_inputs(vision))
        )
        ours_n = sum(math.prod(a.shape) for a in jax.tree.leaves(shapes))
        assert ours_n == sum(p.numel() for p in tower.parameters())
        assert name not in CLIP_COUNTS or ours_n == CLIP_COUNTS[name]


def test_param_shapes_and_abstract_calls():
    """Shapes only: A14B's two experts, and the 1.3B called at 480 x 832 x 81 frames
    (latent 21 x 60 x 104 x 16, 32,760 tokens) traced without a weight or an activation."""
    count = lambda tree: sum(math.prod(a.shape) for a in jax.tree.leaves(tree))  # noqa: E731
    shapes = param_shapes("wan22_t2v_a14b")
    assert set(shapes) == {"transformer", "transformer_2"}
    assert (
        count(shapes["transformer"]) == count(shapes["transformer_2"]) == COUNTS["wan22_t2v_a14b"]
    )
    assert {a.dtype for a in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}
    module, params = init_wan_transformer(preset("tiny")["transformer"], jax.random.key(1))
    as_shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)  # noqa: E731
    assert as_shapes(param_shapes("tiny", jnp.float32)["transformer"]) == as_shapes(params)

    call = abstract_call("wan21_t2v_1_3b", frames=81, height=480, width=832)
    assert call.latent == (21, 60, 104, 16) and call.tokens == 21 * 30 * 52
    assert [a.shape for a in call.args] == [(1, 21, 60, 104, 16), (1,), (1, TEXT_LEN, 4096)]
    out = jax.eval_shape(lambda p, *a: _apply(call.module, p, *a), call.params, *call.args)
    assert out.shape == (1, 21, 60, 104, 16) and out.dtype == jnp.bfloat16
    assert latent_shape(preset("wan21_t2v_1_3b"), 33, 480, 832) == (9, 60, 104, 16)
    ti2v = abstract_call("wan22_ti2v_5b", frames=121, height=704, width=1280, batch=2)
    assert ti2v.latent == (31, 44, 80, 48) and ti2v.args[1].shape == (2, 31 * 22 * 40)
    i2v = abstract_call("wan21_i2v_14b", frames=81, height=480, width=832)
    assert i2v.args[0].shape[-1] == 36 and i2v.args[3].shape == (1, IMAGE_LEN, 1280)
    with pytest.raises(ConfigError, match="num_frames=80 must be 1 \\+ 4k"):
        abstract_call("wan21_t2v_1_3b", frames=80, height=480, width=832)
    with pytest.raises(ValueError, match="expert='transformer_2' is not one of"):
        abstract_call("wan21_t2v_1_3b", frames=81, height=480, width=832, expert="transformer_2")
    assert set(PRESETS) == set(COUNTS)


# ---------------------------------------------------------------- loading and errors


def test_tensors_are_placed_by_sharding_fn_under_the_expert_name(wan):
    """`sharding_fn` sees `(expert, *path)`; per-block tensors arrive on their layer's slice of
    the stacked tensor's sharding and are stacked there."""
    device = jax.devices()[0]
    seen = {}

    def sharding_fn(path, shape):
        seen[path] = shape
        return jax.sharding.SingleDeviceSharding(device)

    _, params = load_wan_transformer(wan["a14b"], expert="transformer_2", sharding_fn=sharding_fn)
    assert seen[("transformer_2", "blocks", STACKED, "attn2", "to_k", "kernel")] == (2, 32, 32)
    assert seen[("transformer_2", "patch_embedding", "kernel")] == (1, 2, 2, 16, 32)
    assert all(path[0] == "transformer_2" for path in seen)
    leaves = jax.tree.leaves(params)
    assert all(leaf.sharding == jax.sharding.SingleDeviceSharding(device) for leaf in leaves)


def _copy(wan, tmp_path, **config) -> str:
    bad = str(tmp_path / "transformer")
    shutil.copytree(os.path.join(wan["a14b"], "transformer"), bad)
    if config:
        path = os.path.join(bad, "config.json")
        with open(path) as f:
            raw = json.load(f)
        with open(path, "w") as f:
            json.dump({**raw, **config}, f)
    return bad


def test_loader_skips_norm_added_q_and_names_bad_folders(wan, tmp_path):
    folder = _copy(wan, tmp_path)
    file = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    state = safetensors_torch.load_file(file)
    state["blocks.0.attn2.norm_added_q.weight"] = torch.ones(32)  # diffusers ignores these
    safetensors_torch.save_file(state, file)
    _, params = load_wan_transformer(folder)
    _, want = load_wan_transformer(wan["a14b"])
    jax.tree.map(np.testing.assert_array_equal, params, want)

    for config, match in (
        ({"num_layers": 3}, r"missing tensor\(s\) blocks\.2\."),
        ({"qk_norm": "rms_norm"}, "qk_norm='rms_norm' is not supported"),
        ({"image_dim": 24}, "image_dim=24 and added_kv_proj_dim=None"),
        ({"window_size": [-1, -1]}, r"keys \['window_size'\] are not supported"),
        ({"_class_name": "FluxTransformer2DModel"}, "expected 'WanTransformer3DModel'"),
    ):
        shutil.rmtree(tmp_path / "transformer")
        with pytest.raises(WeightsError, match=match):
            load_wan_transformer(_copy(wan, tmp_path, **config))
    with pytest.raises(WeightsError, match="transformer_2 .Wan2.2 A14B's low-noise expert"):
        load_wan_transformer(str(wan["root"] / "i2v"), expert="transformer_2")
    with pytest.raises(WeightsError, match="missing folder"):
        load_wan_transformer(str(tmp_path / "nowhere"))


def test_inputs_are_checked_by_name():
    module = wan_transformer(wan_folders.I2V)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *example_inputs(module.cfg)))
    x = jnp.zeros((1, FRAMES, HEIGHT, WIDTH, 36))
    text, image = jnp.zeros((1, 5, 32)), jnp.zeros((1, IMAGE_LEN, 24))

    def run(*args):
        return jax.eval_shape(lambda p: _apply(module, p, *args), shapes["params"])

    assert run(x, jnp.zeros((1,)), text, image).shape == (1, FRAMES, HEIGHT, WIDTH, 16)
    for args, match in (
        ((x[..., :16], jnp.zeros((1,)), text, image), r"must be \[B, F, H, W, 36\]"),
        ((x[:, :, :7], jnp.zeros((1,)), text, image), "positive multiples of patch_size"),
        ((x, jnp.zeros((1, 47)), text, image), r"per token \[B, L\] = \(1, 48\)"),
        ((x, jnp.zeros((1,)), text, None), "has an image branch"),
        ((x, jnp.zeros((1,)), text[..., :8], image), r"must be \[B, L, 32\]"),
    ):
        with pytest.raises(ValueError, match=match):
            run(*args)
