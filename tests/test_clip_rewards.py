"""CLIP-based rewards vs. the same scores computed with transformers' PyTorch CLIP.

The torch side gets the pixels from our jnp preprocessing, so these tests pin
the model and scoring maths; preprocessing vs. PIL is checked in
test_clip_parity.py.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from test_clip_parity import _to_openclip  # noqa: E402  (same tests/ folder)

from bpgo_jax.models.clip.preprocess import preprocess_images  # noqa: E402
from bpgo_jax.rewards import base, clip_rewards  # noqa: E402  (importing registers them)

# Its module-scoped fixtures build once: keep the file on one xdist worker.
pytestmark = pytest.mark.xdist_group("test_clip_rewards")

TOL = 1e-4
PROMPTS = ["a cat", "dog dog cat", "zebra " * 40]  # the last one is truncated to 77
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MERGES = ["a t</w>", "c at</w>", "d o", "do g</w>"]


def _write_tokenizer(folder) -> int:
    """A tiny byte-pair CLIP vocabulary (letters, a few merges); returns the EOS id."""
    vocab = {}
    for token in [*LETTERS, *(c + "</w>" for c in LETTERS), *(m.replace(" ", "") for m in MERGES)]:
        vocab[token] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    return vocab["<|endoftext|>"]


def _cfg(**kw) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"weight": 1.0, **kw})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny CLIPModel + tokenizer folder, plus its OpenCLIP-layout copy."""
    folder = tmp_path_factory.mktemp("clip")
    eos = _write_tokenizer(folder)
    text = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        bos_token_id=eos - 1,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        hidden_act="gelu",
    )
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    model.save_pretrained(str(folder), safe_serialization=True)
    openclip = str(folder / "hps.safetensors")
    safetensors_torch.save_file(_to_openclip(model.state_dict(), 2, 2), openclip)
    images = np.random.RandomState(0).rand(3, 40, 48, 3).astype(np.float32)
    return model, str(folder), openclip, images


def _torch_cos(model, images, input_ids) -> np.ndarray:
    pixels = np.asarray(preprocess_images(jnp.asarray(images), 32))
    with torch.no_grad():
        image = model.get_image_features(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2))
        text = model.get_text_features(
            input_ids=torch.tensor(np.asarray(input_ids), dtype=torch.long)
        )
        image = torch.nn.functional.normalize(image.pooler_output, dim=-1)
        text = torch.nn.functional.normalize(text.pooler_output, dim=-1)
    return (image * text).sum(-1).numpy()


def _score(reward: base.Reward, images: np.ndarray) -> tuple[np.ndarray, dict]:
    aux = reward.prepare(PROMPTS, [{}] * len(PROMPTS)) if reward.prepare else {}
    return np.asarray(jax.jit(reward.fn)(reward.params, jnp.asarray(images), aux)), aux


def test_rewards_are_registered():
    assert {"clip_score", "pickscore", "hpsv2", "aesthetic"} <= set(base.names())


def test_prepare_tokenizes_with_clip_tokenizer(reference):
    model, folder, _, _ = reference
    reward = base.build("clip_score", _cfg(path=folder))
    aux = reward.prepare(PROMPTS, [{}] * 3)
    ids = aux["input_ids"]
    assert ids.dtype == np.int32 and ids.shape == (3, 77)
    expected = transformers.CLIPTokenizer.from_pretrained(folder)(
        PROMPTS, padding="max_length", max_length=77, truncation=True
    )["input_ids"]
    np.testing.assert_array_equal(ids, np.asarray(expected))
    eos = model.config.text_config.eos_token_id
    assert (ids[:, 0] == eos - 1).all() and ids[2, -1] == eos  # BOS first; truncated keeps EOS
    np.testing.assert_array_equal(ids[0, :4], [eos - 1, 26, 53, eos])  # "a</w>", "cat</w>"


@pytest.mark.parametrize("name", ["clip_score", "pickscore"])
def test_clip_model_rewards_match_torch(reference, name):
    model, folder, _, images = reference
    reward = base.build(name, _cfg(path=folder, scale=2.5))
    assert reward.jittable and reward.name == name
    scores, aux = _score(reward, images)
    cos = _torch_cos(model, images, aux["input_ids"])
    factor = 2.5 if name == "clip_score" else float(model.logit_scale.detach().exp())
    assert scores.shape == (3,) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, factor * cos, atol=TOL, rtol=TOL)


def test_hpsv2_matches_torch_on_openclip_layout(reference):
    model, folder, openclip, images = reference
    # Argmax pooling (OpenCLIP) == first-EOS pooling here: EOS is the largest id.
    reward = base.build(
        "hpsv2", _cfg(path=openclip, tokenizer_path=folder, text_heads=4, vision_heads=4)
    )
    scores, aux = _score(reward, images)
    np.testing.assert_allclose(scores, _torch_cos(model, images, aux["input_ids"]), atol=TOL)


class _AestheticMLP(torch.nn.Module):
    """The LAION improved-aesthetic-predictor head (no activations), at tiny widths."""

    def __init__(self, dim: int):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 24),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(24, 12),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(12, 8),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(8, 4),
            torch.nn.Linear(4, 1),
        )

    def forward(self, x):
        return self.layers(x)


def test_aesthetic_matches_torch_mlp_and_ignores_prompt(reference, tmp_path):
    model, folder, _, images = reference
    torch.manual_seed(1)
    head = _AestheticMLP(16).eval()
    head_path = str(tmp_path / "aesthetic.safetensors")
    safetensors_torch.save_file(head.state_dict(), head_path)
    reward = base.build("aesthetic", _cfg(path=folder, head_path=head_path))
    assert reward.prepare is None
    scores = np.asarray(jax.jit(reward.fn)(reward.params, jnp.asarray(images), {}))
    pixels = np.asarray(preprocess_images(jnp.asarray(images), 32))
    with torch.no_grad():
        embeds = model.get_image_features(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2))
        expected = head(torch.nn.functional.normalize(embeds.pooler_output, dim=-1))[:, 0]
    np.testing.assert_allclose(scores, expected.numpy(), atol=TOL, rtol=TOL)
    assert np.ptp(scores) > 1e-4  # different images really get different scores


def test_aesthetic_head_must_chain(tmp_path):
    bad = {"layers.0.weight": torch.zeros(8, 16), "layers.0.bias": torch.zeros(8)}
    bad |= {"layers.2.weight": torch.zeros(1, 7), "layers.2.bias": torch.zeros(1)}
    safetensors_torch.save_file(bad, str(tmp_path / "head.safetensors"))
    with pytest.raises(ValueError, match=r"aesthetic head layer 2 has weight \(1, 7\)"):
        clip_rewards.load_aesthetic_head(str(tmp_path / "head.safetensors"))


def test_bf16_clip_score_close_to_fp32_reference(reference):
    model, folder, _, images = reference
    reward = base.build("clip_score", _cfg(path=folder, dtype="bfloat16"))
    assert jax.tree.leaves(reward.params)[0].dtype == jnp.bfloat16
    scores, aux = _score(reward, images)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, _torch_cos(model, images, aux["input_ids"]), atol=0.03)


@pytest.mark.parametrize(
    "name,kw,message",
    [
        ("clip_score", {}, r"reward 'clip_score' needs cfg\.path"),
        ("pickscore", {"path": "/nonexistent/pick"}, r"cfg\.path='/nonexistent/pick' does not"),
        ("hpsv2", {}, r"reward 'hpsv2' needs cfg\.path"),
        ("aesthetic", {}, r"reward 'aesthetic' needs cfg\.path"),
    ],
)
def test_factories_name_missing_paths(name, kw, message):
    with pytest.raises(ValueError, match=message):
        base.build(name, _cfg(**kw))


def test_factories_name_missing_second_paths(reference):
    _, folder, openclip, _ = reference
    with pytest.raises(ValueError, match=r"reward 'hpsv2' needs cfg\.tokenizer_path"):
        base.build("hpsv2", _cfg(path=openclip))
    with pytest.raises(ValueError, match=r"reward 'aesthetic' needs cfg\.head_path"):
        base.build("aesthetic", _cfg(path=folder))
