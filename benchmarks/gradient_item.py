"""One gradient item of the update, bpgo-jax against PyTorch: where the update's time goes.

    python benchmarks/gradient_item.py
    python benchmarks/gradient_item.py --batch=16 --remat=false --profile
    python benchmarks/gradient_item.py --attention=xla

On benchmarks/vs_pytorch.py's UNet (written to a temp folder, or read from
`--folder`): the median time of the UNet's forward pass and of its gradient
(forward + backward of a mean-square loss) at `--batch` rows, jitted in JAX
(the forward under `jax.checkpoint` with `--remat`, as the trainer's update
does for exact on-policy ratios) and eager in PyTorch with `--threads`
threads. `--profile` adds XLA's per-operation time of the JAX gradient,
grouped by fusion kind (convolution and matrix libraries, layout copies,
broadcasts, elementwise).
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/vs_pytorch.py
from absl import app, flags  # noqa: E402

_FOLDER = flags.DEFINE_string("folder", None, "SD folder (default: write the benchmark's).")
_BATCH = flags.DEFINE_integer("batch", 8, "Rows per call.")
_REMAT = flags.DEFINE_bool("remat", True, "Forward under jax.checkpoint, as the update.")
_ATTENTION = flags.DEFINE_enum(
    "attention", "auto", ["auto", "xla", "blocked"], "model.attention (auto: blocked on CPU)."
)
_THREADS = flags.DEFINE_integer("threads", os.cpu_count() or 1, "torch threads.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls after the first.")
_PROFILE = flags.DEFINE_bool("profile", False, "XLA's per-operation time of the gradient.")


def _median_ms(fn, repeats: int) -> tuple[float, float]:
    """(first call, median of `repeats` later calls), milliseconds."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * first, 1000 * statistics.median(times)


def jax_item(folder: str, batch: int, remat: bool, attention: str = "auto"):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bpgo_jax.configs.sd_vs_pytorch import get_config
    from bpgo_jax.models import build_model

    cfg = get_config().model
    cfg.init = folder
    cfg.attention = attention
    model, trainable, frozen = build_model(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, *model.latent_shape)), jnp.float32)
    t = jnp.full((batch,), 501.0)
    cond = jax.jit(model.encode_text)(frozen, jnp.asarray(model.tokenize(["a cat"] * batch)))
    predict = jax.checkpoint(model.predict) if remat else model.predict
    forward = jax.jit(lambda p: model.predict(p, frozen, x, t, cond))
    grad = jax.jit(jax.grad(lambda p: jnp.mean(predict(p, frozen, x, t, cond) ** 2)))
    return (
        lambda: jax.block_until_ready(forward(trainable)),
        lambda: jax.block_until_ready(grad(trainable)),
    )


def torch_item(folder: str, batch: int, threads: int):
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(threads)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, 4, 16, 16), generator=gen)
    t = torch.full((batch,), 501)
    cond = torch.randn((batch, 77, unet.config.cross_attention_dim), generator=gen)

    def forward():
        with torch.no_grad():
            unet(x, t, cond)

    def grad():
        unet.zero_grad(set_to_none=True)
        (unet(x, t, cond).sample ** 2).mean().backward()

    return forward, grad


def profile(grad, calls: int = 3) -> None:
    """XLA's per-operation times of `grad`, summed by fusion kind (XLA times its
    operations only with the trace-me flag `main` sets before JAX starts)."""
    import jax

    with tempfile.TemporaryDirectory() as logdir:
        jax.profiler.start_trace(logdir, create_perfetto_trace=True)
        for _ in range(calls):
            grad()
        jax.profiler.stop_trace()
        (trace,) = Path(logdir).rglob("*.trace.json.gz")
        with gzip.open(trace) as f:
            events = json.load(f)["traceEvents"]
    kinds, counts = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith(("ThunkExecutor", "$", "Slinky", "Pjit")):
            continue
        kind = re.sub(r"[._]?\d+$", "", name)
        if "CommonPjRt" in kind:
            continue
        kinds[kind] += e["dur"] / 1000 / calls
        counts[kind] += 1 / calls
    print(f"XLA operation time per gradient call: {sum(kinds.values()):.0f} ms")
    for kind, ms in kinds.most_common(12):
        print(f"  {ms:7.1f} ms  {round(counts[kind]):4d} x {kind}")


def main(argv: list[str]) -> None:
    del argv
    if _PROFILE.value:  # XLA reads its flags when JAX starts, below
        flag = "--xla_cpu_enable_xprof_traceme=true"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    folder = _FOLDER.value
    if folder is None:
        from bpgo_jax.testing.sd_folders import UNET_6M, save_sd_pipeline

        root = Path(tempfile.mkdtemp(prefix="gradient_item_"))
        folder = save_sd_pipeline(root, UNET_6M)["folder"]
    b, n = _BATCH.value, _REPEATS.value
    forward, grad = jax_item(folder, b, _REMAT.value, _ATTENTION.value)
    rows = [("bpgo-jax" + (" (remat)" if _REMAT.value else ""), forward, grad)]
    rows.append((f"PyTorch, {_THREADS.value} thread(s)", *torch_item(folder, b, _THREADS.value)))
    print(f"batch {b}, ms: first call / median of {n}")
    for name, fwd, grd in rows:
        f_first, f_med = _median_ms(fwd, n)
        g_first, g_med = _median_ms(grd, n)
        print(
            f"{name:<24} forward {f_first:7.0f} / {f_med:5.0f}   "
            f"forward+backward {g_first:7.0f} / {g_med:5.0f}"
        )
    if _PROFILE.value:
        profile(grad=rows[0][2])


if __name__ == "__main__":
    app.run(main)
