"""The attention dispatch (`models.attention`): XLA exactly as `jax.nn`, the CPU's blocked
kernel, splash (run by the Pallas interpreter on CPU) and cuDNN (GPU only) against XLA,
backend errors, and the SD / CLIP modules taking the configured kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bpgo_jax.errors import ConfigError
from bpgo_jax.models.attention import attention, resolve
from bpgo_jax.parallel import mesh as mesh_lib


def _qkv(b=2, lq=6, lk=6, h=3, d=8, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((b, n, h, d)).astype(np.float32) for n in (lq, lk, lk))
    return (jnp.asarray(a, dtype) for a in (q, k, v))


def _reference(q, k, v, mask=None, bias=None, causal=False, scale=None):
    """Softmax attention in float64 numpy; `mask` broadcasts to [B, H, Lq, Lk]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    keep = np.ones(logits.shape, bool)
    if mask is not None:
        keep &= np.asarray(mask)
    if causal:
        keep &= np.tril(np.ones(logits.shape[-2:], bool))
    logits = np.where(keep, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


def test_xla_is_jax_attention_bit_for_bit():
    q, k, v = _qkv()
    for causal in (False, True):
        want = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
        xla = lambda q, k, v, c=causal: attention(q, k, v, causal=c, implementation="xla")
        np.testing.assert_array_equal(xla(q, k, v), want)
        jitted = jax.jit(xla)
        np.testing.assert_array_equal(
            jitted(q, k, v),
            jax.jit(jax.nn.dot_product_attention, static_argnames="is_causal")(
                q, k, v, is_causal=causal
            ),
        )


def _grads(fn, q, k, v):
    loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v).astype(jnp.float32)))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("budget", [10**9, 2 * 2 * 5 * 7, 1])  # one block, 2 heads, 1 head
def test_blocked_matches_attention_with_masks_causal_scale_and_gradients(budget):
    from bpgo_jax.models.attention import blocked

    q, k, v = _qkv(b=2, lq=5, lk=7, h=4)
    rng = np.random.default_rng(1)
    key_mask = rng.random((2, 7)) > 0.3
    key_mask[:, 0] = True
    head_mask = rng.random((2, 4, 5, 7)) > 0.2  # a mask per head: split with the heads
    head_mask[..., 0] = True
    shared_mask = rng.random((1, 1, 5, 7)) > 0.2
    shared_mask[..., 0] = True
    cases = [
        {},
        dict(mask=key_mask[:, None, None, :]),
        dict(mask=head_mask),
        dict(mask=shared_mask, scale=0.3),
        dict(causal=True, scale=0.5),
        dict(mask=head_mask, causal=True),
    ]
    for kw in cases:
        mask = None if "mask" not in kw else jnp.asarray(kw["mask"])
        opts = dict(mask=mask, causal=kw.get("causal", False), scale=kw.get("scale"))
        ours = lambda q, k, v, o=opts: blocked(q, k, v, budget=budget, **o)
        xla = lambda q, k, v, o=opts: attention(q, k, v, implementation="xla", **o)
        got = jax.jit(ours)(q, k, v)
        np.testing.assert_allclose(got, _reference(q, k, v, **kw), atol=2e-6, err_msg=str(kw))
        for a, b in zip(_grads(ours, q, k, v), _grads(xla, q, k, v), strict=True):
            np.testing.assert_allclose(a, b, atol=3e-6, err_msg=str(kw))


def test_blocked_takes_grouped_heads_bfloat16_and_a_fully_masked_row():
    from bpgo_jax.models.attention import blocked

    q, _, _ = _qkv(b=2, lq=6, lk=6, h=4)
    _, k, v = _qkv(b=2, lq=6, lk=6, h=2, seed=1)  # 2 key heads for 4 query heads
    xla = attention(q, k, v, implementation="xla")
    np.testing.assert_allclose(blocked(q, k, v, budget=1), xla, atol=2e-6)
    for ours, want in zip(
        _grads(lambda *x: blocked(*x, budget=1), q, k, v),
        _grads(lambda *x: attention(*x, implementation="xla"), q, k, v),
        strict=True,
    ):
        np.testing.assert_allclose(ours, want, atol=3e-6)
    half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got = blocked(*half)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(got, np.float32),
        np.asarray(attention(*half, implementation="xla"), np.float32),
        atol=2e-2,
    )
    nothing = jnp.zeros((2, 6), bool).at[0].set(True)  # batch row 1 attends to no key
    kw = dict(mask=nothing[:, None, None, :])
    np.testing.assert_allclose(
        blocked(q, k, v, **kw), attention(q, k, v, implementation="xla", **kw), atol=2e-6
    )
    for grad in _grads(lambda *x: blocked(*x, **kw), q, k, v):
        assert np.isfinite(np.asarray(grad)).all()


def test_blocked_under_remat_names_and_a_batch_sharded_mesh():
    """`model.remat="names"` saves its output and logsumexp, the gradient unchanged; under a
    mesh that shards the batch the loop over heads keeps the batch sharded."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from bpgo_jax.models.attention import blocked
    from bpgo_jax.models.scan import remat_policy

    q, k, v = _qkv(b=8, lq=16, lk=16, h=4, seed=8)
    fn = lambda q, k, v: blocked(q, k, v, budget=8 * 16 * 16)  # four blocks of one head
    want = _grads(fn, q, k, v)
    remat = jax.checkpoint(fn, policy=remat_policy("names"))
    for a, b in zip(_grads(remat, q, k, v), want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    mesh = mesh_lib.make_mesh((4, 2))
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    args = jax.device_put((q, k, v), batch)
    out = jax.jit(mesh_lib.on_mesh(fn, mesh))(*args)
    assert out.sharding.is_equivalent_to(batch, 4)
    np.testing.assert_allclose(out, fn(q, k, v), atol=1e-6)
    for a, b in zip(_grads(mesh_lib.on_mesh(fn, mesh), *args), want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_xla_masks_bias_and_scale():
    q, k, v = _qkv(lq=5, lk=7)
    rng = np.random.default_rng(1)
    key_mask = rng.random((2, 7)) > 0.3
    key_mask[:, 0] = True
    full_mask = rng.random((2, 1, 5, 7)) > 0.2
    full_mask[..., 0] = True
    bias = rng.standard_normal((1, 3, 5, 7)).astype(np.float32)
    cases = [
        (dict(mask=jnp.asarray(key_mask)), dict(mask=key_mask[:, None, None, :])),
        (dict(mask=jnp.asarray(full_mask)), dict(mask=full_mask)),
        (dict(bias=jnp.asarray(bias), scale=1.0), dict(bias=bias, scale=1.0)),
        (dict(causal=True, scale=0.5), dict(causal=True, scale=0.5)),
    ]
    for ours, ref in cases:
        got = attention(q, k, v, implementation="xla", **ours)
        np.testing.assert_allclose(got, _reference(q, k, v, **ref), atol=1e-5, err_msg=str(ref))
    with pytest.raises(ValueError, match="key mask"):
        attention(q, k, v, mask=jnp.ones((2, 5), bool))


def test_backend_choice_and_errors():
    assert [resolve("auto", b) for b in ("cpu", "gpu", "tpu")] == ["blocked", "cudnn", "splash"]
    assert resolve("splash", "cpu", interpret=True) == "splash"
    with pytest.raises(ConfigError, match="model.attention='cudnn' needs a GPU.*'cpu'"):
        resolve("cudnn", "cpu")
    with pytest.raises(ConfigError, match="model.attention='splash' needs a TPU"):
        resolve("splash", "gpu")
    with pytest.raises(ConfigError, match="model.attention='flash' is not one of"):
        resolve("flash", "cpu")
    if jax.default_backend() == "cpu":
        q, k, v = _qkv()
        with pytest.raises(ConfigError, match="needs a GPU"):
            attention(q, k, v, implementation="cudnn")


def test_splash_matches_xla_with_padding_masks_and_gradients():
    """Interpreted splash: 150 tokens padded to one 256 block, head dim 40 padded to 128,
    padded and masked keys excluded through segment ids, causal, custom scale, gradients."""
    q, k, v = _qkv(b=2, lq=150, lk=150, h=2, d=40, seed=2)
    key_mask = np.random.default_rng(3).random((2, 150)) > 0.25
    key_mask[:, 0] = True
    kw = dict(mask=jnp.asarray(key_mask), causal=True, scale=0.2)
    splash = attention(q, k, v, implementation="splash", interpret=True, **kw)
    np.testing.assert_allclose(splash, attention(q, k, v, implementation="xla", **kw), atol=2e-6)

    def loss(impl):
        def f(q, k, v):
            out = attention(q, k, v, mask=kw["mask"], implementation=impl, interpret=True)
            return jnp.sum(out * jnp.cos(out))

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

    for a, b in zip(loss("splash")(q, k, v), loss("xla")(q, k, v), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_splash_in_two_jitted_functions_of_one_shape():
    """Each trace builds its own kernel (a kernel cached across traces leaked a tracer)."""
    q, k, v = _qkv(b=1, lq=8, lk=8, h=1, d=8, seed=6)

    def loss(q, impl="splash"):
        return jnp.sum(attention(q, k, v, implementation=impl, interpret=True) ** 2)

    jax.jit(loss)(q)
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(q), jax.grad(loss)(q, "xla"), atol=1e-5)


def test_splash_leaves_what_it_cannot_take_to_xla():
    """Full 4-D masks and additive biases run on XLA, exactly."""
    q, k, v = _qkv()
    mask = jnp.asarray(np.random.default_rng(4).random((2, 3, 6, 6)) > 0.2)
    bias = jnp.ones((1, 3, 6, 6))
    for kw in (dict(mask=mask), dict(bias=bias)):
        got = attention(q, k, v, implementation="splash", interpret=True, **kw)
        np.testing.assert_array_equal(got, attention(q, k, v, implementation="xla", **kw))


def test_splash_runs_per_batch_shard_under_a_mesh():
    mesh = mesh_lib.make_mesh((4, 2))
    q, k, v = _qkv(b=8, lq=20, lk=20, h=1, d=8, seed=5)
    fn = jax.jit(lambda q, k, v: attention(q, k, v, implementation="splash", interpret=True))
    with jax.set_mesh(mesh):
        assert "manual_computation" in fn.lower(q, k, v).as_text()  # the shard_map
        out = fn(q, k, v)
    np.testing.assert_allclose(out, attention(q, k, v, implementation="xla"), atol=2e-6)


@pytest.mark.parametrize(
    ("b", "h", "layout"),
    [(1, 2, ((), ("fsdp",))), (2, 4, (("fsdp",), ("data",))), (3, 3, ((), ()))],
)
def test_splash_with_a_batch_the_mesh_does_not_split_runs_in_a_shard_map(b, h, layout):
    """One sample, CFG halves, a VAE call: split over the heads where they divide, else every
    device computes the call; never left to GSPMD (which cannot partition the kernel)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from bpgo_jax.models.attention import SplashLayout, splash_layout

    mesh = mesh_lib.make_mesh((4, 2))
    q, k, v = _qkv(b=b, lq=20, lk=20, h=h, d=8, seed=7)
    with jax.set_mesh(mesh):
        assert splash_layout(b, h, 20, False) == SplashLayout(*layout)
    fn = jax.jit(
        mesh_lib.on_mesh(
            lambda q, k, v: attention(q, k, v, implementation="splash", interpret=True), mesh
        )
    )
    args = jax.device_put((q, k, v), NamedSharding(mesh, P()))
    assert "manual_computation" in fn.lower(*args).as_text()
    np.testing.assert_allclose(fn(*args), attention(q, k, v, implementation="xla"), atol=2e-6)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
def test_cudnn_matches_xla():
    q, k, v = _qkv(b=2, lq=256, lk=256, h=4, d=64, dtype=jnp.bfloat16)
    for kw in (dict(), dict(causal=True), dict(mask=jnp.arange(256)[None].repeat(2, 0) < 200)):
        got = attention(q, k, v, implementation="cudnn", **kw)
        want = attention(q, k, v, implementation="xla", **kw)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2
        )
    q32 = q.astype(jnp.float32)
    assert attention(q32, q32, q32, implementation="cudnn").dtype == jnp.float32
    np.testing.assert_array_equal(  # auto keeps float32 on XLA
        attention(q32, q32, q32), attention(q32, q32, q32, implementation="xla")
    )


def test_sd_and_clip_take_the_configured_kernel():
    """`model.attention` reaches every attention of the SD UNet and its text encoder: a
    GPU-only kernel on CPU fails while the modules are built."""
    from bpgo_jax.models.clip.config import TextConfig
    from bpgo_jax.models.clip.modules import CLIPTextModel
    from bpgo_jax.models.sd.pipeline import sd_from_config

    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU refusal of a GPU kernel")
    cfg = ml_collections.ConfigDict(dict(init="random", preset="tiny", attention="cudnn"))
    with pytest.raises(ConfigError, match="model.attention='cudnn' needs a GPU"):
        sd_from_config(cfg, jax.random.key(0))
    text = CLIPTextModel(
        TextConfig(
            vocab_size=10,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=4,
        ),
        attention="splash",
    )
    with pytest.raises(ConfigError, match="model.attention='splash' needs a TPU"):
        jax.eval_shape(lambda: text.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))


def test_attention_check_script_runs(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "attention_check.py"
    spec = importlib.util.spec_from_file_location("attention_check", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--shapes=sd15,t5", "--size=small", "--iters=1", "--dtype=float32"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| sd15")]
    assert rows and "| xla | 0.00e+00 | 0.00e+00 |" in rows[0]


def test_config_validates_model_attention():
    from bpgo_jax.config import validate
    from bpgo_jax.configs import image

    config = image.get_config()
    validate(config, num_devices=1)  # "auto" is the default
    config.model.attention = "flash"
    with pytest.raises(ConfigError, match=r"model.attention='flash' is not one of \('auto'"):
        validate(config, num_devices=1)
    config.model.attention = "xla"  # the built-in model runs Flax's attention: refused, not ignored
    with pytest.raises(ConfigError, match="model.attention='xla': the built-in model"):
        validate(config, num_devices=1)
