"""LoRA over generic linen trees and over the SD UNet (no torch needed)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from bpgo_jax.models import lora
from bpgo_jax.models.sd import LoraSpec, preset, sd_model
from bpgo_jax.models.sd.pipeline import model_from_modules, modules_from_configs

# Its module-scoped fixtures build once: keep the file on one xdist worker.
pytestmark = pytest.mark.xdist_group("test_lora")


class Net(nn.Module):
    """Dense, 1x1 conv and 3x3 conv: two eligible kernels, one ineligible."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(6, (3, 3), name="stem")(x)
        x = nn.Conv(5, (1, 1), name="mix")(jax.nn.gelu(x))
        return nn.Dense(3, name="head")(jax.nn.gelu(x.mean((1, 2))))


@pytest.fixture(scope="module")
def net():
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 2))
    params = Net().init(jax.random.key(1), x)["params"]
    return x, params


TARGETS = (r"mix/kernel", r"head/.*")


def test_zero_init_equals_base_exactly(net):
    x, base = net
    factors = lora.init_lora(base, rank=2, alpha=4.0, targets=TARGETS, rng=jax.random.key(2))
    assert set(factors) == {"mix", "head"}
    assert factors["mix"]["kernel"]["lora_a"].shape == (6, 2)  # [in, r] of a 1x1 conv
    assert factors["mix"]["kernel"]["lora_b"].shape == (2, 5)
    assert float(jnp.abs(factors["head"]["kernel"]["lora_a"]).sum()) > 0  # A is random
    merged = lora.merge(base, factors, alpha=4.0, rank=2)
    jax.tree.map(np.testing.assert_array_equal, merged, base)
    out = Net().apply({"params": merged}, x)
    np.testing.assert_array_equal(out, Net().apply({"params": base}, x))


def test_merge_by_hand():
    base = {
        "fc": {"kernel": jnp.array([[1.0, 0.0], [0.0, 1.0]]), "bias": jnp.array([5.0, 5.0])},
        "pw": {"kernel": jnp.zeros((1, 1, 2, 1))},
        "untouched": {"kernel": jnp.ones((2, 2))},
    }
    factors = {
        "fc": {"kernel": {"lora_a": jnp.array([[1.0], [2.0]]), "lora_b": jnp.array([[3.0, 4.0]])}},
        "pw": {"kernel": {"lora_a": jnp.array([[1.0], [-1.0]]), "lora_b": jnp.array([[0.5]])}},
    }
    # scale = alpha / rank = 2; fc: I + 2 * [[3, 4], [6, 8]]; pw: 2 * [[0.5], [-0.5]].
    merged = jax.jit(lora.merge, static_argnames=("alpha", "rank"))(
        base, factors, alpha=2.0, rank=1
    )
    np.testing.assert_allclose(merged["fc"]["kernel"], [[7.0, 8.0], [12.0, 17.0]])
    np.testing.assert_allclose(merged["pw"]["kernel"].reshape(2), [1.0, -1.0])
    np.testing.assert_array_equal(merged["fc"]["bias"], base["fc"]["bias"])
    np.testing.assert_array_equal(merged["untouched"]["kernel"], base["untouched"]["kernel"])
    assert lora.num_params(factors) == 2 * 1 + 1 * 2 + 2 * 1 + 1 * 1


def test_merge_keeps_base_dtype(net):
    _, base = net
    base16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), base)
    factors = lora.init_lora(base16, rank=3, alpha=3.0, targets=TARGETS, rng=jax.random.key(3))
    merged = lora.merge(base16, factors, alpha=3.0, rank=3)
    assert {a.dtype for a in jax.tree.leaves(merged)} == {jnp.dtype(jnp.bfloat16)}
    jax.tree.map(np.testing.assert_array_equal, merged, base16)


def test_gradients_reach_only_lora(net):
    x, base = net
    factors = lora.init_lora(base, rank=2, alpha=2.0, targets=TARGETS, rng=jax.random.key(4))
    target = jnp.arange(12.0).reshape(4, 3)

    def loss(trainable, frozen):
        params = lora.merge(frozen, trainable, alpha=2.0, rank=2)
        return jnp.mean((Net().apply({"params": params}, x) - target) ** 2)

    grads = jax.grad(loss)(factors, base)
    assert jax.tree.structure(grads) == jax.tree.structure(factors)
    # B = 0 at init: A's gradient vanishes, B's does not (the delta is A @ B).
    assert float(jnp.abs(grads["head"]["kernel"]["lora_a"]).max()) == 0.0
    assert float(jnp.abs(grads["head"]["kernel"]["lora_b"]).max()) > 0.0
    base_before, loss_before = jax.tree.map(np.asarray, base), float(loss(factors, base))
    step = jax.jit(lambda f, b: jax.tree.map(lambda p, g: p - 0.1 * g, f, jax.grad(loss)(f, b)))
    for _ in range(3):
        factors = step(factors, base)
    jax.tree.map(np.testing.assert_array_equal, base, base_before)
    grads = jax.grad(loss)(factors, base)
    assert float(jnp.abs(grads["mix"]["kernel"]["lora_a"]).max()) > 0.0
    assert float(loss(factors, base)) < loss_before


def test_bad_targets_and_ranks(net):
    _, base = net
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="LoRA target 'nothing/.*' matches no"):
        lora.init_lora(base, rank=2, alpha=1.0, targets=("mix/kernel", "nothing/.*"), rng=key)
    with pytest.raises(ValueError, match="LoRA target 'stem/kernel' matches no"):
        lora.init_lora(base, rank=2, alpha=1.0, targets=("stem/kernel",), rng=key)  # 3x3 conv
    with pytest.raises(ValueError, match="rank=0"):
        lora.init_lora(base, rank=0, alpha=1.0, targets=TARGETS, rng=key)
    with pytest.raises(ValueError, match="has no base kernel"):
        lora.merge(
            {"head": base["head"]},
            {"mix": {"kernel": {"lora_a": 0, "lora_b": 0}}},
            alpha=1.0,
            rank=1,
        )


def test_sd_pipeline_with_lora():
    """LoRA on the UNet's attention projections: base frozen, exact at init, live after."""
    spec = LoraSpec(rank=2, alpha=4.0)
    model, trainable, frozen = sd_model(preset("tiny"), rng=jax.random.key(5), lora=spec)
    assert set(trainable) == {"lora"} and set(frozen) == {"unet", "text", "vae"}
    # tiny preset: one transformer in down block 0, mid block, two in up block 1;
    # attn1 + attn2 with q, k, v, out each -> 4 * 8 adapted kernels.
    paths = lora.target_paths(frozen["unet"], spec.targets)
    assert len(paths) == 32
    # rank * (in + out) per kernel
    assert lora.num_params(trainable) == sum(2 * sum(_shape(frozen["unet"], p)) for p in paths)
    plain = model_from_modules(modules_from_configs(preset("tiny")))
    rs = np.random.RandomState(0)
    x = rs.randn(2, *model.latent_shape).astype(np.float32)
    t = np.array([3.0, 800.0], np.float32)
    cond = rs.randn(2, 77, 32).astype(np.float32)
    base_out = jax.jit(plain.predict)({"unet": frozen["unet"]}, {}, x, t, cond)
    predict = jax.jit(model.predict)
    np.testing.assert_array_equal(predict(trainable, frozen, x, t, cond), base_out)
    bumped = jax.tree.map(lambda a: a + 0.1, trainable)
    assert float(jnp.abs(predict(bumped, frozen, x, t, cond) - base_out).max()) > 1e-4


def _shape(tree, path):
    for key in path:
        tree = tree[key]
    return tree.shape


def test_sd_from_config_builds_lora_model():
    """`config.model` (name="sd") as the engine's model registry passes it."""
    import ml_collections

    from bpgo_jax.models import build_model as build_from_config

    cfg = ml_collections.ConfigDict(
        dict(
            name="sd",
            init="random",
            preset="tiny",
            dtype="bfloat16",
            resolution=32,
            scheduler=dict(prediction_type="v_prediction"),
            lora=dict(rank=4, alpha=8.0, targets=(r".*/attn2/to_(k|v)/kernel",)),
        )
    )
    model, trainable, frozen = build_from_config(cfg, jax.random.key(0))
    assert model.latent_shape == (16, 16, 4)
    assert model.prediction_type == "v_prediction"
    assert model.scheduler_config["beta_schedule"] == "scaled_linear"
    assert len(lora.target_paths(frozen["unet"], cfg.lora.targets)) == 8
    assert {a.dtype for a in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert {a.dtype for a in jax.tree.leaves(trainable)} == {jnp.dtype(jnp.float32)}
    tokens = model.tokenize(["a red cube", "two spheres"])
    assert tokens.shape == (2, 77) and tokens.dtype == np.int32
    with pytest.raises(ValueError, match="neither 'random' nor a diffusers folder"):
        build_from_config(ml_collections.ConfigDict(dict(name="sd", init="/no/such")), None)


def test_attention_kernels_adapt_as_head_flattened_matrices():
    """DenseGeneral q/k/v [in, h, d] and out [h, d, out]: merge == the matrix LoRA."""
    attn = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, out_features=6)
    x = jax.random.normal(jax.random.key(0), (3, 5, 6))
    base = attn.init(jax.random.key(1), x)["params"]
    assert base["query"]["kernel"].shape == (6, 2, 4) and base["out"]["kernel"].shape == (2, 4, 6)
    factors = lora.init_lora(
        base, rank=3, alpha=3.0, targets=(r"(query|out)/kernel",), rng=jax.random.key(2)
    )
    assert factors["query"]["kernel"]["lora_a"].shape == (6, 3)
    assert factors["query"]["kernel"]["lora_b"].shape == (3, 8)
    assert factors["out"]["kernel"]["lora_a"].shape == (8, 3)
    assert factors["out"]["kernel"]["lora_b"].shape == (3, 6)
    factors = jax.tree.map(lambda f: f + 0.1, factors)
    merged = lora.merge(base, factors, alpha=3.0, rank=3)
    q, o = factors["query"]["kernel"], factors["out"]["kernel"]
    # By hand: a linear map on flattened heads gains x @ A @ B.
    xq = x @ base["query"]["kernel"].reshape(6, 8) + (x @ q["lora_a"]) @ q["lora_b"]
    np.testing.assert_allclose(
        jnp.einsum("bli,ihd->blhd", x, merged["query"]["kernel"]).reshape(3, 5, 8), xq, rtol=1e-5
    )
    h = jax.random.normal(jax.random.key(3), (3, 5, 2, 4))
    ho = h.reshape(3, 5, 8) @ base["out"]["kernel"].reshape(8, 6) + h.reshape(3, 5, 8) @ (
        o["lora_a"] @ o["lora_b"]
    )
    np.testing.assert_allclose(
        jnp.einsum("blhd,hdo->blo", h, merged["out"]["kernel"]), ho, rtol=1e-5, atol=1e-6
    )


def test_built_in_model_lora(tmp_path):
    """model.lora.rank > 0: only factors train, the base is exact at init, runs on-policy."""
    from tiny_config import tiny_config

    from bpgo_jax.models import build_model
    from bpgo_jax.train import train

    cfg = tiny_config(
        tmp_path, **{"model.lora.rank": 2, "train.num_epochs": 1, "mesh.num_devices": 1}
    )
    model, trainable, frozen = build_model(cfg.model, jax.random.key(0))
    full = tiny_config(tmp_path)
    _, base_trainable, _ = build_model(full.model, jax.random.key(0))
    assert set(trainable) == {"lora"} and set(frozen) == {"text", "unet"}
    adapted = ["/".join(p[:-1]) for p in traverse_util.flatten_dict(trainable)]
    assert {a.rsplit("/", 2)[-2] for a in adapted} == {"query", "key", "value", "out"}
    assert any("cross_attn" in a for a in adapted) and any("self_attn" in a for a in adapted)
    jax.tree.map(np.testing.assert_array_equal, frozen["unet"], base_trainable["unet"])
    x = jax.random.normal(jax.random.key(1), (2, *model.latent_shape))
    cond = jax.jit(model.encode_text)(frozen, jnp.asarray(model.tokenize(["a red circle"] * 2)))
    t = jnp.full((2,), 0.5)
    predict = jax.jit(model.predict)  # one program for both (eager dispatch compiles per op)
    np.testing.assert_array_equal(
        predict(trainable, frozen, x, t, cond), predict(base_trainable, frozen, x, t, cond)
    )
    records = train(cfg, tmp_path / "run").records
    assert records[0]["onpolicy_ratio_max_dev"] == 0.0
