"""Flax CLIP towers and loaders vs. transformers' PyTorch CLIP on tiny random models.

open_clip itself cannot be installed here (it needs torchvision), so the
OpenCLIP converter is checked on a state dict renamed from a transformers
CLIPModel by the inverse mapping written out below.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from bpgo_jax.models.clip import load_clip, load_clip_text, load_clip_vision  # noqa: E402
from bpgo_jax.models.clip.openclip import load_openclip  # noqa: E402
from bpgo_jax.models.clip.preprocess import CLIP_MEAN, CLIP_STD, preprocess_images  # noqa: E402

TOL = 1e-4
TEXT = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    bos_token_id=1,
    pad_token_id=0,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)

# Its module-scoped fixtures build once: keep the file on one xdist worker.
pytestmark = pytest.mark.xdist_group("test_clip_parity")


def _save(model, folder, **kwargs) -> str:
    model.save_pretrained(str(folder), safe_serialization=True, **kwargs)
    return str(folder)


def _text_ids(eos: int, seed: int = 0) -> np.ndarray:
    """Random ids with EOS at varying positions; ids above EOS appear before it,
    so argmax pooling and first-EOS pooling pick different tokens."""
    ids = np.random.RandomState(seed).randint(3, 100, (3, 16)).astype(np.int32)
    ids[ids == eos] = 3
    for row, pos in enumerate((5, 9, 15)):
        ids[row, pos] = eos
    ids[0, 11] = eos  # padding may repeat the EOS id
    return ids


def _nchw(pixels: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.asarray(pixels)).permute(0, 3, 1, 2)


def _close(ours, ref, tol=TOL):
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref), atol=tol, rtol=tol)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.RandomState(1).randn(2, 32, 32, 3).astype(np.float32)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    torch.manual_seed(0)
    text = {**TEXT, "eos_token_id": 50}
    cfg = transformers.CLIPConfig(text_config=text, vision_config=VISION, projection_dim=16)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(1.7)
    return model, _save(model, tmp_path_factory.mktemp("clip"))


@pytest.mark.parametrize(
    "act,eos", [("quick_gelu", 2), ("gelu", 50)], ids=["sd1-quickgelu-argmax", "gelu-first-eos"]
)
def test_text_model_matches_transformers(tmp_path, act, eos):
    torch.manual_seed(1)
    cfg = transformers.CLIPTextConfig(**TEXT, hidden_act=act, eos_token_id=eos)
    model = transformers.CLIPTextModel(cfg).eval()
    ids = _text_ids(eos)
    with torch.no_grad():
        ref = model(torch.tensor(ids, dtype=torch.long))
    module, params = load_clip_text(_save(model, tmp_path))
    hidden, pooled = jax.jit(module.apply)({"params": params}, jnp.asarray(ids))
    _close(hidden, ref.last_hidden_state)
    _close(pooled, ref.pooler_output)
    # The two pooling rules really differ on these ids (the test can tell them apart).
    other = np.argmax(ids, -1) if eos != 2 else np.argmax(ids == 2, -1)
    assert not np.allclose(np.asarray(hidden)[np.arange(3), other], ref.pooler_output.numpy())


def test_text_with_projection_sharded_folder(tmp_path):
    """CLIPTextModelWithProjection (SDXL encoder 2) from a multi-file checkpoint."""
    torch.manual_seed(2)
    cfg = transformers.CLIPTextConfig(**TEXT, hidden_act="gelu", eos_token_id=2, projection_dim=24)
    model = transformers.CLIPTextModelWithProjection(cfg).eval()
    folder = _save(model, tmp_path, max_shard_size="20KB")
    assert any(f.endswith(".safetensors.index.json") for f in os.listdir(folder))
    ids = _text_ids(2)
    with torch.no_grad():
        ref = model(torch.tensor(ids, dtype=torch.long))
    module, params = load_clip_text(folder)
    hidden, embeds = module.apply({"params": params}, jnp.asarray(ids))
    _close(hidden, ref.last_hidden_state)
    _close(embeds, ref.text_embeds)
    module, params = load_clip_text(folder, with_projection=False)
    assert "text_projection" not in params
    assert module.apply({"params": params}, jnp.asarray(ids))[1].shape == (3, 32)


def test_vision_model_matches_transformers(tmp_path, pixels):
    torch.manual_seed(3)
    cfg = transformers.CLIPVisionConfig(**VISION, projection_dim=16)
    model = transformers.CLIPVisionModelWithProjection(cfg).eval()
    folder = _save(model, tmp_path)
    with torch.no_grad():
        ref = model(_nchw(pixels))
        ref_pooled = model.vision_model(_nchw(pixels)).pooler_output
    module, params = load_clip_vision(folder)
    hidden, embeds = module.apply({"params": params}, jnp.asarray(pixels))
    _close(hidden, ref.last_hidden_state)
    _close(embeds, ref.image_embeds)
    module, params = load_clip_vision(folder, with_projection=False)
    _close(module.apply({"params": params}, jnp.asarray(pixels))[1], ref_pooled)


def test_clip_model_logits_match_transformers(clip_folder, pixels):
    model, folder = clip_folder
    ids = _text_ids(model.config.text_config.eos_token_id)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=_nchw(pixels))
    module, params = load_clip(folder)
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(pixels))
    _close(out["logits_per_image"], ref.logits_per_image)
    _close(out["logits_per_text"], ref.logits_per_text)
    _close(out["image_embeds"], ref.image_embeds)
    _close(out["text_embeds"], ref.text_embeds)
    assert out["logits_per_image"].shape == (2, 3)


def test_tower_loaders_take_their_part_of_a_clip_model(clip_folder, pixels):
    model, folder = clip_folder
    ids = _text_ids(model.config.text_config.eos_token_id)
    with torch.no_grad():
        text_ref = model.text_model(torch.tensor(ids, dtype=torch.long)).pooler_output
        image_ref = model.get_image_features(pixel_values=_nchw(pixels)).pooler_output
    module, params = load_clip_text(folder, with_projection=False)
    _close(module.apply({"params": params}, jnp.asarray(ids))[1], text_ref)
    module, params = load_clip_vision(folder)  # projection found -> image embeds
    _close(module.apply({"params": params}, jnp.asarray(pixels))[1], image_ref)


def test_bf16_checkpoint_and_bf16_compute(tmp_path):
    torch.manual_seed(4)
    cfg = transformers.CLIPTextConfig(**TEXT, eos_token_id=2)
    model = transformers.CLIPTextModel(cfg).eval().to(torch.bfloat16)
    folder = _save(model, tmp_path)  # BF16 tensors: numpy safetensors cannot read them
    ids = _text_ids(2)
    with torch.no_grad():
        ref = model.float()(torch.tensor(ids, dtype=torch.long)).last_hidden_state
    module, params = load_clip_text(folder)
    _close(module.apply({"params": params}, jnp.asarray(ids))[0], ref)
    module, params = load_clip_text(folder, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    hidden = module.apply({"params": params}, jnp.asarray(ids))[0]
    assert hidden.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(hidden, np.float32), ref.numpy(), atol=0.15, rtol=0.05)


def test_sharding_fn_places_every_leaf(clip_folder):
    model, folder = clip_folder
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("x",))
    seen = {}

    def sharding_fn(path, shape):
        """Shards kernels on their output axis, replicates everything else."""
        seen[path] = shape
        split = path[-1] == "kernel" and shape[-1] % 8 == 0
        spec = (None,) * (len(shape) - 1) + ("x",) if split else ()
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    module, params = load_clip_text(folder, sharding_fn=sharding_fn)
    flat = {
        tuple(k.key for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }
    assert set(seen) == set(flat)
    q = flat[("text_model", "encoder", "layers_0", "self_attn", "q_proj", "kernel")]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "x")
    assert len(q.sharding.device_set) == 8
    ids = _text_ids(model.config.text_config.eos_token_id)
    _, ref = load_clip_text(folder)
    np.testing.assert_allclose(
        np.asarray(module.apply({"params": params}, jnp.asarray(ids))[1]),
        np.asarray(module.apply({"params": ref}, jnp.asarray(ids))[1]),
        atol=5e-6,  # heads split over 8 devices sum in another order
    )


def _to_openclip(sd: dict, n_text: int, n_vision: int) -> dict:
    """Inverse of our converter: transformers CLIPModel names -> OpenCLIP names."""
    out = {
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].T,
        "logit_scale": sd["logit_scale"],
        "attn_mask": torch.full((16, 16), float("-inf")).triu(1),  # old non-weight buffer
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].T,
    }
    for tower, prefix, n in (("text_model", "", n_text), ("vision_model", "visual.", n_vision)):
        for i in range(n):
            hf, oc = f"{tower}.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
            for part in ("weight", "bias"):
                qkv = [sd[f"{hf}self_attn.{p}_proj.{part}"] for p in "qkv"]
                out[f"{oc}attn.in_proj_{part}"] = torch.cat(qkv)
                out[f"{oc}attn.out_proj.{part}"] = sd[f"{hf}self_attn.out_proj.{part}"]
                out[f"{oc}ln_1.{part}"] = sd[f"{hf}layer_norm1.{part}"]
                out[f"{oc}ln_2.{part}"] = sd[f"{hf}layer_norm2.{part}"]
                out[f"{oc}mlp.c_fc.{part}"] = sd[f"{hf}mlp.fc1.{part}"]
                out[f"{oc}mlp.c_proj.{part}"] = sd[f"{hf}mlp.fc2.{part}"]
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def openclip_reference(tmp_path_factory):
    """A tiny LAION-style CLIP (gelu, argmax pooling) and its OpenCLIP-layout file."""
    torch.manual_seed(5)
    text = {**TEXT, "hidden_act": "gelu", "eos_token_id": 2}
    vision = {**VISION, "hidden_act": "gelu"}
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    model = transformers.CLIPModel(cfg).eval()
    sd = _to_openclip(model.state_dict(), 2, 2)
    path = str(tmp_path_factory.mktemp("openclip") / "open_clip.safetensors")
    safetensors_torch.save_file(sd, path)
    return model, path


def test_openclip_converter_matches_transformers(openclip_reference, pixels):
    model, path = openclip_reference
    ids = _text_ids(99)  # 99 is the largest id: the EOT under OpenCLIP's argmax rule
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=_nchw(pixels))
    module, params = load_openclip(path, text_heads=4, vision_heads=4)
    cfg = module.cfg
    assert (cfg.text.num_hidden_layers, cfg.vision.num_hidden_layers) == (2, 2)
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.projection_dim) == (32, 8, 16)
    out = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(pixels))
    _close(out["logits_per_image"], ref.logits_per_image)
    _close(out["text_embeds"], ref.text_embeds)


def test_openclip_rejects_unknown_tensor(tmp_path):
    path = str(tmp_path / "bad.safetensors")
    safetensors_torch.save_file(
        {"transformer.resblocks.0.ls_1.gamma": torch.zeros(4), "logit_scale": torch.zeros(())}, path
    )
    with pytest.raises(ValueError, match=r"unexpected tensor 'transformer\.resblocks\.0\.ls_1"):
        load_openclip(path)


def _rewrite(folder: str, edit) -> None:
    path = os.path.join(folder, "model.safetensors")
    sd = safetensors_torch.load_file(path)
    edit(sd)
    safetensors_torch.save_file(sd, path)


@pytest.fixture
def text_folder(tmp_path):
    torch.manual_seed(6)
    cfg = transformers.CLIPTextConfig(**TEXT, eos_token_id=50)
    return _save(transformers.CLIPTextModel(cfg), tmp_path)


def test_missing_tensor_is_named(text_folder):
    _rewrite(text_folder, lambda sd: sd.pop("encoder.layers.1.mlp.fc2.bias"))
    with pytest.raises(
        ValueError, match=r"missing tensor\(s\) text_model\.encoder\.layers\.1\.mlp\.fc2\.bias"
    ):
        load_clip_text(text_folder)


def test_unexpected_tensor_is_named(text_folder):
    _rewrite(text_folder, lambda sd: sd.update({"encoder.layers.2.mlp.fc2.bias": torch.zeros(32)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'encoder\.layers\.2\.mlp\.fc2\.bias'"):
        load_clip_text(text_folder)


def test_misshaped_tensor_is_named(text_folder):
    _rewrite(text_folder, lambda sd: sd.update({"final_layer_norm.weight": torch.ones(31)}))
    with pytest.raises(
        ValueError, match=r"'final_layer_norm\.weight'.*shape \(31,\).*expected \(32,\)"
    ):
        load_clip_text(text_folder)


def test_pickle_checkpoints_are_refused(tmp_path):
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(
        ValueError, match=r"refusing pickle checkpoint .*pytorch_model\.bin.*safetensors"
    ):
        load_clip_text(str(folder))
    torch.save({"state_dict": {}}, tmp_path / "HPS_v2.pt")
    with pytest.raises(ValueError, match=r"refusing pickle checkpoint .*HPS_v2\.pt.*save_file"):
        load_openclip(str(tmp_path / "HPS_v2.pt"))


def test_preprocess_matches_clip_image_processor():
    """Geometry + normalisation as CLIPImageProcessor (PIL bicubic) up to resampling noise."""
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    yy, xx = np.mgrid[0:64, 0:88] / 64.0
    image = np.stack([np.sin(3 * xx + yy), np.cos(2 * yy), np.sin(5 * xx * yy)], -1) * 0.4 + 0.5
    u8 = (image * 255).round().astype(np.uint8)
    ref = processor(images=[Image.fromarray(u8)], return_tensors="np")["pixel_values"]
    ours = np.asarray(
        jax.jit(preprocess_images, static_argnums=1)(jnp.asarray(u8[None] / 255.0), 32)
    )
    diff = np.abs(ours - ref.transpose(0, 2, 3, 1))
    assert diff.mean() < 0.01 and diff.max() < 0.1, (diff.mean(), diff.max())
    # An image already at the model size is only normalised (exactly).
    x = np.random.RandomState(0).rand(1, 32, 32, 3).astype(np.float32)
    expected = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    np.testing.assert_allclose(
        np.asarray(preprocess_images(jnp.asarray(x), 32)), expected, atol=1e-6
    )
