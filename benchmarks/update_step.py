"""Seconds per optimiser update: scanned vs host-loop gradient accumulation.

    python benchmarks/update_step.py --mode=both

Uses configs/image.py's model, sampler, loss and update layout (batch 64 =
4 micro-batches of 16, 5 of 10 steps trained, KL reference pass) on random
rollout data, so the numbers are those of the default run's update. Prints compile time and the
median of `--repeats` timed updates for each mode.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bpgo_jax.config import batch_layout  # noqa: E402
from bpgo_jax.models import build_model  # noqa: E402
from bpgo_jax.parallel import mesh as mesh_lib  # noqa: E402
from bpgo_jax.rollout import samplers  # noqa: E402
from bpgo_jax.update.loss import PolicyBatch  # noqa: E402
from bpgo_jax.update.step import (  # noqa: E402
    HostAccumulatedStep,
    TrainState,
    make_optimizer,
    step_options,
    train_step,
)
from bpgo_jax.configs.image import get_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("scan", "host", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

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
    fns = {
        "scan": jax.jit(functools.partial(train_step, opts=opts), donate_argnums=(0,)),
        "host": HostAccumulatedStep(
            opts, state_shardings=shardings, metric_sharding=mesh_lib.replicated(mesh)
        ),
    }
    modes = ("host", "scan") if args.mode == "both" else (args.mode,)
    print(
        f"backend={jax.default_backend()} batch={b} micro={config.train.micro_batch_size} "
        f"items per update={opts.count}"
    )
    for mode in modes:
        fn, state = fns[mode], fresh_state()
        start = time.perf_counter()
        state, metrics = fn(state, batch, frozen, ref, uncond)
        jax.block_until_ready(metrics)
        first = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            state, metrics = fn(state, batch, frozen, ref, uncond)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        print(
            f"{mode}: first call (compile + run) {first:.1f} s, "
            f"update {statistics.median(times):.2f} s (median of {args.repeats})"
        )


if __name__ == "__main__":
    main()
