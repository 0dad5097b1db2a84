"""FLUX / SD3 / Wan text stacks vs. the diffusers pipelines' own prompt encoding.

Tiny random pipelines with real (tiny-vocabulary) tokenizers are saved with
`save_pretrained`; our stack loads the folder and encodes the same prompts
from text, so tokenization, truncation, masks and the stacking rules are all
compared, in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("diffusers")

import text_folders  # noqa: E402

from bpgo_jax.errors import ConfigError, WeightsError  # noqa: E402
from bpgo_jax.models.clip import load_clip_text  # noqa: E402
from bpgo_jax.models.text import HashTokenizer  # noqa: E402
from bpgo_jax.models.text_stacks import (  # noqa: E402
    clean_prompt,
    load_text_stack,
    stack_from_modules,
)
from bpgo_jax.parallel import mesh as mesh_lib  # noqa: E402

TOL = 1e-5
T5_LEN = 24  # longer than relative_attention_max_distance=20
PROMPTS = [
    "a photo of a cat",
    "a red dog on the mat in the snow with a blue cat on a red mat and a dog",  # CLIP and T5 cut it
    "",
    "  a &amp; dog\n\nin   snow ",  # Wan cleans it
]

pytestmark = pytest.mark.xdist_group("test_text_stacks")


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {
        "flux": (text_folders.flux_pipeline(root / "flux", seed=0), str(root / "flux")),
        "sd3": (text_folders.sd3_pipeline(root / "sd3", seed=1), str(root / "sd3")),
        "wan": (text_folders.wan_pipeline(root / "wan", seed=2), str(root / "wan")),
    }


_ENCODED: dict = {}


def _ours(kind: str, folder: str, **kw) -> dict[str, np.ndarray]:
    """Our stack's encoding of PROMPTS (computed once per folder and options)."""
    key = (kind, folder, tuple(sorted(kw.items())))
    if key not in _ENCODED:
        stack, params = load_text_stack(kind, folder, max_sequence_length=T5_LEN, **kw)
        out = jax.jit(stack.encode)(params, jnp.asarray(stack.tokenizer(PROMPTS)))
        _ENCODED[key] = {k: np.asarray(v) for k, v in out.items()}
    return _ENCODED[key]


def _close(ours: dict, ref: dict) -> None:
    assert sorted(ours) == sorted(ref)
    for key, value in ref.items():
        value = value.numpy()
        assert ours[key].shape == value.shape, key
        np.testing.assert_allclose(ours[key], value, atol=TOL, rtol=TOL, err_msg=key)


def test_flux_matches_pipeline(pipelines):
    pipe, folder = pipelines["flux"]
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=T5_LEN)
    ours = _ours("flux", folder)
    _close(ours, {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled})
    assert ours["prompt_embeds"].shape == (4, T5_LEN, 96)
    assert ours["pooled_prompt_embeds"].shape == (4, 32)  # CLIP-L width: pooler output


def test_sd3_matches_pipeline(pipelines):
    pipe, folder = pipelines["sd3"]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=T5_LEN
        )
    ours = _ours("sd3", folder)
    _close(ours, {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled})
    clip = text_folders.CLIP_LEN
    assert ours["prompt_embeds"].shape == (4, clip + T5_LEN, 96)
    assert ours["pooled_prompt_embeds"].shape == (4, 24 + 28)  # both projections
    # CLIP-L (32) and CLIP-G (40) states fill 72 channels; the rest is zero padding.
    assert not ours["prompt_embeds"][:, :clip, 72:].any()
    assert np.abs(ours["prompt_embeds"][:, :clip, 32:72]).min(axis=-1).max() > 0


def test_sd3_clip_skip_matches_pipeline(pipelines):
    pipe, folder = pipelines["sd3"]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPTS,
            None,
            None,
            do_classifier_free_guidance=False,
            max_sequence_length=T5_LEN,
            clip_skip=1,
        )
    _close(
        _ours("sd3", folder, clip_skip=1),
        {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled},
    )


def test_sd3_without_t5_matches_pipeline(tmp_path):
    pipe = text_folders.sd3_pipeline(tmp_path, seed=3, with_t5=False)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=T5_LEN
        )
    ours = _ours("sd3", str(tmp_path))
    _close(ours, {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled})
    assert not ours["prompt_embeds"][:, text_folders.CLIP_LEN :].any()


def test_wan_matches_pipeline_and_zeroes_past_each_prompt(pipelines):
    pipe, folder = pipelines["wan"]
    with torch.no_grad():
        embeds = pipe._get_t5_prompt_embeds(PROMPTS, max_sequence_length=T5_LEN)
    ours = _ours("wan", folder)
    _close(ours, {"prompt_embeds": embeds})
    lengths = pipe.tokenizer(
        [clean_prompt(p) for p in PROMPTS], padding="max_length", max_length=T5_LEN, truncation=True
    ).attention_mask
    for row, mask in zip(ours["prompt_embeds"], np.asarray(lengths), strict=True):
        n = int(mask.sum())
        assert not row[n:].any() and np.abs(row[:n]).sum(-1).min() > 0
    assert clean_prompt(PROMPTS[3]) == "a & dog in snow"


def test_clip_hidden_states_match_transformers(pipelines):
    pipe, folder = pipelines["sd3"]
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=16, truncation=True).input_ids
    with torch.no_grad():
        ref = pipe.text_encoder(torch.tensor(ids), output_hidden_states=True)
    module, params = load_clip_text(f"{folder}/text_encoder")
    apply = jax.jit(module.apply, static_argnames="output_hidden_states")
    last, embeds, hidden = apply(
        {"params": params}, jnp.asarray(ids, jnp.int32), output_hidden_states=True
    )
    assert len(hidden) == len(ref.hidden_states) == 4
    for ours, theirs in zip(hidden, ref.hidden_states, strict=True):
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=TOL, rtol=TOL)
    np.testing.assert_allclose(np.asarray(embeds), ref.text_embeds.numpy(), atol=TOL, rtol=TOL)
    # The penultimate state is not the last one after its norm: SD3 must ask for it.
    assert np.abs(np.asarray(hidden[-2]) - np.asarray(last)).max() > 1e-2


def test_sharded_load_equals_unsharded(pipelines):
    """Each tensor goes to the mesh rules' sharding under its encoder's name, and the
    FSDP-sharded stack encodes exactly what the single-device one does."""
    _, folder = pipelines["flux"]
    mesh = mesh_lib.make_mesh((1, 8), ("data", "fsdp"))
    seen = []
    place = mesh_lib.param_sharding_fn(mesh, ((".*", "fsdp_auto"),))

    def sharding_fn(path, shape):
        seen.append("/".join(path))
        return place(path, shape)

    stack, params = load_text_stack(
        "flux", folder, max_sequence_length=T5_LEN, sharding_fn=sharding_fn
    )
    assert "t5/shared/embedding" in seen and "clip_l/text_model/final_layer_norm/scale" in seen
    embedding = params["t5"]["shared"]["embedding"]
    assert embedding.sharding.shard_shape(embedding.shape)[1] == 96 // 8
    tokens = jnp.asarray(stack.tokenizer(PROMPTS))
    sharded = jax.jit(stack.encode)(params, tokens)
    plain = _ours("flux", folder)
    for key, value in plain.items():
        np.testing.assert_allclose(np.asarray(sharded[key]), value, atol=TOL, rtol=TOL)


def test_stack_tokenizer_layout(pipelines):
    _, folder = pipelines["sd3"]
    stack, _ = load_text_stack("sd3", folder, max_sequence_length=T5_LEN)
    tokens = stack.tokenizer(PROMPTS)
    assert tokens.dtype == np.int32 and tokens.shape == (4, 16 + 16 + T5_LEN)
    parts = stack.tokenizer.split(tokens)
    assert [v.shape[1] for v in parts.values()] == [16, 16, T5_LEN]
    assert stack.tokenizer.max_length == T5_LEN  # length checks report T5's truncation
    assert stack.tokenizer.count(PROMPTS[1]) > T5_LEN


def test_random_stack_from_modules():
    """A weight-free stack (random params) for benchmarks: shapes and finiteness."""
    from bpgo_jax.models.clip import CLIPTextModel
    from bpgo_jax.models.clip.config import TextConfig
    from bpgo_jax.models.t5 import T5Config, T5EncoderModel

    clip = CLIPTextModel(TextConfig(64, 32, 64, num_hidden_layers=2, max_position_embeddings=8))
    t5 = T5EncoderModel(
        T5Config(vocab_size=64, d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=2)
    )
    stack = stack_from_modules(
        "flux",
        {"clip_l": clip, "t5": t5},
        {"clip_l": HashTokenizer(64, 8), "t5": HashTokenizer(64, 12)},
        max_sequence_length=12,
    )
    params = stack.init(jax.random.key(0))
    out = jax.jit(stack.encode)(params, jnp.asarray(stack.tokenizer(["a cat", "two dogs"])))
    assert out["prompt_embeds"].shape == (2, 12, 48)
    assert out["pooled_prompt_embeds"].shape == (2, 32)
    assert all(np.isfinite(np.asarray(v)).all() for v in out.values())
    assert stack.output_shapes(params)["prompt_embeds"].shape == (12, 48)
    with pytest.raises(ConfigError, match="with_projection"):
        stack_from_modules("sd3", {"clip_l": clip, "clip_g": clip}, {}, joint_attention_dim=48)


def test_bad_folders_fail_by_name(pipelines, tmp_path):
    _, folder = pipelines["flux"]
    with pytest.raises(WeightsError, match="model_index.json"):
        load_text_stack("flux", str(tmp_path))
    with pytest.raises(WeightsError, match="text_encoder_3"):
        load_text_stack("sd3", folder)  # a FLUX folder has no third encoder
    with pytest.raises(ConfigError, match="kind='sdxl'"):
        load_text_stack("sdxl", folder)
