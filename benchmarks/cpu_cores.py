"""Does XLA:CPU spread one jitted program over the cores? Seconds per call.

    python benchmarks/cpu_cores.py             # all cores
    taskset -c 0 python benchmarks/cpu_cores.py  # pinned to one core

The gradient of six 3x3 convolutions (batch 32, 32x32, 64 channels), the
kind of work our UNet does. Near-equal times mean one program uses about
one core, which is why `--cpu_devices` and `study.workers` exist.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def loss(w: jax.Array, x: jax.Array) -> jax.Array:
    for _ in range(6):
        x = jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    return (x**2).mean()


def main() -> None:
    x = jnp.ones((32, 32, 32, 64))
    w = jnp.full((3, 3, 64, 64), 0.01)
    grad = jax.jit(jax.grad(loss))
    grad(w, x).block_until_ready()  # compile
    times = []
    for _ in range(10):
        start = time.perf_counter()
        grad(w, x).block_until_ready()
        times.append(time.perf_counter() - start)
    print(f"{statistics.median(times):.3f} s per call (median of 10), jax {jax.__version__}")


if __name__ == "__main__":
    main()
