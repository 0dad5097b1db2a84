"""Each attention kernel against XLA on this machine: max error and seconds per call.

    python benchmarks/attention_check.py                    # GPU: cudnn vs xla; TPU: splash vs xla
    python benchmarks/attention_check.py --shapes=flux,wan  # some of the shapes below
    python benchmarks/attention_check.py --size=small --interpret   # CPU: splash interpreted
    python benchmarks/attention_check.py --shapes=sd_bench --size=full --dtype=float32  # CPU

Shapes are the attention calls of the models at their training sizes (`--size=full`,
the default on an accelerator) or with sequences cut 16x (`--size=small`, the CPU
default): FLUX.1 at 1024 px (4096 image + 512 text tokens, 24 heads x 128), SD3.5
medium at 1024 px (4096 + 333, 24 x 64), Wan2.1-1.3B at 480x832x81 (32760 tokens,
12 x 128), the SD1.5 UNet's first self-attention at 512 px (4096, 8 x 40), T5's
masked attention (512 tokens, 64 x 64) and the first self-attention of
benchmarks/vs_pytorch.py's UNet (16x16 latents, batch 8, 8 x 8). For the blocked
kernel and every kernel the backend runs (and splash through the Pallas
interpreter with `--interpret`) it prints the max abs
difference from XLA of the output and of the gradients of a fixed loss, both in
`--dtype`, and the median milliseconds of a forward and of a forward + backward
call ("bwd ms").
XLA's own row is the baseline; at Wan's full length its [12, 32760, 32760] logits
and their gradient need about 100 GB (leave `wan` out on smaller devices).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bpgo_jax.models.attention import attention

# name -> (batch, q length, kv length, heads, head dim, key mask)
SHAPES = {
    "flux": (1, 4608, 4608, 24, 128, False),
    "sd35": (1, 4429, 4429, 24, 64, False),
    "wan": (1, 32760, 32760, 12, 128, False),
    "sd15": (2, 4096, 4096, 8, 40, False),
    "t5": (4, 512, 512, 64, 64, True),
    "sd_bench": (8, 256, 256, 8, 8, False),
}


def _time(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _max_err(a, b) -> float:
    leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(
        float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))) for x, y in leaves
    )


def kernels(interpret: bool) -> list[str]:
    backend = jax.default_backend()
    extra = {"gpu": ["cudnn"], "tpu": ["splash"]}.get(backend, [])
    if interpret and "splash" not in extra:
        extra.append("splash")
    return ["xla", "blocked", *extra]


def check(name: str, shape: tuple, *, dtype, iters: int, interpret: bool, divide: int) -> list[str]:
    b, lq, lk, h, d, masked = shape
    lq, lk = max(lq // divide, 8), max(lk // divide, 8)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((b, n, h, d)), dtype) for n in (lq, lk, lk))
    mask = jnp.asarray(np.arange(lk)[None].repeat(b, 0) < lk - lk // 4) if masked else None

    def fns(impl: str):
        def fwd(q, k, v):
            return attention(q, k, v, mask=mask, implementation=impl, interpret=interpret)

        def loss(q, k, v):
            return jnp.sum(jnp.sin(fwd(q, k, v).astype(jnp.float32)))

        return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    rows = []
    ref_fwd, ref_grad = fns("xla")
    want, want_grad = ref_fwd(q, k, v), ref_grad(q, k, v)
    for impl in kernels(interpret):
        fwd, grad = fns(impl)
        err = _max_err(fwd(q, k, v), want)
        gerr = _max_err(grad(q, k, v), want_grad)
        t_fwd, t_bwd = _time(fwd, q, k, v, iters=iters), _time(grad, q, k, v, iters=iters)
        rows.append(
            f"| {name} | {b}x{lq}x{lk}x{h}x{d} | {impl} | {err:.2e} | {gerr:.2e} "
            f"| {t_fwd * 1e3:.2f} | {t_bwd * 1e3:.2f} |"
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names")
    parser.add_argument("--size", choices=("full", "small"), default=None)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument(
        "--interpret", action="store_true", help="splash via the Pallas interpreter"
    )
    args = parser.parse_args(argv)
    size = args.size or ("small" if jax.default_backend() == "cpu" else "full")
    divide = 16 if size == "small" else 1
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {args.dtype}, size={size}")
    print("| shape | B x Lq x Lk x H x D | kernel | max err out | max err grad | fwd ms | bwd ms |")
    print("|---|---|---|---|---|---|---|")
    for name in args.shapes.split(","):
        if name not in SHAPES:
            raise SystemExit(f"error: --shapes: unknown shape {name!r}; known: {sorted(SHAPES)}")
        rows = check(
            name,
            SHAPES[name],
            dtype=jnp.dtype(args.dtype),
            iters=args.iters,
            interpret=args.interpret,
            divide=divide,
        )
        print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
