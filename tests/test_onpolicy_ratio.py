"""On an SD-layout UNet of a few million parameters the on-policy ratio is exactly 1.

The built-in tiny models are too small to show a mismatch: on larger
activations XLA:CPU blocks a reduction (GroupNorm statistics, for one) by
what is fused into it, so a network compiled together with its backward pass
sums in another order than the rollout's forward-only program. The blocking
also depends on how many CPU devices the host is split into: the 8 devices of
the test process hide it, the launcher's one device shows it, so the check
runs this file as a one-device subprocess.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import numpy as np

NUM_STEPS = 10


def on_policy_metrics() -> dict[str, list[float]]:
    """A 10-step DDIM rollout (eta 1, CFG 5) of 2 samples, then the update's loss
    at every step, differentiated as the update step does, with the rollout's
    parameters: each step's `ratio_max_dev` and `approx_kl`."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    import optax

    from bpgo_jax.models.sd import preset, sd_model
    from bpgo_jax.rollout import samplers
    from bpgo_jax.testing.sd_folders import UNET_6M
    from bpgo_jax.update.loss import PolicyBatch, step_loss

    configs = preset("tiny")
    configs["unet"] = UNET_6M
    model, trainable, frozen = sd_model(configs, rng=jax.random.key(0))  # full fine-tune
    sample_cfg = dict(kind="ddim", num_steps=NUM_STEPS, eta=1.0, guidance_scale=5.0)
    sampler = samplers.make_sampler(ml_collections.ConfigDict(sample_cfg), model)
    encode = jax.jit(model.encode_text)
    cond = encode(frozen, jnp.asarray(model.tokenize(["a cat", "a dog"])))
    uncond = encode(frozen, jnp.asarray(model.tokenize([""])))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(1), i))(jnp.arange(2))
    traj = jax.jit(functools.partial(samplers.sample, model, sampler))(
        trainable, frozen, cond, uncond, keys
    )
    ones = jnp.ones((2,), jnp.float32)
    batch = PolicyBatch(traj.latents, traj.outputs, cond, ones, ones, ones)
    loss = functools.partial(
        step_loss,
        model=model,
        sampler=sampler,
        clip_range=1e-4,
        crt_coef=0.5,
        kl_beta=0.0,
    )

    def accumulate(acc, *args):  # the trainer's per-item program (`update.step._accumulate`)
        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(*args)
        return jax.tree.map(jnp.add, acc, grads), metrics

    accumulate = jax.jit(accumulate, donate_argnums=(0,))
    # Arguments, not constants, and the norm a program of its own, as in the trainer:
    # either change makes XLA fuse the loss otherwise, and the ratio misses 1 by 2e-7.
    global_norm = jax.jit(optax.global_norm)
    zeros_like = jax.jit(lambda tree: jax.tree.map(jnp.zeros_like, tree))
    out = {"ratio_max_dev": [], "approx_kl": [], "grad_norm": []}
    half = NUM_STEPS // 2
    for j in range(half):  # sample 0 at steps 0..4, sample 1 at steps 5..9
        k = jnp.asarray([j, j + half])
        grads, metrics = accumulate(
            zeros_like(trainable), trainable, frozen, None, batch, uncond, k
        )
        out["ratio_max_dev"].append(float(metrics["ratio_max_dev"]))
        out["approx_kl"].append(float(metrics["approx_kl"]))
        out["grad_norm"].append(float(global_norm(grads)))
    return out


def test_first_update_recomputes_a_6m_sd_unet_rollout_bit_for_bit():
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
    )
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["approx_kl"] == [0.0] * (NUM_STEPS // 2)  # log-ratios exactly 0
    assert metrics["ratio_max_dev"] == [0.0] * (NUM_STEPS // 2)
    assert all(np.isfinite(g) and g > 0 for g in metrics["grad_norm"])


if __name__ == "__main__":
    print(json.dumps(on_policy_metrics()))
