"""launch/compile.py and parallel/aot.py: a run's stages compiled for a TPU slice from shapes."""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys

import jax
import numpy as np
import pytest
from absl import flags

from bpgo_jax.cli import compile as compile_cli
from bpgo_jax.models import build_model
from bpgo_jax.parallel import aot

# TPU topologies come from libtpu (`pip install -e ".[tpu]"`, a Linux wheel).
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed"
)

# configs/image.py with a one-level UNet, two sampler steps and a file-free reward, so
# every stage compiles for a TPU slice in seconds.
SMALL_IMAGE = [
    "--config=configs/image.py",
    "--config.model.channels=(8,)",
    "--config.model.attn_levels=()",
    "--config.model.heads=2",
    "--config.model.text_depth=1",
    "--config.model.text_width=16",
    "--config.model.resolution=8",
    "--config.model.patch=1",
    "--config.sample.num_steps=2",
    "--config.train.timestep_window=(0,1)",
    "--config.train.micro_batch_size=32",
    "--config.train.kl_beta=0",
    "--config.rewards={'saturation': {'weight': 1.0}}",
]


COMMAND_FLAGS = ("topology", "num_slices", "devices", "hbm_gib", "stage", "attention")


def compile_command(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`launch/compile.py ARGS` in this process: (exit code, stdout, stderr)."""
    for name in list(flags.FLAGS):  # a fresh parse: config_flags adds a flag per override
        if name.split(".")[0] in ("config", *COMMAND_FLAGS):
            delattr(flags.FLAGS, name)
    compile_cli.define_flags()
    monkeypatch.setattr(sys, "argv", ["compile.py", *args])
    with pytest.raises(SystemExit) as exit_:
        compile_cli.run()
    out = capsys.readouterr()
    return exit_.value.code or 0, out.out, out.err


def small_image_config():
    from bpgo_jax.configs.image import get_config

    c = get_config()
    c.model.update(
        init="random",
        channels=(8,),
        attn_levels=(),
        heads=2,
        text_depth=1,
        text_width=16,
        resolution=8,
    )
    return c


def _totals(out: str) -> dict[str, float]:
    """Stage name -> its printed total bytes per device."""
    units = {"MiB": 2**20, "GiB": 2**30}
    found = re.findall(
        r"^(\w+): compiled in .*\n  memory per device: .*total ([\d.]+) (\w+)", out, re.M
    )
    return {name: float(v) * units[unit] for name, v, unit in found}


@needs_libtpu
def test_every_stage_compiles_for_a_tpu_slice_and_fits(monkeypatch, capsys):
    code, out, err = compile_command(monkeypatch, capsys, *SMALL_IMAGE, "--topology=v5e:2x2")
    assert code == 0, err[-2000:]
    assert "devices: TPU v5e:2x2, 4 x TPU v5 lite over 1 host(s), HBM 16.00 GiB" in out
    assert "mesh {'data': 4, 'fsdp': 1}" in out
    assert "accumulate=scan" in out  # the TPU's loop, not this CPU host's
    totals = _totals(out)
    assert set(totals) == {"rollout", "advantages", "shuffle", "update"}, out
    assert all(v > 0 for v in totals.values()), out
    assert len(re.findall(r"XLA's estimate [\d.e+-]+ s", out)) >= 2, out
    assert len(re.findall(r"of 16.00 GiB: fits$", out, re.M)) == 4, out
    assert out.rstrip().endswith(
        "fits TPU v5e:2x2: every stage compiled within 16.00 GiB per device"
    )
    # Data parallel: each device holds the whole model, as the run builds it.
    _, trainable, frozen = build_model(small_image_config().model, jax.random.key(0))
    resident = re.search(r"resident per device: trainable ([\d.]+) MiB, frozen ([\d.]+) MiB", out)
    assert float(resident[1]) == pytest.approx(aot.tree_bytes(trainable) / 2**20, abs=0.05)
    assert float(resident[2]) == pytest.approx(aot.tree_bytes(frozen) / 2**20, abs=0.05)


def test_cpu_devices_compile_the_host_loop_and_a_small_hbm_does_not_fit(monkeypatch, capsys):
    args = (*SMALL_IMAGE, "--devices=4", "--stage=update", "--hbm_gib=0.001")
    code, out, err = compile_command(monkeypatch, capsys, *args)
    assert code == 0, err[-2000:]
    assert "accumulate=host" in out
    totals = _totals(out)
    assert set(totals) == {"update_prepare", "update_accumulate", "update_finish"}, out
    assert all(v > 0 for v in totals.values())
    assert (
        "DOES NOT FIT 4 local cpu device(s): update_prepare, update_accumulate, update_finish"
        in out
    )


@needs_libtpu
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--topology=v5e:2x2", "--config.mesh.shape=(3,1)"),
            "error: mesh: mesh.shape (3, 1) needs 3 devices, 4 are available",
        ),
        (("--topology=v5x:2x2",), "error: --topology=v5x:2x2: 'v5x:2x2' is not a TPU topology"),
        (("--topology=v5e:3x3",), "error: --topology=v5e:3x3: topology 'v5e:3x3': "),
        (("--topology=v5e:2x2", "--devices=2"), "error: give --topology or --devices, not both"),
    ],
)
def test_an_impossible_mesh_or_topology_is_one_error_line(monkeypatch, capsys, args, message):
    code, out, err = compile_command(monkeypatch, capsys, *SMALL_IMAGE, *args)
    assert code == 1 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(message), err


@needs_libtpu
def test_each_tpu_generation_has_its_hbm_and_peak():
    """Chips by `device_kind`: v5p's is "TPU v5", which also prefixes v5e's "TPU v5 lite"."""
    expected = {
        "v4:2x2x1": (4, 32, 275.0),  # megacore: one device per chip
        "v5e:2x2": (4, 16, 197.0),
        "v5p:2x2x1": (4, 95, 459.0),
        "v6e:2x2": (4, 32, 918.0),
    }
    for name, (count, hbm, peak) in expected.items():
        devices = aot.topology_devices(name)
        assert len(devices) == count, name
        assert aot.hbm_bytes(devices[0]) == hbm * 2**30, name
        assert aot.peak_tflops(devices[0]) == peak, name
    assert aot.num_hosts(aot.topology_devices("v5p:2x2x2")) == 2
    two = aot.topology_devices("v5e:2x2", num_slices=2)
    assert sorted({d.slice_index for d in two}) == [0, 1]


def _model_config(name: str, **fields):
    """`config.model` of shipped config `name` with `fields` set."""
    model = importlib.import_module(f"bpgo_jax.configs.{name}").get_config().model
    model.update(fields)
    return model


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("image", {"lora": {"rank": 2, "alpha": 2.0, "targets": ()}}),
        ("sd_tiny_test", {"init": "random", "preset": "tiny"}),
        ("sd_tiny_test", {"init": "random", "preset": "tiny", "lora": {"rank": 0}}),
        ("flux_tiny_test", {"init": "random", "preset": "tiny"}),
        ("sd35_tiny_test", {"init": "random", "preset": "tiny", "lora": {"rank": 0}}),
    ],
)
def test_abstract_model_has_the_built_models_shapes(name, fields):
    cfg = _model_config(name, **fields)
    model, trainable, frozen = build_model(cfg, jax.random.key(0))
    abstract, a_trainable, a_frozen = aot.abstract_model(cfg)
    shapes = lambda tree: jax.tree.map(lambda x: (np.shape(x), np.dtype(x.dtype)), tree)
    assert shapes(a_trainable) == shapes(trainable)
    assert shapes(a_frozen) == shapes(frozen)
    assert abstract.latent_shape == model.latent_shape
    assert abstract.prediction_type == model.prediction_type


# A one-block Wan transformer (the tiny preset's widths), for the 14B presets' structure.
TINY_WAN = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=1,
)
TINY_WAN_VAE = dict(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1)


def test_abstract_wan_models_have_the_built_models_shapes(tmp_path):
    """Text-to-video, and Wan2.2 image-to-video's two experts (LoRA on one), from presets."""
    import json

    from PIL import Image

    lines = []
    for i, colour in enumerate(((200, 30, 30), (20, 160, 90))):
        Image.new("RGB", (20, 12), colour).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"prompt": f"prompt {i}", "image": f"{i}.png"}))
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    t2v = _model_config("wan_tiny_test", init="random", preset="tiny", vae=TINY_WAN_VAE)
    i2v = _model_config(
        "wan_i2v_tiny_test",
        init="random",
        preset="wan22_i2v_a14b",
        condition_prompts=str(tmp_path / "p.jsonl"),
        transformer=TINY_WAN,
        transformer_2=TINY_WAN,
        vae=TINY_WAN_VAE,
    )
    i2v.lora.update(rank=2, alpha=2.0, experts=("transformer_2",))
    for cfg, experts in ((t2v, {"transformer"}), (i2v, {"transformer", "transformer_2"})):
        model, trainable, frozen = build_model(cfg, jax.random.key(0))
        abstract, a_trainable, a_frozen = aot.abstract_model(cfg)
        shapes = lambda tree: jax.tree.map(lambda x: (np.shape(x), np.dtype(x.dtype)), tree)
        assert shapes(a_trainable) == shapes(trainable)
        assert shapes(a_frozen) == shapes(frozen)
        assert abstract.latent_shape == model.latent_shape
        assert experts <= set(a_frozen) | set(a_trainable)


def test_aesthetic_reward_without_files_is_clip_vit_l14_with_the_laion_head():
    import ml_collections

    cfg = ml_collections.ConfigDict(
        {"aesthetic": {"weight": 1.0, "path": None, "head_path": None, "dtype": "float32"}}
    )
    rewards, params, notes = aot.abstract_rewards(cfg)
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    # transformers' CLIPVisionModelWithProjection of openai/clip-vit-large-patch14.
    assert count(params["aesthetic"]["clip"]) == 303_966_208
    assert count(
        params["aesthetic"]["head"]
    ) == 768 * 1024 + 1024 * 128 + 128 * 64 + 64 * 16 + 16 + (1024 + 128 + 64 + 16 + 1)
    assert notes == ["reward aesthetic: its published architecture with abstract weights"]
    images = jax.ShapeDtypeStruct((2, 64, 64, 3), np.float32)
    scores = jax.eval_shape(rewards.score_jittable, params, images, {"aesthetic": {}})
    assert scores["aesthetic"].shape == (2,)


def test_tracing_for_a_tpu_picks_its_attention_kernel():
    from bpgo_jax.models import attention

    with aot.tracing_for("tpu"):
        assert attention.resolve("auto") == "splash"
    assert attention.resolve("auto") == "blocked"  # this CPU host's


@needs_libtpu
def test_a_program_larger_than_the_chip_is_reported_not_raised():
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(aot.topology_devices("v5e:2x2")).reshape(4, 1), ("data", "fsdp"))
    rows = NamedSharding(mesh, P("data"))
    fn = jax.jit(lambda x, w: jnp.tanh(x @ w) @ w.T, out_shardings=rows)
    x = jax.ShapeDtypeStruct((2**20, 8192), jnp.float32, sharding=rows)  # 8 GiB a chip
    w = jax.ShapeDtypeStruct((8192, 8192), jnp.float32, sharding=NamedSharding(mesh, P()))
    stage = aot.compile_stage("big", fn, (x, w), platform="tpu", mesh=mesh)
    assert stage.compiled is None and "RESOURCE_EXHAUSTED" in stage.error
    assert stage.outputs.shape == (2**20, 8192)
    (line,) = aot.report_lines(stage)
    assert line.startswith("big: does not compile: JaxRuntimeError: RESOURCE_EXHAUSTED")
    assert stage.flops == 2 * 2 * 2**20 * 8192 * 8192


@needs_libtpu
def test_splash_attention_sd_rollout_compiles_for_a_multi_chip_slice():
    """The tiny SD's rollout on 4 chips with model.attention=auto (splash): the calls whose
    batch the batch axes do not split run in a `shard_map` over the heads or replicated;
    GSPMD alone cannot partition the kernel ("Mosaic kernels cannot be automatically
    partitioned")."""
    config = importlib.import_module("bpgo_jax.configs.sd_tiny_test").get_config()
    config.model.update(init="random", preset="tiny", attention="auto")
    config.rewards = {"saturation": {"weight": 1.0}}
    config.sample.batch_size = config.train.micro_batch_size = 4
    config.mesh.shape = (-1, 1)
    run = aot.plan_run(config, aot.topology_devices("v5e:2x2"))
    (rollout,) = run.compile(["rollout"])
    assert rollout.compiled is not None, rollout.error
    assert "tpu_custom_call" in rollout.compiled.as_text()  # the Pallas kernel, not XLA's


@needs_libtpu
@pytest.mark.parametrize("name", ["flux_tiny_test", "wan_tiny_test"])
def test_splash_attention_dit_call_of_one_sample_compiles_for_a_multi_chip_slice(name):
    """A tiny DiT's network call on one sample (an evaluation of one prompt) over 4 chips,
    its parameters fsdp-sharded, with model.attention=splash."""
    import jax.numpy as jnp

    from bpgo_jax.parallel import mesh as mesh_lib

    cfg = _model_config(name, init="random", preset="tiny", attention="splash")
    mesh = mesh_lib.make_mesh((1, 4), devices=aot.topology_devices("v5e:2x2"))
    with aot.tracing_for("tpu"):
        model, trainable, frozen = aot.abstract_model(cfg)
        tokens = np.asarray(model.tokenize(["a red fox"]))
        cond = jax.eval_shape(model.encode_text, frozen, tokens)
    rules = ((".*", "fsdp_auto"),)
    trainable, frozen = (
        aot.placed(t, mesh_lib.tree_shardings(t, mesh, rules)) for t in (trainable, frozen)
    )
    repl = mesh_lib.replicated(mesh)
    x = jax.ShapeDtypeStruct((1, *model.latent_shape), jnp.float32, sharding=repl)
    t = jax.ShapeDtypeStruct((1,), jnp.float32, sharding=repl)
    fn = jax.jit(mesh_lib.on_mesh(model.predict, mesh))
    stage = aot.compile_stage(
        "predict", fn, (trainable, frozen, x, t, aot.placed(cond, repl)), platform="tpu", mesh=mesh
    )
    assert stage.compiled is not None, stage.error
    assert "tpu_custom_call" in stage.compiled.as_text()


def test_flops_are_reported_per_device_and_in_all():
    """XLA's cost analysis of an SPMD program is one device's share (on CPU as on TPU); the
    jaxpr's matmul count is the whole program's: each is printed per device and in all."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from bpgo_jax.parallel import mesh as mesh_lib

    mesh = mesh_lib.make_mesh((4, 1), devices=jax.devices()[:4])
    rows = NamedSharding(mesh, P("data"))
    x = jax.ShapeDtypeStruct((256, 128), jnp.float32, sharding=rows)
    w = jax.ShapeDtypeStruct((128, 64), jnp.float32, sharding=mesh_lib.replicated(mesh))
    fn = jax.jit(lambda x, w: x @ w, out_shardings=rows)
    stage = aot.compile_stage("matmul", fn, (x, w), platform="cpu", mesh=mesh)
    whole = 2 * 256 * 128 * 64
    assert stage.devices == 4 and stage.flops == whole
    assert stage.cost["flops"] == pytest.approx(whole / 4)  # XLA's: one device's rows
    line = aot.report_lines(stage)[2]
    per_device, in_all, xla, xla_all = (
        float(v) for v in re.findall(r"TFLOP \(([\d.e+-]+)\)", line)
    )
    assert line.startswith("  FLOPs per device: matmul ")
    assert (per_device, in_all) == pytest.approx((whole / 4, whole), rel=1e-4)
    assert (xla, xla_all) == pytest.approx((whole / 4, whole), rel=1e-4)


def test_matmul_flops_count_splash_blocks_and_shard_map_copies():
    """Splash's kernel body runs once per grid step, its `shard_map` body once per device:
    split over the batch, the count is XLA attention's; replicated, each copy counts."""
    import jax.numpy as jnp

    from bpgo_jax.models.attention import attention
    from bpgo_jax.parallel import mesh as mesh_lib

    def flops(impl: str, batch: int) -> int:
        q = jax.ShapeDtypeStruct((batch, 1024, 4, 128), jnp.float32)
        fn = lambda q: attention(q, q, q, implementation=impl, interpret=True)
        return aot.matmul_flops(jax.make_jaxpr(fn)(q).jaxpr)

    assert flops("xla", 8) == 2 * 2 * 8 * 4 * 1024 * 1024 * 128
    with jax.set_mesh(mesh_lib.make_mesh((4, 2))):
        assert flops("splash", 8) == flops("xla", 8)  # each device one sample
        assert flops("splash", 1) == 2 * flops("xla", 1)  # heads over data, 2 fsdp copies
