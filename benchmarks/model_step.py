"""Compiled memory and FLOPs of one rollout step and one update step of a real-size flow DiT.

    python benchmarks/model_step.py --preset=flux_dev --resolution=512 --remat=full
    python benchmarks/model_step.py --preset=flux_dev --lora_rank=64 --remat=none
    python benchmarks/model_step.py --preset=sd35_medium --batch=2
    python benchmarks/model_step.py --preset=flux_dev --devices=8 --config.mesh.shape="(1,8)"
    python benchmarks/model_step.py --preset=flux_dev --run          # on an accelerator

The weights are abstract (`ShapeDtypeStruct`s, nothing drawn or allocated):
each step is `jax.jit(...).lower(abstract args).compile()`d and XLA's own
accounts are printed, per device: `memory_analysis()` (arguments, outputs,
temporaries, generated code) and `cost_analysis()` FLOPs. XLA's cost analysis
counts a loop body once, so the scanned blocks' FLOPs appear there for one
block per stack; the `matmul` figure counts every matmul and convolution
of the program's jaxpr with scan lengths multiplied out (the backward pass,
and the recomputation that remat adds, included).

- rollout step: one guided network call of the sampler at `--batch` samples
  (classifier-free guidance doubles the rows when `sample.guidance_scale` is
  not 1), the step's mean and noise: the body of `rollout.samplers.sample`.
- update step: `update.step.train_step` for one micro-batch of `--batch`
  samples and one trained denoising step: forward, backward, clipping and
  AdamW on the trained parameters (LoRA factors with `--lora_rank`).

The config (`--config`, default the shared defaults) gives the sampler, the
optimiser, the KL term and the mesh block; the preset replaces its model.
Without `--config` the sampler is FLUX.1's (no classifier-free guidance,
resolution-dependent shift; schnell unshifted) or Flow-GRPO's SD3.5 one
(guidance 4.5, shift 3). `flux_tiny` / `sd3_tiny` are the tests' small models.
`--devices=N` compiles for N devices (fake CPU devices on a CPU host) over
`config.mesh.shape`, with parameters placed by `config.mesh.rules`. The text
encoders and the VAE are not run by either step; their weights are counted
in the parameter lines (and stay resident in a run). `--run` also allocates
random weights, times each step (median of `--repeats`) and prints seconds
and MFU: matmul FLOPs / seconds / the device's peak (`--peak_tflops`, or a
table of dense bf16 peaks by device kind).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from absl import flags
from ml_collections import config_flags

from bpgo_jax import runtime
from bpgo_jax.errors import ConfigError, UserError

PRESETS = (
    "flux_dev",
    "flux_schnell",
    "sd3_medium",
    "sd35_medium",
    "sd35_large",
    "flux_tiny",
    "sd3_tiny",
)
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run config (sampler, optimiser, mesh); default: the shared defaults."
)
_PRESET = flags.DEFINE_enum("preset", "flux_dev", PRESETS, "Model architecture.")
_RESOLUTION = flags.DEFINE_integer("resolution", 512, "Image side in pixels.")
_BATCH = flags.DEFINE_integer("batch", 1, "Samples per rollout call and per update micro-batch.")
_REMAT = flags.DEFINE_enum("remat", "none", ["none", "full", "dots", "names"], "model.remat.")
_LORA = flags.DEFINE_integer("lora_rank", 0, "LoRA rank on the attention projections; 0: full.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Weights and compute.")
_ATTENTION = flags.DEFINE_string("attention", "auto", "model.attention: auto|xla|cudnn|splash.")
_DEVICES = flags.DEFINE_integer("devices", 1, "Devices to compile for (fake CPU devices on CPU).")
_RUN = flags.DEFINE_bool("run", False, "Also allocate random weights and time both steps.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per step with --run.")
_PEAK = flags.DEFINE_float(
    "peak_tflops", 0.0, "Peak TFLOP/s per device for MFU; 0: by kind (parallel/aot.py)."
)
flags.adopt_module_key_flags(runtime)


def _num(n: float) -> str:
    return f"{n:,}"


def _count(tree: Any) -> int:
    import jax
    import numpy as np

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------- the model


def _model_config(preset_name: str) -> tuple[Any, dict]:
    """`(config.model block, default sample overrides)` of a preset name and the flags."""
    import ml_collections

    family, _, size = preset_name.partition("_")
    if family == "flux":
        # Guidance-distilled: no classifier-free guidance; FLUX.1's resolution-dependent shift.
        name, preset = "flux", size
        sample = dict(guidance_scale=1.0, dynamic_shift=size != "schnell")
    else:
        # Flow-GRPO's SD3.5 sampling: CFG 4.5, shift 3 (the scheduler's).
        name, preset = "sd3", "tiny" if size == "tiny" else preset_name
        sample = dict(guidance_scale=4.5, shift=3.0, dynamic_shift=False)
    model = ml_collections.ConfigDict(
        dict(
            name=name,
            init="random",
            preset=preset,
            dtype=_DTYPE.value,
            resolution=_RESOLUTION.value,
            attention=_ATTENTION.value,
            remat=_REMAT.value,
            lora=dict(rank=_LORA.value, alpha=float(_LORA.value), targets=()),
        )
    )
    return model, sample


def _compiled(stage):
    """`stage`'s report printed; raises when it did not compile."""
    from bpgo_jax.parallel import aot

    for line in aot.report_lines(stage):
        print(line)
    if stage.compiled is None:
        raise UserError(f"{stage.name} does not compile for this backend")
    return stage


def _peak_tflops(device) -> float | None:
    if _PEAK.value > 0:
        return _PEAK.value
    from bpgo_jax.parallel import aot

    return aot.peak_tflops(device)


def _random_like(tree: Any, shardings: Any, seed: int) -> Any:
    """Random arrays of `tree`'s shapes, drawn on the devices straight into `shardings`."""
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree.flatten(tree)

    def draw():
        keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
        out = []
        for key, leaf in zip(keys, leaves, strict=False):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                out.append((0.02 * jax.random.normal(key, leaf.shape)).astype(leaf.dtype))
            else:
                out.append(jnp.zeros(leaf.shape, leaf.dtype))
        return jax.tree.unflatten(treedef, out)

    return jax.jit(draw, out_shardings=shardings)()


def _time(fn: Callable, args_fn: Callable, repeats: int) -> float:
    """Median seconds of `fn(*args_fn())` after one warm-up call (fresh args: donation)."""
    import jax

    jax.block_until_ready(fn(*args_fn()))
    times = []
    for _ in range(repeats):
        args = args_fn()
        jax.block_until_ready(args)
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str]) -> None:
    del argv
    if _DEVICES.value < 1:
        raise UserError(f"--devices={_DEVICES.value} must be >= 1")
    if _DEVICES.value > 1 and "jax" not in sys.modules:
        runtime.set_cpu_devices(_DEVICES.value)  # fake CPU devices; accelerators unaffected
    import jax
    import jax.numpy as jnp
    import ml_collections

    from bpgo_jax.advantages.forms import loss_crt_coef
    from bpgo_jax.build import _gathered
    from bpgo_jax.configs.common import base_config
    from bpgo_jax.parallel import aot
    from bpgo_jax.parallel import mesh as mesh_lib
    from bpgo_jax.rollout import samplers
    from bpgo_jax.update.loss import PolicyBatch
    from bpgo_jax.update.step import StepOptions, TrainState, UpdateStep, make_optimizer

    config = _CONFIG.value if _CONFIG.value is not None else base_config()
    model_cfg, sample_defaults = _model_config(_PRESET.value)
    sample_cfg = ml_collections.ConfigDict(config.sample.to_dict())
    if _CONFIG.value is None:
        sample_cfg.update(sample_defaults)
    devices = jax.devices()
    if len(devices) < _DEVICES.value:
        raise UserError(
            f"--devices={_DEVICES.value}: only {len(devices)} {devices[0].platform} device(s); "
            "fake devices exist on a CPU host only (JAX_PLATFORMS=cpu)"
        )
    devices = devices[: _DEVICES.value]
    try:
        mesh = mesh_lib.make_mesh(config.mesh.shape, config.mesh.axes, devices)
    except ValueError as err:
        raise ConfigError(f"config.mesh: {err}") from None
    rules = tuple(tuple(r) for r in config.mesh.rules)
    shards = mesh_lib.num_batch_shards(mesh)
    b = _BATCH.value
    if b % shards:
        raise UserError(f"--batch={b} must be divisible by the mesh's {shards} batch shards")

    dtype = jnp.dtype(_DTYPE.value)
    try:
        model, trainable, frozen = aot.abstract_model(model_cfg)
    except ConfigError as err:
        raise UserError(
            f"--preset={_PRESET.value} --resolution={_RESOLUTION.value}: {err}"
        ) from None
    if config.mesh.gather_params and mesh.shape.get("fsdp", 1) > 1:
        model = _gathered(model, mesh)
    sampler = samplers.make_sampler(sample_cfg, model)
    optimizer = make_optimizer(config.train)

    n_train, n_frozen = _count(trainable), _count(frozen)
    print(
        f"{_PRESET.value}: {_RESOLUTION.value} px, latent {model.latent_shape}, batch {b}, "
        f"{dtype.name}, remat={_REMAT.value}, "
        f"{f'LoRA rank {_LORA.value}' if _LORA.value else 'full fine-tune'}, "
        f"guidance_scale={sampler.guidance_scale}, {sampler.num_steps} sampler steps, "
        f"kl_beta={config.train.kl_beta}"
    )
    print(
        f"backend {jax.default_backend()} ({devices[0].device_kind}), "
        f"mesh {dict(mesh.shape)} over {len(devices)} device(s)"
    )
    parts = {"transformer": trainable.get("transformer", frozen.get("transformer"))}
    parts.update({k: v for k, v in frozen.items() if k != "transformer"})
    print(
        f"parameters: total {_num(n_train + n_frozen)}, trainable {_num(n_train)} ("
        + ", ".join(
            f"{k} {_num(_count(v))} ({aot.gib(aot.tree_bytes(v))})" for k, v in parts.items()
        )
        + ")"
    )

    def placed(tree):
        return aot.placed(tree, mesh_lib.tree_shardings(tree, mesh, rules))

    batch_sh, repl = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
    trainable_a, frozen_a = placed(trainable), placed(frozen)
    tokens = model.tokenize(["a photograph of an astronaut riding a horse"] * b)
    cond = jax.eval_shape(model.encode_text, frozen, tokens)
    uncond = jax.eval_shape(model.encode_text, frozen, tokens[:1])
    shape = model.latent_shape
    t_steps = sampler.num_steps

    def batched(s, sharding=batch_sh):
        return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)

    cond_a = jax.tree.map(batched, cond)
    uncond_a = jax.tree.map(lambda s: batched(s, repl), uncond)
    key_a = jax.ShapeDtypeStruct((b, 2), jnp.uint32, sharding=batch_sh)

    def rollout_call(trainable, frozen, x, k, cond, uncond, keys):
        """One step of `samplers.sample`'s scan body at step index `k`."""
        keys = jax.random.wrap_key_data(keys)
        t = jnp.full((x.shape[0],), jnp.asarray(sampler.tables["model_t"])[k])
        out = samplers.guided_prediction(
            model, sampler.guidance_scale, trainable, frozen, x, t, cond, uncond
        )
        mean, std = samplers.transition(sampler, jnp.full((x.shape[0],), k), x, out)
        return mean + std * samplers.step_noise(keys, k, shape), out

    x_a = jax.ShapeDtypeStruct((b, *shape), jnp.float32, sharding=batch_sh)
    k_a = jax.ShapeDtypeStruct((), jnp.int32, sharding=repl)
    rollout_fn = jax.jit(rollout_call, out_shardings=batch_sh)
    rollout_args = (trainable_a, frozen_a, x_a, k_a, cond_a, uncond_a, key_a)
    platform = devices[0].platform
    r_flops = _compiled(
        aot.compile_stage(
            "rollout step (one guided network call)",
            rollout_fn,
            rollout_args,
            platform=platform,
            mesh=mesh,
        )
    ).flops

    opts = StepOptions(
        model=model,
        sampler=sampler,
        optimizer=optimizer,
        num_micro=1,
        num_shards=shards,
        num_train_steps=1,
        window=(0, t_steps),
        clip_range=config.train.clip_range,
        crt_coef=loss_crt_coef(config),
        kl_beta=config.train.kl_beta,
        kl_form=config.train.kl_form,
        ema_decay=config.train.ema_decay,
    )
    state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        trainable=trainable,
        opt_state=jax.eval_shape(optimizer.init, trainable),
        ema=trainable if config.train.ema_decay else {},
        prior={},
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    state_sh = mesh_lib.tree_shardings(state, mesh, rules)
    state_a = aot.placed(state, state_sh)
    policy = PolicyBatch(
        latents=jax.ShapeDtypeStruct((b, t_steps + 1, *shape), jnp.float32, sharding=batch_sh),
        outputs=jax.ShapeDtypeStruct((b, t_steps, *shape), jnp.float32, sharding=batch_sh),
        cond=cond_a,
        advantages=jax.ShapeDtypeStruct((b,), jnp.float32, sharding=batch_sh),
        ras_weights=jax.ShapeDtypeStruct((b,), jnp.float32, sharding=batch_sh),
        crt_advantages=jax.ShapeDtypeStruct((b,), jnp.float32, sharding=batch_sh),
    )
    ref_a = trainable_a if config.train.kl_beta else None
    update = UpdateStep(opts, accumulate="scan", state_shardings=state_sh, metric_sharding=repl)
    update_fn = update.jitted["train_step"]
    update_args = (state_a, policy, frozen_a, ref_a, uncond_a)
    u_flops = _compiled(
        aot.compile_stage(
            "update step (one micro-batch x one trained step: forward, backward, AdamW)",
            update_fn,
            update_args,
            platform=platform,
            mesh=mesh,
        )
    ).flops
    print(
        "memory: XLA's estimate for this backend's compiler (XLA:CPU on a CPU host; "
        "GPU/TPU compilers plan buffers differently)"
    )
    if not _RUN.value:
        return

    frozen_v = _random_like(frozen, mesh_lib.tree_shardings(frozen, mesh, rules), 1)
    trainable_v = _random_like(trainable, mesh_lib.tree_shardings(trainable, mesh, rules), 2)
    cond_v = _random_like(cond, jax.tree.map(lambda _: batch_sh, cond), 3)
    uncond_v = _random_like(uncond, jax.tree.map(lambda _: repl, uncond), 4)
    x_v = _random_like(x_a, batch_sh, 5)
    keys_v = jax.device_put(jax.random.key_data(jax.random.split(jax.random.key(6), b)), batch_sh)
    k_v = jax.device_put(jnp.int32(0), repl)
    rollout_s = _time(
        rollout_fn,
        lambda: (trainable_v, frozen_v, x_v, k_v, cond_v, uncond_v, keys_v),
        _REPEATS.value,
    )
    batch_v = _random_like(policy, jax.tree.map(lambda _: batch_sh, policy), 7)

    def fresh_state():
        s = TrainState(
            step=jnp.zeros((), jnp.int32),
            trainable=jax.tree.map(jnp.copy, trainable_v),
            opt_state=optimizer.init(trainable_v),
            ema=jax.tree.map(jnp.copy, trainable_v) if config.train.ema_decay else {},
            prior={},
            rng=jax.random.key_data(jax.random.key(8)),
        )
        return jax.device_put(s, state_sh)

    ref_v = trainable_v if config.train.kl_beta else None
    update_s = _time(
        update_fn,
        lambda: (fresh_state(), batch_v, frozen_v, ref_v, uncond_v),
        _REPEATS.value,
    )
    peak = _peak_tflops(devices[0])
    for name, seconds, flops in (("rollout", rollout_s, r_flops), ("update", update_s, u_flops)):
        mfu = f", MFU {flops / seconds / (peak * 1e12):.1%}" if peak else ""
        print(f"{name} step: {seconds * 1e3:.1f} ms (median of {_REPEATS.value}){mfu}")
    if not peak:
        print(f"no peak FLOP/s known for {devices[0].device_kind!r}: give --peak_tflops for MFU")


if __name__ == "__main__":
    runtime.run(main, __doc__)
