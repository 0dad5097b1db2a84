"""The `context` mesh axis (sequence parallelism): a DiT's tokens split over it give the
single-device forward pass and gradients, and batch placement ignores it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bpgo_jax.models.attention import SplashLayout, attention, splash_layout
from bpgo_jax.parallel import mesh as mesh_lib

AXES = ("data", "fsdp", "context")


def _wan(frames: int = 5, side: int = 32):
    """Tiny Wan (2 heads, 2 blocks): 5 frames of 32 x 32 are 2 x 2 x 2 = 8 video tokens."""
    from bpgo_jax.models.wan import preset, wan_model

    return wan_model(preset("tiny"), num_frames=frames, resolution=side, max_sequence_length=8)


def _inputs(model, frozen, batch: int):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, *model.latent_shape)), jnp.float32)
    t = jnp.asarray(rng.uniform(0.1, 0.9, (batch,)), jnp.float32)
    tokens = model.tokenize(["a red fox", "snow on a hill", "a lamp", "two boats"][:batch])
    cond = jax.jit(model.encode_text)(frozen, tokens)
    return x, t, cond


def _forward_and_grad(model):
    def loss(trainable, frozen, x, t, cond):
        out = model.predict(trainable, frozen, x, t, cond)
        return jnp.mean(out * jnp.cos(out)), out

    return jax.value_and_grad(loss, has_aux=True)


@pytest.mark.parametrize("shape", [(1, 2, 4), (2, 1, 4)])
def test_wan_forward_and_gradient_with_a_context_axis_equal_one_devices(shape):
    model, trainable, frozen = _wan()
    x, t, cond = _inputs(model, frozen, batch=2)
    fn = _forward_and_grad(model)
    (want_loss, want_out), want_grad = jax.jit(fn)(trainable, frozen, x, t, cond)

    mesh = mesh_lib.make_mesh(shape, AXES)
    rows, repl = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
    assert rows.spec == P(("data", "fsdp"))  # the batch is not split over `context`
    args = jax.device_put((trainable, frozen), repl) + jax.device_put((x, t, cond), rows)
    sharded = jax.jit(mesh_lib.on_mesh(fn, mesh))
    hlo = sharded.lower(*args).as_text()
    assert "context" in hlo  # the tokens' constraints are in the program
    (loss, out), grad = sharded(*args)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, want_out, rtol=1e-4, atol=1e-5)
    for got, want in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad), strict=True):
        scale = max(1.0, float(jnp.abs(want).max()))
        np.testing.assert_allclose(got, want, atol=1e-5 * scale)


def test_tokens_are_split_over_context_only_under_a_mesh_that_has_it():
    x = jnp.arange(2 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 3)
    assert mesh_lib.shard_tokens(x) is x  # no mesh: nothing to constrain
    for shape, axes, spec in (
        ((4, 2), mesh_lib.BATCH_AXES, None),
        ((2, 1, 4), AXES, P("data", "context")),
        ((1, 2, 4), AXES, P("fsdp", "context")),
    ):
        mesh = mesh_lib.make_mesh(shape, axes)
        split = jax.jit(mesh_lib.on_mesh(mesh_lib.shard_tokens, mesh))
        out = split(jax.device_put(x, mesh_lib.replicated(mesh)))
        np.testing.assert_array_equal(out, x)
        if spec is not None:
            assert out.sharding.spec == spec
    mesh = mesh_lib.make_mesh((2, 1, 4), AXES)
    one = jax.device_put(x[:1], mesh_lib.replicated(mesh))  # a batch of 1: only the tokens split
    assert jax.jit(mesh_lib.on_mesh(mesh_lib.shard_tokens, mesh))(one).sharding.spec == P(
        None, "context"
    )
    assert mesh_lib.num_batch_shards(mesh) == 2 and mesh_lib.context_size(mesh) == 4


def _qkv(b, lq, lk, h, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32) for n in (lq, lk, lk))


@pytest.mark.parametrize(
    ("b", "lq", "h", "causal", "layout"),
    [
        (1, 520, 2, False, ((), ("data",), "context")),  # one sample: queries over context
        (4, 300, 4, False, (("data",), ("context",), None)),  # too short to split: heads
        (2, 40, 3, True, (("data",), (), None)),  # causal, 3 heads: context computes all
    ],
)
def test_splash_under_a_context_mesh_matches_xla(b, lq, h, causal, layout):
    """Interpreted splash in its `shard_map` over a (2, 1, 4) mesh, forward and gradients."""
    mesh = mesh_lib.make_mesh((2, 1, 4), AXES)
    q, k, v = _qkv(b, lq, lq, h)
    mask = jnp.asarray(np.random.default_rng(1).random((b, lq)) > 0.2).at[:, 0].set(True)
    with jax.set_mesh(mesh):
        assert splash_layout(b, h, lq, causal) == SplashLayout(*layout)

    def loss(impl):
        def f(q, k, v, m):
            out = attention(q, k, v, mask=m, causal=causal, implementation=impl, interpret=True)
            return jnp.sum(out * jnp.cos(out)), out

        return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)

    placed = jax.device_put((q, k, v, mask), NamedSharding(mesh, P()))
    (_, got), got_grad = jax.jit(mesh_lib.on_mesh(loss("splash"), mesh))(*placed)
    (_, want), want_grad = jax.jit(loss("xla"))(q, k, v, mask)
    np.testing.assert_allclose(got, want, atol=2e-6)
    for a, w in zip(got_grad, want_grad, strict=True):
        np.testing.assert_allclose(a, w, atol=2e-5)


def test_model_step_compiles_a_tiny_wan_with_a_context_axis():
    """benchmarks/model_step.py on a Wan preset over data x fsdp x context: both steps
    compile, FLOPs per device are the whole program's over the 8 devices."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "model_step.py"
    args = [
        "--preset=wan_tiny",
        "--resolution=32x32",
        "--frames=5",
        "--lora_rank=2",
        "--remat=full",
        "--dtype=float32",
        "--devices=8",
        "--config=configs/wan_tiny_test.py",
        "--config.mesh.shape=(1,2,4)",
        "--config.mesh.axes=('data','fsdp','context')",
        "--batch=2",
        "--hbm_gib=80",
    ]
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "mesh {'data': 1, 'fsdp': 2, 'context': 4} over 8 device(s), 80.00 GiB" in out
    found = re.findall(
        r"matmul [\d.]+ TFLOP \(([\d.e+]+)\) .*?8 device\(s\): [\d.]+ TFLOP \(([\d.e+]+)\)", out
    )
    assert len(found) == 2, out
    for per_device, whole in found:
        assert float(per_device) == pytest.approx(float(whole) / 8, rel=1e-3)
    assert len(re.findall(r"in a run, per device: .* of 80.00 GiB: fits", out)) == 2, out


def test_a_context_axis_does_not_split_the_batch_in_the_config_checks():
    """`config.validate` counts batch shards without `context`: 8 devices as 2 x 4 context
    hold a micro-batch of 4, as 8 x 1 they do not."""
    from bpgo_jax.config import validate
    from bpgo_jax.configs.image import get_config
    from bpgo_jax.errors import ConfigError

    config = get_config()
    config.sample.batch_size, config.train.micro_batch_size = 8, 4
    config.mesh.shape, config.mesh.axes = (2, 1, -1), AXES
    validate(config, num_devices=8)
    config.mesh.shape, config.mesh.axes = (8, 1), mesh_lib.BATCH_AXES
    with pytest.raises(ConfigError, match="micro_batch_size=4 must be divisible by the 8 batch"):
        validate(config, num_devices=8)
    config.mesh.shape, config.mesh.axes = (2, 4), ("data", "contxt")
    with pytest.raises(ConfigError, match="unknown axis 'contxt'.*did you mean 'context'"):
        validate(config, num_devices=8)
