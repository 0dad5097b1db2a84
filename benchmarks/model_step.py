"""Compiled memory and FLOPs of one rollout step and one update step of a real-size flow DiT.

    python benchmarks/model_step.py --preset=flux_dev --resolution=512 --remat=full
    python benchmarks/model_step.py --preset=flux_dev --lora_rank=64 --remat=none
    python benchmarks/model_step.py --preset=sd35_medium --batch=2
    python benchmarks/model_step.py --preset=flux_dev --devices=8 --config.mesh.shape="(1,8)"
    python benchmarks/model_step.py --preset=flux_dev --run          # on an accelerator
    python benchmarks/model_step.py --preset=wan21_t2v_14b --resolution=480x832 --frames=81 \
        --lora_rank=32 --remat=full --topology=v5p:2x2x1 --config=configs/wan_t2v.py \
        --config.mesh.shape="(1,1,4)" --config.mesh.axes="('data','fsdp','context')"

The weights are abstract (`ShapeDtypeStruct`s, nothing drawn or allocated):
each step is `jax.jit(...).lower(abstract args).compile()`d and XLA's own
accounts are printed, per device: `memory_analysis()` (arguments, outputs,
temporaries, generated code) and `cost_analysis()` FLOPs (XLA's figure for
a partitioned program is one device's; the line also gives all devices').
XLA's cost analysis counts a loop body once, so the scanned blocks' FLOPs
appear there for one block per stack; the `matmul` figure counts every
matmul and convolution of the program's jaxpr with scan lengths multiplied
out (the backward pass, and the recomputation that remat adds, included):
the whole program's, divided evenly over the devices for the per-device
figure.

- rollout step: one guided network call of the sampler at `--batch` samples
  (classifier-free guidance doubles the rows when `sample.guidance_scale` is
  not 1), the step's mean and noise: the body of `rollout.samplers.sample`.
- update step: `update.step.train_step` for one micro-batch of `--batch`
  samples and one trained denoising step: forward, backward, clipping and
  AdamW on the trained parameters (LoRA factors with `--lora_rank`).

The config (`--config`, default the shared defaults) gives the sampler, the
optimiser, the KL term and the mesh block; the preset replaces its model.
Without `--config` the sampler is FLUX.1's (no classifier-free guidance,
resolution-dependent shift; schnell unshifted), Flow-GRPO's SD3.5 one
(guidance 4.5, shift 3), or for Wan configs/wan_t2v.py's whole config (CFG
5, its mesh rules). `flux_tiny` / `sd3_tiny` / `wan_tiny` are the tests'
small models; `--resolution` is a side or HEIGHTxWIDTH (Wan: 480x832) and
`--frames` a Wan video's length (1 + 4k). `--devices=N` compiles for N
devices (fake CPU devices on a CPU host), `--topology=GEN:CHIPS` for a TPU
slice through libtpu's compile-only devices (as launch/compile.py), over
`config.mesh.shape` / `config.mesh.axes` (a `context` axis splits each
sample's tokens in the DiT blocks: sequence parallelism), with parameters
placed by `config.mesh.rules`. The text encoders and the VAE are not run by
either step (XLA drops them from its arguments); their weights are counted in
the parameter lines and in what a device holds resident in a run (weights,
optimiser state, EMA), which each step's line adds to its own inputs,
outputs and temporaries and compares with the device's memory (`--hbm_gib`,
or the device's own / the TPU table). `--run` also allocates random
weights, times each step (median of `--repeats`) and prints seconds and
MFU: per-device matmul FLOPs / seconds / the device's peak
(`--peak_tflops`, or a table of dense bf16 peaks by device kind).
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
    "wan21_t2v_1_3b",
    "wan21_t2v_14b",
    "wan_tiny",
)
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run config (sampler, optimiser, mesh); default: the shared defaults."
)
_PRESET = flags.DEFINE_enum("preset", "flux_dev", PRESETS, "Model architecture.")
_RESOLUTION = flags.DEFINE_string(
    "resolution", "512", "Image side, or HEIGHTxWIDTH, in pixels (Wan: 480x832)."
)
_FRAMES = flags.DEFINE_integer("frames", 81, "Frames of a Wan video (1 + 4k).")
_BATCH = flags.DEFINE_integer("batch", 1, "Samples per rollout call and per update micro-batch.")
_REMAT = flags.DEFINE_enum("remat", "none", ["none", "full", "dots", "names"], "model.remat.")
_LORA = flags.DEFINE_integer("lora_rank", 0, "LoRA rank on the attention projections; 0: full.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Weights and compute.")
_ATTENTION = flags.DEFINE_string("attention", "auto", "model.attention: auto|xla|cudnn|splash.")
_DEVICES = flags.DEFINE_integer("devices", 1, "Devices to compile for (fake CPU devices on CPU).")
_TOPOLOGY = flags.DEFINE_string(
    "topology", "", "TPU slice to compile for (GEN:CHIPS, e.g. v5p:2x2x1), instead of --devices."
)
_HBM = flags.DEFINE_float("hbm_gib", 0.0, "Memory per device in GiB; 0: the device's own.")
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


def _size() -> int | tuple[int, int]:
    """`--resolution` as a side or (height, width)."""
    text = _RESOLUTION.value.lower()
    try:
        sides = tuple(int(v) for v in text.split("x"))
    except ValueError:
        sides = ()
    if len(sides) not in (1, 2) or min(sides) < 1:
        raise UserError(f"--resolution={_RESOLUTION.value!r} is not a side or HEIGHTxWIDTH")
    return sides[0] if len(sides) == 1 else sides


def _model_config(preset_name: str) -> tuple[Any, dict]:
    """`(config.model block, default sample overrides)` of a preset name and the flags."""
    import ml_collections

    family, _, size = preset_name.partition("_")
    family = "wan" if family.startswith("wan") else family
    fields = {}
    if family == "flux":
        # Guidance-distilled: no classifier-free guidance; FLUX.1's resolution-dependent shift.
        name, preset = "flux", size
        sample = dict(guidance_scale=1.0, dynamic_shift=size != "schnell")
    elif family == "wan":
        # configs/wan_t2v.py's sampler (CFG 5, the scheduler's shift) is the default config.
        name, preset = "wan", "tiny" if size == "tiny" else preset_name
        sample = {}
        fields = dict(num_frames=_FRAMES.value, max_sequence_length=0)
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
            resolution=_size(),
            attention=_ATTENTION.value,
            remat=_REMAT.value,
            lora=dict(rank=_LORA.value, alpha=float(_LORA.value), targets=()),
            **fields,
        )
    )
    return model, sample


def _compiled(stage, transient: Any, held: int, hbm: int | None):
    """`stage`'s report printed with a device's memory in a run: `held` bytes resident
    (parameters, optimiser state: the unused ones are not the step's arguments), the
    step's own inputs `transient`, its outputs, temporaries and code; whether that fits
    `hbm`. Raises when it did not compile."""
    import dataclasses

    from bpgo_jax.parallel import aot

    stage = dataclasses.replace(stage, inputs=aot.device_bytes(transient))
    for line in aot.report_lines(stage):
        print(line)
    if stage.compiled is None:
        raise UserError(f"{stage.name} does not compile for this backend")
    total = held + stage.inputs + stage.work_bytes
    line = (
        f"  in a run, per device: {aot.gib(held)} resident + {aot.gib(stage.inputs)} inputs + "
        f"{aot.gib(stage.work_bytes)} outputs, temporaries and code = {aot.gib(total)}"
    )
    if hbm:
        line += f" of {aot.gib(hbm)}: {'fits' if total <= hbm else 'DOES NOT FIT'}"
    print(line)
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
    if _TOPOLOGY.value and (_DEVICES.value > 1 or _RUN.value):
        raise UserError("--topology compiles only: give it without --devices and --run")
    if _DEVICES.value > 1 and "jax" not in sys.modules:
        runtime.set_cpu_devices(_DEVICES.value)  # fake CPU devices; accelerators unaffected
    import jax
    import jax.numpy as jnp
    import ml_collections

    from bpgo_jax.advantages.forms import loss_crt_coef
    from bpgo_jax.build import _gathered
    from bpgo_jax.configs.common import base_config
    from bpgo_jax.configs.wan_t2v import wan_config
    from bpgo_jax.parallel import aot
    from bpgo_jax.parallel import mesh as mesh_lib
    from bpgo_jax.rollout import samplers
    from bpgo_jax.update.loss import PolicyBatch
    from bpgo_jax.update.step import StepOptions, TrainState, UpdateStep, make_optimizer

    model_cfg, sample_defaults = _model_config(_PRESET.value)
    config = _CONFIG.value
    if config is None:
        config = wan_config() if model_cfg.name == "wan" else base_config()
    sample_cfg = ml_collections.ConfigDict(config.sample.to_dict())
    if _CONFIG.value is None:
        sample_cfg.update(sample_defaults)
    if _TOPOLOGY.value:
        try:
            devices = aot.topology_devices(_TOPOLOGY.value)
        except ValueError as err:
            raise UserError(f"--topology={_TOPOLOGY.value}: {err}") from None
    else:
        devices = jax.devices()
        if len(devices) < _DEVICES.value:
            raise UserError(
                f"--devices={_DEVICES.value}: only {len(devices)} {devices[0].platform} "
                "device(s); fake devices exist on a CPU host only (JAX_PLATFORMS=cpu)"
            )
        devices = devices[: _DEVICES.value]
    platform = devices[0].platform
    hbm = int(_HBM.value * 2**30) or aot.hbm_bytes(devices[0])
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
        with aot.tracing_for(platform):  # shapes traced with the target's attention kernels
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
        f"backend {platform} ({devices[0].device_kind}), "
        f"mesh {dict(mesh.shape)} over {len(devices)} device(s), "
        f"{aot.gib(hbm) if hbm else 'unknown memory'} per device"
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
    with aot.tracing_for(platform):
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
    ref_a = trainable_a if config.train.kl_beta else None
    resident = aot.device_bytes((state_a, frozen_a, ref_a))
    print(
        f"resident per device: {aot.gib(resident)} (trainable, optimiser state, EMA, frozen"
        f"{', reference' if ref_a is not None else ''})"
    )

    x_a = jax.ShapeDtypeStruct((b, *shape), jnp.float32, sharding=batch_sh)
    k_a = jax.ShapeDtypeStruct((), jnp.int32, sharding=repl)
    rollout_fn = jax.jit(mesh_lib.on_mesh(rollout_call, mesh), out_shardings=batch_sh)
    rollout_args = (trainable_a, frozen_a, x_a, k_a, cond_a, uncond_a, key_a)
    r_flops = _compiled(
        aot.compile_stage(
            "rollout step (one guided network call)",
            rollout_fn,
            rollout_args,
            platform=platform,
            mesh=mesh,
        ),
        (x_a, cond_a, uncond_a, key_a),
        resident,
        hbm,
    ).flops_per_device

    policy = PolicyBatch(
        latents=jax.ShapeDtypeStruct((b, t_steps + 1, *shape), jnp.float32, sharding=batch_sh),
        outputs=jax.ShapeDtypeStruct((b, t_steps, *shape), jnp.float32, sharding=batch_sh),
        cond=cond_a,
        advantages=jax.ShapeDtypeStruct((b,), jnp.float32, sharding=batch_sh),
        ras_weights=jax.ShapeDtypeStruct((b,), jnp.float32, sharding=batch_sh),
        crt_advantages=jax.ShapeDtypeStruct((b,), jnp.float32, sharding=batch_sh),
    )
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
        ),
        (policy, uncond_a),
        resident,
        hbm,
    ).flops_per_device
    print(
        f"memory: XLA's estimate of the {platform.upper()} compiler (XLA:CPU for fake CPU "
        "devices: GPU compilers plan buffers differently)"
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
