"""Flax T5 v1.1 / UMT5 encoders vs. transformers' T5EncoderModel / UMT5EncoderModel.

Tiny random models saved with `save_pretrained` (safetensors) and read by our
loader; sequences longer than `relative_attention_max_distance` so the
logarithmic and the clipped buckets are exercised.
"""

from __future__ import annotations

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from bpgo_jax.errors import WeightsError  # noqa: E402
from bpgo_jax.models.t5 import (  # noqa: E402
    T5Config,
    load_t5,
    relative_position_buckets,
    t5_config_from_dict,
)

TOL = 1e-5
SMALL = dict(
    vocab_size=64,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=3,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    feed_forward_proj="gated-gelu",
)
MODELS = {
    "t5": (transformers.T5Config, transformers.T5EncoderModel),
    "umt5": (transformers.UMT5Config, transformers.UMT5EncoderModel),
}

pytestmark = pytest.mark.xdist_group("test_t5_parity")


def _ids_and_mask() -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.RandomState(0).randint(2, 64, (3, 40)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 23:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = 0  # padding id, as a tokenizer writes it
    return ids, mask


@pytest.fixture(scope="module", params=sorted(MODELS))
def saved(request, tmp_path_factory):
    """(model_type, torch model, folder) for T5 and UMT5."""
    cfg_cls, model_cls = MODELS[request.param]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**SMALL)).eval()
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(str(folder), safe_serialization=True)
    return request.param, model, str(folder)


def _reference(model, ids, mask=None) -> np.ndarray:
    with torch.no_grad():
        m = None if mask is None else torch.tensor(mask)
        out = model(torch.tensor(ids, dtype=torch.long), attention_mask=m)
    return out.last_hidden_state.numpy()


def _close(ours, ref, tol=TOL):
    np.testing.assert_allclose(np.asarray(ours, np.float32), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "num_buckets,max_distance", [(32, 128), (8, 20), (64, 256)], ids=["xxl", "tiny", "wide"]
)
def test_bucket_table_equals_transformers(num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-700, 701)
    ref = T5Attention._relative_position_bucket(
        torch.tensor(rel), bidirectional=True, num_buckets=num_buckets, max_distance=max_distance
    ).numpy()
    np.testing.assert_array_equal(relative_position_buckets(rel, num_buckets, max_distance), ref)
    ref_causal = T5Attention._relative_position_bucket(
        torch.tensor(rel), bidirectional=False, num_buckets=num_buckets, max_distance=max_distance
    ).numpy()
    ours = relative_position_buckets(rel, num_buckets, max_distance, bidirectional=False)
    np.testing.assert_array_equal(ours, ref_causal)


def test_encoder_matches_transformers_with_and_without_mask(saved):
    model_type, model, folder = saved
    ids, mask = _ids_and_mask()
    module, params = load_t5(folder)
    assert module.cfg.bias_every_layer == (model_type == "umt5")
    apply = jax.jit(module.apply)
    unmasked = apply({"params": params}, jnp.asarray(ids))
    masked = apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    _close(unmasked, _reference(model, ids))
    _close(masked, _reference(model, ids, mask))
    # The mask changes the padded rows (the test tells masked from unmasked attention).
    assert np.abs(np.asarray(masked)[2] - np.asarray(unmasked)[2]).max() > 1e-2


def test_umt5_has_a_bias_table_in_every_block(saved):
    model_type, _, folder = saved
    _, params = load_t5(folder)
    owners = [
        name
        for name, block in params["encoder"].items()
        if "relative_attention_bias" in block.get("layer_0", {}).get("SelfAttention", {})
    ]
    assert owners == (["block_0"] if model_type == "t5" else ["block_0", "block_1", "block_2"])


def test_bf16_smoke(saved):
    _, model, folder = saved
    ids, mask = _ids_and_mask()
    module, params = load_t5(folder, dtype=jnp.bfloat16)
    assert jax.tree.leaves(params)[0].dtype == jnp.bfloat16
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
    ref = _reference(model, ids, mask)
    err = np.abs(np.asarray(out) - ref).max() / np.abs(ref).max()
    assert err < 3e-2, err  # bf16 weights and activations: ~1e-2 here


def test_tied_embedding_spellings(tmp_path):
    """Checkpoints with `encoder.embed_tokens.weight` only, with both names, and a full
    seq2seq `T5ForConditionalGeneration` (decoder and LM head skipped) all load."""
    torch.manual_seed(1)
    full = transformers.T5ForConditionalGeneration(transformers.T5Config(**SMALL)).eval()
    full.save_pretrained(str(tmp_path / "full"), safe_serialization=True)
    encoder = full.get_encoder()
    ids, mask = _ids_and_mask()
    with torch.no_grad():
        ref = encoder(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)
        ).last_hidden_state.numpy()
    state = {k: v.contiguous() for k, v in full.state_dict().items() if k.startswith("encoder.")}
    for name, tensors in [
        ("embed_only", state),
        ("both", {**state, "shared.weight": state["encoder.embed_tokens.weight"].clone()}),
    ]:
        (tmp_path / name).mkdir()
        shutil.copy(tmp_path / "full" / "config.json", tmp_path / name / "config.json")
        safetensors_torch.save_file(tensors, str(tmp_path / name / "model.safetensors"))
    module, _ = load_t5(str(tmp_path / "full"))
    apply = jax.jit(lambda p: module.apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask)))
    for name in ("full", "embed_only", "both"):
        _close(apply(load_t5(str(tmp_path / name))[1]), ref)


def test_missing_tensor_is_named(saved, tmp_path):
    _, model, folder = saved
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    del state["encoder.embed_tokens.weight"]  # tied to shared.weight
    del state["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
    shutil.copy(f"{folder}/config.json", tmp_path / "config.json")
    safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_1"):
        load_t5(str(tmp_path))


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_config_defaults_are_transformers(model_type):
    """`save_pretrained` may omit default-valued keys: ours must be transformers' defaults."""
    ref = MODELS[model_type][0]()
    ours = t5_config_from_dict({"model_type": model_type})
    for field in dataclasses.fields(T5Config):
        assert getattr(ours, field.name) == getattr(ref, field.name), field.name
    assert ours.dense_act_fn == ref.dense_act_fn and ours.is_gated == ref.is_gated_act
