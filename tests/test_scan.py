"""Scanned stacks (`models.scan.Stack`): equal to the unrolled blocks, depth-independent
programs, remat policies, and stacked parameter paths in LoRA, the mesh rules and the loader."""

from __future__ import annotations

import contextlib
import functools
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.ad_checkpoint import print_saved_residuals
from jax.sharding import PartitionSpec as P

from bpgo_jax.errors import ConfigError, WeightsError
from bpgo_jax.models import dit, lora, weights
from bpgo_jax.models.scan import REMAT_POLICIES, STACKED, Stack, num_layer_axes
from bpgo_jax.models.sd.pipeline import random_params
from bpgo_jax.parallel import mesh as mesh_lib

DIM, HEADS = 16, 2
ROPE = dit.rope_tables(dit.grid_ids(2, 3), (4, 4))


class Block(nn.Module):
    """Like FLUX's single blocks: AdaLN-Zero-single, self-attention with RoPE, MLP, gate."""

    @nn.compact
    def __call__(self, x, temb, rope):
        h, gate = dit.AdaLayerNormZeroSingle(name="norm")(x, temb)
        attn = dit.Attention(HEADS, DIM // HEADS, out_dim=DIM, name="attn")(h, rope=rope)
        mlp = nn.Dense(2 * DIM, name="proj_mlp")(h)
        out = nn.Dense(DIM, name="proj_out")(jnp.concatenate([attn, jax.nn.gelu(mlp)], -1))
        return x + gate[:, None] * out


class Scanned(nn.Module):
    depth: int
    remat: str = "none"

    @nn.compact
    def __call__(self, x, temb):
        x = Stack(Block, self.depth, remat=self.remat, name="blocks")(x, temb, ROPE)
        return nn.Dense(4, name="proj")(x)


class Unrolled(nn.Module):
    depth: int

    @nn.compact
    def __call__(self, x, temb):
        for i in range(self.depth):
            x = Block(name=f"blocks_{i}")(x, temb, ROPE)
        return nn.Dense(4, name="proj")(x)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.standard_normal((2, 6, DIM)), jnp.float32),
        jnp.asarray(rng.standard_normal((2, DIM)), jnp.float32),
    )


def _loss(module):
    return lambda p, x, t: jnp.mean(module.apply({"params": p}, x, t) ** 2)


def _expected(module, *inputs):
    return weights.expected_shapes(module, *inputs)


def test_scanned_equals_unrolled_outputs_and_gradients():
    x, t = _inputs()
    unrolled = Unrolled(3)
    per_index = random_params(unrolled, jax.random.key(0), jnp.float32, x, t)
    scanned = Scanned(3)
    stacked = weights.stack_params(per_index, _expected(scanned, x, t))
    kernel = stacked["blocks"][STACKED]["attn"]["to_q"]["kernel"]
    assert kernel.shape == (3, DIM, DIM)
    np.testing.assert_array_equal(kernel[1], per_index["blocks_1"]["attn"]["to_q"]["kernel"])

    f_u, f_s = (
        jax.jit(jax.value_and_grad(_loss(unrolled))),
        jax.jit(jax.value_and_grad(_loss(scanned))),
    )
    (loss_u, grad_u), (loss_s, grad_s) = f_u(per_index, x, t), f_s(stacked, x, t)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
    flat_u = traverse_util.flatten_dict(grad_u)
    flat_s = traverse_util.flatten_dict(weights.unstack_params(grad_s))
    assert flat_u.keys() == flat_s.keys()
    for path, g in flat_u.items():
        np.testing.assert_allclose(flat_s[path], g, atol=1e-6, err_msg="/".join(path))


def _program_size(module, x, t) -> tuple[int, int]:
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), x, t))["params"]
    grad = jax.grad(_loss(module))

    # The printed jaxpr includes the scan body (and any nested jaxprs) once each.
    eqns = len(str(jax.make_jaxpr(grad)(params, x, t)).splitlines())
    hlo = jax.jit(grad).lower(params, x, t).as_text()
    return eqns, len(hlo.splitlines())


def test_program_size_does_not_grow_with_depth():
    x, t = _inputs()
    assert _program_size(Scanned(2), x, t) == _program_size(Scanned(8), x, t)
    two, eight = _program_size(Unrolled(2), x, t)[0], _program_size(Unrolled(8), x, t)[0]
    assert eight > 3 * two  # the measure sees depth when blocks are unrolled


class SmallBlock(nn.Module):
    """Attention and a dense layer: enough for every remat policy to differ, cheap to compile.
    XLA's attention keeps its softmax for the backward, so that "dots" has more to drop."""

    attention: str = "xla"

    @nn.compact
    def __call__(self, x, temb, rope):
        h = dit.Attention(
            HEADS, DIM // HEADS, out_dim=DIM, qk_norm=None, attention=self.attention, name="attn"
        )(x)
        return x + jnp.tanh(nn.Dense(DIM, name="mlp")(h) * temb[:, None])


class SmallStack(nn.Module):
    remat: str = "none"
    attention: str = "xla"

    @nn.compact
    def __call__(self, x, temb):
        block = functools.partial(SmallBlock, attention=self.attention)
        return Stack(block, 2, remat=self.remat, name="blocks")(x, temb, None)


def _saved_residuals(loss, *args) -> list[str]:
    with contextlib.redirect_stdout(io.StringIO()) as out:  # one residual a line
        print_saved_residuals(loss, *args)
    return out.getvalue().splitlines()


def test_remat_policies_give_the_same_gradients_and_save_less():
    x, t = _inputs(1)
    params = random_params(SmallStack(), jax.random.key(1), jnp.float32, x, t)
    losses = {policy: _loss(SmallStack(policy)) for policy in REMAT_POLICIES}
    # One program for the four gradients: one compilation.
    grads = jax.jit(lambda p: {k: jax.grad(f)(p, x, t) for k, f in losses.items()})(params)
    saved = {policy: len(_saved_residuals(loss, params, x, t)) for policy, loss in losses.items()}
    for policy in REMAT_POLICIES[1:]:
        for a, b in zip(
            jax.tree.leaves(grads[policy]), jax.tree.leaves(grads["none"]), strict=True
        ):
            np.testing.assert_allclose(a, b, atol=1e-6, err_msg=policy)
    # "names" keeps what "full" keeps plus the tagged attention outputs; "none" keeps the most.
    assert saved["full"] < saved["names"] < saved["none"]
    assert saved["dots"] < saved["none"]
    # The CPU's blocked kernel keeps its logsumexp, not its [B, H, L, L] softmax.
    blocked = _saved_residuals(_loss(SmallStack(attention="blocked")), params, x, t)
    xla = _saved_residuals(losses["none"], params, x, t)
    softmax = ",6,6]"  # [..., L, L]
    assert any(softmax in line for line in xla) and not any(softmax in line for line in blocked)
    with pytest.raises(ConfigError, match="model.remat='some'"):
        SmallStack("some").init(jax.random.key(0), x, t)


def test_lora_factors_get_the_layer_axis():
    x, t = _inputs()
    base = random_params(Scanned(3), jax.random.key(2), jnp.float32, x, t)
    targets = (r".*/attn/to_(q|v)/kernel", r"proj/kernel")
    factors = lora.init_lora(base, rank=2, alpha=4.0, targets=targets, rng=jax.random.key(3))
    q = factors["blocks"][STACKED]["attn"]["to_q"]["kernel"]
    assert q["lora_a"].shape == (3, DIM, 2) and q["lora_b"].shape == (3, 2, DIM)
    assert factors["proj"]["kernel"]["lora_a"].shape == (DIM, 2)
    assert not np.array_equal(q["lora_a"][0], q["lora_a"][1])  # one adapter per layer
    # With non-zero B: merging the stack equals merging each layer on its own.
    factors = jax.tree.map(lambda a: a + 0.1, factors)
    merged = weights.unstack_params(lora.merge(base, factors, alpha=4.0, rank=2))
    per_layer = lora.merge(
        weights.unstack_params(base), weights.unstack_params(factors), alpha=4.0, rank=2
    )
    for path, w in traverse_util.flatten_dict(per_layer).items():
        np.testing.assert_allclose(traverse_util.flatten_dict(merged)[path], w, rtol=1e-6)


def test_mesh_rules_never_shard_the_layer_axis():
    mesh = mesh_lib.make_mesh((2, 4))  # data 2, fsdp 4
    name = "unet/blocks/stacked/attn/to_q/kernel"
    assert num_layer_axes(name) == 1
    # fsdp_auto picks the largest per-layer dim, never the (larger) layer axis.
    assert mesh_lib.spec_for(name, (8, 4, 6), mesh, ((".*", "fsdp_auto"),)) == P(None, "fsdp", None)
    rules = ((".*to_q/kernel", (None, "fsdp")), (".*", "fsdp_auto"))
    assert mesh_lib.spec_for(name, (8, 4, 8), mesh, rules) == P(None, None, "fsdp")
    assert mesh_lib.spec_for("blocks_0/attn/to_q/kernel", (4, 8), mesh, rules) == P(None, "fsdp")
    lora_a = name + "/lora_a"
    assert mesh_lib.spec_for(lora_a, (8, 4, 2), mesh, ((".*", "fsdp_auto"),)) == P(
        None, "fsdp", None
    )
    x, t = _inputs()
    params = random_params(Scanned(8), jax.random.key(0), jnp.float32, x, t)
    placed = jax.device_put(params, mesh_lib.tree_shardings(params, mesh, ((".*", "fsdp_auto"),)))
    kernel = placed["blocks"][STACKED]["proj_mlp"]["kernel"]  # [8, 16, 32]
    assert kernel.sharding.spec == P(None, None, "fsdp")
    np.testing.assert_allclose(
        jax.jit(_loss(Scanned(8)))(placed, x, t), _loss(Scanned(8))(params, x, t), rtol=1e-5
    )


# ---------------------------------------------------------------- loading per-index tensors


class FFStack(nn.Module):
    """`blocks.{i}` diffusers FeedForwards in one or two stacks, then a Linear `proj_out`."""

    splits: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        names = ("first", "second")
        for n, name in zip(self.splits, names, strict=False):
            x = Stack(dit.FeedForward, n, dict(inner_dim=32), name=name)(x)
        return nn.Dense(DIM, name="proj_out")(x)


def _torch_checkpoint(tmp_path, depth: int, drop: str | None = None):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    ref = torch.nn.Module()
    blocks = [
        FeedForward(DIM, inner_dim=32, activation_fn="gelu-approximate") for _ in range(depth)
    ]
    ref.blocks = torch.nn.ModuleList(blocks)
    ref.proj_out = torch.nn.Linear(DIM, DIM)
    state = {k: v.contiguous() for k, v in ref.state_dict().items() if k != drop}
    path = str(tmp_path / "model.safetensors")
    safetensors_torch.save_file(state, path)

    def forward(x):
        h = torch.from_numpy(np.asarray(x))
        for block in ref.blocks:
            h = block(h)
        return ref.proj_out(h).detach().numpy()

    return path, forward


def test_read_stacked_params_from_per_index_tensors(tmp_path):
    path, forward = _torch_checkpoint(tmp_path, 4)
    x = np.random.default_rng(4).standard_normal((2, 5, DIM)).astype(np.float32)
    mesh = mesh_lib.make_mesh((1, 8))
    sharding_fn = mesh_lib.param_sharding_fn(mesh, ((".*", "fsdp_auto"),))
    stacks = {"first/stacked": ("blocks", 0), "second/stacked": ("blocks", 1)}
    cases = ((FFStack((4,)), {"first/stacked": ("blocks", 0)}), (FFStack((1, 3)), stacks))
    for module, plan in cases:
        with weights.open_tensors(path) as reader:
            params = weights.read_stacked_params(
                reader, _expected(module, x), stacks=plan, sharding_fn=sharding_fn, prefix=("unet",)
            )
        out = jax.jit(module.apply)({"params": params}, x)
        np.testing.assert_allclose(out, forward(x), atol=1e-5)
        proj = params["first"][STACKED]["net_0"]["proj"]["kernel"]
        assert proj.shape == (module.splits[0], DIM, 32)
        assert proj.sharding.spec == P(None, None, "fsdp")  # per layer [16, 32]: 32 over 8
    # unstacking gives back the checkpoint's layout and per-index names
    flat = traverse_util.flatten_dict(weights.unstack_params(params, stacks=stacks))
    names = {weights.torch_name(p) for p in flat}
    assert "blocks.3.net.2.weight" in names and "proj_out.weight" in names


def test_read_stacked_params_names_a_missing_layer(tmp_path):
    path, _ = _torch_checkpoint(tmp_path, 3, drop="blocks.1.net.0.proj.weight")
    module = FFStack((3,))
    x = np.zeros((1, 2, DIM), np.float32)
    with (
        weights.open_tensors(path) as reader,
        pytest.raises(WeightsError, match=r"missing tensor\(s\) blocks\.1\.net\.0\.proj\.weight"),
    ):
        weights.read_stacked_params(
            reader, _expected(module, x), stacks={"first/stacked": ("blocks", 0)}
        )
    with pytest.raises(ValueError, match="name no stacked subtree"):
        weights.unstacked_shapes(_expected(module, x), stacks={"nowhere/stacked": ("blocks", 0)})


def test_config_validates_model_remat():
    from bpgo_jax.config import validate
    from bpgo_jax.configs import image

    config = image.get_config()
    config.model.remat = "everything"
    with pytest.raises(ConfigError, match=r"model.remat='everything' is not one of \('none'"):
        validate(config, num_devices=1)
    config.model.remat = "dots"  # the built-in UNet is not scanned: refused, not ignored
    with pytest.raises(ConfigError, match="model.remat='dots' applies to the scanned DiT"):
        validate(config, num_devices=1)
