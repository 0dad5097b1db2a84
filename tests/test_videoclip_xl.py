"""VideoCLIP-XL in Flax vs. a PyTorch reference on tiny random weights, fp32, end to end.

The reference code cannot be installed here, so the reference is built from
what it computes (see `bpgo_jax/models/videoclip_xl/__init__.py`): the text
tower is transformers' `CLIPTextModelWithProjection` with 248 positions, the
video tower a short torch forward below over `nn.MultiheadAttention`. Both
are written out under the released key names (fused `in_proj_weight`, `x @ W`
projections, LongCLIP's two position tables, the Conv3d patch kernel),
saved with `torch.save`, converted and loaded, so the converter's mapping is
checked against an independent spelling of it.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from text_folders import clip_tokenizer  # noqa: E402  (same tests/ folder)

from bpgo_jax import rewards  # noqa: E402
from bpgo_jax.errors import ConfigError, WeightsError  # noqa: E402
from bpgo_jax.models import weights  # noqa: E402
from bpgo_jax.models.videoclip_xl import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    RELEASED,
    VideoCLIPXL,
    ZeroPaddedTokenizer,
    convert_checkpoint,
    convert_state_dict,
    load_videoclip_xl,
    sample_frames,
    tiny_config,
)
from bpgo_jax.models.videoclip_xl.model import example_inputs  # noqa: E402
from bpgo_jax.rewards import base  # noqa: E402

TOL = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = tiny_config()  # the sizes the random reference is built with
KEPT = 20  # LongCLIP: positional_embedding's rows before positional_embedding_res takes over
PROMPTS = ["a cat on the mat", "a dog in snow!", "red " * 100]  # the last is truncated to 248

pytestmark = pytest.mark.xdist_group("test_videoclip_xl")


def _randomise(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)


def _text_reference(eos: int) -> torch.nn.Module:
    t = CFG.text
    config = transformers.CLIPTextConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        max_position_embeddings=t.max_position_embeddings,
        hidden_act="quick_gelu",
        projection_dim=CFG.projection_dim,
        bos_token_id=eos - 1,
        eos_token_id=eos,
        pad_token_id=0,
    )
    model = transformers.CLIPTextModelWithProjection(config).eval()
    _randomise(model, 0)
    return model


def _fused(layer: torch.nn.Module, kind: str) -> torch.Tensor:
    return torch.cat(
        [getattr(getattr(layer.self_attn, p), kind) for p in ("q_proj", "k_proj", "v_proj")]
    )


def _released_text(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The HF text tower under LongCLIP's names (prefix `text_model.`)."""
    tm = model.text_model
    pos = tm.embeddings.position_embedding.weight.detach()
    gen = torch.Generator().manual_seed(1)
    # Rows the reference masks out are noise: the converter must not use them.
    first = torch.randn(pos.shape, generator=gen)
    res = torch.randn(pos.shape, generator=gen)
    first[:KEPT], res[KEPT:] = pos[:KEPT], pos[KEPT:]
    sd = {
        "token_embedding.weight": tm.embeddings.token_embedding.weight,
        "positional_embedding": first,
        "positional_embedding_res": res,
        "ln_final.weight": tm.final_layer_norm.weight,
        "ln_final.bias": tm.final_layer_norm.bias,
        "text_projection": model.text_projection.weight.T,
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
    }
    for i, layer in enumerate(tm.encoder.layers):
        block = f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            sd[block + f"attn.in_proj_{kind}"] = _fused(layer, kind)
            sd[block + f"attn.out_proj.{kind}"] = getattr(layer.self_attn.out_proj, kind)
            sd[block + f"ln_1.{kind}"] = getattr(layer.layer_norm1, kind)
            sd[block + f"ln_2.{kind}"] = getattr(layer.layer_norm2, kind)
            sd[block + f"mlp.c_fc.{kind}"] = getattr(layer.mlp.fc1, kind)
            sd[block + f"mlp.c_proj.{kind}"] = getattr(layer.mlp.fc2, kind)
    return {f"text_model.{k}": v.detach().clone().contiguous() for k, v in sd.items()}


def _released_vision(seed: int = 2) -> dict[str, torch.Tensor]:
    """Random video-tower tensors under the names and shapes of `model_parameters.txt`."""
    v, d = CFG.vision, CFG.vision.hidden_size
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: 0.1 * torch.randn(shape, generator=gen)  # noqa: E731
    grid = v.image_size // v.patch_size
    sd = {
        "class_embedding": rand(d),
        "positional_embedding": rand(grid * grid + 1, d),
        "temporal_positional_embedding": rand(1, CFG.num_frames, d),
        "proj": rand(d, CFG.projection_dim),
        "conv1.weight": rand(d, 3, 1, v.patch_size, v.patch_size),
        "ln_pre.weight": 1 + rand(d),
        "ln_pre.bias": rand(d),
        "ln_post.weight": 1 + rand(d),
        "ln_post.bias": rand(d),
    }
    for i in range(v.num_hidden_layers):
        block, m = f"transformer.resblocks.{i}.", v.intermediate_size
        sd |= {
            block + "attn.in_proj_weight": rand(3 * d, d),
            block + "attn.in_proj_bias": rand(3 * d),
            block + "attn.out_proj.weight": rand(d, d),
            block + "attn.out_proj.bias": rand(d),
            block + "ln_1.weight": 1 + rand(d),
            block + "ln_1.bias": rand(d),
            block + "mlp.c_fc.weight": rand(m, d),
            block + "mlp.c_fc.bias": rand(m),
            block + "mlp.c_proj.weight": rand(d, m),
            block + "mlp.c_proj.bias": rand(d),
            block + "ln_2.weight": 1 + rand(d),
            block + "ln_2.bias": rand(d),
        }
    sd = {f"vision_model.vision_encoder.{k}": t for k, t in sd.items()}
    sd["vision_model.temp"] = torch.tensor(0.01)
    return sd


def torch_video_features(sd: dict, pixels: torch.Tensor) -> torch.Tensor:
    """The released video tower's forward, from its facts: pixels `[B, T, C, H, W]`."""
    p = {k.removeprefix("vision_model.vision_encoder."): t for k, t in sd.items()}
    d, heads = CFG.vision.hidden_size, CFG.vision.num_attention_heads
    x = torch.nn.functional.conv3d(
        pixels.permute(0, 2, 1, 3, 4), p["conv1.weight"], stride=p["conv1.weight"].shape[2:]
    )
    b, _, t, h, w = x.shape
    x = x.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, d)
    cls = p["class_embedding"] + torch.zeros(b * t, 1, d)
    x = torch.cat([cls, x], dim=1) + p["positional_embedding"]
    cls, x = x[:b, :1], x[:, 1:]
    x = x.reshape(b, t, h * w, d).permute(0, 2, 1, 3).reshape(b * h * w, t, d)
    temporal = p["temporal_positional_embedding"]
    x = x + (temporal.mean(1) if t == 1 else temporal)
    x = torch.cat([cls, x.reshape(b, h * w * t, d)], dim=1)
    ln = lambda y, name: torch.nn.functional.layer_norm(  # noqa: E731
        y, (d,), p[f"{name}.weight"], p[f"{name}.bias"]
    )
    x = ln(x, "ln_pre").permute(1, 0, 2)  # [L, B, D], nn.MultiheadAttention's layout
    for i in range(CFG.vision.num_hidden_layers):
        block = f"transformer.resblocks.{i}."
        attn = torch.nn.MultiheadAttention(d, heads)
        attn.load_state_dict(
            {
                k.removeprefix(block + "attn."): v
                for k, v in p.items()
                if k.startswith(block + "attn.")
            }
        )
        y = ln(x, block + "ln_1")
        x = x + attn(y, y, y, need_weights=False)[0]
        y = torch.nn.functional.linear(
            ln(x, block + "ln_2"), p[block + "mlp.c_fc.weight"], p[block + "mlp.c_fc.bias"]
        )
        y = y * torch.sigmoid(1.702 * y)
        x = x + torch.nn.functional.linear(
            y, p[block + "mlp.c_proj.weight"], p[block + "mlp.c_proj.bias"]
        )
    return ln(x, "ln_post")[0] @ p["proj"]


def reference_ids(tokenizer, prompts: list[str], length: int) -> np.ndarray:
    """The reference `tokenize(truncate=True)`: [SOT] + tokens + [EOT], cut with EOT last, zeros."""
    out = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        ids = (ids + [tokenizer.eos_token_id])[:length]
        ids[-1] = tokenizer.eos_token_id
        out[row, : len(ids)] = ids
    return out


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(state dict, its .bin, the converted folder, the HF text model, the tokenizer)."""
    root = tmp_path_factory.mktemp("videoclip_xl")
    tok = clip_tokenizer(pad="!")
    tok.save_pretrained(str(root / "tokenizer"))
    assert len(tok) == CFG.text.vocab_size
    text = _text_reference(tok.eos_token_id)
    sd = {**_released_text(text), **_released_vision()}
    torch.save(sd, root / "VideoCLIP-XL.bin")
    folder = str(root / "converted")
    cfg = convert_checkpoint(
        str(root / "VideoCLIP-XL.bin"),
        folder,
        tokenizer=str(root / "tokenizer"),
        text_heads=4,
        vision_heads=4,
    )
    assert cfg == CFG
    return sd, root / "VideoCLIP-XL.bin", folder, text, tok


@pytest.fixture(scope="module")
def loaded(released):
    return load_videoclip_xl(released[2])


def _close(ours, ref, tol=TOL):
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref), atol=tol, rtol=tol)


def _released_shapes() -> dict[str, tuple[int, ...]]:
    """The release's key names and shapes (vision: the reference's `model_parameters.txt`)."""
    v = {"class_embedding": (1024,), "positional_embedding": (257, 1024)}
    v |= {"temporal_positional_embedding": (1, 8, 1024), "proj": (1024, 768)}
    v |= {"conv1.weight": (1024, 3, 1, 14, 14)}
    t = {"token_embedding.weight": (49408, 768), "text_projection": (768, 768)}
    t |= {"positional_embedding": (248, 768), "positional_embedding_res": (248, 768)}
    t |= {"logit_scale": ()}
    for tower, width, layers in ((v, 1024, 24), (t, 768, 12)):
        ln = ("ln_pre", "ln_post") if tower is v else ("ln_final",)
        tower |= {f"{n}.{k}": (width,) for n in ln for k in ("weight", "bias")}
        for i in range(layers):
            b = f"transformer.resblocks.{i}."
            tower |= {b + "attn.in_proj_weight": (3 * width, width)}
            tower |= {b + "attn.in_proj_bias": (3 * width,)}
            tower |= {
                b + "attn.out_proj.weight": (width, width),
                b + "attn.out_proj.bias": (width,),
            }
            tower |= {b + "mlp.c_fc.weight": (4 * width, width), b + "mlp.c_fc.bias": (4 * width,)}
            tower |= {b + "mlp.c_proj.weight": (width, 4 * width), b + "mlp.c_proj.bias": (width,)}
            tower |= {f"{b}{n}.{k}": (width,) for n in ("ln_1", "ln_2") for k in ("weight", "bias")}
    shapes = {f"vision_model.vision_encoder.{k}": s for k, s in v.items()}
    return shapes | {f"text_model.{k}": s for k, s in t.items()} | {"vision_model.temp": ()}


def test_released_shapes_convert_to_the_released_model():
    # Zero-stride arrays: the full-size checkpoint's shapes without its 1.7 GB.
    zeros = {k: np.broadcast_to(np.float32(0), s) for k, s in _released_shapes().items()}
    cfg, tensors = convert_state_dict(zeros)
    assert cfg == RELEASED
    expected = weights.expected_shapes(VideoCLIPXL(cfg), *example_inputs(cfg))
    want = {
        weights.torch_name(p): weights.torch_shape(p[-1], tuple(x.shape))
        for p, x in expected.items()
    }
    assert {k: tuple(a.shape) for k, a in tensors.items()} == want


def test_frame_pick_is_the_references_slice():
    for total in (8, 9, 15, 33, 81):
        assert sample_frames(total).tolist() == list(range(total))[:: total // 8][:8]
    assert sample_frames(5).tolist() == [0, 0, 1, 1, 2, 3, 3, 4]  # short clips repeat frames


def test_tokenizer_gives_the_reference_ids(released):
    *_, folder, _, tok = released
    ours = ZeroPaddedTokenizer(folder, 248, CFG.text.vocab_size)(PROMPTS)
    np.testing.assert_array_equal(ours, reference_ids(tok, PROMPTS, 248))
    assert ours[2, -1] == tok.eos_token_id and (ours[0, 20:] == 0).all()


def test_text_tower_matches_transformers(released, loaded):
    *_, text, tok = released
    module, params = loaded
    ids = reference_ids(tok, PROMPTS, 248)
    ours = module.apply({"params": params}, jnp.asarray(ids), method="get_text_features")
    with torch.no_grad():
        ref = text(input_ids=torch.tensor(ids, dtype=torch.long)).text_embeds
    _close(ours, ref)


@pytest.mark.parametrize("frames", [8, 1])
def test_video_tower_matches_torch_reference(released, loaded, frames):
    sd = released[0]
    module, params = loaded
    s = CFG.vision.image_size
    pixels = np.random.RandomState(frames).randn(2, frames, s, s, 3).astype(np.float32)
    ours = module.apply({"params": params}, jnp.asarray(pixels), method="get_video_features")
    with torch.no_grad():
        ref = torch_video_features(sd, torch.tensor(pixels).permute(0, 1, 4, 2, 3))
    _close(ours, ref)


def test_reward_through_registry_matches_reference_pipeline(released):
    sd, _, folder, text, tok = released
    rewards.load_plugins()
    assert "videoclip_xl" in base.names()
    reward = base.build(
        "videoclip_xl", ml_collections.ConfigDict({"weight": 1.0, "path": folder, "scale": 100.0})
    )
    videos = np.random.RandomState(3).rand(3, 11, 20, 24, 3).astype(np.float32)
    aux = reward.prepare(PROMPTS, [{}] * 3)
    ours = jax.jit(reward.fn)(reward.params, jnp.asarray(videos), aux)

    clip = torch.tensor(videos[:, sample_frames(11)]).permute(0, 1, 4, 2, 3).flatten(0, 1)
    s = CFG.vision.image_size
    # cv2.resize's INTER_LINEAR is this filter (half-pixel centres, no antialiasing).
    clip = torch.nn.functional.interpolate(clip, size=(s, s), mode="bilinear", align_corners=False)
    mean, std = (torch.tensor(m).view(1, 3, 1, 1) for m in (IMAGENET_MEAN, IMAGENET_STD))
    clip = ((clip - mean) / std).reshape(3, 8, 3, s, s)
    with torch.no_grad():
        video = torch_video_features(sd, clip)
        words = text(
            input_ids=torch.tensor(reference_ids(tok, PROMPTS, 248), dtype=torch.long)
        ).text_embeds
    ref = 100 * torch.nn.functional.cosine_similarity(video, words, dim=-1)
    _close(ours, ref, tol=1e-3)
    assert ours.shape == (3,) and ours.dtype == jnp.float32


def test_bf16_reward_is_close_to_fp32(released):
    rewards.load_plugins()
    videos = jnp.asarray(np.random.RandomState(4).rand(2, 8, 28, 28, 3), jnp.float32)
    scores = {}
    for dtype in ("float32", "bfloat16"):
        block = {"weight": 1.0, "path": released[2], "dtype": dtype}
        reward = base.build("videoclip_xl", ml_collections.ConfigDict(block))
        aux = reward.prepare(PROMPTS[:2], [{}] * 2)
        scores[dtype] = np.asarray(jax.jit(reward.fn)(reward.params, videos, aux))
    np.testing.assert_allclose(scores["bfloat16"], scores["float32"], atol=0.03)


def test_reward_options_are_checked(released):
    folder = released[2]
    build = lambda **kw: base.build(
        "videoclip_xl", ml_collections.ConfigDict({"weight": 1.0, **kw})
    )  # noqa: E731
    rewards.load_plugins()
    with pytest.raises(ConfigError, match="reward 'videoclip_xl' needs cfg.path"):
        build()
    with pytest.raises(ConfigError, match=r"frames=4: the model takes 8 frames \(or 1\)"):
        build(path=folder, frames=4)
    with pytest.raises(WeightsError, match="videoclip_xl0 holds no CLIPTokenizer"):
        build(path=folder, tokenizer_path=os.path.dirname(folder))


def test_safetensors_input_converts_alike(released, tmp_path):
    sd, _, folder, *_ = released
    safetensors_torch.save_file(sd, str(tmp_path / "released.safetensors"))
    convert_checkpoint(
        str(tmp_path / "released.safetensors"), str(tmp_path / "out"), text_heads=4, vision_heads=4
    )
    a = safetensors_torch.load_file(os.path.join(folder, "model.safetensors"))
    b = safetensors_torch.load_file(str(tmp_path / "out" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class NotATensor:  # pickled by reference: torch.load(weights_only=True) refuses it
    pass


def test_converter_errors_name_the_key_or_file(released, tmp_path):
    sd, path = released[:2]
    out = str(tmp_path / "out")
    missing = dict(sd)
    del missing["vision_model.vision_encoder.transformer.resblocks.1.ln_2.bias"]
    torch.save(missing, tmp_path / "missing.bin")
    with pytest.raises(
        WeightsError,
        match=r"missing tensor 'vision_model.vision_encoder.transformer.resblocks.1.ln_2.bias'",
    ):
        convert_checkpoint(str(tmp_path / "missing.bin"), out, text_heads=4, vision_heads=4)
    torch.save({**sd, "text_model.extra.weight": torch.zeros(2)}, tmp_path / "extra.bin")
    with pytest.raises(WeightsError, match=r"unexpected tensor\(s\) 'text_model.extra.weight'"):
        convert_checkpoint(str(tmp_path / "extra.bin"), out, text_heads=4, vision_heads=4)
    torch.save({"weights": NotATensor()}, tmp_path / "pickle.bin")
    with pytest.raises(
        WeightsError,
        match=r"pickle.bin is not a torch state dict that torch.load\(weights_only=True\) reads",
    ):
        convert_checkpoint(str(tmp_path / "pickle.bin"), out)
    (tmp_path / "odd.npz").write_bytes(b"")
    with pytest.raises(WeightsError, match="odd.npz: expected a torch state dict"):
        convert_checkpoint(str(tmp_path / "odd.npz"), out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="empty holds no CLIPTokenizer"):
        convert_checkpoint(str(path), out, tokenizer=str(tmp_path / "empty"))
    assert not os.path.exists(out)


def test_converter_command_fails_in_one_line(tmp_path):
    cmd = [
        sys.executable,
        "launch/convert_videoclip_xl.py",
        f"--checkpoint={tmp_path}/none.bin",
        f"--out={tmp_path}/out",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: checkpoint {tmp_path}/none.bin does not exist (or is not a file)"
    ]
