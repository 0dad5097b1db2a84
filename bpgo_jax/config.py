"""Up-front checks of a run config: one-line errors naming the field.

`validate` checks the fields against each other and the device count without
touching a file or a device; `check_inputs` reads the files the config names
(prompts, weights). Both run in about a second, before any model is built, so
a bad override fails at once instead of after minutes of set-up.
"""

from __future__ import annotations

import difflib
import importlib
import math
import pkgutil
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_collections

from bpgo_jax import rewards as rewards_lib
from bpgo_jax.advantages import bpgo as bpgo_forms
from bpgo_jax.advantages.forms import PRESET_NAMES, resolve_forms
from bpgo_jax.errors import ConfigError
from bpgo_jax.models import tiny
from bpgo_jax.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from bpgo_jax.models.scan import REMAT_POLICIES
from bpgo_jax.parallel.mesh import CONTEXT_AXIS, MESH_AXES
from bpgo_jax.prompts import PromptSet, load_prompts
from bpgo_jax.rollout import schedules

__all__ = ["ConfigError", "batch_layout", "check_inputs", "validate"]

ADVANTAGE_METHODS = ("bpgo", "grpo", "ddpo_tracker")
PRIOR_KINDS = ("fixed", "moving_average", "reference", "first_frame")
FLOW_NOISE = schedules.FLOW_NOISE
MODEL_NAMES = ("tiny_unet", "sd", "flux", "sd3", "wan")
PREDICTION_TYPES = ("flow", "epsilon", "v_prediction", "sample")

# Integer fields shared by every run config (configs/common.py) and their minimum.
_INTEGERS: tuple[tuple[str, int, str], ...] = (
    ("seed", 0, "it seeds numpy's prompt order"),
    ("sample.num_steps", 1, ""),
    ("sample.group_size", 2, "GRPO needs a group to compare"),
    ("sample.prompts_per_epoch", 1, ""),
    ("sample.batch_size", 1, ""),
    ("advantage.tracker.buffer_size", 1, ""),
    ("advantage.tracker.min_count", 1, ""),
    ("train.num_epochs", 1, ""),
    ("train.inner_epochs", 1, ""),
    ("train.batch_size", 1, ""),
    ("train.micro_batch_size", 1, ""),
    ("train.warmup_updates", 0, ""),
    ("train.max_consecutive_skips", 0, ""),
    ("eval.num_prompts", 1, ""),
    ("eval.every", 1, "evaluate every N epochs"),
    ("mesh.num_devices", 0, "0 = every device"),
    ("checkpoint.every", 1, "save every N epochs"),
    ("checkpoint.keep", 1, "0 would delete every checkpoint"),
    ("log.image_every", 1, "log images every N epochs"),
    ("log.num_images", 1, ""),
    ("distributed.num_processes", 0, "0 = from the environment"),
    ("distributed.process_id", -1, "-1 = from the environment"),
)

# Real-valued fields: the condition they must meet besides being finite.
_REAL_RULES: dict[str, Callable[[float], bool]] = {
    "": lambda v: True,
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "in (0, 1]": lambda v: 0 < v <= 1,
}
_REALS: tuple[tuple[str, str, str], ...] = (
    ("sample.guidance_scale", ">= 0", ""),
    ("sample.eta", ">= 0", ""),
    ("sample.noise_level", ">= 0", ""),
    ("sample.shift", "> 0", ""),
    ("advantage.eps", "> 0", "it keeps the std division finite"),
    ("advantage.alpha", "in [0, 1)", "so RAS weights stay positive"),
    ("advantage.k", ">= 0", ""),
    ("advantage.lam", ">= 0", ""),
    ("advantage.crt_coef", ">= 0", ""),
    ("advantage.max_exp", "> 0", ""),
    ("advantage.bayes.alpha", ">= 0", ""),
    ("advantage.bayes.prior_var", "> 0", "the variance of the prior's Normal"),
    ("advantage.sign_std.alpha", ">= 0", ""),
    ("advantage.sign_std.value", ">= 0", "a magnitude"),
    ("advantage.binary.a", ">= 0", ""),
    ("advantage.binary.tau", "> 0", ""),
    ("prior.decay", "in [0, 1)", ""),
    ("prior.init_value", "", ""),
    ("train.timestep_fraction", "in (0, 1]", ""),
    ("train.clip_range", "> 0", ""),
    ("train.kl_beta", ">= 0", ""),
    ("train.ema_decay", "in [0, 1)", ""),
    ("train.lr", "> 0", ""),
    ("train.b1", "in [0, 1)", ""),
    ("train.b2", "in [0, 1)", ""),
    ("train.adam_eps", "> 0", ""),
    ("train.weight_decay", ">= 0", ""),
    ("train.max_grad_norm", "> 0", ""),
)

# Real fields that may be None: the flow DiT's own value (its scheduler config).
_UNSET_MEANS_MODEL = frozenset({"sample.shift"})

_CHOICES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("prompts.on_too_long", ("warn", "error")),
    ("sample.kind", ("ddim", "flow")),
    ("sample.noise", FLOW_NOISE),
    ("sample.sigmas", schedules.FLOW_SIGMAS),
    ("model.attention", ATTENTION_IMPLEMENTATIONS),
    ("model.remat", REMAT_POLICIES),
    ("advantage.method", ADVANTAGE_METHODS),
    ("advantage.std", ("group", "global")),
    ("advantage.preset", PRESET_NAMES),
    ("advantage.sign_std.magnitude", bpgo_forms.SIGN_MAGNITUDES),
    ("train.kl_form", ("gaussian", "flow_grpo")),
    ("prior.kind", PRIOR_KINDS),
    ("train.accumulate", ("auto", "scan", "host")),
    ("log.wandb.mode", ("online", "offline", "disabled")),
)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


_MISSING = object()


def _get(config: Any, field: str) -> Any:
    """The value at dotted `field`, or `_MISSING` where a config lacks it."""
    node = config
    for part in field.split("."):
        if not isinstance(node, Mapping | ml_collections.ConfigDict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _because(why: str) -> str:
    return f" ({why})" if why else ""


def _check_scalars(config: ml_collections.ConfigDict) -> None:
    """The tables above; a field a config does not have is left to its reader."""
    for field, low, why in _INTEGERS:
        value = _get(config, field)
        if value is not _MISSING:
            _check(
                _is_int(value) and value >= low,
                f"{field}={value!r} must be an integer >= {low}{_because(why)}",
            )
    for field, rule, why in _REALS:
        value = _get(config, field)
        if value is None and field in _UNSET_MEANS_MODEL:
            _check(
                config.model.name in _DIT_PRESETS,
                f"{field}=None takes the value of the model's scheduler config; model.name="
                f"{config.model.name!r} has none: set a number",
            )
        elif value is not _MISSING:
            _check(
                _is_real(value) and _REAL_RULES[rule](value),
                f"{field}={value!r} must be a finite number {rule}".rstrip() + _because(why),
            )
    for field, choices in _CHOICES:
        value = _get(config, field)
        if value is not _MISSING:
            _check(value in choices, f"{field}={value!r} is not one of {choices}")


def _is_window(window: tuple, num_steps: int) -> bool:
    """(start, stop) with 0 <= start < stop <= num_steps: a range of sampler steps."""
    return len(window) == 2 and 0 <= window[0] < window[1] <= num_steps


def _is_range(pair: Any) -> bool:
    """(low, high), finite, low <= high."""
    return (
        isinstance(pair, tuple | list)
        and len(pair) == 2
        and all(_is_real(v) for v in pair)
        and pair[0] <= pair[1]
    )


def batch_layout(config: ml_collections.ConfigDict, num_devices: int, num_hosts: int = 1) -> dict:
    """Derived sizes of one epoch; raises ConfigError when they do not fit together."""
    for field in ("sample.batch_size", "train.batch_size", "train.micro_batch_size"):
        value = _get(config, field)
        _check(_is_int(value) and value >= 1, f"{field}={value!r} must be an integer >= 1")
    g = config.sample.group_size
    n = config.sample.prompts_per_epoch
    samples = n * g
    _check(g >= 2, f"sample.group_size={g} must be >= 2 (GRPO needs a group to compare)")
    _check(n >= 1, f"sample.prompts_per_epoch={n} must be >= 1")
    _check(
        n % num_hosts == 0,
        f"sample.prompts_per_epoch={n} must be divisible by the {num_hosts} hosts",
    )
    rb = config.sample.batch_size
    _check(
        rb % g == 0,
        f"sample.batch_size={rb} must be a multiple of sample.group_size={g}, so groups stay whole",
    )
    _check(
        samples % rb == 0,
        f"sample.prompts_per_epoch*group_size={samples} must be a multiple "
        f"of sample.batch_size={rb}",
    )
    _check(
        rb % num_devices == 0,
        f"sample.batch_size={rb} must be divisible by the {num_devices} batch shards of the mesh",
    )
    tb, mb = config.train.batch_size, config.train.micro_batch_size
    _check(samples % tb == 0, f"train.batch_size={tb} must divide the {samples} samples per epoch")
    _check(tb % mb == 0, f"train.micro_batch_size={mb} must divide train.batch_size={tb}")
    _check(
        mb % num_devices == 0,
        f"train.micro_batch_size={mb} must be divisible by the "
        f"{num_devices} batch shards of the mesh",
    )
    _check(
        rb % mb == 0,
        f"sample.batch_size={rb} must be a multiple of train.micro_batch_size="
        f"{mb}: the rollout evaluates the network in micro-batch-sized chunks",
    )
    steps = config.sample.num_steps
    stochastic = _sde_steps(config.sample)
    window = tuple(config.train.get("timestep_window", ()) or stochastic)
    _check(
        _is_window(window, steps),
        f"train.timestep_window={window} must be (start, stop) with "
        f"0 <= start < stop <= sample.num_steps={steps}",
    )
    sde, cps = tuple(config.sample.get("sde_window", ())), config.sample.get("noise") == "cps"
    _check(
        stochastic[0] <= window[0] and window[1] <= stochastic[1],
        f"train.timestep_window={window} must lie inside the stochastic steps {stochastic} "
        f"of sample.sde_window={sde}{' (the last CPS step has no noise)' if cps else ''}: "
        "the other steps are deterministic, with no log-probability to train",
    )
    trained = max(1, int(round(config.train.timestep_fraction * (window[1] - window[0]))))
    warmup = config.train.get("warmup_updates", 0)
    _check(
        isinstance(warmup, int) and warmup >= 0,
        f"train.warmup_updates={warmup!r} must be a non-negative integer",
    )
    _check(
        0 < config.train.timestep_fraction <= 1,
        f"train.timestep_fraction={config.train.timestep_fraction} must be in (0, 1]",
    )
    return {
        "samples_per_epoch": samples,
        "rollout_calls": samples // rb,
        "rollout_chunks": rb // mb,
        "updates_per_inner_epoch": samples // tb,
        "micro_per_update": tb // mb,
        "trained_steps": trained,
        "timestep_window": window,
    }


def _module_hint(name: str) -> str:
    """'; did you mean X?' over the modules beside `name` (its package's, or top-level)."""
    parent, _, leaf = name.rpartition(".")
    try:
        path = importlib.import_module(parent).__path__ if parent else None
    except (ImportError, AttributeError):
        return ""
    siblings = [m.name for m in pkgutil.iter_modules(path)]
    close = difflib.get_close_matches(leaf, siblings, n=1)
    return f"; did you mean {'.'.join(filter(None, (parent, close[0])))!r}?" if close else ""


def _load_plugins(plugins: Any) -> None:
    """Imports `config.plugins`; a missing module is a ConfigError, its own bugs are not."""
    _check(
        isinstance(plugins, tuple | list) and all(isinstance(p, str) and p for p in plugins),
        f"plugins={plugins!r} must be a tuple of module names, e.g. \"('my_rewards',)\"",
    )
    for module in plugins:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and (module == err.name or module.startswith(err.name + ".")):
                raise ConfigError(
                    f"plugins: no module named {module!r}{_module_hint(module)}"
                ) from None
            raise ConfigError(
                f"plugins: module {module!r} imports {err.name!r}, which is not installed"
            ) from None
    rewards_lib.load_plugins()


def _reward_blocks(config: ml_collections.ConfigDict, section: str) -> list[tuple[str, Any]]:
    blocks = _get(config, section)
    return [] if blocks is _MISSING or blocks is None else list(blocks.items())


def _check_rewards(config: ml_collections.ConfigDict) -> None:
    known = rewards_lib.names()
    _check(len(config.rewards) > 0, "config.rewards is empty: name at least one reward")
    for section in ("rewards", "eval.rewards"):
        for name, block in _reward_blocks(config, section):
            where = f"config.{section}.{name}"
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {known}"
            _check(name in known, f"{where}: unknown reward; {hint}")
            _check(
                isinstance(block, Mapping | ml_collections.ConfigDict),
                f"{where}={block!r} must be a dict of the reward's options with a weight",
            )
            weight = block.get("weight", _MISSING)
            _check(weight is not _MISSING, f"{where}.weight is missing")
            _check(_is_real(weight), f"{where}.weight={weight!r} must be a finite number")


_EMPTY_INIT = (
    "model.init is empty: set it to 'random' or to the weights (a .msgpack file for "
    "tiny_unet, a diffusers folder for sd)"
)


def _check_model(config: ml_collections.ConfigDict) -> None:
    model = config.model
    _check(model.name in MODEL_NAMES, f"model.name={model.name!r} is not one of {MODEL_NAMES}")
    _check(
        model.get("dtype", "float32") in ("float32", "bfloat16"),
        f"model.dtype={model.get('dtype')!r} is not float32 or bfloat16",
    )
    init = model.get("init", "random")
    _check(isinstance(init, str) and bool(init), _EMPTY_INIT)
    lora = model.get("lora", None) or {}
    rank, alpha = lora.get("rank", 0), lora.get("alpha", 0.0)
    _check(_is_int(rank) and rank >= 0, f"model.lora.rank={rank!r} must be an integer >= 0")
    _check(
        alpha is None or (_is_real(alpha) and alpha >= 0),
        f"model.lora.alpha={alpha!r} must be a finite number >= 0 (0 = rank)",
    )
    for target in lora.get("targets", ()) or ():
        try:
            re.compile(target)
        except (re.error, TypeError) as err:
            raise ConfigError(f"model.lora.targets: {target!r} is not a regex ({err})") from None
    _check_kernels(model)
    if model.name == "tiny_unet":
        _check_tiny(config)
    elif model.name in _DIT_PRESETS:
        _check_dit(config)
    else:
        _check(
            config.sample.kind == "ddim",
            f"sample.kind={config.sample.kind!r}: an SD model needs the 'ddim' sampler",
        )
        resolution = model.get("resolution", None)
        _check(
            resolution is None or (_is_int(resolution) and resolution >= 8),
            f"model.resolution={resolution!r} must be None (the model's own) or an integer >= 8",
        )
        if init == "random":
            from bpgo_jax.models.sd.presets import PRESETS

            preset = model.get("preset", "tiny")
            _check(
                preset in PRESETS,
                f"model.preset={preset!r} is not one of {tuple(PRESETS)} (model.init='random')",
            )


# How messages name a model family.
_FAMILY = {"sd": "SD", "flux": "FLUX", "sd3": "SD3", "wan": "Wan"}
# The flow DiTs: model.name -> the module of its random-init presets.
_DIT_PRESETS = {
    "flux": "bpgo_jax.models.flux.presets",
    "sd3": "bpgo_jax.models.sd3.presets",
    "wan": "bpgo_jax.models.wan.presets",
}
# Flow DiTs whose `model.resolution` may be (height, width).
_RECTANGULAR = ("flux", "wan")


def _check_dit(config: ml_collections.ConfigDict) -> None:
    """FLUX / SD3 / Wan: the flow sampler, a 16-pixel image grid, the text fields they read,
    and Wan's frame count."""
    model, name = config.model, config.model.name
    _check(
        config.sample.kind == "flow",
        f"sample.kind={config.sample.kind!r}: model.name={name!r} needs the 'flow' sampler",
    )
    resolution = model.get("resolution", None)
    sides = tuple(resolution) if isinstance(resolution, tuple | list) else (resolution,)
    shapes = "an integer or (height, width)" if name in _RECTANGULAR else "an integer"
    _check(
        resolution is None
        or (
            len(sides) in ((1, 2) if name in _RECTANGULAR else (1,))
            and all(_is_int(v) and v >= 16 and v % 16 == 0 for v in sides)
        ),
        f"model.resolution={resolution!r} must be None (the model's own) or {shapes} "
        "of multiples of 16 (8x VAE, 2x2 patches)",
    )
    init = model.get("init", "random")
    if init == "random":
        presets = importlib.import_module(_DIT_PRESETS[name]).PRESETS
        preset = model.get("preset", "tiny")
        _check(
            preset in presets,
            f"model.preset={preset!r} is not one of {tuple(presets)} (model.init='random')",
        )
    length = model.get("max_sequence_length", 0)
    _check(
        _is_int(length) and length >= 0,
        f"model.max_sequence_length={length!r} must be an integer >= 0 (0: the pipeline's)",
    )
    text_cache = model.get("text_cache", "")
    _check(isinstance(text_cache, str), f"model.text_cache={text_cache!r} must be a path or ''")
    _check(
        not text_cache or init != "random",
        f"model.text_cache={text_cache!r} needs model.init to be the diffusers folder it was "
        "written for, not 'random'",
    )
    if name == "wan":
        _check_wan(model, config)
    if name == "flux":
        guidance = model.get("guidance", 3.5)
        _check(
            _is_real(guidance) and guidance > 0,
            f"model.guidance={guidance!r} must be a finite number > 0 (FLUX.1-dev's embedded "
            "guidance)",
        )


def _check_wan(model: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    """Wan: `1 + 4k` frames (the VAE's causal chunks); text-to-video presets, or
    image-to-video with conditioning prompts (`model.condition_prompts`): Wan2.2 I2V-A14B,
    TI2V-5B (one transformer, 32-pixel grid) or a folder's."""
    frames = model.get("num_frames", 81)
    _check(
        _is_int(frames) and frames >= 1 and (frames - 1) % 4 == 0,
        f"model.num_frames={frames!r} must be 1 + 4k (1, 5, 9, ..., 81): the Wan VAE encodes "
        "frame 0 alone, then chunks of 4 frames",
    )
    chunk = model.get("vae_batch_chunk", 0)
    _check(
        _is_int(chunk) and chunk >= 0,
        f"model.vae_batch_chunk={chunk!r} must be an integer >= 0 (0: decode every video at once)",
    )
    i2v = bool(model.get("condition_prompts", ""))
    ti2v = False
    if model.get("init", "random") == "random":
        from bpgo_jax.models.wan.presets import PRESETS

        name = model.get("preset", "tiny")
        preset = PRESETS.get(name, {})
        # Image-to-video presets read the image latents (36 channels) or blend them (TI2V).
        takes_images = {
            n
            for n, p in PRESETS.items()
            if p["transformer"].get("in_channels") == 36 or p.get("expand_timesteps")
        }
        if i2v:
            _check(
                name in takes_images,
                f"model.preset={name!r}: image-to-video with random weights builds one of "
                f"{sorted(takes_images)}",
            )
            ti2v = bool(preset.get("expand_timesteps"))
        else:
            _check(
                name not in takes_images and preset.get("transformer_2") is None,
                f"model.preset={name!r} is an image-to-video or Wan2.2 model (image input, "
                "two experts or per-token timesteps); text-to-video trains Wan2.1's T2V "
                "presets, image-to-video needs model.condition_prompts",
            )
    if config.prior.kind == "first_frame":
        _check(
            i2v,
            "prior.kind='first_frame' scores each prompt's conditioning frame: it needs an "
            "image-to-video model (model.condition_prompts)",
        )
    if not i2v:
        return
    _check(
        config.sample.guidance_scale == 1.0,
        f"sample.guidance_scale={config.sample.guidance_scale!r} must be 1.0 for image-to-video: "
        "the model guides each expert itself (model.guidance_scales); both would guide twice",
    )
    experts = tuple(model.get("lora", {}).get("experts", ()) or ())
    _check(
        set(experts) <= {"transformer", "transformer_2"},
        f"model.lora.experts={experts!r} must name 'transformer' and/or 'transformer_2' "
        "(empty: every expert)",
    )
    if ti2v:
        _check(
            set(experts) <= {"transformer"},
            f"model.lora.experts={experts!r}: Wan2.2 TI2V-5B has one transformer "
            "('transformer'; empty: it)",
        )
        resolution = model.get("resolution", None)
        sides = tuple(resolution) if isinstance(resolution, tuple | list) else (resolution,)
        _check(
            all(v is None or v % 32 == 0 for v in sides),
            f"model.resolution={resolution!r}: Wan2.2 TI2V-5B needs multiples of 32 (16x VAE, "
            "2x2 patches)",
        )
    _check(
        not model.get("text_cache", ""),
        "model.text_cache is not read by image-to-video runs (the prompt rows carry the "
        "conditioning images): set it to ''",
    )


def _check_kernels(model: ml_collections.ConfigDict) -> None:
    """`model.attention` / `model.remat` where the model does not read them would be ignored."""
    attention, remat = model.get("attention", "auto"), model.get("remat", "none")
    _check(
        attention == "auto" or model.name != "tiny_unet",
        f"model.attention={attention!r}: the built-in model (tiny_unet) runs Flax's own "
        "attention; only 'auto' applies to it",
    )
    _check(
        remat == "none" or model.name not in ("tiny_unet", "sd"),
        f"model.remat={remat!r} applies to the scanned DiT models; model.name="
        f"{model.name!r} is not scanned (use 'none')",
    )


_TINY_SIZES = (
    ("resolution", 1),
    ("heads", 1),
    ("vocab_size", 3),
    ("max_length", 1),
    ("text_width", 1),
    ("text_depth", 0),
)


def _check_tiny(config: ml_collections.ConfigDict) -> None:
    """The built-in model's sizes: positive, and divisible where attention needs it."""
    model = config.model
    for field, low in _TINY_SIZES:
        value = model.get(field, _MISSING)
        _check(
            _is_int(value) and value >= low,
            f"model.{field}={'<missing>' if value is _MISSING else repr(value)} "
            f"must be an integer >= {low}",
        )
    channels, levels = tuple(model.channels), tuple(model.attn_levels)
    _check(
        len(channels) >= 1 and all(_is_int(c) and c >= 1 for c in channels),
        f"model.channels={channels!r} must be one or more integers >= 1",
    )
    _check(
        all(_is_int(lv) and 0 <= lv < len(channels) for lv in levels),
        f"model.attn_levels={levels!r} must index model.channels (0 .. {len(channels) - 1})",
    )
    heads = model.heads
    _check(
        model.text_width % heads == 0,
        f"model.text_width={model.text_width} must be divisible by model.heads={heads}",
    )
    for level in sorted({*levels, len(channels) - 1}):
        _check(
            channels[level] % heads == 0,
            f"model.channels[{level}]={channels[level]} must be divisible by model.heads={heads} "
            "(attention runs at that level)",
        )
    _check(
        model.prediction_type in PREDICTION_TYPES,
        f"model.prediction_type={model.prediction_type!r} is not one of {PREDICTION_TYPES}",
    )
    try:
        tiny.check_config(model)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    flow_model = model.prediction_type == "flow"
    _check(
        flow_model == (config.sample.kind == "flow"),
        f"sample.kind={config.sample.kind!r} does not fit model.prediction_type="
        f"{model.prediction_type!r}: the flow sampler needs a flow model, ddim any other",
    )


def _sde_steps(sample: ml_collections.ConfigDict) -> tuple[int, int]:
    """[start, stop) of the sampler steps that draw noise, from a checked `sample.sde_window`."""
    steps, sde = sample.num_steps, sample.get("sde_window", ())
    _check(
        isinstance(sde, tuple | list)
        and all(_is_int(v) for v in sde)
        and (len(sde) == 0 or _is_window(tuple(sde), steps)),
        f"sample.sde_window={sde!r} must be () (every step) or (start, stop) with "
        f"0 <= start < stop <= sample.num_steps={steps}",
    )
    if sample.kind != "flow":
        _check(not sde, f"sample.sde_window={tuple(sde)} is for the flow sampler only")
        return 0, steps
    return schedules.sde_steps(steps, sample.noise, tuple(sde))


def _check_sample(config: ml_collections.ConfigDict) -> None:
    sample = config.sample
    if sample.kind == "ddim":
        _check(
            sample.eta > 0,
            f"sample.eta={sample.eta} must be > 0: a "
            "deterministic sampler has no log-probability to train",
        )
    else:
        _check(sample.noise != "ode", "sample.noise='ode' has no log-probability to train")
        _check(
            sample.noise_level > 0,
            f"sample.noise_level={sample.noise_level} must be > 0: a "
            "deterministic sampler has no log-probability to train",
        )
    eval_noise = config.eval.get("noise", "")
    _check(
        sample.noise_level <= 1 or "cps" not in (sample.noise, eval_noise),
        f"sample.noise_level={sample.noise_level} must be in (0, 1] for CPS "
        "(std = sigma_next * sin(noise_level * pi / 2))",
    )
    start, stop = _sde_steps(sample)
    _check(
        start < stop,
        f"sample.sde_window={tuple(sample.get('sde_window', ()))} holds no stochastic step "
        f"(sample.noise={sample.noise!r}, sample.num_steps={sample.num_steps}; CPS's last "
        "step is deterministic): nothing to train",
    )
    dynamic = sample.get("dynamic_shift", False)
    _check(
        isinstance(dynamic, bool),
        f"sample.dynamic_shift={dynamic!r} must be True or False",
    )
    _check(
        not dynamic or sample.kind == "flow",
        f"sample.dynamic_shift=True is FLUX's shift of the flow schedule; sample.kind="
        f"{sample.kind!r} has none",
    )
    _check(
        not dynamic or config.model.name not in ("tiny_unet", "sd"),
        f"sample.dynamic_shift=True needs a model that gives its image sequence length "
        f"(FLUX); model.name={config.model.name!r} does not",
    )
    kl_form = config.train.get("kl_form", "gaussian")
    _check(
        kl_form == "gaussian" or sample.kind == "flow",
        f"train.kl_form={kl_form!r} is Flow-GRPO's form for the flow SDE; "
        f"sample.kind={sample.kind!r} has only 'gaussian'",
    )
    _check(
        eval_noise in ("", *FLOW_NOISE) and not (eval_noise and sample.kind != "flow"),
        f"eval.noise={eval_noise!r} must be '' or, for a flow sampler, one of {FLOW_NOISE}",
    )


def _check_advantage_and_prior(config: ml_collections.ConfigDict) -> None:
    adv = config.advantage
    clip = adv.get("clip", None)
    _check(
        clip is None or (_is_real(clip) and clip > 0),
        f"advantage.clip={clip!r} must be a finite number > 0 (or None: no clipping)",
    )
    clamp = adv.get("ras_clamp", None)
    _check(
        clamp is None or (_is_range(clamp) and clamp[0] >= 0),
        f"advantage.ras_clamp={clamp!r} must be None or (low, high) with 0 <= low <= high",
    )
    _check_forms(adv, clamp)
    tracker = adv.get("tracker", None)
    if tracker is not None:
        _check(
            tracker.min_count <= tracker.buffer_size,
            f"advantage.tracker.min_count={tracker.min_count} must be <= "
            f"advantage.tracker.buffer_size={tracker.buffer_size}",
        )
    prior_clip = config.prior.get("clip", None)
    _check(
        prior_clip is None or _is_range(prior_clip),
        f"prior.clip={prior_clip!r} must be None or (low, high) with low <= high",
    )


def _check_forms(adv: ml_collections.ConfigDict, clamp: Any) -> None:
    """The preset and form fields agree, and the chosen RAS form's weights stay > 0
    (a negative weight would flip the sign of its group's gradient)."""
    forms = resolve_forms(adv)
    low = clamp[0] if clamp is not None else -math.inf
    if forms.ras == "bayes":
        b = adv.bayes
        _check(
            _is_range(b.range),
            f"advantage.bayes.range={b.range!r} must be (w_min, w_max) with w_min <= w_max",
        )
        lowest = 1.0 + b.alpha * (b.range[0] - 1.0)
        _check(
            max(lowest, low) > 0,
            f"advantage.bayes.alpha={b.alpha} with range={tuple(b.range)} allows RAS weights "
            f"down to {lowest:g}: keep 1 + alpha (w_min - 1) > 0 or set advantage.ras_clamp "
            "with low > 0",
        )
    if forms.ras == "sign_std":
        _check(
            low > 0,
            f"advantage.ras='sign_std' needs advantage.ras_clamp=(low, high) with low > 0, "
            f"got {clamp!r}: 1 - alpha * std is unbounded below",
        )


def _check_mesh(config: ml_collections.ConfigDict) -> None:
    mesh = config.mesh
    shape, axes = tuple(mesh.shape), tuple(mesh.axes)
    _check(
        all(_is_int(s) and (s >= 1 or s == -1) for s in shape) and shape.count(-1) <= 1,
        f"mesh.shape={shape!r} must be sizes >= 1, with at most one -1 (the remaining devices)",
    )
    for axis in axes:
        close = difflib.get_close_matches(str(axis), MESH_AXES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        _check(axis in MESH_AXES, f"mesh.axes: unknown axis {axis!r}, known: {MESH_AXES}{hint}")
    _check(len(set(axes)) == len(axes), f"mesh.axes={axes!r} names an axis twice")
    _check(
        len(shape) == len(axes),
        f"mesh.shape={shape!r} and mesh.axes={axes!r} must have the same length",
    )
    for rule in mesh.rules:
        _check(
            isinstance(rule, tuple | list) and len(rule) == 2,
            f"mesh.rules: {rule!r} must be a (regex, spec) pair",
        )
        pattern, spec = rule
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise ConfigError(f"mesh.rules: {pattern!r} is not a regex ({err})") from None
        _check(
            spec == "fsdp_auto"
            or (isinstance(spec, tuple | list) and all(a is None or a in axes for a in spec)),
            f"mesh.rules: spec {spec!r} of {pattern!r} must be 'fsdp_auto' or a tuple of "
            f"mesh axes {axes} or None, one per array dimension",
        )


def _batch_shards(mesh: ml_collections.ConfigDict, num_devices: int) -> int:
    """How many shards a batch has on `mesh` over `num_devices`: the devices not split along
    the `context` axis (which divides a sample's tokens, not the batch)."""
    shape, axes = list(mesh.shape), tuple(mesh.axes)
    if CONTEXT_AXIS not in axes:
        return num_devices
    context = shape[axes.index(CONTEXT_AXIS)]
    if context == -1:
        others = math.prod(s for s in shape if s != -1)
        context = max(num_devices // others, 1)
    # A shape that does not fit the devices is refused by name when the mesh is made.
    return num_devices // context if num_devices % context == 0 else num_devices


def validate(config: ml_collections.ConfigDict, num_devices: int, num_hosts: int = 1) -> dict:
    """Checks the whole config; returns `batch_layout`.

    `num_devices` is the number of devices of the mesh (the batch is split over those
    not along `context`). Reads no file and touches no device (plugins are imported:
    they register rewards).
    """
    _load_plugins(config.get("plugins", ()))
    _check_scalars(config)
    _check_rewards(config)
    for name in config.eval.get("extra_prompts", {}):
        _check(
            name.isidentifier() and bool(config.eval.prompts_path),
            f"config.eval.extra_prompts.{name}: needs an identifier name and eval.prompts_path set",
        )
    _check_advantage_and_prior(config)
    _check_sample(config)
    _check_model(config)
    _check_mesh(config)
    wandb = config.log.get("wandb", None)
    if wandb is not None and wandb.get("enabled", False):
        _check(bool(wandb.get("project", "")), "log.wandb.project is empty (log.wandb.enabled)")
    return batch_layout(config, _batch_shards(config.mesh, num_devices), num_hosts)


# ------------------------------------------------------------------ inputs


def _prompt_files(config: ml_collections.ConfigDict) -> dict[str, str]:
    """Field -> prompt file, for every prompt file the run reads."""
    path = config.prompts.path
    _check(
        isinstance(path, str) and bool(path),
        "prompts.path is empty: name a .txt (one prompt a line) or .jsonl prompt file",
    )
    files = {"prompts.path": path}
    if config.eval.get("prompts_path", ""):
        files["eval.prompts_path"] = config.eval.prompts_path
        for name, extra in config.eval.get("extra_prompts", {}).items():
            files[f"eval.extra_prompts.{name}"] = extra
    return files


def _check_model_init(config: ml_collections.ConfigDict) -> None:
    init, name = config.model.get("init", "random"), config.model.name
    _check(isinstance(init, str) and bool(init), _EMPTY_INIT)
    text_cache = config.model.get("text_cache", "") if name in _DIT_PRESETS else ""
    _check(
        not text_cache or Path(text_cache).is_file(),
        f"model.text_cache={text_cache!r} is not a file (write it with launch/embed_prompts.py)",
    )
    if init == "random":
        return
    path = Path(init)
    if name in ("sd", *_DIT_PRESETS):
        _check(
            path.is_dir(),
            f"model.init={init!r} is not a directory: {_FAMILY[name]} weights are a "
            "diffusers folder (or 'random')",
        )
        _check(
            (path / "model_index.json").is_file(),
            f"model.init={init!r} is not a diffusers folder: it has no model_index.json",
        )
    else:
        _check(
            path.is_file(),
            f"model.init={init!r} is not a file: the built-in model's weights are one .msgpack "
            "file (or 'random')",
        )


def _check_reward_paths(config: ml_collections.ConfigDict) -> None:
    """Every non-empty `path` / `*_path` option of a reward names something that exists."""
    for section in ("rewards", "eval.rewards"):
        for name, block in _reward_blocks(config, section):
            if not isinstance(block, Mapping | ml_collections.ConfigDict):
                continue  # `validate` names it
            for key, value in block.items():
                if (key == "path" or key.endswith("_path")) and isinstance(value, str) and value:
                    _check(
                        Path(value).exists(),
                        f"{section}.{name}.{key}={value!r} does not exist",
                    )


def check_inputs(config: ml_collections.ConfigDict) -> dict[str, PromptSet]:
    """Reads every prompt file and checks every weights path the config names.

    Returns field -> its loaded prompts (`"prompts.path"`, `"eval.prompts_path"`,
    `"eval.extra_prompts.NAME"`). Raises ConfigError naming the field and path.
    """
    prompt_sets = {}
    for field, path in _prompt_files(config).items():
        try:
            prompt_sets[field] = load_prompts(path)
        except ValueError as err:
            raise ConfigError(f"{field}: {err}") from None
    if config.prior.kind == "fixed":
        _check(
            prompt_sets["prompts.path"].priors is not None,
            f"prior.kind='fixed' needs a \"prior\" on every entry of prompts.path="
            f"{config.prompts.path!r} (a .jsonl file)",
        )
    _check_model_init(config)
    _check_reward_paths(config)
    return prompt_sets
