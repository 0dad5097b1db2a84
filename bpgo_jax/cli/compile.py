r"""Compiles a run's stages for a TPU pod or N devices and prints their memory, FLOPs and time.

    python launch/compile.py --config=configs/sd_aesthetic.py --config.model.init=random \
        --config.model.preset=sd15 --topology=v5p:2x2x1
    python launch/compile.py --config=configs/sd_aesthetic.py --config.model.init=random \
        --config.model.preset=sd15 --config.model.lora.rank=0 --config.train.lr=1e-5 \
        --config.mesh.shape="(2,4)" --topology=v5p:2x2x2 --attention=xla
    python launch/compile.py --config=configs/image.py --devices=8

Tells before a pod is rented whether a config fits its chips and which mesh
to use: `--topology=GEN:CHIPS` (v4, v5e, v5p, v6e; e.g. v5e:4x4, v6e:2x2,
v5p:2x2x2; `--num_slices` for multi-slice) compiles for that TPU slice on
this host through libtpu's compile-only devices (`pip install
"bpgo-jax[tpu]"`, no TPU needed; libtpu warns that it finds no TPU
metadata); `--devices=N` compiles for N of this host's devices (N fake
devices on a CPU host), and neither flag for all of them.

The stages are the functions the trainer jits, with the config's mesh,
sharding rules and batch layout: one rollout call (`rollout.step`: sampler,
decode, jittable rewards over `sample.batch_size` samples), the advantages,
the shuffle into optimiser batches and one optimiser update
(`update.step`, `train.batch_size` samples). Nothing is allocated: weights
are shapes (`model.init=random` with `model.preset` for SD, FLUX and SD3;
the aesthetic reward without its files is its published architecture), so
FLUX-size models compile on a laptop.

Per stage and per device it prints XLA's memory analysis (arguments,
outputs, temporaries, generated code, their total), the matmul FLOPs (scans
multiplied out: the step's real compute) and the time they take at the
chip's bf16 peak, XLA's cost analysis (which counts a loop body once) and,
on TPU, XLA's estimated time (`optimal_seconds`, also per loop body). The
HBM line adds up a device's memory while the stage runs: what the trainer
holds (parameters, optimiser state, EMA and reference weights, reward
models, the epoch's rollout buffers so far: twice during the update, the
batch and its shuffled copy), the stage's own inputs, and XLA's outputs,
temporaries and code; it says whether that fits the chip's HBM (v4 32 GiB,
v5e 16, v5p 95, v6e 32; `--hbm_gib` for others). A TPU program that cannot
fit does not compile: XLA's reason is printed. docs/pods.md tabulates SD1.5
and FLUX.1-dev on v5p and v5e slices.
"""

from __future__ import annotations

import functools
import os
import sys

from absl import flags
from ml_collections import config_flags

from bpgo_jax import runtime


def define_flags() -> None:
    """The command's flags, defined when it runs rather than on import (module-level flags
    would clash with other commands' flags of the same name in one process, e.g. tests)."""
    if "topology" in flags.FLAGS:
        return
    config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
    flags.DEFINE_string(
        "topology", "", "TPU slice to compile for, GEN:CHIPS, e.g. v5p:2x2x1, v5e:2x2, v6e:4x4."
    )
    flags.DEFINE_integer(
        "num_slices",
        1,
        "Slices of --topology (multi-slice, over the data-centre network).",
        lower_bound=1,
    )
    flags.DEFINE_integer(
        "devices",
        0,
        "Compile for N of this host's devices (N fake ones on a CPU host); 0: all.",
        lower_bound=0,
    )
    flags.DEFINE_float(
        "hbm_gib",
        0.0,
        "Memory per device in GiB for the fit check; 0: the device's own, or the TPU table's.",
        lower_bound=0.0,
    )
    from bpgo_jax.parallel.aot import STAGES

    flags.DEFINE_multi_enum("stage", list(STAGES), STAGES, "Stages to compile (repeatable).")
    flags.DEFINE_enum(
        "attention",
        "",
        ["", "auto", "xla", "blocked", "cudnn", "splash"],
        "Attention kernel to compile with, in place of config.model.attention ('': the "
        "config's; also for configs whose model block lacks the field).",
    )
    flags.adopt_module_key_flags(runtime)
    flags.mark_flags_as_required(["config"])


def _devices(args: flags.FlagValues) -> tuple[list, str, int]:
    """`(devices, what they are, hosts)` of the flags."""
    from bpgo_jax.errors import UserError
    from bpgo_jax.parallel import aot

    if args.topology and args.devices:
        raise UserError("give --topology or --devices, not both")
    if args.topology:
        if not os.environ.get("JAX_PLATFORMS"):  # a pod VM's own chips stay free for its jobs
            import jax

            jax.config.update("jax_platforms", "cpu")
        try:
            devices = aot.topology_devices(args.topology, args.num_slices)
        except ValueError as err:
            raise UserError(f"--topology={args.topology}: {err}") from None
        slices = f" x {args.num_slices} slices" if args.num_slices > 1 else ""
        return devices, f"TPU {args.topology}{slices}", aot.num_hosts(devices)
    if args.num_slices > 1:
        raise UserError("--num_slices needs --topology")
    n = args.devices
    if n > 1 and "jax" not in sys.modules:
        runtime.set_cpu_devices(n)  # fake CPU devices; accelerators are unaffected
    import jax

    devices = jax.devices()
    if n > len(devices):
        raise UserError(
            f"--devices={n}: only {len(devices)} {devices[0].platform} device(s); fake devices "
            "exist on a CPU host only (JAX_PLATFORMS=cpu)"
        )
    devices = devices[: n or None]
    return devices, f"{len(devices)} local {devices[0].platform} device(s)", 1


def _model_line(config, latent_shape: tuple) -> str:
    m = config.model
    rank = (m.get("lora", None) or {}).get("rank", 0)
    preset = f" {m.preset}" if m.name != "tiny_unet" else ""
    return (
        f"model {m.name}{preset}: latent {latent_shape}, "
        f"{f'LoRA rank {rank}' if rank else 'full fine-tune'}, {m.get('dtype', 'float32')}, "
        f"attention={m.get('attention', 'auto')}; {config.sample.num_steps} sampler steps"
    )


def main(argv: list[str]) -> None:
    del argv
    say = functools.partial(print, flush=True)  # each stage as it compiles (minutes for SD)
    runtime.quiet_absl()
    args = flags.FLAGS
    devices, what, hosts = _devices(args)
    from bpgo_jax.parallel import aot

    config = args.config
    if args.attention:
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.model.attention = args.attention
    run = aot.plan_run(config, devices, hosts=hosts)
    devices = list(run.mesh.devices.flat)
    kind = devices[0].device_kind
    hbm = int(args.hbm_gib * 2**30) or aot.hbm_bytes(devices[0])
    peak = aot.peak_tflops(devices[0])
    layout, t = run.layout, config.train
    say(_model_line(config, run.latent_shape))
    say(
        f"devices: {what}, {len(devices)} x {kind} over {hosts} host(s), "
        f"HBM {aot.gib(hbm) if hbm else 'unknown'} per device; mesh {dict(run.mesh.shape)}"
    )
    say(
        f"batch: rollout {config.sample.batch_size} samples per call "
        f"({layout['rollout_calls']} calls per epoch), update {t.batch_size} samples "
        f"({layout['micro_per_update']} micro-batches x {layout['trained_steps']} trained "
        f"steps, accumulate={run.accumulate}), {layout['updates_per_inner_epoch']} update(s) "
        "per epoch"
    )
    for note in run.notes:
        say(note)
    say(
        "resident per device: "
        + ", ".join(f"{name} {aot.gib(n)}" for name, n in run.resident.items() if n)
    )
    too_big, refused = [], []
    for stage in run.compile(args.stage):
        for line in aot.report_lines(stage):
            say(line)
        if stage.compiled is None:
            (too_big if "RESOURCE_EXHAUSTED" in stage.error else refused).append(stage.name)
            continue
        times = []
        if peak:
            share = stage.flops_per_device
            times.append(
                f"matmul FLOPs at the {peak:.0f} TFLOP/s bf16 peak {share / peak / 1e12:.3g} s"
            )
        seconds = stage.cost.get("optimal_seconds")
        if seconds is not None and seconds > 0:  # negative: the cost model has none
            times.append(f"XLA's estimate {seconds:.3g} s (loop bodies once)")
        if times:
            say("  time per device: " + "; ".join(times))
        held = run.held.get(stage.name, 0)
        total = held + stage.inputs + stage.work_bytes
        line = (
            f"  HBM per device: {aot.gib(held)} held + {aot.gib(stage.inputs)} inputs + "
            f"{aot.gib(stage.work_bytes)} outputs, temporaries and code = {aot.gib(total)}"
        )
        if not hbm:
            say(f"{line} (no HBM size known for {kind!r}: give --hbm_gib)")
            continue
        say(f"{line} of {aot.gib(hbm)}: {'fits' if total <= hbm else 'DOES NOT FIT'}")
        if total > hbm:
            too_big.append(stage.name)
    if refused:
        say(f"DOES NOT COMPILE for {what}: {', '.join(refused)} (the reason is above)")
    if too_big:
        say(f"DOES NOT FIT {what}: {', '.join(too_big)} (a larger slice, fsdp, LoRA or bf16)")
    elif hbm and not refused:
        say(f"fits {what}: every stage compiled within {aot.gib(hbm)} per device")


def run() -> None:
    define_flags()
    runtime.run(main, __doc__)


if __name__ == "__main__":
    run()
