"""Up-front validation of a run config: one-line errors naming the field.

Everything that can be checked before compiling is checked here, so a bad
override fails in a second instead of after minutes of compilation.
"""

from __future__ import annotations

import ml_collections

from bpgo_jax import rewards as rewards_lib
from bpgo_jax.errors import ConfigError
from bpgo_jax.models import tiny

ADVANTAGE_METHODS = ("bpgo", "grpo", "ddpo_tracker")
PRIOR_KINDS = ("fixed", "moving_average", "reference")
FLOW_NOISE = ("flow_grpo", "dance", "ode")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _is_window(window: tuple, num_steps: int) -> bool:
    """(start, stop) with 0 <= start < stop <= num_steps: a range of sampler steps."""
    return len(window) == 2 and 0 <= window[0] < window[1] <= num_steps


def batch_layout(config: ml_collections.ConfigDict, num_devices: int, num_hosts: int = 1) -> dict:
    """Derived sizes of one epoch; raises ConfigError when they do not fit together."""
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
    window = tuple(config.train.get("timestep_window", ()) or (0, steps))
    _check(
        _is_window(window, steps),
        f"train.timestep_window={window} must be (start, stop) with "
        f"0 <= start < stop <= sample.num_steps={steps}",
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


def validate(config: ml_collections.ConfigDict, num_devices: int, num_hosts: int = 1) -> dict:
    """Checks the whole config; returns `batch_layout`."""
    rewards_lib.load_plugins(tuple(config.get("plugins", ())))
    known = set(rewards_lib.names())
    for name in config.rewards:
        _check(name in known, f"config.rewards.{name}: unknown reward; known: {sorted(known)}")
    for name in config.eval.rewards:
        _check(name in known, f"config.eval.rewards.{name}: unknown reward; known: {sorted(known)}")
    for name in config.eval.get("extra_prompts", {}):
        _check(
            name.isidentifier() and bool(config.eval.prompts_path),
            f"config.eval.extra_prompts.{name}: needs an identifier name and eval.prompts_path set",
        )
    adv = config.advantage
    _check(
        adv.method in ADVANTAGE_METHODS,
        f"advantage.method={adv.method!r} is not one of {ADVANTAGE_METHODS}",
    )
    _check(adv.std in ("group", "global"), f"advantage.std={adv.std!r} is not 'group' or 'global'")
    _check(
        0 <= adv.alpha < 1,
        f"advantage.alpha={adv.alpha} must be in [0, 1) so RAS weights stay positive",
    )
    _check(adv.crt_coef >= 0, f"advantage.crt_coef={adv.crt_coef} must be >= 0")
    _check(
        config.prior.kind in PRIOR_KINDS,
        f"prior.kind={config.prior.kind!r} is not one of {PRIOR_KINDS}",
    )
    _check(0 <= config.prior.decay < 1, f"prior.decay={config.prior.decay} must be in [0, 1)")
    _check(config.train.clip_range > 0, f"train.clip_range={config.train.clip_range} must be > 0")
    _check(config.train.kl_beta >= 0, f"train.kl_beta={config.train.kl_beta} must be >= 0")
    _check(
        0 <= config.train.ema_decay < 1,
        f"train.ema_decay={config.train.ema_decay} must be in [0, 1)",
    )
    _check(
        config.train.inner_epochs >= 1,
        f"train.inner_epochs={config.train.inner_epochs} must be >= 1",
    )
    _check(
        config.train.accumulate in ("auto", "scan", "host"),
        f"train.accumulate={config.train.accumulate!r} is not 'auto', 'scan' or 'host'",
    )
    _check(
        config.sample.kind in ("ddim", "flow"),
        f"sample.kind={config.sample.kind!r} is not 'ddim' or 'flow'",
    )
    _check(config.sample.num_steps >= 1, f"sample.num_steps={config.sample.num_steps} must be >= 1")
    if config.sample.kind == "ddim":
        _check(
            config.sample.eta > 0,
            f"sample.eta={config.sample.eta} must be > 0: a "
            "deterministic sampler has no log-probability to train",
        )
    else:
        _check(config.sample.noise != "ode", "sample.noise='ode' has no log-probability to train")
    patch = config.sample.get("noise_patch", 1)
    _check(
        isinstance(patch, int) and patch >= 1,
        f"sample.noise_patch={patch!r} must be an integer >= 1",
    )
    window = tuple(config.sample.get("noise_patch_window", ()))
    _check(
        window == () or _is_window(window, config.sample.num_steps),
        f"sample.noise_patch_window={window!r} must be () or (start, stop) with "
        f"0 <= start < stop <= sample.num_steps={config.sample.num_steps}",
    )
    eval_noise = config.eval.get("noise", "")
    _check(
        eval_noise in ("", *FLOW_NOISE) and not (eval_noise and config.sample.kind != "flow"),
        f"eval.noise={eval_noise!r} must be '' or, for a flow sampler, one of {FLOW_NOISE}",
    )
    _check(
        config.model.get("dtype", "float32") in ("float32", "bfloat16"),
        f"model.dtype={config.model.get('dtype')!r} is not float32 or bfloat16",
    )
    if config.model.name == "tiny_unet":
        try:
            tiny.check_config(config.model)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return batch_layout(config, num_devices, num_hosts)
