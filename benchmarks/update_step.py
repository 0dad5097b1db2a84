"""Seconds per optimiser update: scanned vs host-loop gradient accumulation.

    python benchmarks/update_step.py --mode=both

Uses configs/image.py's model, sampler, loss and update layout (batch 64 =
4 micro-batches of 16, the first 2 of 6 sampler steps trained, KL reference
pass) on random rollout data, so the numbers are those of the default run's
update. Prints compile time and the median of `--repeats` timed updates for
each mode.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from absl import flags

from bpgo_jax import runtime
from bpgo_jax.config import batch_layout
from bpgo_jax.configs.image import get_config
from bpgo_jax.models import build_model
from bpgo_jax.parallel import mesh as mesh_lib
from bpgo_jax.rollout import samplers
from bpgo_jax.update.loss import PolicyBatch
from bpgo_jax.update.step import TrainState, UpdateStep, make_optimizer, step_options

_MODE = flags.DEFINE_enum("mode", "both", ["scan", "host", "both"], "Accumulation loop(s) to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed updates per mode (after the first call).")


def main(argv: list[str]) -> None:
    del argv
    repeats = _REPEATS.value
    config = get_config()
    config.model.init = "random"
    mesh = mesh_lib.make_mesh((1, 1), config.mesh.axes, jax.devices()[:1])
    lay = batch_layout(config, 1)
    model, trainable, frozen = build_model(config.model, jax.random.key(0))
    sampler = samplers.make_sampler(config.sample, model)
    optimizer = make_optimizer(config.train)
    opts = step_options(config, lay, 1, model=model, sampler=sampler, optimizer=optimizer)
    b, t = config.train.batch_size, config.sample.num_steps
    keys = jax.random.split(jax.random.key(1), 4)
    tokens = model.tokenize(["a red circle"] * b)
    batch = PolicyBatch(
        latents=jax.random.normal(keys[0], (b, t + 1, *model.latent_shape)),
        outputs=jax.random.normal(keys[1], (b, t, *model.latent_shape)),
        cond=jax.jit(model.encode_text)(frozen, tokens),
        advantages=jax.random.normal(keys[2], (b,)),
        ras_weights=jnp.ones((b,)),
        crt_advantages=jax.random.normal(keys[3], (b,)),
    )
    uncond = jax.jit(model.encode_text)(frozen, model.tokenize([""]))
    ref = trainable if config.train.kl_beta else None  # the KL's frozen initial policy

    def fresh_state():
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            trainable=jax.tree.map(jnp.copy, trainable),
            opt_state=optimizer.init(trainable),
            ema={},
            prior={},
            rng=jax.random.key_data(jax.random.key(2)),
        )

    state0 = fresh_state()
    shardings = jax.tree.map(lambda _: mesh_lib.replicated(mesh), state0)
    modes = ("host", "scan") if _MODE.value == "both" else (_MODE.value,)
    fns = {
        mode: UpdateStep(
            opts,
            accumulate=mode,
            state_shardings=shardings,
            metric_sharding=mesh_lib.replicated(mesh),
        )
        for mode in modes
    }
    print(
        f"backend={jax.default_backend()} batch={b} micro={config.train.micro_batch_size} "
        f"items per update={opts.count}"
    )
    for mode in modes:
        # Placed as the step's outputs are, so later calls reuse the first's programs.
        fn, state = fns[mode], jax.device_put(fresh_state(), shardings)
        start = time.perf_counter()
        state, metrics = fn(state, batch, frozen, ref, uncond)
        jax.block_until_ready(metrics)
        first = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            state, metrics = fn(state, batch, frozen, ref, uncond)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        print(
            f"{mode}: first call (compile + run) {first:.1f} s, "
            f"update {statistics.median(times):.2f} s (median of {repeats})"
        )


if __name__ == "__main__":
    runtime.run(main, __doc__)
