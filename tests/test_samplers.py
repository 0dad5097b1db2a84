"""The flow sampler's options: CPS, an SDE window with ODE steps outside it, and
diffusers' flow schedule (static SD3 shift, FLUX's dynamic shift)."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from tiny_config import tiny_config

from bpgo_jax.config import ConfigError, validate
from bpgo_jax.models.interface import DiffusionModel
from bpgo_jax.models.tiny import tiny_model
from bpgo_jax.rollout import samplers, schedules
from bpgo_jax.train import train


def _flow_sampler(num_steps: int, noise: str, level: float, **kw) -> samplers.Sampler:
    tables = schedules.flow_tables(num_steps, kw.pop("shift", 1.0), noise, level, **kw)
    return samplers.Sampler("flow", "flow", num_steps, 1.0, tables)


def _cps_step_reference(x, v, sigma, sigma_next, level):
    """Flow-GRPO's `sde_step_with_logprob(sde_type="cps")` mean and std, in float64."""
    std = sigma_next * math.sin(level * math.pi / 2)
    x0 = x - sigma * v
    x1 = x + v * (1 - sigma)
    return x0 * (1 - sigma_next) + x1 * math.sqrt(sigma_next**2 - std**2), std


@pytest.mark.parametrize(
    ("sigmas", "shift", "level"),
    [("shifted_linear", 1.0, 0.7), ("shifted_linear", 3.0, 1.0), ("diffusers", 3.0, 0.5)],
)
def test_cps_step_matches_flow_grpo_formula(sigmas, shift, level):
    n = 5
    sampler = _flow_sampler(n, "cps", level, shift=shift, sigmas=sigmas)
    s = schedules.flow_schedule(n, sigmas, shift)
    rng = np.random.default_rng(0)
    x, v = rng.normal(size=(2, n, 3, 3, 2))
    k = jnp.arange(n)
    mean, std = jax.jit(functools.partial(samplers.transition, sampler))(
        k, jnp.asarray(x, jnp.float32), jnp.asarray(v, jnp.float32)
    )
    for i in range(n):
        want_mean, want_std = _cps_step_reference(x[i], v[i], s[i], s[i + 1], level)
        np.testing.assert_allclose(mean[i], want_mean, rtol=1e-5, atol=1e-6)
        assert float(std[i, 0, 0, 0]) == pytest.approx(want_std, rel=1e-6, abs=0)
    assert float(std[-1, 0, 0, 0]) == 0.0  # sigma_next = 0: the last step is deterministic
    np.testing.assert_array_equal(sampler.tables["sde_std"], sampler.tables["std"])


def test_cps_log_ratio_is_the_exact_gaussian_one():
    """Ours is the exact Gaussian log-ratio; Flow-GRPO's CPS log-prob `-(x' - mean)^2`
    gives 2 std^2 times it (constants cancel, the 1 / (2 std^2) scale does not)."""
    sampler = _flow_sampler(4, "cps", 0.7)
    keys = jax.random.split(jax.random.key(0), 4)
    x, x_next, out, old = (jax.random.normal(key, (3, 4, 4, 2)) for key in keys)
    k = jnp.array([0, 1, 2])
    lr, _, std = samplers.log_ratio(sampler, k, x, x_next, out, old)
    new_mean, _ = samplers.transition(sampler, k, x, out)
    old_mean, _ = samplers.transition(sampler, k, x, old)
    exact = samplers.gaussian_logprob(x_next, new_mean, std) - samplers.gaussian_logprob(
        x_next, old_mean, std
    )
    np.testing.assert_allclose(lr, exact, rtol=1e-4, atol=1e-5)
    per_dim = lambda m: -((x_next - m) ** 2).mean(axis=(1, 2, 3))
    flow_grpo = per_dim(new_mean) - per_dim(old_mean)
    np.testing.assert_allclose(flow_grpo, 2 * std[:, 0, 0, 0] ** 2 * lr, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("noise", ["flow_grpo", "dance", "cps"])
def test_sde_window_keeps_its_steps_and_makes_the_others_euler(noise):
    n, window = 6, (2, 4)
    full = schedules.flow_tables(n, 3.0, noise, 0.7)
    ode = schedules.flow_tables(n, 3.0, "ode", 0.0)
    windowed = schedules.flow_tables(n, 3.0, noise, 0.7, sde_window=window)
    every = schedules.flow_tables(n, 3.0, noise, 0.7, sde_window=(0, n))
    inside = np.zeros(n, bool)
    inside[slice(*window)] = True
    for name, table in windowed.items():
        np.testing.assert_array_equal(every[name], full[name])  # (0, n) is ()
        np.testing.assert_array_equal(table[inside], full[name][inside])
        np.testing.assert_array_equal(table[~inside], ode[name][~inside])
    assert np.all(windowed["std"][inside] > 0) and np.all(windowed["std"][~inside] == 0)
    assert schedules.sde_steps(n, noise, window) == window
    assert schedules.sde_steps(n, noise) == (0, n - 1 if noise == "cps" else n)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"sample.sde_window": (1, 3), "train.timestep_window": (0, 2)},
            "train.timestep_window=(0, 2) must lie inside the stochastic steps (1, 3) of "
            "sample.sde_window=(1, 3)",
        ),
        (
            {"sample.noise": "cps", "train.timestep_window": (1, 3)},
            "train.timestep_window=(1, 3) must lie inside the stochastic steps (0, 2) of "
            "sample.sde_window=() (the last CPS step has no noise)",
        ),
        ({"sample.sde_window": (2, 4)}, "sample.sde_window=(2, 4) must be ()"),
        ({"sample.sde_window": (1,)}, "sample.sde_window=(1,) must be ()"),
        ({"sample.noise": "cps", "sample.sde_window": (2, 3)}, "holds no stochastic step"),
        ({"sample.noise": "cps", "sample.noise_level": 1.5}, "sample.noise_level=1.5"),
        ({"sample.sigmas": "karras"}, "sample.sigmas='karras'"),
        ({"sample.dynamic_shift": True}, "model.name='tiny_unet' does not"),
    ],
)
def test_validation_names_the_sampler_fields(tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        validate(tiny_config(tmp_path, **override), num_devices=8)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_default_trained_window_is_the_stochastic_steps(tmp_path):
    def window(**kw):
        return validate(tiny_config(tmp_path, **kw), num_devices=8)["timestep_window"]

    assert window() == (0, 3)
    assert window(**{"sample.noise": "cps"}) == (0, 2)
    assert window(**{"sample.sde_window": (1, 2)}) == (1, 2)
    assert window(**{"sample.sde_window": (1, 3), "train.timestep_window": (2, 3)}) == (2, 3)


def _one_epoch(tmp_path, **kw):
    config = tiny_config(
        tmp_path, **{"train.num_epochs": 1, "train.batch_size": 8, "mesh.num_devices": 1, **kw}
    )
    (record,) = train(config, tmp_path / "run").records
    return record


def test_cps_noise_in_an_sde_window_is_on_policy(tmp_path):
    """CPS noise on the one stochastic step of three (the others ODE steps): the first
    update of the epoch recomputes ratios of exactly 1, with finite loss and gradients
    (no step of std 0 reaches the log-ratio); the second is off-policy."""
    record = _one_epoch(tmp_path, **{"sample.noise": "cps", "sample.sde_window": (1, 2)})
    assert record["onpolicy_ratio_max_dev"] == 0.0
    assert record["skipped_updates"] == 0
    assert np.isfinite(record["loss"]) and record["grad_norm"] > 0
    assert record["approx_kl"] > 0  # the mean over both updates: the second moved


def test_ode_steps_are_deterministic_given_the_initial_noise(tmp_path):
    config = tiny_config(tmp_path, **{"sample.sde_window": (1, 2)})
    model = tiny_model(config.model)
    trainable, frozen = model.init(jax.random.key(0))

    @jax.jit
    def perturb(params, key):  # moves the zero-initialised output layer
        # One draw for all leaves: XLA:CPU takes ~0.1 s to compile each random draw.
        flat, unflatten = ravel_pytree(params)
        return unflatten(flat + 0.05 * jax.random.normal(key, flat.shape))

    trainable = perturb(trainable, jax.random.key(1))
    sampler = samplers.make_sampler(config.sample, model)
    np.testing.assert_array_equal(sampler.tables["std"] > 0, [False, True, False])
    encode = jax.jit(model.encode_text)
    cond = encode(frozen, jnp.asarray(model.tokenize(["a red circle"] * 2)))
    uncond = encode(frozen, jnp.asarray(model.tokenize([""])))
    run = jax.jit(functools.partial(samplers.sample, model, sampler, trainable, frozen))
    init = jax.random.split(jax.random.key(2), 2)
    a = run(cond, uncond, jax.random.split(jax.random.key(3), 2), init_keys=init)
    b = run(cond, uncond, jax.random.split(jax.random.key(4), 2), init_keys=init)
    np.testing.assert_array_equal(a.latents[:, :2], b.latents[:, :2])  # ODE step 0
    assert not np.allclose(a.latents[:, 2], b.latents[:, 2])  # SDE step 1
    for traj in (a, b):  # ODE step 2: the Euler step of its input, no noise
        mean, std = samplers.transition(
            sampler, jnp.full(2, 2), traj.latents[:, 2], traj.outputs[:, 2]
        )
        assert np.all(np.asarray(std) == 0)
        np.testing.assert_allclose(traj.latents[:, 3], mean, rtol=1e-6, atol=1e-6)


# FLUX.1-dev's scheduler config, with other end points for mu's line than diffusers' defaults.
FLUX_SCHED = dict(
    base_image_seq_len=256, max_image_seq_len=8192, base_shift=0.6, max_shift=1.2, shift=3.0
)


@pytest.mark.parametrize("num_steps", [1, 10, 28])
def test_diffusers_sigmas_match_the_scheduler_static_shift(num_steps):
    """SD3's pipeline: `set_timesteps(N)` with the scheduler's shift 3."""
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ref.set_timesteps(num_steps)
    tables = schedules.flow_tables(num_steps, 3.0, "flow_grpo", 0.7, sigmas="diffusers")
    ours = schedules.flow_schedule(num_steps, "diffusers", 3.0).astype(np.float32)
    np.testing.assert_array_equal(ours, ref.sigmas.numpy())
    np.testing.assert_array_equal(tables["model_t"], ref.timesteps.numpy())


@pytest.mark.parametrize(
    ("num_steps", "seq_len", "shift_type"),
    [(4, 1024, "exponential"), (28, 4096, "exponential"), (28, 64, "linear")],
)
def test_diffusers_sigmas_match_the_scheduler_dynamic_shift(num_steps, seq_len, shift_type):
    """`set_timesteps(N, mu)` with `use_dynamic_shifting`, mu by FLUX's `calculate_shift`."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = dict(FLUX_SCHED, use_dynamic_shifting=True, time_shift_type=shift_type)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(**sched)
    mu = calculate_shift(seq_len, 256, 8192, 0.6, 1.2)
    ref.set_timesteps(num_steps, mu=mu)
    shift = schedules.dynamic_shift(seq_len, sched)
    assert shift == (math.exp(mu) if shift_type == "exponential" else mu)
    ours = schedules.flow_schedule(num_steps, "diffusers", shift, dynamic=True)
    np.testing.assert_array_equal(ours.astype(np.float32), ref.sigmas.numpy())


@pytest.mark.parametrize(("num_steps", "seq_len"), [(4, 1024), (28, 4096), (50, 300)])
def test_flux_pipeline_sigmas_are_shifted_linear_under_the_dynamic_shift(
    tmp_path, num_steps, seq_len
):
    """FluxPipeline passes `sigmas=linspace(1, 1/N, N)` and mu: the default schedule
    with shift e^mu, to 2 float32 ulp (diffusers shifts in float32); `make_sampler`
    takes the length from the model and the line's end points from its scheduler."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    ref = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, **FLUX_SCHED)
    mu = calculate_shift(seq_len, 256, 8192, 0.6, 1.2)
    ref.set_timesteps(num_steps, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    ours = schedules.flow_schedule(num_steps, "shifted_linear", math.exp(mu))
    np.testing.assert_array_max_ulp(ours.astype(np.float32), ref.sigmas.numpy(), maxulp=2)

    @dataclasses.dataclass(frozen=True)
    class SeqLenModel(DiffusionModel):  # the proposed `DiffusionModel.image_seq_len`
        image_seq_len: int | None = None

    tiny = tiny_model(tiny_config(tmp_path).model)
    fields = {f.name: getattr(tiny, f.name) for f in dataclasses.fields(tiny)}
    model = SeqLenModel(**{**fields, "scheduler_config": FLUX_SCHED}, image_seq_len=seq_len)
    cfg = ml_collections.ConfigDict(
        dict(kind="flow", num_steps=num_steps, guidance_scale=1.0, noise="cps", noise_level=0.7)
    )
    cfg.update(shift=1.0, sigmas="shifted_linear", dynamic_shift=True, sde_window=())
    sampler = samplers.make_sampler(cfg, model)
    want = schedules.flow_tables(num_steps, math.exp(mu), "cps", 0.7)
    for name, table in want.items():
        np.testing.assert_allclose(sampler.tables[name], table, rtol=1e-6, atol=1e-7)
    with pytest.raises(ConfigError, match="sample.dynamic_shift=True needs"):
        samplers.make_sampler(cfg, tiny)
