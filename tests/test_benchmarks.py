"""benchmarks/model_step.py: compiled memory and FLOPs of the rollout and update steps."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpgo_jax.parallel.aot import matmul_flops

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "model_step.py"


def test_matmul_flops_multiplies_scan_lengths_out():
    """XLA's cost analysis counts a loop body once; the jaxpr count must not."""

    def net(ws, x):
        def body(h, w):
            return jnp.tanh(h @ w), None

        return jax.lax.scan(body, x, ws)[0].sum()

    ws = jax.ShapeDtypeStruct((6, 32, 32), jnp.float32)
    x = jax.ShapeDtypeStruct((8, 32), jnp.float32)
    forward = matmul_flops(jax.make_jaxpr(net)(ws, x).jaxpr)
    assert forward == 6 * 2 * 8 * 32 * 32
    # Backward: two matmuls per layer (input and weight gradients) on top of the forward.
    grad = matmul_flops(jax.make_jaxpr(jax.grad(net))(ws, x).jaxpr)
    assert grad == 3 * forward
    conv = lambda k, im: jax.lax.conv_general_dilated(im, k, (1, 1), "SAME")
    k = jax.ShapeDtypeStruct((5, 3, 3, 3), jnp.float32)  # OIHW
    im = jax.ShapeDtypeStruct((2, 3, 10, 10), jnp.float32)  # NCHW
    assert matmul_flops(jax.make_jaxpr(conv)(k, im).jaxpr) == 2 * (2 * 5 * 10 * 10) * 27


def test_model_step_prints_memory_and_flops_of_a_tiny_sharded_flux():
    """The tiny FLUX preset over a 2-device FSDP mesh, LoRA, remat: both steps compile."""
    from bpgo_jax.models import flux

    args = [
        "--preset=flux_tiny",
        "--resolution=64",
        "--lora_rank=2",
        "--remat=full",
        "--dtype=float32",
        "--devices=2",
        "--config=configs/image.py",
        "--config.mesh.shape=(1,2)",
        "--batch=2",
    ]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "mesh {'data': 1, 'fsdp': 2} over 2 device(s)" in out
    # Parameter counts agree with a model whose weights are really drawn.
    spec = flux.pipeline.lora_lib.LoraSpec(2, 2.0, flux.FLUX_ATTENTION_TARGETS)
    _, trainable, frozen = flux.flux_model(flux.preset("tiny"), resolution=64, lora=spec)
    count = lambda tree: sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))
    total = count(trainable) + count(frozen)
    assert f"parameters: total {total:,}, trainable {count(trainable):,} " in out
    flops = [float(v) for v in re.findall(r"matmul [\d.]+ TFLOP \(([\d.e+]+)\)", out)]
    totals = re.findall(r"total ([\d.]+) (MiB|GiB)\n", out)
    assert len(flops) == 2 and len(totals) == 2, out
    rollout, update = flops
    # The update runs the forward pass, its recomputation (remat) and the backward pass.
    assert update > 2.5 * rollout > 0, out
    assert all(float(v) > 0 for v, _ in totals)


def test_pytorch_peer_steps_as_our_ddim_sampler():
    """benchmarks/ddpo_peer.py's DDIM step (ddpo-pytorch's formula, in torch) gives our
    sampler's timesteps, step means and log-probabilities, so the side-by-side
    benchmark times the same algorithm on both sides."""
    import importlib.util
    import types

    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from bpgo_jax.rollout import samplers
    from bpgo_jax.testing.sd_folders import SCHEDULE

    path = SCRIPT.parent / "ddpo_peer.py"
    spec = importlib.util.spec_from_file_location("ddpo_peer", path)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)

    scheduler = diffusers.DDIMScheduler(**SCHEDULE, prediction_type="epsilon")
    scheduler.set_timesteps(10)
    model = types.SimpleNamespace(prediction_type="epsilon", scheduler_config=dict(SCHEDULE))
    cfg = types.SimpleNamespace(kind="ddim", num_steps=10, eta=1.0, guidance_scale=1.0)
    sampler = samplers.make_sampler(cfg, model)
    np.testing.assert_array_equal(sampler.tables["model_t"], scheduler.timesteps.numpy())

    rng = np.random.default_rng(0)
    k = np.asarray([0, 3, 9, 5])  # per-row steps, the last one to t = 1 (alpha_prev = abar_0)
    x, eps, x_next = (rng.standard_normal((4, 8, 8, 4)).astype(np.float32) for _ in range(3))
    mean, std = samplers.transition(sampler, jnp.asarray(k), jnp.asarray(x), jnp.asarray(eps))
    ours = samplers.gaussian_logprob(jnp.asarray(x_next), mean, std)
    nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)
    t = scheduler.timesteps[torch.from_numpy(k)]
    zero_noise = peer.ddim_step_with_logprob(scheduler, nchw(eps), t, nchw(x), 0.0)[0]
    _, log_prob = peer.ddim_step_with_logprob(
        scheduler, nchw(eps), t, nchw(x), 1.0, prev_sample=nchw(x_next)
    )
    np.testing.assert_allclose(log_prob.numpy(), np.asarray(ours), rtol=1e-5, atol=1e-5)
    # eta = 0 is the deterministic DDIM step: diffusers' own scheduler step.
    for row in range(4):
        ref = scheduler.step(nchw(eps)[row : row + 1], int(t[row]), nchw(x)[row : row + 1], eta=0.0)
        np.testing.assert_allclose(zero_noise[row : row + 1].numpy(), ref.prev_sample.numpy(),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
