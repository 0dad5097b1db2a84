"""Ahead-of-time compilation: a run's stages compiled from shapes, for devices this host need
not have.

The devices are a TPU topology's (`topology_devices("v5p:2x2x1")`: libtpu's
compile-only devices, no TPU needed) or this host's. Weights, optimiser state
and batches are `ShapeDtypeStruct`s placed by the config's mesh rules
(`abstract_model`, `abstract_rewards`, `placed`), so a FLUX-size model costs
no memory here. `plan_run` sets a run up from its config, and its `compile`
lowers and compiles the functions the trainer jits (`rollout.step`,
`advantages.step`, `update.step`) at the config's batch layout; each `Stage`
holds XLA's memory and cost analyses.

What XLA reports: `memory_analysis()` per device (arguments, outputs,
temporaries, generated code; a TPU compile that needs more than the chip's
HBM fails with RESOURCE_EXHAUSTED instead). `cost_analysis()` counts a loop
body once, so for scanned programs (the sampler, scanned DiT blocks, the
update's accumulation) its FLOPs and `optimal_seconds` (TPU only) cover one
iteration; `matmul_flops` counts the jaxpr's matmuls and convolutions with
scan lengths multiplied out, the compute a step really runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bpgo_jax.errors import ConfigError, UserError, WeightsError
from bpgo_jax.parallel import mesh as mesh_lib

Params = Any

# HBM per chip in GiB (Cloud TPU system architecture pages), by `device.device_kind`.
TPU_HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}
# Dense bf16 peak TFLOP/s per device, by a substring of `device.device_kind`, first match
# wins: v5p's kind is "TPU v5", v5e's "TPU v5 lite".
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "B200": 2250.0,
    "TPU v6 lite": 918.0,
    "TPU v5 lite": 197.0,
    "TPU v5": 459.0,
    "TPU v4": 275.0,
}
_TOPOLOGY = re.compile(r"(v4|v5e|v5p|v5|v6e):\d+x\d+(x\d+)?")
# v4 and v5p chips have two TensorCores that jax drives as one device ("megacore").
_MEGACORE = ("v4", "v5p", "v5")


# ---------------------------------------------------------------- devices


def topology_devices(name: str, num_slices: int = 1) -> list:
    """Compile-only devices of TPU topology `name` (e.g. "v5p:2x2x1", "v5e:4x4", "v6e:2x2"),
    `num_slices` slices of it joined by the data-centre network. Needs libtpu
    (`pip install "bpgo-jax[tpu]"`), not a TPU. Raises ValueError for a bad name."""
    if not _TOPOLOGY.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a TPU topology: write GENERATION:CHIPS, e.g. v5p:2x2x1, v5e:2x2, "
            "v6e:4x4, v4:2x2x2 (generations v4, v5e, v5p, v6e)"
        )
    if num_slices < 1:
        raise ValueError(f"num_slices={num_slices} must be >= 1")
    from jax.experimental import topologies

    if importlib.util.find_spec("libtpu") is None:
        raise ValueError("needs libtpu, which is not installed: pip install 'bpgo-jax[tpu]'")
    # Compile-only devices touch no chip: another process (a run, another compile) may
    # hold libtpu's single-process lock.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs: dict[str, Any] = {"num_slices": num_slices} if num_slices > 1 else {}
    if name.split(":")[0] in _MEGACORE:
        kwargs["chip_config_name"] = "megacore"
    try:
        return list(topologies.get_topology_desc(name, "tpu", **kwargs).devices)
    except Exception as err:  # noqa: BLE001 (libtpu refused the topology)
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"topology {name!r}: {text}") from None


def num_hosts(devices: Sequence[Any]) -> int:
    """Processes the devices belong to: a pod's hosts."""
    return len({d.process_index for d in devices})


def hbm_bytes(device: Any) -> int | None:
    """Memory of one device: an addressable device's `memory_stats` limit, else the TPU
    table, else None (CPU)."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 (compile-only devices have none)
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    gib = TPU_HBM_GIB.get(device.device_kind)
    return gib * 2**30 if gib else None


def peak_tflops(device: Any) -> float | None:
    """Dense bf16 peak TFLOP/s of `device` (`PEAK_TFLOPS`), or None when unknown."""
    return next((v for k, v in PEAK_TFLOPS.items() if k in device.device_kind), None)


# ---------------------------------------------------------------- shapes


def _module_shapes(module: Any, dtype: Any, *inputs: Any) -> Params:
    """A Flax module's params as ShapeDtypeStructs of `dtype` (what `random_params` draws)."""
    tree = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))["params"]
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)), tree)


def _text_shapes(stack: Any, dtype: Any) -> Params:
    """A DiT text stack's params (`TextStack.init`) as ShapeDtypeStructs."""
    from bpgo_jax.models.clip import CLIPTextModel
    from bpgo_jax.models.clip.loaders import text_inputs
    from bpgo_jax.models.t5 import example_inputs

    return {
        name: _module_shapes(
            m, dtype, *((text_inputs(m.cfg),) if isinstance(m, CLIPTextModel) else example_inputs())
        )
        for name, m in stack.encoders
    }


def _preset_configs(cfg: ml_collections.ConfigDict, preset_fn: Callable, keys: Sequence[str]):
    try:
        configs = preset_fn(cfg.get("preset", "tiny"))
    except ValueError as err:
        raise ConfigError(f"config.model.preset: {err}") from None
    for key in keys:
        configs[key].update(dict(cfg.get(key, None) or {}))
    return configs


def _sd(cfg: ml_collections.ConfigDict):
    from bpgo_jax.models import lora as lora_lib
    from bpgo_jax.models.sd import loader
    from bpgo_jax.models.sd import pipeline as sd
    from bpgo_jax.models.sd.presets import preset
    from bpgo_jax.models.sd.scheduler import scheduler_from_dict

    dtype = jnp.bfloat16 if cfg.get("dtype", "float32") == "bfloat16" else jnp.float32
    lora = lora_lib.spec_from_config(cfg.get("lora", None), lora_lib.SD_ATTENTION_TARGETS)
    configs = _preset_configs(cfg, preset, ("unet", "vae", "text_encoder"))
    mods = sd.modules_from_configs(configs, dtype, cfg.get("attention", "auto"))
    overrides = {k: v for k, v in dict(cfg.get("scheduler", None) or {}).items() if v is not None}
    if overrides:
        schedule = scheduler_from_dict({**mods.scheduler.to_dict(), **overrides})
        mods = dataclasses.replace(mods, scheduler=schedule)
    model = sd.model_from_modules(mods, resolution=cfg.get("resolution", None), lora=lora)
    tokens = jnp.zeros((1, mods.text.cfg.max_position_embeddings), jnp.int32)
    unet = _module_shapes(mods.unet, dtype, *loader.unet_inputs(mods.unet.cfg))
    frozen = {
        "text": _module_shapes(mods.text, dtype, tokens),
        "vae": _module_shapes(mods.vae, dtype, *loader.vae_inputs(mods.vae.cfg)),
    }
    split = lambda u, f: lora_lib.split_params(u, f, lora, jax.random.key(0))
    return model, *jax.eval_shape(split, unet, frozen)


def _flux(cfg: ml_collections.ConfigDict):
    from bpgo_jax.models import flux
    from bpgo_jax.models import lora as lora_lib
    from bpgo_jax.models.text_cache import jnp_dtype

    configs = _preset_configs(cfg, flux.preset, ("transformer", "vae"))
    mods = flux.modules_from_configs(
        configs,
        jnp_dtype(cfg.get("dtype", "float32")),
        attention=cfg.get("attention", "auto"),
        remat=cfg.get("remat", "none"),
        max_sequence_length=cfg.get("max_sequence_length", None) or None,
    )
    lora = lora_lib.spec_from_config(cfg.get("lora", None), flux.FLUX_ATTENTION_TARGETS)
    guidance = cfg.get("guidance", None)
    model = flux.model_from_modules(
        mods,
        resolution=cfg.get("resolution", None),
        lora=lora,
        **({} if guidance is None else {"guidance": float(guidance)}),
    )
    return model, *flux.param_shapes(mods, lora)


def _sd3(cfg: ml_collections.ConfigDict):
    from bpgo_jax.models import lora as lora_lib
    from bpgo_jax.models import sd3
    from bpgo_jax.models.sd.loader import vae_inputs
    from bpgo_jax.models.sd3.transformer import example_inputs
    from bpgo_jax.models.text_cache import jnp_dtype

    dtype = jnp_dtype(cfg.get("dtype", "float32"))
    configs = _preset_configs(cfg, sd3.preset, ("transformer", "vae"))
    mods = sd3.modules_from_configs(
        configs,
        dtype,
        attention=cfg.get("attention", "auto"),
        remat=cfg.get("remat", "none"),
        max_sequence_length=cfg.get("max_sequence_length", None) or None,
    )
    lora = lora_lib.spec_from_config(cfg.get("lora", None), sd3.SD3_ATTENTION_TARGETS)
    model = sd3.model_from_modules(mods, resolution=cfg.get("resolution", None), lora=lora)
    net = _module_shapes(mods.transformer, dtype, *example_inputs(mods.transformer.cfg))
    frozen = {"vae": _module_shapes(mods.vae, dtype, *vae_inputs(mods.vae.cfg)), "text": {}}
    frozen["text"] = _text_shapes(mods.text, dtype)
    split = lambda n, f: lora_lib.split_params(n, f, lora, jax.random.key(0), key="transformer")
    return model, *jax.eval_shape(split, net, frozen)


def _wan(cfg: ml_collections.ConfigDict):
    """`wan.pipeline.wan_from_config`'s model with abstract weights: the same fields read by
    the same `dit.pipeline.model_from_config`, modules built and shapes taken instead of
    drawn. With `condition_prompts`, the image-to-video model (`_wan_i2v`)."""
    from bpgo_jax.models.dit import pipeline as dit_pipeline
    from bpgo_jax.models.wan import pipeline as wan
    from bpgo_jax.models.wan.presets import preset

    if cfg.get("condition_prompts", None):
        return _wan_i2v(cfg)

    def build(configs, *, rng, lora, resolution, num_frames, vae_batch_chunk, text_cache, **kw):
        del rng, text_cache
        o = dit_pipeline.options_of(kw)
        mods = wan.modules_from_configs(configs, o.dtype, **o.modules())
        model = wan.model_from_modules(
            mods,
            num_frames=num_frames,
            resolution=resolution,
            lora=lora,
            vae_batch_chunk=vae_batch_chunk,
        )
        return model, *wan.param_shapes(mods, lora)

    return dit_pipeline.model_from_config(
        cfg,
        jax.random.key(0),
        None,
        family="Wan",
        targets=wan.WAN_ATTENTION_TARGETS,
        preset=preset,
        build=build,
        num_frames=int(cfg.get("num_frames", wan.DEFAULT_FRAMES)),
        vae_batch_chunk=cfg.get("vae_batch_chunk", None) or None,
    )


def _wan_i2v(cfg: ml_collections.ConfigDict):
    """`wan.i2v.wan_i2v_from_config`'s model with abstract weights (the conditioning images
    of `condition_prompts` are read: they are part of the model's frozen tree)."""
    from bpgo_jax.models.clip.loaders import vision_inputs
    from bpgo_jax.models.dit import pipeline as dit_pipeline
    from bpgo_jax.models.wan import i2v
    from bpgo_jax.models.wan import vae as wan_vae
    from bpgo_jax.models.wan.pipeline import DEFAULT_SIZE
    from bpgo_jax.models.wan.transformer import example_inputs
    from bpgo_jax.prompts.images import condition_images

    sets, options = i2v.config_options(cfg)

    def build(configs, *, rng, lora, resolution, num_frames, text_cache, **kw):
        del text_cache
        fields = ("dtype", "attention", "remat", "max_sequence_length")
        o = dit_pipeline.options_of({k: kw.pop(k) for k in fields})
        mods = i2v.modules_from_configs(configs, o.dtype, **o.modules())
        size = dit_pipeline.image_size(resolution, DEFAULT_SIZE)
        images, rows = condition_images(sets, *size)
        last = condition_images(sets, *size, key="last_image")
        clip = i2v.clip_pixel_table(mods, sets, last)
        model, trained = i2v.model_from_modules(
            mods,
            images,
            rows,
            num_frames=num_frames,
            resolution=resolution,
            lora=lora,
            last=last,
            clip=clip,
            **kw,
        )
        nets = {n: _module_shapes(m, o.dtype, *example_inputs(m.cfg)) for n, m in mods.experts}
        frozen = {
            "vae": _module_shapes(mods.vae, o.dtype, *wan_vae.example_inputs(mods.vae.cfg)),
            "text": _text_shapes(mods.text, o.dtype),
            **jax.eval_shape(lambda: i2v.condition_tables(images, last)),
        }
        if clip is not None:  # Wan2.1 I2V / FLF2V: the CLIP tower and the frames' pixels
            encoder = mods.image_encoder
            frozen["image_encoder"] = _module_shapes(encoder, o.dtype, vision_inputs(encoder.cfg))
            frozen["clip_pixels"] = jax.ShapeDtypeStruct(clip.shape, jnp.float32)
        split = lambda n, f: i2v.split_experts(n, f, lora, trained, rng)
        return model, *jax.eval_shape(split, nets, frozen)

    return dit_pipeline.model_from_config(cfg, jax.random.key(0), None, build=build, **options)


def abstract_model(cfg: ml_collections.ConfigDict) -> tuple[Any, Params, Params]:
    """`config.model` -> `(model, trainable, frozen)` with the parameters as
    ShapeDtypeStructs: what `models.build_model` returns, nothing drawn or read.

    SD, FLUX, SD3 and Wan (text- and image-to-video, every expert) are built
    from `model.preset` (`model.init="random"`): a diffusers folder's
    architecture is not read. The built-in model takes either init.
    """
    name, init = cfg.name, cfg.get("init", "random")
    if name == "tiny_unet":
        from bpgo_jax.models.tiny import tiny_model, with_lora

        model = tiny_model(cfg)
        key = jax.random.key(0)
        trainable, frozen = jax.eval_shape(model.init, key)
        return model, *jax.eval_shape(lambda t, f: with_lora(cfg, t, f, key), trainable, frozen)
    builders = {"sd": _sd, "flux": _flux, "sd3": _sd3, "wan": _wan}
    if name not in builders:
        raise ConfigError(
            f"config.model.name={name!r} is not one of: tiny_unet, sd, flux, sd3, wan"
        )
    if init != "random":
        raise ConfigError(
            f"config.model.init={init!r}: compiling reads no weights; give "
            "--config.model.init=random and --config.model.preset=NAME (the folder's architecture)"
        )
    if cfg.get("text_cache", ""):
        raise ConfigError("config.model.text_cache needs the folder's weights: set it to ''")
    try:
        return builders[name](cfg)
    except UserError:
        raise
    except ValueError as err:  # a config dict the modules refuse
        raise ConfigError(f"config.model: {err}") from None


def _aesthetic(block: ml_collections.ConfigDict) -> Any:
    """The LAION aesthetic predictor on CLIP ViT-L/14 (openai/clip-vit-large-patch14's
    architecture) with abstract weights: `rewards.clip_rewards.build_aesthetic`'s function."""
    from bpgo_jax.models.clip import CLIPVisionModel, VisionConfig, l2_normalize, preprocess_images
    from bpgo_jax.models.clip.loaders import vision_inputs
    from bpgo_jax.rewards.base import Reward
    from bpgo_jax.rewards.clip_rewards import aesthetic_head

    vision = VisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        patch_size=14,
        image_size=224,
        projection_dim=768,
    )
    dtype = jnp.dtype(block.get("dtype", "float32"))
    module = CLIPVisionModel(vision, with_projection=True, dtype=dtype)
    widths = (768, 1024, 128, 64, 16, 1)  # the head's Linear layers, in order
    head = [
        {
            "kernel": jax.ShapeDtypeStruct((i, o), jnp.float32),
            "bias": jax.ShapeDtypeStruct((o,), jnp.float32),
        }
        for i, o in zip(widths[:-1], widths[1:], strict=True)
    ]
    params = {"clip": _module_shapes(module, dtype, vision_inputs(vision)), "head": head}

    def fn(params, images: jax.Array, aux: dict) -> jax.Array:
        del aux
        pixels = preprocess_images(images, vision.image_size)
        _, embeds = module.apply({"params": params["clip"]}, pixels)
        return aesthetic_head(params["head"], l2_normalize(embeds))

    return Reward(name="aesthetic", jittable=True, fn=fn, params=params)


# Rewards whose weights are files, compiled without them when their paths are unset.
STAND_INS: dict[str, Callable[[ml_collections.ConfigDict], Any]] = {"aesthetic": _aesthetic}


def abstract_rewards(cfg: ml_collections.ConfigDict) -> tuple[Any, dict, list[str]]:
    """`config.rewards` -> `(RewardSet, its params as ShapeDtypeStructs, notes)`.

    A reward is built as the run builds it; one whose weight paths are unset
    and that has a stand-in (`STAND_INS`) gets its architecture with abstract
    weights, and a note says so.
    """
    from bpgo_jax import rewards as rewards_lib
    from bpgo_jax.rewards.compose import RewardSet

    built, notes = [], []
    for name, block in cfg.items():
        try:
            built.append(rewards_lib.build(name, block))
        except (ConfigError, WeightsError) as err:
            unset = not any(v for k, v in block.items() if k == "path" or k.endswith("_path"))
            if name not in STAND_INS or not unset:
                raise ConfigError(f"config.rewards.{name}: {err}") from None
            built.append(STAND_INS[name](block))
            notes.append(f"reward {name}: its published architecture with abstract weights")
    reward_set = RewardSet(
        tuple(built), tuple(cfg.keys()), tuple(float(b.weight) for b in cfg.values())
    )
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), reward_set.params())
    return reward_set, params, notes


def placed(tree: Any, shardings: Any) -> Any:
    """`tree`'s shapes as ShapeDtypeStructs on `shardings` (a matching tree, or one for all)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=shardings), tree
        )
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings
    )


def tree_bytes(tree: Any) -> int:
    """Bytes of every leaf of `tree`, whole."""
    return int(
        sum(np.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
    )


def device_bytes(tree: Any) -> int:
    """Bytes one device holds of `tree`'s placed leaves (its shard of each)."""
    return int(
        sum(
            np.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
            for x in jax.tree.leaves(tree)
        )
    )


def opt_state_placed(optimizer: Any, trainable: Any, replicated: NamedSharding) -> Any:
    """The optimiser state of placed `trainable`, as `build.init_opt_state` places it:
    parameter-shaped leaves on their parameter's sharding, the rest replicated."""
    from bpgo_jax.build import opt_state_shardings

    shapes = jax.eval_shape(optimizer.init, trainable)
    return placed(shapes, opt_state_shardings(optimizer, trainable, replicated))


# ---------------------------------------------------------------- compiling


def matmul_flops(jaxpr: Any) -> int:
    """Multiply-add FLOPs (x2) of every dot and convolution of a jaxpr, whole (all devices).

    Scan bodies count `length` times, a Pallas kernel's body once per step of
    its grid (splash attention: every block, padding included), a `shard_map`
    body once per device it runs on, `cond` its costliest branch, a `while`
    body once (its trip count is not static).
    """
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            contract = int(np.prod([lhs[d] for d in lc]))
            batch = int(np.prod([lhs[d] for d in lb]))
            free_l = int(np.prod(lhs)) // (contract * batch)
            free_r = int(np.prod(rhs)) // (contract * batch)
            total += 2 * batch * free_l * free_r * contract
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            kernel_out = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            per_output = int(np.prod(rhs)) // kernel_out  # in-channels / groups x window
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * per_output
        elif name == "scan":
            total += eqn.params["length"] * matmul_flops(eqn.params["jaxpr"].jaxpr)
        elif name == "pallas_call":
            steps = int(np.prod(eqn.params["grid_mapping"].grid))
            total += steps * matmul_flops(eqn.params["jaxpr"])
        elif name == "shard_map":
            mesh, axes = eqn.params["mesh"], eqn.params.get("newly_manual_axes") or ()
            copies = int(np.prod([mesh.shape[a] for a in axes])) if axes else mesh.size
            total += copies * matmul_flops(eqn.params["jaxpr"])
        elif name == "cond":
            total += max(matmul_flops(b.jaxpr) for b in eqn.params["branches"])
        else:
            for value in eqn.params.values():
                sub = getattr(value, "jaxpr", value)
                if hasattr(sub, "eqns"):
                    total += matmul_flops(sub)
    return total


@contextlib.contextmanager
def tracing_for(platform: str, mesh: Mesh | None = None) -> Iterator[None]:
    """Traces as the target would: `jax.default_backend()` answers `platform` (the models
    pick attention kernels by it, `models/attention.py`), inside `jax.set_mesh(mesh)`
    (the context splash attention is partitioned by). For another platform
    nothing is written to the persistent compilation cache: compile-only
    executables cannot be loaded from it."""
    original = jax.default_backend
    min_seconds = jax.config.jax_persistent_cache_min_compile_time_secs
    if platform != original():
        jax.default_backend = lambda: platform
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
    try:
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            yield
    finally:
        jax.default_backend = original
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One compiled program and XLA's accounts of it, or why it did not compile."""

    name: str
    compiled: Any  # jax.stages.Compiled, None when it failed
    outputs: Any  # the outputs' ShapeDtypeStructs (with shardings when compiled)
    compile_seconds: float
    flops: int  # `matmul_flops` of the whole program (all devices together)
    error: str = ""  # XLA's one-line reason when it did not compile
    inputs: int = 0  # per-device bytes of its arguments that live only for this stage
    devices: int = 1  # devices the program runs on (its mesh's)

    @property
    def flops_per_device(self) -> float:
        """The matmul FLOPs split evenly over the devices (a call that every device computes
        whole, such as replicated attention, costs each device more)."""
        return self.flops / self.devices

    @property
    def memory(self) -> Any:
        return self.compiled.memory_analysis()

    @property
    def cost(self) -> dict:
        """XLA's cost analysis of the partitioned program: one device's share (XLA:CPU and
        XLA:TPU alike), with a loop body counted once."""
        cost = self.compiled.cost_analysis()
        return (cost[0] if isinstance(cost, list | tuple) else cost) or {}

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs + temporaries, less what outputs reuse of donated arguments."""
        m = self.memory
        return m.argument_size_in_bytes + self.work_bytes - m.generated_code_size_in_bytes

    @property
    def work_bytes(self) -> int:
        """What the program adds to its arguments: new outputs, temporaries, its code."""
        m = self.memory
        return (
            m.output_size_in_bytes
            - m.alias_size_in_bytes
            + m.temp_size_in_bytes
            + m.generated_code_size_in_bytes
        )


def compile_stage(name: str, fn: Any, args: tuple, *, platform: str, mesh: Mesh | None) -> Stage:
    """Lowers and compiles jitted `fn` at abstract `args` for `platform`'s devices.

    A program XLA refuses (on TPU: more memory than the chip's HBM) gives a
    Stage with `error` set and its output shapes, so later stages still compile.
    """
    devices = 1 if mesh is None else mesh.size
    with tracing_for(platform, mesh):
        outputs = jax.eval_shape(fn, *args)
        flops = matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)
        start = time.perf_counter()
        try:
            compiled = fn.lower(*args).compile()
        except (jax.errors.JaxRuntimeError, NotImplementedError) as err:
            # XLA's refusal (e.g. RESOURCE_EXHAUSTED on HBM) or a kernel the target's
            # lowering rejects: what the run would hit on those devices.
            reason = f"{type(err).__name__}: {' '.join(str(err).split())}"
            seconds = time.perf_counter() - start
            return Stage(name, None, outputs, seconds, flops, reason[:400], devices=devices)
    seconds = time.perf_counter() - start
    outputs = jax.tree.map(
        lambda o, s: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=s),
        outputs,
        compiled.output_shardings,
    )
    return Stage(name, compiled, outputs, seconds, flops, devices=devices)


def gib(n: float) -> str:
    """Bytes in GiB, or MiB below one GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def tflop(n: float) -> str:
    return f"{n / 1e12:.2f} TFLOP ({n:.4e})"


def report_lines(stage: Stage) -> list[str]:
    """A stage's compile time, memory per device and FLOPs, as printed by the commands.

    FLOPs per device and for all `stage.devices` together: the matmul count
    (the whole program's, split evenly) and XLA's cost analysis (one device's).
    """
    if stage.compiled is None:
        return [f"{stage.name}: does not compile: {stage.error}"]
    mem, cost, n = stage.memory, stage.cost, stage.devices
    xla = cost.get("flops", 0.0)
    return [
        f"{stage.name}: compiled in {stage.compile_seconds:.1f} s",
        f"  memory per device: arguments {gib(mem.argument_size_in_bytes)}, outputs "
        f"{gib(mem.output_size_in_bytes)} (aliased {gib(mem.alias_size_in_bytes)}), "
        f"temporaries {gib(mem.temp_size_in_bytes)}, generated code "
        f"{mem.generated_code_size_in_bytes / 2**20:.1f} MiB; total {gib(stage.peak_bytes)}",
        f"  FLOPs per device: matmul {tflop(stage.flops_per_device)} (scans multiplied out; "
        f"{n} device(s): {tflop(stage.flops)} in all); XLA cost analysis {tflop(xla)} "
        f"(loop bodies once; {tflop(xla * n)} in all), bytes accessed "
        f"{gib(cost.get('bytes accessed', 0.0))}",
    ]


# ---------------------------------------------------------------- a run


@dataclasses.dataclass
class RunPlan:
    """`plan_run`'s result: the run's layout and placement, and its stages to compile."""

    mesh: Mesh
    layout: dict  # `config.batch_layout`
    platform: str
    latent_shape: tuple
    accumulate: str  # the update's loop, "scan" or "host"
    resident: dict[str, int]  # per-device bytes: parameters, optimiser state, ...
    # Stage name -> per-device bytes of the arrays the trainer holds while it runs: the
    # resident ones and the epoch's rollout buffers so far.
    held: dict[str, int]
    notes: list[str]
    # `compile(names)` compiles the named stages (`STAGES`), yielding each when done.
    compile: Callable[[Sequence[str]], Iterator[Stage]]


STAGES = ("rollout", "advantages", "shuffle", "update")


def _host_update(update: Any, state, batch, frozen, ref, uncond, compile_one) -> Iterator[Stage]:
    """The three programs of `accumulate="host"`, each fed its predecessor's outputs."""
    prepare = compile_one(
        "update_prepare", update.jitted["update_prepare"], (state, batch), (batch,)
    )
    yield prepare
    micro, micro_order, rng = prepare.outputs
    step = jax.ShapeDtypeStruct((), jnp.int32)
    acc = state.trainable  # the gradient accumulator: trainable-shaped, donated
    accumulate = compile_one(
        "update_accumulate",
        update.jitted["update_accumulate"],
        (acc, step, state.trainable, frozen, ref, micro, micro_order, uncond),
        (acc, batch, micro, micro_order),
    )
    yield accumulate
    grads, metrics = accumulate.outputs
    stacked = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct((update.opts.count, *m.shape), m.dtype, sharding=m.sharding),
        metrics,
    )
    yield compile_one(
        "update_finish",
        update.jitted["update_finish"],
        (state, grads, stacked, rng),
        (batch, grads, stacked),
    )


def plan_run(
    config: ml_collections.ConfigDict, devices: Sequence[Any], *, hosts: int = 1
) -> RunPlan:
    """The run's stages for `devices` (`hosts` processes), from shapes only.

    The same checks as a run (`config.validate`, prompt files, the mesh), the
    same jitted functions and shardings as `build.build_run` /
    `build.build_training`, inputs of the config's batch layout: one rollout
    call of `sample.batch_size` samples, the epoch's advantages, its shuffle
    into optimiser batches, and one optimiser update of `train.batch_size`.
    Raises `ConfigError` for a config the run would refuse.
    """
    from bpgo_jax.advantages.step import jit_advantages_step
    from bpgo_jax.build import _gathered
    from bpgo_jax.config import check_inputs, validate
    from bpgo_jax.priors import init_prior_state
    from bpgo_jax.rollout import samplers
    from bpgo_jax.rollout.step import jit_rollout_step
    from bpgo_jax.update.loss import PolicyBatch
    from bpgo_jax.update.step import (
        TrainState,
        UpdateStep,
        jit_shuffle,
        make_optimizer,
        step_options,
    )

    devices = list(devices)[: config.mesh.num_devices or None]
    platform = devices[0].platform
    layout = validate(config, len(devices), hosts)
    prompts = check_inputs(config)["prompts.path"]
    try:
        mesh = mesh_lib.make_mesh(config.mesh.shape, config.mesh.axes, devices)
    except ValueError as err:
        raise ConfigError(f"mesh: {err}") from None
    rules = tuple(tuple(r) for r in config.mesh.rules)
    shards = mesh_lib.num_batch_shards(mesh)
    batch_sh, repl = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)

    with tracing_for(platform):  # shapes traced with the target's attention kernels
        model, trainable, frozen = abstract_model(config.model)
    if config.mesh.gather_params and mesh.shape.get("fsdp", 1) > 1:
        model = _gathered(model, mesh)
    reward_set, reward_params, notes = abstract_rewards(config.rewards)
    try:
        sampler = samplers.make_sampler(config.sample, model)
    except ValueError as err:
        raise ConfigError(f"sample: {err}") from None
    try:
        trainable = placed(trainable, mesh_lib.tree_shardings(trainable, mesh, rules))
        frozen = placed(frozen, mesh_lib.tree_shardings(frozen, mesh, rules))
    except ValueError as err:
        raise ConfigError(f"mesh.rules: {err}") from None
    reward_params = placed(reward_params, repl)

    def compile_one(name: str, fn: Any, args: tuple, transient: tuple = ()) -> Stage:
        """`compile_stage`, with the bytes of `transient`: its arguments that the
        trainer makes for this stage alone (the rest are resident)."""
        stage = compile_stage(name, fn, args, platform=platform, mesh=mesh)
        return dataclasses.replace(stage, inputs=device_bytes(transient))

    def rows(tree: Any, n: int, sharding: NamedSharding = batch_sh) -> Any:
        """`tree` with `n` rows on its leading axis, on `sharding`."""
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((n, *np.shape(x)[1:]), x.dtype, sharding=sharding), tree
        )

    rb, n_samples = config.sample.batch_size, layout["samples_per_epoch"]
    texts = [prompts.prompts[i % len(prompts)] for i in range(rb)]
    meta = [prompts.metadata[i % len(prompts)] for i in range(rb)]
    tokens = rows(np.asarray(model.tokenize(texts)), rb)
    uncond_tokens = placed(np.asarray(model.tokenize([config.sample.negative_prompt])), repl)
    aux = rows(jax.tree.map(np.asarray, reward_set.prepare(texts, meta)), rb)
    key = placed(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))), repl)
    with tracing_for(platform, mesh):
        uncond = placed(jax.eval_shape(model.encode_text, frozen, uncond_tokens), repl)
    shared = config.sample.group_size if config.sample.get("shared_initial_noise", False) else 1
    rollout_fn = jit_rollout_step(
        model=model,
        sampler=sampler,
        reward_set=reward_set,
        num_chunks=layout["rollout_chunks"],
        num_shards=shards,
        batch_sharding=batch_sh,
        init_group=shared,
    )
    index = jax.ShapeDtypeStruct((rb,), jnp.int32, sharding=batch_sh)
    rollout_args = (trainable, frozen, reward_params, tokens, uncond_tokens, index, key, aux)
    with tracing_for(platform, mesh):
        latents, outputs, cond, images, scores = jax.eval_shape(rollout_fn, *rollout_args)

    # Every prior kind has this structure; only its shapes are compiled for.
    prior = placed(init_prior_state(len(prompts), kind="reference"), repl)
    n_prompts = config.sample.prompts_per_epoch
    advantages_fn = jit_advantages_step(
        config, batch_sharding=batch_sh, prior_sharding=repl, replicated=repl
    )
    advantages_args = (
        prior,
        jax.ShapeDtypeStruct((n_prompts,), jnp.int32, sharding=repl),
        jax.ShapeDtypeStruct((n_samples,), jnp.float32, sharding=batch_sh),
    )
    per_sample = jax.ShapeDtypeStruct((n_samples,), jnp.float32, sharding=batch_sh)
    epoch = PolicyBatch(
        rows(latents, n_samples),
        rows(outputs, n_samples),
        rows(cond, n_samples),
        per_sample,
        per_sample,
        per_sample,
    )
    batches = NamedSharding(mesh, P(None, mesh_lib.batch_axes(mesh)))
    shuffle_fn = jit_shuffle(layout["updates_per_inner_epoch"], batches)
    perm = jax.ShapeDtypeStruct((n_samples,), jnp.int32, sharding=repl)

    optimizer = make_optimizer(config.train)
    needs_ref = config.train.kl_beta > 0 or config.prior.kind == "reference"
    state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=repl),
        trainable=trainable,
        opt_state=opt_state_placed(optimizer, trainable, repl),
        ema=trainable if config.train.ema_decay else {},
        prior=prior,
        rng=key,
    )
    accumulate = config.train.accumulate
    if accumulate == "auto":  # `UpdateStep`'s rule, for the target's backend
        accumulate = "host" if platform == "cpu" else "scan"
    opts = step_options(config, layout, shards, model=model, sampler=sampler, optimizer=optimizer)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    update = UpdateStep(
        opts, accumulate=accumulate, state_shardings=state_shardings, metric_sharding=repl
    )
    batch = jax.tree.map(lambda x: rows(x, config.train.batch_size), epoch)
    ref = trainable if needs_ref else None

    def compile_stages(names: Sequence[str]) -> Iterator[Stage]:
        if "rollout" in names:
            yield compile_one("rollout", rollout_fn, rollout_args, rollout_args[3:])
        if "advantages" in names:
            yield compile_one("advantages", advantages_fn, advantages_args, advantages_args[1:])
        if "shuffle" in names:
            yield compile_one("shuffle", shuffle_fn, (epoch, perm), (perm,))
        if "update" in names and accumulate == "scan":
            args = (state, batch, frozen, ref, uncond)
            yield compile_one("update", update.jitted["train_step"], args, (batch,))
        elif "update" in names:
            yield from _host_update(update, state, batch, frozen, ref, uncond, compile_one)

    eval_params = abstract_rewards(config.eval.rewards)[1] if config.eval.rewards else {}
    resident = {
        "trainable": device_bytes(trainable),
        "frozen": device_bytes(frozen),
        "optimiser state": device_bytes(state.opt_state),
        "EMA": device_bytes(state.ema),
        "reference": device_bytes(ref) if ref is not None else 0,
        "rewards": device_bytes(reward_params),
        "eval rewards": device_bytes(placed(eval_params, repl)),
        "rollout buffers": device_bytes((epoch.latents, epoch.outputs, epoch.cond)),
    }
    return RunPlan(
        mesh,
        layout,
        platform,
        model.latent_shape,
        accumulate,
        resident,
        _held(resident, layout, device_bytes((latents, outputs, cond, images, scores))),
        notes,
        compile_stages,
    )


def _held(resident: dict[str, int], layout: dict, per_call: int) -> dict[str, int]:
    """Per stage, the bytes of the arrays the trainer holds on each device while it runs.

    Always the resident ones (parameters, optimiser state, EMA, reference,
    reward weights). The rollout's earlier calls' outputs (images and scores
    too) while it runs; the epoch's rollout buffers from then on, twice during
    the update (the epoch's batch and its shuffled copy).
    """
    buffers = resident["rollout buffers"]
    state = sum(resident.values()) - buffers
    update = state + 2 * buffers
    return {
        "rollout": state + (layout["rollout_calls"] - 1) * per_call,
        "advantages": state + buffers,
        "shuffle": state + buffers,
        "update": update,
        "update_prepare": update,
        "update_accumulate": update,
        "update_finish": update,
    }
