"""The shared DiT blocks (`bpgo_jax.models.dit`) vs. the diffusers modules and functions.

Each torch module gets random weights, its state dict goes through a
safetensors file and `weights.read_params` (the conversion path of the real
loaders), and both run on the same random inputs in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from diffusers.models import attention as d_attention  # noqa: E402
from diffusers.models import attention_processor as d_processor  # noqa: E402
from diffusers.models import embeddings as d_emb  # noqa: E402
from diffusers.models import normalization as d_norm  # noqa: E402
from diffusers.models.transformers import transformer_flux as d_flux  # noqa: E402
from diffusers.models.transformers import transformer_wan as d_wan  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline  # noqa: E402

from bpgo_jax.models import dit, weights  # noqa: E402
from bpgo_jax.models.sd.pipeline import random_params  # noqa: E402

ATOL = 1e-5
# Sinusoids of float32 arguments up to 1000 differ by their ulp across
# libraries (see tests/test_layers.py); components fed timesteps get this.
TIME_ATOL = 1e-4


@pytest.fixture(autouse=True)
def _seed_torch():
    """torch modules draw their initial weights from the global generator."""
    torch.manual_seed(0)


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, norm scales and biases included."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return module.eval()


def _load(flax_module, inputs, torch_module, tmp_path, rename=None, name="m", method=None):
    """Our params from the torch module's state dict, through a safetensors file."""
    path = tmp_path / f"{name}.safetensors"
    state = {k: v.contiguous() for k, v in torch_module.state_dict().items()}
    if not state:  # a norm without parameters
        return {}
    safetensors_torch.save_file(state, str(path))
    with weights.open_tensors(str(path)) as reader:
        return weights.read_params(
            reader, weights.expected_shapes(flax_module, *inputs, method=method), rename=rename
        )


def _apply(module, params, *args, **kwargs):
    """`module.apply` jitted: one compilation rather than one per eager op."""
    fn = jax.jit(lambda p, *a: module.apply({"params": p}, *a, **kwargs))
    return fn(params, *args)


def _rand(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _t(x):
    return torch.from_numpy(np.asarray(x))


def _close(ours, ref, atol=ATOL):
    np.testing.assert_allclose(np.asarray(ours), ref.detach().numpy(), atol=atol, rtol=0)


# ---------------------------------------------------------------- norms


@pytest.mark.parametrize(
    "ours,ref",
    [
        (dit.RMSNorm(1e-6), lambda d: d_norm.RMSNorm(d, 1e-6)),
        (dit.RMSNorm(1e-5, use_scale=False), lambda d: d_norm.RMSNorm(d, 1e-5, False)),
        (dit.RMSNorm(1e-6), lambda d: torch.nn.RMSNorm(d, eps=1e-6)),
        (dit.LayerNorm(1e-6, affine=True), lambda d: torch.nn.LayerNorm(d, eps=1e-6)),
        (dit.LayerNorm(1e-6), lambda d: torch.nn.LayerNorm(d, 1e-6, elementwise_affine=False)),
    ],
)
def test_norms_match_torch(ours, ref, tmp_path):
    x = _rand(np.random.default_rng(0), 2, 5, 24, scale=3.0)
    torch_norm = _randomize(ref(24))
    params = _load(ours, (x,), torch_norm, tmp_path)
    _close(_apply(ours, params, x), torch_norm(_t(x)))


@pytest.mark.parametrize(
    "kind,ref",
    [
        ("rms_norm", lambda h, d: d_norm.RMSNorm(d, 1e-6)),
        ("layer_norm", lambda h, d: torch.nn.LayerNorm(d, eps=1e-6)),
        ("rms_norm_across_heads", lambda h, d: torch.nn.RMSNorm(h * d, eps=1e-6)),
        ("layer_norm_across_heads", lambda h, d: torch.nn.LayerNorm(h * d, eps=1e-6)),
    ],
)
def test_qk_norms(kind, ref, tmp_path):
    b, seq, h, d = 2, 6, 3, 8
    x = _rand(np.random.default_rng(1), b, seq, h, d, scale=2.0)
    torch_norm = _randomize(ref(h, d))
    ours = dit.QKNorm(kind, 1e-6)
    params = _load(ours, (x,), torch_norm, tmp_path)
    across = kind.endswith("across_heads")
    want = torch_norm(_t(x).reshape(b, seq, h * d) if across else _t(x)).reshape(b, seq, h, d)
    _close(_apply(ours, params, x), want)


def test_adaln_zero_and_single(tmp_path):
    rng = np.random.default_rng(2)
    x, emb = _rand(rng, 2, 7, 16), _rand(rng, 2, 16)
    torch_zero = _randomize(d_norm.AdaLayerNormZero(16))
    ours = dit.AdaLayerNormZero()
    params = _load(ours, (x, emb), torch_zero, tmp_path, name="zero")
    got = _apply(ours, params, x, emb)
    want = torch_zero(_t(x), emb=_t(emb))
    assert len(got) == len(want) == 5
    for a, b in zip(got, want, strict=True):
        _close(a, b)

    torch_single = _randomize(d_norm.AdaLayerNormZeroSingle(16), seed=1)
    ours = dit.AdaLayerNormZeroSingle()
    params = _load(ours, (x, emb), torch_single, tmp_path, name="single")
    for a, b in zip(_apply(ours, params, x, emb), torch_single(_t(x), emb=_t(emb)), strict=True):
        _close(a, b)


def test_sd35_adaln_zero_x(tmp_path):
    rng = np.random.default_rng(3)
    x, emb = _rand(rng, 2, 5, 16), _rand(rng, 2, 16)
    torch_norm = _randomize(d_norm.SD35AdaLayerNormZeroX(16))
    ours = dit.SD35AdaLayerNormZeroX()
    params = _load(ours, (x, emb), torch_norm, tmp_path)
    got, want = _apply(ours, params, x, emb), torch_norm(_t(x), emb=_t(emb))
    assert len(got) == len(want) == 7
    for a, b in zip(got, want, strict=True):
        _close(a, b)


@pytest.mark.parametrize(
    "kw",
    [
        dict(elementwise_affine=False, eps=1e-6),  # FLUX / SD3 norm_out
        dict(elementwise_affine=True, eps=1e-5, norm_type="rms_norm"),
        dict(elementwise_affine=True, eps=1e-5, bias=False),
    ],
)
def test_adaln_continuous(kw, tmp_path):
    rng = np.random.default_rng(4)
    x, cond = _rand(rng, 2, 5, 16), _rand(rng, 2, 12)
    torch_norm = _randomize(d_norm.AdaLayerNormContinuous(16, 12, **kw))
    ours = dit.AdaLayerNormContinuous(
        eps=kw["eps"],
        affine=kw["elementwise_affine"],
        bias=kw.get("bias", True),
        norm_type=kw.get("norm_type", "layer_norm"),
    )
    params = _load(ours, (x, cond), torch_norm, tmp_path)
    _close(_apply(ours, params, x, cond), torch_norm(_t(x), _t(cond)))


def test_table_modulation_is_wans():
    """Wan's blocks: `(scale_shift_table + temb.float()).chunk(6, dim=1)`, or for per-token
    timesteps `(table.unsqueeze(0) + temb).chunk(6, dim=2)` squeezed."""
    rng = np.random.default_rng(5)
    table = _rand(rng, 1, 6, 8)
    temb = _rand(rng, 2, 6, 8)
    for a, b in zip(
        dit.table_modulation(table, temb), (_t(table) + _t(temb)).chunk(6, dim=1), strict=True
    ):
        assert a.shape == (2, 1, 8)
        _close(a, b, atol=0)
    per_token = _rand(rng, 2, 5, 6, 8)
    want = (_t(table).unsqueeze(0) + _t(per_token)).chunk(6, dim=2)
    for a, b in zip(dit.table_modulation(table, per_token), want, strict=True):
        assert a.shape == (2, 5, 8)
        _close(a, b.squeeze(2), atol=0)


# ---------------------------------------------------------------- embedders


def test_timestep_embedding_and_text_projection(tmp_path):
    rng = np.random.default_rng(6)
    proj = _rand(rng, 3, 32)
    torch_t = _randomize(d_emb.TimestepEmbedding(32, 24, out_dim=20, post_act_fn="silu"))
    ours = dit.TimestepEmbedding(24, out_features=20, post_act_fn="silu")
    params = _load(ours, (proj,), torch_t, tmp_path, name="t")
    _close(_apply(ours, params, proj), torch_t(_t(proj)))
    for act in ("gelu_tanh", "silu"):
        torch_p = _randomize(d_emb.PixArtAlphaTextProjection(32, 24, act_fn=act))
        ours = dit.TextProjection(24, act_fn=act)
        params = _load(ours, (proj,), torch_p, tmp_path, name=act)
        _close(_apply(ours, params, proj), torch_p(_t(proj)))


@pytest.mark.parametrize("guidance", [False, True])
def test_combined_timestep_text_embeddings(guidance, tmp_path):
    """FLUX dev (guidance), FLUX schnell / SD3; timesteps as FLUX feeds them (t * 1000)."""
    rng = np.random.default_rng(7)
    t = np.array([0.0, 250.0, 999.0], np.float32)
    g = np.array([1000.0, 400.0, 0.0], np.float32)  # <= 1000: see TIME_ATOL
    pooled = _rand(rng, 3, 12)
    if guidance:
        ref = _randomize(d_emb.CombinedTimestepGuidanceTextProjEmbeddings(16, 12))
        want = ref(_t(t), _t(g), _t(pooled))
        inputs = (t, pooled, g)
    else:
        ref = _randomize(d_emb.CombinedTimestepTextProjEmbeddings(16, 12))
        want = ref(_t(t), _t(pooled))
        inputs = (t, pooled)
    ours = dit.TimestepTextEmbedding(16, guidance=guidance)
    params = _load(ours, inputs, ref, tmp_path)
    _close(_apply(ours, params, *inputs), want, atol=TIME_ATOL)
    with pytest.raises(ValueError, match="guidance"):
        _apply(ours, params, t, pooled, None if guidance else g)


# ---------------------------------------------------------------- rotary embeddings


def test_flux_rope_tables_and_ids():
    ids = dit.flux_ids(5, 3, 4)
    img = FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float32)
    np.testing.assert_array_equal(ids[5:], img.numpy())
    np.testing.assert_array_equal(ids[:5], 0)
    cos, sin = dit.rope_tables(ids, dit.FLUX_AXES_DIMS)
    ref_cos, ref_sin = d_flux.FluxPosEmbed(10000, list(dit.FLUX_AXES_DIMS))(_t(ids))
    assert cos.shape == (17, 128) and cos.dtype == np.float32
    _close(cos, ref_cos, atol=1e-6)
    _close(sin, ref_sin, atol=1e-6)


def test_apply_rope_is_fluxs():
    rng = np.random.default_rng(8)
    ids = np.concatenate([np.zeros((2, 3)), dit.grid_ids(1, 2, 3)]).astype(np.float32)
    cos, sin = dit.rope_tables(ids, (4, 6, 6))
    x = _rand(rng, 2, 8, 3, 16)
    want = d_emb.apply_rotary_emb(_t(x), (_t(cos), _t(sin)), sequence_dim=1)
    _close(dit.apply_rope(jnp.asarray(x), cos, sin), want)
    x16 = jnp.asarray(x, jnp.bfloat16)
    assert dit.apply_rope(x16, cos, sin).dtype == jnp.bfloat16


def test_wan_rope_tables():
    head_dim, frames, h, w = 24, 3, 4, 6
    assert dit.wan_axes_dims(128) == (44, 42, 42)
    rope = d_wan.WanRotaryPosEmbed(head_dim, (1, 2, 2), max_seq_len=32)
    ref_cos, ref_sin = rope(torch.zeros(1, 4, frames, h, w))
    ids = dit.grid_ids(frames, h // 2, w // 2)
    cos, sin = dit.rope_tables(ids, dit.wan_axes_dims(head_dim))
    _close(cos, ref_cos[0, :, 0], atol=1e-6)
    _close(sin, ref_sin[0, :, 0], atol=1e-6)


# ---------------------------------------------------------------- attention and feed-forward


def _flux_attention_case(pre_only: bool):
    kw = dict(query_dim=32, dim_head=8, heads=4, out_dim=32, bias=True, eps=1e-6)
    if pre_only:
        return d_flux.FluxAttention(**kw, pre_only=True)
    return d_flux.FluxAttention(**kw, added_kv_proj_dim=32, context_pre_only=False)


@pytest.mark.parametrize("pre_only", [False, True])
def test_flux_attention(pre_only, tmp_path):
    """Joint attention of FLUX's double blocks and the single blocks' self-attention, with RoPE."""
    rng = np.random.default_rng(9)
    txt, img = _rand(rng, 2, 3, 32), _rand(rng, 2, 6, 32)
    cos, sin = dit.rope_tables(dit.flux_ids(3, 2, 3), (2, 2, 4))
    ref = _randomize(_flux_attention_case(pre_only))
    if pre_only:
        joint = np.concatenate([txt, img], axis=1)
        ours = dit.Attention(4, 8, out_dim=None, qk_norm="rms_norm")
        params = _load(ours, (joint,), ref, tmp_path)
        got = _apply(ours, params, joint, rope=(cos, sin))
        _close(got, ref(_t(joint), image_rotary_emb=(_t(cos), _t(sin))))
        return
    ours = dit.Attention(4, 8, out_dim=32, joint=True, context_first=True, context_out_dim=32)
    params = _load(ours, (img, txt), ref, tmp_path)
    got_img, got_txt = _apply(ours, params, img, txt, rope=(cos, sin))
    want_img, want_txt = ref(_t(img), _t(txt), image_rotary_emb=(_t(cos), _t(sin)))
    _close(got_img, want_img)
    _close(got_txt, want_txt)


@pytest.mark.parametrize("context_pre_only", [False, True])
def test_sd3_joint_attention(context_pre_only, tmp_path):
    """SD3's `[image; context]` joint attention with SD3.5's RMS q-k norm; the last block
    (`context_pre_only`) has no context output."""
    rng = np.random.default_rng(10)
    img, ctx = _rand(rng, 2, 6, 32), _rand(rng, 2, 4, 32)
    ref = _randomize(
        d_processor.Attention(
            query_dim=32,
            cross_attention_dim=None,
            added_kv_proj_dim=32,
            dim_head=8,
            heads=4,
            out_dim=32,
            context_pre_only=context_pre_only,
            bias=True,
            processor=d_processor.JointAttnProcessor2_0(),
            qk_norm="rms_norm",
            eps=1e-6,
        )
    )
    ours = dit.Attention(
        4,
        8,
        out_dim=32,
        joint=True,
        context_first=False,
        context_out_dim=None if context_pre_only else 32,
    )
    params = _load(ours, (img, ctx), ref, tmp_path)
    got_img, got_ctx = _apply(ours, params, img, ctx)
    want = ref(_t(img), _t(ctx))
    if context_pre_only:  # diffusers returns the unprojected context states; we return None
        assert got_ctx is None
        _close(got_img, want[0])
    else:
        _close(got_img, want[0])
        _close(got_ctx, want[1])


def test_sd35_self_attention(tmp_path):
    """SD3.5's `attn2`: plain self-attention with RMS q-k norms, no context."""
    x = _rand(np.random.default_rng(11), 2, 6, 32)
    ref = _randomize(
        d_processor.Attention(
            query_dim=32,
            cross_attention_dim=None,
            dim_head=8,
            heads=4,
            out_dim=32,
            bias=True,
            processor=d_processor.JointAttnProcessor2_0(),
            qk_norm="rms_norm",
            eps=1e-6,
        )
    )
    ours = dit.Attention(4, 8, out_dim=32)
    params = _load(ours, (x,), ref, tmp_path)
    _close(_apply(ours, params, x), ref(_t(x)))


def test_wan_self_attention_with_rope(tmp_path):
    """Wan's `attn1`: q-k RMSNorm across heads, then its (t, h, w) RoPE."""
    rng = np.random.default_rng(12)
    dim, heads = 48, 2
    head_dim = dim // heads
    frames, h, w = 2, 2, 3
    x = _rand(rng, 2, frames * h * w, dim)
    cos, sin = dit.rope_tables(dit.grid_ids(frames, h, w), dit.wan_axes_dims(head_dim))
    ref = _randomize(
        d_wan.WanAttention(dim, heads, head_dim, eps=1e-6, processor=d_wan.WanAttnProcessor())
    )
    ours = dit.Attention(heads, head_dim, out_dim=dim, qk_norm="rms_norm_across_heads")
    params = _load(ours, (x,), ref, tmp_path)
    rotary = (_t(cos)[None, :, None], _t(sin)[None, :, None])
    _close(_apply(ours, params, x, rope=(cos, sin)), ref(_t(x), None, None, rotary))


def test_wan_cross_attention_with_image_branch(tmp_path):
    """Wan's `attn2`: text cross-attention, plus Wan2.1 I2V's image keys / values (the
    diffusers processor takes the last 512 context tokens as the text)."""
    rng = np.random.default_rng(13)
    dim, heads = 32, 2
    x, text, image = _rand(rng, 1, 5, dim), _rand(rng, 1, 512, dim), _rand(rng, 1, 4, dim)
    kw = dict(eps=1e-6, cross_attention_dim_head=dim // heads, processor=d_wan.WanAttnProcessor())
    ours = dit.Attention(heads, dim // heads, out_dim=dim, qk_norm="rms_norm_across_heads")

    ref = _randomize(d_wan.WanAttention(dim, heads, dim // heads, **kw))
    params = _load(ours, (x, text), ref, tmp_path, name="t2v")
    _close(_apply(ours, params, x, text), ref(_t(x), _t(text)))

    ref = _randomize(d_wan.WanAttention(dim, heads, dim // heads, added_kv_proj_dim=dim, **kw), 1)
    with_image = lambda m, x, text, image: m(x, text, image_context=image)  # noqa: E731
    params = _load(ours, (x, text, image), ref, tmp_path, name="i2v", method=with_image)
    got = _apply(ours, params, x, text, image_context=image)
    _close(got, ref(_t(x), torch.cat([_t(image), _t(text)], dim=1)))


@pytest.mark.parametrize("act", ["gelu-approximate", "gelu"])
def test_feed_forward(act, tmp_path):
    x = _rand(np.random.default_rng(14), 2, 5, 16)
    ref = _randomize(d_attention.FeedForward(16, dim_out=12, inner_dim=40, activation_fn=act))
    ours = dit.FeedForward(dim_out=12, inner_dim=40, activation_fn=act)
    params = _load(ours, (x,), ref, tmp_path)
    _close(_apply(ours, params, x), ref(_t(x)))


# ---------------------------------------------------------------- positions and patches


@pytest.mark.parametrize("grid,base,scale", [(8, 4, 1.0), ((6, 10), 16, 2.0)])
def test_sincos_2d(grid, base, scale):
    want = d_emb.get_2d_sincos_pos_embed(32, grid, base_size=base, interpolation_scale=scale)
    got = dit.sincos_2d(32, grid, base_size=base, interpolation_scale=scale)
    assert got.dtype == np.float32
    _close(got, want.float())


@pytest.mark.parametrize("max_size", [None, 12])
def test_sd3_patch_embed(max_size, tmp_path):
    """SD3's `pos_embed`: conv patches plus the (centre-cropped) fixed table."""
    rng = np.random.default_rng(15)
    latents = _rand(rng, 2, 8, 12, 4)  # NHWC
    ref = _randomize(
        d_emb.PatchEmbed(
            height=16,
            width=16,
            patch_size=2,
            in_channels=4,
            embed_dim=24,
            pos_embed_max_size=max_size,
        )
    )
    ours = dit.PatchEmbed(24, 2, base_size=16 // 2, pos_embed_max_size=max_size)
    # the persistent table buffer is skipped: ours is computed
    rename = lambda key: None if key == "pos_embed" else key  # noqa: E731
    params = _load(ours, (latents,), ref, tmp_path, rename=rename)
    want = ref(_t(latents).permute(0, 3, 1, 2))
    _close(_apply(ours, params, latents), want)
    if max_size:
        with pytest.raises(ValueError, match="pos_embed_max_size=12"):
            _apply(ours, params, np.zeros((1, 26, 2, 4), np.float32))


def test_flux_packing():
    x = _rand(np.random.default_rng(16), 2, 6, 8, 3)  # [B, H, W, C]
    want = FluxPipeline._pack_latents(_t(x).permute(0, 3, 1, 2), 2, 3, 6, 8)
    packed = dit.patchify(x, (2, 2), channels_first=True)
    _close(packed, want, atol=0)
    back = FluxPipeline._unpack_latents(want, 6 * 8, 8 * 8, 8)  # image size, VAE factor 8
    _close(dit.unpatchify(packed, (3, 4), (2, 2), channels_first=True), back.permute(0, 2, 3, 1), 0)


def test_patch_major_unpatchify_of_sd3_and_wan():
    """The output unpatchify of SD3 (`nhwpqc->nchpwq`) and Wan (`permute(0,7,1,4,2,5,3,6)`)."""
    rng = np.random.default_rng(17)
    b, h, w, p, c = 2, 3, 4, 2, 5
    tokens = _rand(rng, b, h * w, p * p * c)
    sd3 = torch.einsum("nhwpqc->nchpwq", _t(tokens).reshape(b, h, w, p, p, c))
    sd3 = sd3.reshape(b, c, h * p, w * p).permute(0, 2, 3, 1)
    _close(dit.unpatchify(tokens, (h, w), (p, p), channels_first=False), sd3, atol=0)
    f, pt = 2, 1
    tokens = _rand(rng, b, f * h * w, pt * p * p * c)
    wan = _t(tokens).reshape(b, f, h, w, pt, p, p, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
    wan = wan.reshape(b, c, f * pt, h * p, w * p).permute(0, 2, 3, 4, 1)
    video = dit.unpatchify(tokens, (f, h, w), (pt, p, p), channels_first=False)
    _close(video, wan, atol=0)
    np.testing.assert_array_equal(dit.patchify(video, (pt, p, p), channels_first=False), tokens)


def test_conv_patch_embedding_3d(tmp_path):
    """Wan's `patch_embedding` Conv3d, flattened like torch's `flatten(2).transpose(1, 2)`."""
    rng = np.random.default_rng(18)
    video = _rand(rng, 2, 3, 4, 6, 5)  # [B, F, H, W, C]
    ref = _randomize(torch.nn.Conv3d(5, 16, kernel_size=(1, 2, 2), stride=(1, 2, 2)))
    conv = dit.patch_conv(16, (1, 2, 2), name=None)
    params = _load(conv, (video,), ref, tmp_path)
    got = dit.conv_tokens(_apply(conv, params, video))
    want = ref(_t(video).permute(0, 4, 1, 2, 3)).flatten(2).transpose(1, 2)
    _close(got, want)


def test_dit_blocks_run_in_bfloat16():
    """bf16 compute through projections, q-k norms, RoPE and attention keeps bf16 outputs
    within bf16 rounding of the float32 result."""
    rng = np.random.default_rng(19)
    img, txt = _rand(rng, 1, 6, 32), _rand(rng, 1, 3, 32)
    rope = dit.rope_tables(dit.flux_ids(3, 2, 3), (2, 2, 4))
    attn = dit.Attention(4, 8, out_dim=32, joint=True, context_out_dim=32, dtype=jnp.bfloat16)
    params = random_params(attn, jax.random.key(0), jnp.float32, img, txt)  # drawn on the host
    bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    out_img, out_txt = _apply(
        attn, bf16, img.astype(jnp.bfloat16), txt.astype(jnp.bfloat16), rope=rope
    )
    assert out_img.dtype == out_txt.dtype == jnp.bfloat16
    ref_img, _ = _apply(attn.clone(dtype=jnp.float32), params, img, txt, rope=rope)
    err = np.abs(np.asarray(out_img, np.float32) - np.asarray(ref_img)).max()
    assert 0 < err < 0.05 * np.abs(np.asarray(ref_img)).max()
