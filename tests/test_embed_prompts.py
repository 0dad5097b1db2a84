"""The offline text-embedding cache: `launch/embed_prompts.py` end to end, and its reader.

One subprocess run of the command on a tiny FLUX folder (weights FSDP-sharded
over the 8 fake devices); reading the file back must give what running the
encoders gives, and a file written for other encoders, another length or
other prompts is refused with one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest
from commands import last_line, run_launch

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import text_folders  # noqa: E402

from bpgo_jax.errors import ConfigError, InputFileError  # noqa: E402
from bpgo_jax.models import text_cache  # noqa: E402
from bpgo_jax.models.text_stacks import load_text_stack  # noqa: E402

T5_LEN = 24
PROMPTS = ["a photo of a cat", "a red dog on the mat", "a photo of a cat", "a blue dog in snow"]
EVAL_PROMPTS = ["a red dog on the mat", "a cat in the snow"]
NEGATIVE = "a red mat"

pytestmark = pytest.mark.xdist_group("test_embed_prompts")


def _model_config(folder: Path, **extra) -> ml_collections.ConfigDict:
    fields = dict(name="flux", init=str(folder), dtype="float32", max_sequence_length=T5_LEN)
    return ml_collections.ConfigDict({**fields, **extra})


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(pipeline folder, prompt file, cache file) after one run of the command."""
    root = tmp_path_factory.mktemp("embed")
    folder = root / "flux"
    text_folders.flux_pipeline(folder, seed=4)
    prompts = root / "prompts.txt"
    prompts.write_text("".join(p + "\n" for p in PROMPTS))
    eval_prompts = root / "eval.jsonl"
    eval_prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in EVAL_PROMPTS))
    config = root / "config.py"
    config.write_text(
        "import ml_collections\n"
        "from bpgo_jax.configs.common import base_config\n\n\n"
        "def get_config():\n"
        "    c = base_config()\n"
        "    c.model = ml_collections.ConfigDict(\n"
        f"        dict(name='flux', init={str(folder)!r}, dtype='float32',"
        f" max_sequence_length={T5_LEN})\n"
        "    )\n"
        f"    c.prompts.path = {str(prompts)!r}\n"
        f"    c.eval.prompts_path = {str(eval_prompts)!r}\n"
        f"    c.sample.negative_prompt = {NEGATIVE!r}\n"
        "    c.mesh.shape = (1, -1)  # FSDP over the 8 devices: the weights load sharded\n"
        "    return c\n"
    )
    out = root / "cache.safetensors"
    done = run_launch(
        "embed_prompts.py",
        f"--config={config}",
        f"--out={out}",
        "--batch_size=3",
        "--compile_cache=",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert last_line(done.stdout).startswith("wrote embeddings of 5 prompts"), done.stdout
    return folder, prompts, out


def test_cache_reads_back_what_the_encoders_give(written):
    folder, _, out = written
    with text_cache.text_cache_from_config(_model_config(folder), str(out)) as cache:
        # Distinct prompts of the training and evaluation files, and the negative prompt.
        assert cache.prompts == (*dict.fromkeys(PROMPTS), EVAL_PROMPTS[1], NEGATIVE)
        assert NEGATIVE in cache and "a dog never embedded" not in cache
        assert sorted(cache.fields) == ["pooled_prompt_embeds", "prompt_embeds"]
        wanted = [PROMPTS[3], NEGATIVE, PROMPTS[0], EVAL_PROMPTS[1]]
        got = cache.lookup(wanted)
        rows = cache.rows(wanted)
        table = cache.table("prompt_embeds")
    stack, params = load_text_stack("flux", str(folder), max_sequence_length=T5_LEN)
    ref = jax.jit(stack.encode)(params, jnp.asarray(stack.tokenizer(wanted)))
    for key, value in ref.items():
        assert got[key].dtype == np.float32 and got[key].shape == value.shape
        np.testing.assert_allclose(got[key], np.asarray(value), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(table[rows], got["prompt_embeds"])
    # Distinct prompts have distinct embeddings (rows are not mixed up).
    assert np.abs(got["prompt_embeds"][0] - got["prompt_embeds"][2]).max() > 1e-2


def test_cache_of_other_encoders_or_length_is_refused(written, tmp_path):
    folder, _, out = written
    with pytest.raises(InputFileError) as err:
        text_cache.TextCache(
            out,
            expect=text_cache.identity_from_config(_model_config(folder, max_sequence_length=16)),
        )
    message = str(err.value)
    assert "\n" not in message and "max_sequence_length 24 (the config: 16)" in message
    # Other T5 weights (here: one changed byte at the end of the file) -> another fingerprint.
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    weights_file = other / "text_encoder_2" / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-1] ^= 0xFF
    weights_file.write_bytes(bytes(data))
    with pytest.raises(InputFileError, match="encoder 't5' of other weights"):
        text_cache.text_cache_from_config(_model_config(other), str(out))
    # The untouched copy has the same identity: the check reads files, not paths.
    shutil.copytree(folder, tmp_path / "same")
    text_cache.text_cache_from_config(_model_config(tmp_path / "same"), str(out)).close()


def test_missing_prompts_and_foreign_files_fail_by_name(written, tmp_path):
    folder, _, out = written
    with (
        text_cache.TextCache(out) as cache,
        pytest.raises(InputFileError, match="no embeddings for 1 prompt"),
    ):
        cache.lookup([PROMPTS[0], "a cat never embedded"])
    other = tmp_path / "plain.safetensors"
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(3, np.float32)}, str(other))
    with pytest.raises(InputFileError, match="not a text-embedding cache"):
        text_cache.TextCache(other)
    with pytest.raises(ConfigError, match="config.model.name='sd'"):
        text_cache.identity_from_config(ml_collections.ConfigDict(dict(name="sd", init="")))
    with pytest.raises(ConfigError, match="text_cache is not set"):
        text_cache.text_cache_from_config(_model_config(folder))


def test_bf16_storage_round_trip(tmp_path):
    """The streaming writer's file is valid safetensors (read by the library) in bf16."""
    rng = np.random.default_rng(0)
    prompts = ["one", "two", "three"]
    values = rng.standard_normal((3, 5, 4)).astype(np.float32)
    fields = {"prompt_embeds": ((5, 4), np.dtype(ml_dtypes.bfloat16))}
    path = tmp_path / "c.safetensors"
    batches = [{"prompt_embeds": values[:2]}, {"prompt_embeds": values[2:]}]
    text_cache.write_cache(path, prompts, batches, fields=fields, identity={"kind": "flux"})
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
        assert json.loads(meta["fields"]) == {"prompt_embeds": [[5, 4], "bfloat16"]}
        assert len(list(f.keys())) == 3
    with text_cache.TextCache(path, expect={"kind": "flux"}) as cache:
        got = cache.lookup(["three", "one"])["prompt_embeds"]
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got, values[[2, 0]].astype(ml_dtypes.bfloat16))
    with pytest.raises(ValueError, match="expected 3"):
        text_cache.write_cache(path, prompts, batches[:1], fields=fields, identity={})
    assert path.exists() and not (tmp_path / ".c.safetensors.tmp").exists()
