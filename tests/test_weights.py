"""The weight-loading layer: shipped msgpack weights, bad files, safetensors layouts and errors."""

from __future__ import annotations

import json
import pathlib
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import msgpack
import numpy as np
import pytest
from flax import traverse_util
from tiny_config import tiny_config

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from bpgo_jax.errors import WeightsError  # noqa: E402
from bpgo_jax.models import build_model, load_params, save_params, weights  # noqa: E402
from bpgo_jax.models.tiny import tiny_model  # noqa: E402
from bpgo_jax.world import reward_model as rm  # noqa: E402

# Its module-scoped fixtures build once: keep the file on one xdist worker.
pytestmark = pytest.mark.xdist_group("test_weights")

ASSETS = rm.DEFAULT_PATH.parent
PROMPTS = [
    "a red circle",
    "two blue squares left of a green triangle",
    "",
    "a big yellow star above a small purple box",
]

# ---------------------------------------------------------------- shipped weights

# What the shipped files computed for PROMPTS (and the inputs below) before the
# generator's text encoder and WorldCLIP's text tower became one module: the
# parameter trees and the numerics must not change under the assets.
GEN_HIDDEN = [  # encode_text(...)["hidden"][:, 1, :4]
    -0.07050706, -0.19366618, -0.019843873, 0.05942969,
    -0.03818922, -0.23730503, 0.016798029, 0.0009124462,
    -0.059525058, 0.5071033, 0.115601584, 0.38599244,
    -0.06767763, -0.27364802, -0.086841255, 0.113318615,
]  # fmt: skip
GEN_HIDDEN_ABS_SUM = [1025.412, 1006.465, 1046.52, 1004.628]
GEN_PRED = [  # predict(...)[:, 10, 20]
    2.7301617, 0.90699553, -1.3148341,
    2.2068858, 1.8491083, 2.075927,
    2.604813, -0.12133202, -0.16769561,
    -1.0335594, 0.09205356, -0.93203324,
]  # fmt: skip
GEN_PRED_ABS_SUM = [5662.406, 5264.355, 3839.561, 2869.324]
RM_LOGITS = [  # pair_logits [image, caption]
    -7.346548, -15.822904, -14.524206, -5.6279483,
    -15.305407, -12.523056, -13.994689, -10.43676,
    -15.65274, -8.7315445, -12.553687, -8.631277,
    -10.085116, -13.85183, -12.498475, -11.168102,
]  # fmt: skip
RM_TEXT = [  # embed_text(...)[:, :4]
    0.08616868, -0.30323806, 0.093805924, 0.01730118,
    0.14542729, 0.12574117, -0.17291677, -0.011391952,
    -0.046285685, -0.21692488, -0.022618087, 0.03202327,
    -0.053418487, -0.064431414, -0.180359, 0.18689336,
]  # fmt: skip


def _close(got, want, tol=1e-5):
    np.testing.assert_allclose(np.ravel(got), want, rtol=tol, atol=tol)


def test_shipped_generator_computes_what_it_computed():
    info = json.loads((ASSETS / "generator.json").read_text())
    model = tiny_model(ml_collections.ConfigDict(info["model"]))
    # Strict: every tensor of the model, with its shape, and no other.
    like = jax.eval_shape(model.init, jax.random.key(0))
    trainable, frozen = load_params(ASSETS / "generator.msgpack", like)
    tokens = jnp.asarray(model.tokenize(PROMPTS))
    cond = jax.jit(model.encode_text)(frozen, tokens)
    hidden = np.asarray(cond["hidden"])
    _close(hidden[:, 1, :4], GEN_HIDDEN)
    _close(np.abs(hidden.astype(np.float64)).sum((1, 2)), GEN_HIDDEN_ABS_SUM)
    x = np.random.RandomState(0).randn(4, *model.latent_shape).astype(np.float32)
    t = np.array([0.0, 250.0, 600.0, 999.0], np.float32)
    pred = np.asarray(jax.jit(model.predict)(trainable, frozen, x, t, cond))
    _close(pred[:, 10, 20], GEN_PRED, 1e-4)
    _close(np.abs(pred.astype(np.float64)).sum((1, 2, 3)), GEN_PRED_ABS_SUM, 1e-4)


def test_shipped_reward_model_computes_what_it_computed():
    params, cfg = rm.load()
    like = jax.eval_shape(lambda: rm.init_params(cfg, jax.random.key(0)))
    weights.load_msgpack(rm.DEFAULT_PATH, like)  # the tree's names and shapes, strictly
    yy, xx = np.mgrid[0:32, 0:32] / 32.0
    images = [
        np.stack([np.sin(3 * xx + k), np.cos(2 * yy - k), (xx * yy + 0.1 * k) % 1.0], -1)
        for k in range(4)
    ]
    images = np.stack(images).astype(np.float32) * 0.5 + 0.25
    tokens = jnp.asarray(rm.tokenizer(cfg)(PROMPTS))
    logits = jax.jit(rm.pair_logits, static_argnums=1)(params, cfg, images, tokens)
    _close(logits, RM_LOGITS)
    embed = lambda p, t: rm.WorldCLIP(cfg).apply({"params": p}, t, method=rm.WorldCLIP.embed_text)
    _close(np.asarray(jax.jit(embed)(params, tokens))[:, :4], RM_TEXT)
    scores = jax.jit(rm.score, static_argnums=1)(params, cfg, images, tokens)
    np.testing.assert_allclose(scores, jax.nn.sigmoid(jnp.diag(logits)), rtol=1e-5)


# ---------------------------------------------------------------- built-in msgpack files


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """`(like, path, params)`: a small built-in model's parameter shapes, and random
    params of those shapes saved at `path`."""
    folder = tmp_path_factory.mktemp("small")
    like = jax.eval_shape(tiny_model(tiny_config(folder).model).init, jax.random.key(0))
    rs = np.random.RandomState(0)
    params = jax.tree.map(lambda s: rs.standard_normal(s.shape).astype(s.dtype), like)
    path = folder / "g.msgpack"
    save_params(path, *params)
    return like, path, params


def _tree_bytes(trainable, frozen) -> bytes:
    from flax import serialization

    return serialization.to_bytes({"trainable": trainable, "frozen": frozen})


def _write_bad(case: str, tmp_path, small) -> object:
    """A file (or folder) that is not the small model's params, by `case`."""
    like, good, _ = small
    path = tmp_path / f"{case}.msgpack"
    data = good.read_bytes()
    zeros = lambda s: np.zeros(s.shape, s.dtype)
    params = jax.tree.map(zeros, {"trainable": like[0], "frozen": like[1]})
    if case == "missing":
        pass
    elif case == "directory":
        path.mkdir()
    elif case == "torch_zip":
        torch.save({"w": torch.zeros(2)}, path)
    elif case == "torch_legacy":
        torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    elif case == "pickle":
        path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    elif case == "random":
        path.write_bytes(np.random.RandomState(0).bytes(1000))
    elif case == "text":
        path.write_text('{"trainable": {}}\n')
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif case == "not_a_dict":
        path.write_bytes(msgpack.packb([1, 2, 3]))
    elif case == "other_model":
        path = rm.DEFAULT_PATH
    elif case == "missing_tensor":
        del params["frozen"]["text"]["ln_final"]
        path.write_bytes(_tree_bytes(params["trainable"], params["frozen"]))
    elif case == "extra_tensor":
        params["frozen"]["text"]["attn_1"] = {"bias": np.zeros(3, np.float32)}
        path.write_bytes(_tree_bytes(params["trainable"], params["frozen"]))
    elif case == "wrong_shape":
        params["trainable"]["unet"]["conv_in"]["bias"] = np.zeros(5, np.float32)
        path.write_bytes(_tree_bytes(params["trainable"], params["frozen"]))
    return path


BAD_FILES = {
    "missing": r"weights file \S+ does not exist",
    "directory": r"is a directory \(the built-in model reads a \.msgpack file; diffusers "
    r"folders are for model\.name=sd\)",
    "torch_zip": r"is a pickle/torch file \(refused: unpickling can run arbitrary code",
    "torch_legacy": r"is a pickle/torch file \(refused",
    "pickle": r"is a pickle/torch file \(refused",
    "random": r"is not a msgpack params file \(",
    "text": r"is not a msgpack params file \(ExtraData",
    "empty": r"is empty",
    "truncated": r"is truncated: its msgpack data ends after \d+ bytes",
    "not_a_dict": r"is not a msgpack params file \(it holds a list",
    "other_model": r"holds \['image_tower', .*\], not the trees \['frozen', 'trainable'\]",
    "missing_tensor": r": missing tensor\(s\) \['frozen'\]\['text'\]\['ln_final'\]\['bias'\]",
    "extra_tensor": r": unexpected tensor\(s\) \['frozen'\]\['text'\]\['attn_1'\]\['bias'\]",
    "wrong_shape": r": tensor \['trainable'\]\['unet'\]\['conv_in'\]\['bias'\] has shape \(5,\), "
    r"the model config expects \(8,\)",
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_load_params_names_the_file_and_what_is_wrong(case, tmp_path, small):
    path = _write_bad(case, tmp_path, small)
    with pytest.raises(WeightsError, match=BAD_FILES[case]) as info:
        load_params(path, small[0])
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_load_params_round_trip_and_config_field(small, tmp_path):
    like, path, params = small
    jax.tree.map(np.testing.assert_array_equal, load_params(path, like), params)
    cfg = tiny_config(tmp_path).model
    cfg.init = str(path)  # config.model.init reads the same, without a random init first
    _, trainable, frozen = build_model(cfg, jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, (trainable, frozen), params)
    cfg.init = str(tmp_path)
    with pytest.raises(WeightsError, match=r"^config\.model\.init: weights file .* is a directory"):
        build_model(cfg, jax.random.key(0))


def test_save_params_cut_short_keeps_the_previous_file(small, tmp_path, monkeypatch):
    like, _, params = small
    path = tmp_path / "g.msgpack"
    save_params(path, *params)
    write_bytes = pathlib.Path.write_bytes

    def half_then_fail(self, data):  # a full disk, or a kill mid-write
        write_bytes(self, data[: len(data) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_bytes", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_params(path, *jax.tree.map(lambda a: a + 1, params))
    monkeypatch.undo()
    jax.tree.map(np.testing.assert_array_equal, load_params(path, like), params)


# ---------------------------------------------------------------- safetensors


class TorchNet(torch.nn.Module):
    """Embedding, Conv1d/2d/3d, LayerNorm and Linear, with a list index in a name."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.conv1d = torch.nn.Conv1d(4, 3, 3, padding=1)
        self.blocks = torch.nn.ModuleList([torch.nn.Conv2d(4, 5, 3, padding=1)])
        self.conv3d = torch.nn.Conv3d(4, 6, (2, 3, 3), padding=(0, 1, 1))
        self.norm = torch.nn.LayerNorm(3)
        self.head = torch.nn.Linear(3, 2)

    def forward(self, ids, image, video):
        seq = self.conv1d(self.embed(ids).transpose(1, 2)).transpose(1, 2)
        return self.head(self.norm(seq)), self.blocks[0](image), self.conv3d(video)


class FlaxNet(nn.Module):
    """`TorchNet` in Flax (channels last), named so the torch names map onto it."""

    @nn.compact
    def __call__(self, ids, image, video):
        seq = nn.Conv(3, (3,), padding=((1, 1),), name="conv1d")(nn.Embed(10, 4, name="embed")(ids))
        out = nn.Dense(2, name="head")(nn.LayerNorm(epsilon=1e-5, name="norm")(seq))
        image = nn.Conv(5, (3, 3), padding=((1, 1), (1, 1)), name="blocks_0")(image)
        pad = ((0, 0), (1, 1), (1, 1))
        return out, image, nn.Conv(6, (2, 3, 3), padding=pad, name="conv3d")(video)


def _inputs():
    rs = np.random.RandomState(0)
    ids = rs.randint(0, 10, (2, 7))
    image = rs.randn(2, 6, 6, 4).astype(np.float32)  # NHWC
    video = rs.randn(2, 3, 5, 5, 4).astype(np.float32)  # NDHWC
    return ids, image, video


@pytest.fixture(scope="module")
def torch_net(tmp_path_factory):
    torch.manual_seed(0)
    net = TorchNet().eval()
    path = str(tmp_path_factory.mktemp("net") / "net.safetensors")
    safetensors_torch.save_file(net.state_dict(), path)
    return net, path


def _expected():
    return weights.expected_shapes(FlaxNet(), *_inputs())


def _save(tensors: dict, path) -> str:
    safetensors_torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def test_linear_and_conv_1d_2d_3d_layouts_match_torch(torch_net):
    """Linear [out, in], Conv OIW / OIHW / OIDHW, Embedding and LayerNorm through the loader."""
    net, path = torch_net
    with weights.open_tensors(path) as reader:
        params = weights.read_params(reader, _expected())
    assert params["conv3d"]["kernel"].shape == (2, 3, 3, 4, 6)  # DHWIO
    assert set(params["norm"]) == {"scale", "bias"} and "embedding" in params["embed"]
    ids, image, video = _inputs()
    ours = FlaxNet().apply({"params": params}, ids, image, video)
    with torch.no_grad():
        ref = net(
            torch.tensor(ids),
            torch.tensor(image).permute(0, 3, 1, 2),
            torch.tensor(video).permute(0, 4, 1, 2, 3),
        )
    ref = (ref[0], ref[1].permute(0, 2, 3, 1), ref[2].permute(0, 2, 3, 4, 1))
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=1e-5, rtol=1e-5)


def test_cast_and_placement_one_tensor_at_a_time(torch_net):
    _, path = torch_net
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
    seen = []

    def sharding_fn(path, shape):
        seen.append(path)
        split = shape and shape[-1] % len(jax.devices()) == 0
        spec = (None,) * (len(shape) - 1) + ("x",) if split else ()
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    with weights.open_tensors(path) as reader:
        params = weights.read_params(
            reader, _expected(), prefix=("net",), dtype=jnp.bfloat16, sharding_fn=sharding_fn
        )
    assert sorted(seen) == sorted(("net", *p) for p in _expected())
    for leaf in jax.tree.leaves(params):
        assert leaf.dtype == jnp.bfloat16 and leaf.sharding.mesh == mesh


def test_unknown_missing_and_misshaped_tensors_name_key_and_file(torch_net, tmp_path):
    net, _ = torch_net
    sd = dict(net.state_dict())
    cases = {
        "extra": ({**sd, "blocks.1.weight": torch.zeros(3)}, r"unexpected tensor 'blocks\.1\.weight' in \S+extra\.safetensors \(the model config has no blocks_1/weight\)"),  # noqa: E501
        "missing": ({k: v for k, v in sd.items() if k != "blocks.0.bias"}, r"missing tensor\(s\) blocks\.0\.bias in \S+missing\.safetensors"),  # noqa: E501
        "shape": ({**sd, "conv3d.weight": torch.zeros(6, 4, 1, 3, 3)}, r"tensor 'conv3d\.weight' in \S+shape\.safetensors has shape \(6, 4, 1, 3, 3\), expected \(6, 4, 2, 3, 3\) \(the model config expects \(2, 3, 3, 4, 6\) in Flax layout\)"),  # noqa: E501
    }  # fmt: skip
    for name, (tensors, message) in cases.items():
        path = _save(tensors, tmp_path / f"{name}.safetensors")
        with pytest.raises(WeightsError, match=message), weights.open_tensors(path) as reader:
            weights.read_params(reader, _expected())


def test_sharded_variant_folder_and_raw_byte_dtypes(torch_net, tmp_path):
    """`model.safetensors.index.fp16.json` + shards; bfloat16 / float8 read from the bytes."""
    net, _ = torch_net
    sd = net.state_dict()
    half = sorted(sd)[: len(sd) // 2]
    shards = {
        "model-00001-of-00002.fp16.safetensors": {k: sd[k].bfloat16() for k in half},
        "model-00002-of-00002.fp16.safetensors": {
            k: sd[k].to(torch.float8_e4m3fn) for k in sd if k not in half
        },
    }
    weight_map = {}
    for file, tensors in shards.items():
        _save(tensors, tmp_path / file)
        weight_map.update(dict.fromkeys(tensors, file))
    (tmp_path / "model.safetensors.index.fp16.json").write_text(
        json.dumps({"weight_map": weight_map})
    )
    with pytest.raises(WeightsError, match=r"missing file .*model\.safetensors .*pass variant"):
        weights.safetensors_files(str(tmp_path))
    with weights.open_tensors(str(tmp_path), variant="fp16") as reader:
        params = weights.read_params(reader, _expected())
        assert reader.get(half[0]).dtype == jnp.bfloat16
    assert len(jax.tree.leaves(params)) == len(sd)
    embed = np.asarray(params["embed"]["embedding"])  # bfloat16 shard, or float8 shard
    stored = sd["embed.weight"]
    stored = stored.bfloat16() if "embed.weight" in half else stored.to(torch.float8_e4m3fn)
    np.testing.assert_array_equal(embed, stored.float().numpy())
    (tmp_path / "model-00002-of-00002.fp16.safetensors").unlink()
    with pytest.raises(
        WeightsError, match=r"missing file \S+model-00002-of-00002\.fp16\..* \(listed in"
    ):
        weights.safetensors_files(str(tmp_path), variant="fp16")


def test_pickles_and_foreign_files_are_refused(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "model.pt")
    with pytest.raises(WeightsError, match=r"refusing pickle checkpoint \S+model\.pt .*save_file"):
        weights.safetensors_files(str(tmp_path / "model.pt"))
    folder = tmp_path / "folder"
    folder.mkdir()
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"refusing pickle checkpoint \S+pytorch_model\.bin"):
        weights.safetensors_files(str(folder))
    disguised = tmp_path / "disguised.safetensors"  # a torch file under a safetensors name
    torch.save({"w": torch.zeros(1)}, disguised)
    match = r"refusing pickle checkpoint \S+disguised"
    with pytest.raises(WeightsError, match=match), weights.open_tensors(str(disguised)):
        pass
    # A real safetensors file whose header size (0x380) starts like a pickle stream.
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    header["__metadata__"] = {"pad": ""}
    header["__metadata__"]["pad"] = "x" * (0x380 - len(json.dumps(header)))
    raw = json.dumps(header).encode()
    lookalike = tmp_path / "lookalike.safetensors"
    lookalike.write_bytes(len(raw).to_bytes(8, "little") + raw + np.float32([1.5, 2.5]).tobytes())
    assert lookalike.read_bytes()[:2] == b"\x80\x03"
    with weights.open_tensors(str(lookalike)) as reader:
        np.testing.assert_array_equal(reader.get("w"), [1.5, 2.5])
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    match = r"\S+corrupt\.safetensors is not a readable"
    with pytest.raises(WeightsError, match=match), weights.open_tensors(str(corrupt)):
        pass
    with pytest.raises(WeightsError, match=r"checkpoint \S+nowhere does not exist"):
        weights.safetensors_files(str(tmp_path / "nowhere"))


def test_a_tensor_in_two_shards_is_an_error(tmp_path):
    for name in ("a", "b"):
        _save({"head.bias": torch.zeros(2)}, tmp_path / f"model-{name}.safetensors")
    index = {"weight_map": {"head.bias": "model-a.safetensors", "x": "model-b.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    match = r"tensor 'head\.bias' is in both \S+model-a\S+ and"
    with pytest.raises(WeightsError, match=match), weights.open_tensors(str(tmp_path)):
        pass


def test_torch_names_invert_flax_paths():
    for name in ("down_blocks.0.attentions.1.to_out.0.weight", "time_embedding.linear_1.bias"):
        path = weights.flax_path(name)
        assert weights.torch_name(path) == name
    assert weights.flax_path("blocks.10.ffn.2.bias") == ("blocks_10", "ffn_2", "bias")
    assert weights.torch_shape("kernel", (2, 3, 3, 4, 6)) == (6, 4, 2, 3, 3)
    assert weights.torch_shape("kernel", (4, 6)) == (6, 4)


def test_a_split_tensor_is_read_by_slice_each_slice_once(tmp_path, monkeypatch):
    """A kernel split over 4 of 8 devices (replicated over the other 2) is read as its 4
    quarters, in every stored dtype and layout, and equals the whole read."""
    rng = np.random.default_rng(0)
    stored = {
        "proj.weight": torch.tensor(rng.standard_normal((16, 8)), dtype=torch.float32),
        "conv.weight": torch.tensor(rng.standard_normal((16, 4, 3, 3))).bfloat16(),
        "conv.bias": torch.tensor(rng.standard_normal(16), dtype=torch.float16),
        "scale": torch.tensor(2.5),
    }
    path = _save(stored, tmp_path / "split.safetensors")
    expected = {
        ("proj", "kernel"): jax.ShapeDtypeStruct((8, 16), jnp.float32),
        ("conv", "kernel"): jax.ShapeDtypeStruct((3, 3, 4, 16), jnp.float32),
        ("conv", "bias"): jax.ShapeDtypeStruct((16,), jnp.float32),
        ("scale",): jax.ShapeDtypeStruct((), jnp.float32),
    }
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))

    def sharding_fn(path, shape):  # the last (output) axis over "a"
        spec = (None,) * (len(shape) - 1) + ("a",) if shape else ()
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    reads = []
    read_slice = weights.TensorReader.read_slice

    def counted(self, name, index):
        part = read_slice(self, name, index)
        reads.append((name, part.shape))
        return part

    monkeypatch.setattr(weights.TensorReader, "read_slice", counted)
    with weights.open_tensors(path) as reader:
        sharded = weights.read_params(reader, expected, sharding_fn=sharding_fn)
        whole = weights.read_params(reader, expected)
    assert sorted(reads) == sorted(
        [("proj.weight", (4, 8))] * 4 + [("conv.weight", (4, 4, 3, 3))] * 4
        + [("conv.bias", (4,))] * 4
    )  # fmt: skip
    flat_sharded = traverse_util.flatten_dict(sharded)
    for key, value in traverse_util.flatten_dict(whole).items():
        assert flat_sharded[key].sharding.spec == sharding_fn(key, value.shape).spec
        np.testing.assert_array_equal(np.asarray(flat_sharded[key]), np.asarray(value))
    np.testing.assert_array_equal(
        np.asarray(whole["conv"]["kernel"]),
        stored["conv.weight"].float().numpy().transpose(2, 3, 1, 0),
    )
