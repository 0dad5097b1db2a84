"""The Wan2.1 / Wan2.2 video VAE in Flax vs. diffusers' `AutoencoderKLWan`, float32.

Tiny random VAEs of both layouts (Wan2.1's; Wan2.2's residual blocks with
2x2 patchified pixels) are saved with `save_pretrained`, loaded by our
loader, and compared on the real chunked path (frame 0, then chunks of 4
frames; decode one latent frame at a time): the posterior mean and
log-variance of a 9-frame video, and the video decoded from the reference
mean. The real-size layouts are compared by parameter name and shape with
diffusers' model built on torch's meta device, and their latent shapes at
480x832x81 traced abstractly.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from wan_folders import VAE22  # noqa: E402

from bpgo_jax.errors import ConfigError, WeightsError  # noqa: E402
from bpgo_jax.models import weights  # noqa: E402
from bpgo_jax.models.wan import vae as wan_vae  # noqa: E402
from bpgo_jax.models.wan.vae_config import (  # noqa: E402
    WAN22_VAE_ARCH,
    WanVAEConfig,
    decoded_frames,
    latent_frames,
    latent_shape,
    wan_vae_config_from_dict,
)
from bpgo_jax.testing.sd_folders import jiggle  # noqa: E402

TOL = 1e-4  # relative to the largest reference magnitude (at least 1)
# The real layouts' level structure (3 downsamplings, time at the last two) at tiny widths;
# Wan2.1's keeps diffusers' 16 default latent statistics (the real Wan2.1 ones).
WAN21 = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
# Wan2.2's: the shared tiny folders' VAE (tests/wan_folders.py), without the pipeline's
# spatial factor.
WAN22 = {k: v for k, v in VAE22.items() if k != "scale_factor_spatial"}

pytestmark = pytest.mark.xdist_group("test_wan_vae_parity")


def _to_torch(video: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(video.transpose(0, 4, 1, 2, 3)))


def _from_torch(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 4, 1)


def _close(ours, ref, tol: float = TOL) -> None:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max())
    assert err <= tol * scale, f"max error {err} > {tol} x {scale}"


def _run(fn, *args):
    """`fn(*args)` jitted, with XLA:CPU's backend at -O0: half the compile time of these
    tiny programs, which run in a fraction of a second either way."""
    compiled = jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})
    return compiled(*args)


def _reference(kw: dict, seed: int) -> diffusers.AutoencoderKLWan:
    """diffusers' VAE with every weight (norm scales included) jiggled off its init."""
    torch.manual_seed(seed)
    return jiggle(diffusers.AutoencoderKLWan(**kw), seed + 1)


def _case(root, kw: dict, seed: int, size: tuple[int, int]) -> dict:
    """A saved tiny VAE and its outputs on a 2 x 9-frame video (frames 1 + 4k, H != W)."""
    ref = _reference(kw, seed)
    ref.save_pretrained(root / "vae")
    video = np.random.RandomState(seed).uniform(-1, 1, (2, 9, *size, 3)).astype(np.float32)
    with torch.no_grad():
        post = ref.encode(_to_torch(video)).latent_dist
        decoded = ref.decode(post.mean).sample
    return dict(
        ref=ref,
        root=root,
        video=video,
        mean=_from_torch(post.mean),
        logvar=_from_torch(post.logvar),
        decoded=_from_torch(decoded),
    )


@pytest.fixture(scope="module")
def wan21(tmp_path_factory):
    return _case(tmp_path_factory.mktemp("wan21"), WAN21, seed=0, size=(16, 24))


@pytest.fixture(scope="module")
def wan22(tmp_path_factory):
    return _case(tmp_path_factory.mktemp("wan22"), WAN22, seed=3, size=(32, 48))


def _parity(case: dict, folder: str) -> None:
    vae, params, cfg = wan_vae.load_wan_vae(folder)
    mean, logvar = _run(lambda p, v: wan_vae.encode(vae, p, v), params, case["video"])
    assert mean.shape == (2, 3, 2, 3, cfg.z_dim)  # 9 frames -> 3, 8x (2.1) / 16x (2.2)
    _close(mean, case["mean"])
    _close(logvar, case["logvar"])
    video = _run(lambda p, z: wan_vae.decode(vae, p, z), params, case["mean"])
    assert video.shape == case["video"].shape
    _close(video, case["decoded"])


def test_wan21_encode_decode_parity(wan21):
    _parity(wan21, str(wan21["root"] / "vae"))


def test_wan22_encode_decode_parity(wan22):
    """The residual / patchified variant, loaded from a pipeline folder's `vae/`."""
    root = wan22["root"]
    index = {"_class_name": "WanPipeline", "vae": ["diffusers", "AutoencoderKLWan"]}
    (root / "model_index.json").write_text(json.dumps(index))
    _parity(wan22, str(root))


def test_reference_without_cache_keeps_every_frame(wan21):
    """Why the cache is the model: diffusers' encoder and decoder called without it skip
    every temporal resampling, so a port that dropped it could not match the chunked
    outputs the parity tests compare with."""
    ref, video = wan21["ref"], _to_torch(wan21["video"])
    with torch.no_grad():
        uncached = ref.quant_conv(ref.encoder(video))
        z = torch.from_numpy(np.ascontiguousarray(wan21["mean"].transpose(0, 4, 1, 2, 3)))
        uncached_video = ref.decoder(ref.post_quant_conv(z))
    assert uncached.shape[2] == 9 and wan21["mean"].shape[1] == 3
    assert uncached_video.shape[2] == 3 and wan21["decoded"].shape[1] == 9


def test_chunks_scan_program_size_does_not_grow():
    """Frame 0, then one `lax.scan` over the chunks: 5 and 17 frames (3 and 9 latent
    frames, 2x in time here) trace to the same program."""
    stats = dict(latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    cfg = wan_vae_config_from_dict(
        dict(base_dim=4, z_dim=4, dim_mult=[1, 2], temperal_downsample=[True], **stats)
    )
    vae = wan_vae.AutoencoderKLWan(cfg)
    params = traverse_util.unflatten_dict(
        weights.expected_shapes(vae, *wan_vae.example_inputs(cfg))
    )

    def eqns(fn, x_shape):
        jaxpr = jax.make_jaxpr(lambda p, x: fn(vae, p, x))(params, jnp.zeros(x_shape))
        return [e.primitive.name for e in jaxpr.jaxpr.eqns]

    enc5, enc17 = eqns(wan_vae.encode, (1, 5, 4, 4, 3)), eqns(wan_vae.encode, (1, 17, 4, 4, 3))
    dec3, dec9 = eqns(wan_vae.decode, (1, 3, 2, 2, 4)), eqns(wan_vae.decode, (1, 9, 2, 2, 4))
    assert enc5 == enc17 and "scan" in enc5
    assert dec3 == dec9 and "scan" in dec3


def test_normalization_is_the_pipelines(wan22):
    """`(z - mean) * (1 / std)` (I2V conditioning) and `z / (1 / std) + mean` (decode)."""
    cfg = wan_vae.load_wan_vae(str(wan22["root"] / "vae"))[2]
    z = wan22["mean"]
    mean = torch.tensor(WAN22["latents_mean"]).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(WAN22["latents_std"]).view(1, -1, 1, 1, 1)
    zt = _to_torch(z)
    _close(wan_vae.normalize_latents(cfg, z), _from_torch((zt - mean) * inv_std), 1e-6)
    _close(wan_vae.denormalize_latents(cfg, z), _from_torch(zt / inv_std + mean), 1e-6)
    back = wan_vae.denormalize_latents(cfg, wan_vae.normalize_latents(cfg, z))
    _close(back, z, 1e-6)


def test_bf16_smoke(wan21):
    """bfloat16 weights and activations track float32 through the frames rewards see
    (normalized latents -> uint8), decoded one video at a time (`batch_chunk`)."""
    vae, params, cfg = wan_vae.load_wan_vae(str(wan21["root"] / "vae"), dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    normalized = wan_vae.normalize_latents(cfg, wan21["mean"])
    decode = lambda p, z: wan_vae.decode_frames_uint8(vae, p, z, batch_chunk=1)
    frames = _run(decode, params, normalized)
    assert frames.dtype == jnp.uint8 and frames.shape == (2, 9, 16, 24, 3)
    want = np.round((wan21["decoded"] / 2 + 0.5) * 255)
    err = np.abs(np.asarray(frames, np.float32) - want)
    assert err.mean() < 2.0 and err.max() < 32, (err.mean(), err.max())


def _torch_names(ref: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The state dict's names in our spelling and Flax-layout shapes."""
    out = {}
    for key, t in ref.state_dict().items():
        shape = tuple(t.shape)
        if key.endswith(".gamma"):
            key, shape = key[: -len("gamma")] + "weight", (shape[0],)
        elif len(shape) == 4 and shape[2:] == (1, 1):  # a 1x1 Conv2d, a Dense here
            shape = (shape[1], shape[0])
        elif len(shape) >= 2:
            shape = (*shape[2:], shape[1], shape[0])
        out[key] = shape
    return out


@pytest.mark.parametrize(
    "kw",
    [
        {},
        WAN22_VAE_ARCH,
        {**WAN21, "num_res_blocks": 2, "attn_scales": [1.0, 0.5]},
        {**WAN21, "dim_mult": [1, 2, 2]},  # 3 time flags for 2 levels: 2x in, 4x out
    ],
    ids=["wan21", "wan22", "attn_scales", "lopsided"],
)
def test_layouts_match_diffusers_names_and_shapes(kw):
    """The real Wan2.1 and Wan2.2 layouts, attention in the encoder's levels, and a
    config that diffusers builds with more time flags than levels."""
    cfg = wan_vae_config_from_dict(kw)
    ours = weights.expected_shapes(wan_vae.AutoencoderKLWan(cfg), *wan_vae.example_inputs(cfg))
    ours = {weights.torch_name(path): tuple(s.shape) for path, s in ours.items()}
    ref_kw = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg).items()}
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLWan(**ref_kw)
    assert ours == _torch_names(ref)


def test_real_latent_shapes():
    """Traced abstractly at 480x832x81: Wan2.1 21x60x104x16, Wan2.2 (TI2V-5B) 21x30x52x48."""
    for cfg, want in (
        (WanVAEConfig(), (21, 60, 104, 16)),
        (WanVAEConfig(**WAN22_VAE_ARCH), (21, 30, 52, 48)),
    ):
        vae = wan_vae.AutoencoderKLWan(cfg, jnp.bfloat16)
        flat = weights.expected_shapes(vae, *wan_vae.example_inputs(cfg))
        params = traverse_util.unflatten_dict(flat)
        video = jax.ShapeDtypeStruct((1, 81, 480, 832, 3), jnp.bfloat16)
        mean, _ = jax.eval_shape(lambda p, x, v=vae: wan_vae.encode(v, p, x), params, video)
        assert mean.shape == (1, *want) == (1, *latent_shape(cfg, 81, 480, 832))
        out = jax.eval_shape(lambda p, z, v=vae: wan_vae.decode(v, p, z), params, mean)
        assert out.shape == video.shape


def test_frame_count_and_size_rules():
    cfg = WanVAEConfig()
    assert [latent_frames(cfg, f) for f in (1, 5, 81)] == [1, 2, 21]
    assert decoded_frames(cfg, 21) == 81
    with pytest.raises(ConfigError, match=r"num_frames=10 must be 1 \+ 4k"):
        latent_frames(cfg, 10)
    with pytest.raises(ConfigError, match="multiple of 8"):
        latent_shape(cfg, 81, 480, 830)
    with pytest.raises(ConfigError, match="multiple of 16"):
        latent_shape(WanVAEConfig(**WAN22_VAE_ARCH), 81, 480, 840)


def test_config_rules():
    lopsided = WanVAEConfig(dim_mult=(1, 2, 2))  # diffusers' flags [F, T] in, [T, T] out
    assert (lopsided.temporal_factor, lopsided.decoder_temporal_factor) == (2, 4)
    assert latent_frames(lopsided, 9) == 5 and decoded_frames(lopsided, 5) == 17
    with pytest.raises(ValueError, match="needs an entry per downsampling level"):
        WanVAEConfig(dim_mult=(1, 2, 2, 2, 2))
    with pytest.raises(ValueError, match="at most 2 temporal resamplings"):
        WanVAEConfig(temperal_downsample=(True, True, True))
    with pytest.raises(ValueError, match="do not regroup evenly"):
        WanVAEConfig(**{**WAN22_VAE_ARCH, "dim_mult": (1, 3, 2, 2)})


def test_loader_refusals(wan21, tmp_path):
    src = wan21["root"] / "vae"
    with pytest.raises(WeightsError, match="not a Wan VAE folder"):
        wan_vae.load_wan_vae(str(tmp_path))

    def folder_with(name: str, **changes) -> str:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        raw = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**raw, **changes}))
        return str(dst)

    with pytest.raises(WeightsError, match="config.json: vae config is a 'AutoencoderKL'"):
        wan_vae.load_wan_vae(folder_with("sd", _class_name="AutoencoderKL"))
    with pytest.raises(WeightsError, match="latents_mean has 16 entries, z_dim is 8"):
        wan_vae.load_wan_vae(folder_with("stats", z_dim=8))
    with pytest.raises(WeightsError, match="has shape"):
        wan_vae.load_wan_vae(folder_with("wide", base_dim=16))
    pipe = tmp_path / "pipe"
    os.makedirs(pipe)
    shutil.copytree(src, pipe / "vae")
    (pipe / "model_index.json").write_text(json.dumps({"vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(WeightsError, match="vae is a 'AutoencoderKL', expected 'AutoencoderKLWan'"):
        wan_vae.load_wan_vae(str(pipe))
