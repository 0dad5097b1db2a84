"""End-to-end engine properties on a seconds-fast model.

- on-policy ratios are exactly 1, with rollout chunks differing from the
  training micro-batch, for the flow SDE and for DDIM with CFG;
- 8 devices (data 4 x fsdp 2) accumulating gradients in one scanned update
  (the GPU/TPU default) give the rewards, advantages and updated parameters of
  one device looping over jitted per-item gradients on the host (the CPU
  default);
- an interrupted (SIGTERM) and resumed run reproduces the uninterrupted one;
- non-finite rewards skip updates and abort after too many, keeping the
  last checkpoint;
- group-shared initial noise (DanceGRPO) keeps the update on-policy.
"""

from __future__ import annotations

import json
import os
import signal

import jax
import numpy as np
import pytest
from tiny_config import tiny_config

from bpgo_jax.build import build_run, build_training, load_policy
from bpgo_jax.errors import ConfigError, DivergedError, Preempted
from bpgo_jax.logs import RunLogger
from bpgo_jax.rewards.base import Reward, register
from bpgo_jax.train import evaluate, train

TIMING_KEYS = {"rollout_seconds", "train_seconds", "images_per_second"}


def _sigterm_after(n_calls: int):
    calls = {"n": 0}

    def fn(images, prompts, metadata):
        calls["n"] += 1
        if calls["n"] == n_calls:
            os.kill(os.getpid(), signal.SIGTERM)
        return np.zeros(len(images), np.float32)

    return fn


@register("test_sigterm_first_call")
def _sigterm_reward(cfg):
    return Reward(name="test_sigterm", jittable=False, fn=_sigterm_after(int(cfg.at_call)))


@register("test_nan")
def _nan_reward(cfg):
    del cfg
    return Reward(
        name="test_nan",
        jittable=False,
        fn=lambda images, prompts, meta: np.full(len(images), np.nan, np.float32),
    )


def _params(trainable):
    return jax.tree.map(np.asarray, jax.device_get(trainable))


def _rows(workdir):
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def _config(tmp_path, **kw):
    # Two updates per epoch (train batch 8 of 16 samples), micro-batch 8,
    # rollout evaluated in chunks of 8 per call of 16.
    base = {
        "train.batch_size": 8,
        "train.micro_batch_size": 8,
        "train.num_epochs": 2,
        "rewards": {
            "saturation": {"weight": 1.0},
            "test_sigterm_first_call": {"weight": 0.0, "at_call": 0},
        },
    }
    base.update(kw)
    return tiny_config(tmp_path, **base)


# The tests that compare with the baseline run share one xdist worker (and one run).
BASELINE_GROUP = pytest.mark.xdist_group("engine_baseline")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """Uninterrupted 2-epoch run on one device."""
    tmp = tmp_path_factory.mktemp("baseline")
    result = train(_config(tmp, **{"mesh.num_devices": 1}), tmp / "run")
    return result.records, _params(result.state.trainable)


def _strip(record):
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}


@BASELINE_GROUP
def test_baseline_trains_on_policy(baseline):
    records, _ = baseline
    assert jax.default_backend() == "cpu"  # so the baseline used the host loop
    assert len(records) == 2
    for r in records:
        assert r["onpolicy_ratio_max_dev"] == 0.0
        assert np.isfinite(r["loss"]) and r["grad_norm"] > 0
    # The second update of an epoch is off-policy: its ratios moved.
    assert records[0]["approx_kl"] > 0
    assert records[1]["prior_mean"] != records[0]["prior_mean"]  # moving-average prior moved


def _assert_same_run(records, params, other):
    for a, b in zip(records, other.records, strict=True):
        for key in (
            "reward_mean",
            "reward_std",
            "prior_mean",
            "advantage_abs_mean",
            "ras_weight_mean",
            "crt_advantage_abs_mean",
        ):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)
        # The loss is a mean of +-O(1) terms that nearly cancel: compare it on
        # the scale of its terms, not relative to its tiny value.
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=0, atol=1e-5)
        assert b["onpolicy_ratio_max_dev"] == 0.0
    # Adam divides by sqrt(v): for near-zero gradients, summation-order noise
    # becomes an update of up to lr (1e-3) per step. 1e-5 is 1% of one step.
    got = _params(other.state.trainable)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), got, params)


@BASELINE_GROUP
def test_sharded_scanned_update_matches_unsharded_host_loop(baseline, tmp_path):
    # data 4 x fsdp 2: the batch split over all 8 devices, the parameters over 2; the
    # gradients summed in one scanned program where the baseline loops on the host.
    config = _config(tmp_path, **{"mesh.shape": (4, 2), "train.accumulate": "scan"})
    training, _ = build_training(*build_run(config))
    assert training.update.accumulate == "scan"
    result = train(config, tmp_path / "run")
    assert result.state.trainable["unet"]["conv_in"]["kernel"].sharding.mesh.devices.size == 8
    _assert_same_run(*baseline, result)


@BASELINE_GROUP
def test_sigterm_then_resume_matches_uninterrupted(baseline, tmp_path):
    records, params = baseline
    workdir = tmp_path / "run"
    # The host reward sends SIGTERM during epoch 0's rollout: the run finishes
    # that epoch, checkpoints and stops.
    rewards = {
        "saturation": {"weight": 1.0},
        "test_sigterm_first_call": {"weight": 0.0, "at_call": 1},
    }
    with pytest.raises(Preempted, match="epoch 1"):
        train(_config(tmp_path, **{"mesh.num_devices": 1, "rewards": rewards}), workdir)
    part = _rows(workdir)
    assert len(part) == 1
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1"]
    # The same run without the reward that sends SIGTERM (weight 0: results unchanged).
    rest = train(_config(tmp_path, **{"mesh.num_devices": 1}), workdir, allow_config_change=True)
    assert [r["epoch"] for r in rest.records] == [1]
    assert [_strip(r) for r in part + rest.records] == [_strip(r) for r in records]
    jax.tree.map(np.testing.assert_array_equal, _params(rest.state.trainable), params)
    assert [row["epoch"] for row in _rows(workdir)] == [0, 1]


def test_ddim_with_guidance_is_on_policy(tmp_path):
    config = tiny_config(
        tmp_path,
        **{
            "model.prediction_type": "epsilon",
            "sample.kind": "ddim",
            "sample.eta": 1.0,
            "sample.guidance_scale": 3.0,
            "train.micro_batch_size": 4,
            "train.num_epochs": 1,
            "train.kl_beta": 0.01,
            "train.ema_decay": 0.9,
            "mesh.shape": (2, 2),
            "mesh.num_devices": 4,
            "eval.rewards": {"saturation": {"weight": 1.0, "log_as": "eval_sat"}},
            "eval.prompts_path": str(tmp_path / "prompts.txt"),
            "eval.extra_prompts": {"other": str(tmp_path / "other.txt")},
            "eval.num_prompts": 4,
        },
    )
    (tmp_path / "other.txt").write_text("a tree\na dog\na boat\na lamp\n")
    records = train(config, tmp_path / "run").records
    assert records[0]["onpolicy_ratio_max_dev"] == 0.0
    assert records[0]["approx_kl"] == 0.0
    assert np.isfinite(records[0]["kl_ref"])
    # Evaluation logs the starting policy first, then after the epoch's update.
    lines = _rows(tmp_path / "run")
    assert [x["samples_seen"] for x in lines] == [0, 16]
    assert set(lines[0]) == {"epoch", "samples_seen", "eval_sat", "eval_sat_other"}
    assert lines[1]["eval_sat"] != lines[0]["eval_sat"]  # EMA weights moved
    # The extra set samples its own prompts with the same fixed seeds (the
    # zero-initialised output layer ignores the prompt until the first update).
    assert lines[1]["eval_sat_other"] != lines[1]["eval_sat"]


def test_eval_noise_ode_evaluates_with_the_deterministic_sampler(tmp_path):
    """`eval.noise=ode`: evaluations use the ODE sampler, rollouts keep their SDE."""
    evals = {}
    for noise in ("", "ode"):
        config = tiny_config(
            tmp_path,
            **{
                "eval.noise": noise,
                "mesh.num_devices": 1,
                "eval.rewards": {"saturation": {"weight": 1.0}},
                "eval.prompts_path": str(tmp_path / "prompts.txt"),
                "eval.num_prompts": 4,
            },
        )
        run, trainable = build_run(config)
        _, state = build_training(run, trainable)
        assert np.all(run.sampler.tables["std"] > 0)
        assert np.all(run.eval_sampler.tables["std"] == 0) == (noise == "ode")
        logger = RunLogger(tmp_path / f"run_{noise or 'sde'}", tensorboard=False)
        evals[noise] = evaluate(run, state, logger, 0)["eval_saturation"]
        logger.close()
    assert evals["ode"] != evals[""]


def test_shared_initial_noise_stays_on_policy(tmp_path):
    """One initial noise per group (DanceGRPO): every group's samples start alike,
    groups differ, and the update's recomputed ratios are still exactly 1."""
    config = _config(
        tmp_path,
        **{"sample.shared_initial_noise": True, "train.num_epochs": 1, "mesh.num_devices": 1},
    )
    run, trainable = build_run(config)
    rollout = run.generate(
        np.arange(4), run.prompts, per_prompt=4, trainable=trainable, epoch_key=run.epoch_key(0, 0)
    )
    x0 = np.asarray(rollout.latents[:, 0]).reshape(4, 4, -1)
    assert np.all(x0 == x0[:, :1]) and len({row.tobytes() for row in x0[:, 0]}) == 4
    assert not np.array_equal(rollout.latents[0, 1], rollout.latents[1, 1])  # step noise differs
    (record,) = train(config, tmp_path / "run").records
    assert record["onpolicy_ratio_max_dev"] == 0.0 and record["grad_norm"] > 0


def test_non_finite_rewards_skip_then_abort(tmp_path):
    config = tiny_config(
        tmp_path,
        **{
            "rewards": {"saturation": {"weight": 1.0}, "test_nan": {"weight": 1.0}},
            "train.num_epochs": 5,
            "train.max_consecutive_skips": 1,
            "checkpoint.every": 1,
            "mesh.num_devices": 1,
        },
    )
    with pytest.raises(DivergedError, match="consecutive updates skipped"):
        train(config, tmp_path / "run")
    lines = _rows(tmp_path / "run")
    assert [x["skipped_updates"] for x in lines] == [1, 2]
    assert lines[0]["non_finite_reward_count"] == 16
    # The epoch before the abort is kept, with the initial (never updated) weights.
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["1"]
    policy = load_policy(config, tmp_path / "run")
    _, initial = build_run(config)
    assert policy.epoch == 1
    jax.tree.map(np.testing.assert_array_equal, _params(policy.trainable), _params(initial))


def test_prompts_longer_than_the_encoder_reads_are_refused_or_reported(tmp_path, caplog):
    config = tiny_config(tmp_path, **{"prompts.on_too_long": "error"})
    long = "a " + " ".join(["very"] * 10) + " red circle"  # 13 tokens; the encoder reads 8
    with open(config.prompts.path, "a") as f:
        f.write(long + "\n")
    with pytest.raises(ConfigError, match=r"prompts.path: 1 of 5 prompts .* 8 tokens"):
        build_run(config)
    config.prompts.on_too_long = "warn"
    with caplog.at_level("WARNING", logger="bpgo_jax"):
        run, _ = build_run(config)
    assert len(run.prompts) == 5
    assert sum("1 of 5 prompts" in r.getMessage() for r in caplog.records) == 1


def test_a_bad_config_fails_before_the_workdir_is_created(tmp_path):
    with pytest.raises(ConfigError, match="sample.group_size=3"):
        train(tiny_config(tmp_path, **{"sample.group_size": 3}), tmp_path / "run")
    assert not (tmp_path / "run").exists()
