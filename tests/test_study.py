"""The study: aggregation, table and plot; parallel runs; bad configs."""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from commands import last_line, run_launch
from tiny_config import tiny_config

from bpgo_jax import study
from bpgo_jax.config import ConfigError
from bpgo_jax.train import train


def _runs(offsets):
    return [
        [
            {
                "epoch": e,
                "samples_seen": 16 * (e + 1),
                "reward_mean": 0.1 * e + o,
                **({"oracle_accuracy": 0.2 * e + o, "eval_r": 0.3 + o} if e % 2 == 0 else {}),
            }
            for e in range(5)
        ]
        for o in offsets
    ]


def _study(**kw):
    return ml_collections.ConfigDict(
        {"threshold_metric": "oracle_accuracy", "threshold": 0.4, **kw}
    )


def test_curves_and_threshold():
    c = study.curves(_runs([0.0, 0.1]), "oracle_accuracy")
    assert c["samples"] == [16, 48, 80]  # epochs where it was logged
    np.testing.assert_allclose(c["mean"], [0.05, 0.45, 0.85])
    np.testing.assert_allclose(c["min"], [0.0, 0.4, 0.8])
    assert study.samples_to_threshold(c, 0.4) == 48
    assert study.samples_to_threshold(c, 0.9) is None


def test_summary_table_and_plot(tmp_path):
    results = {"grpo": _runs([0.0, 0.02]), "bpgo": _runs([0.05, 0.07])}
    summary = study.summarise(results, _study())
    assert summary["bpgo"]["samples_to_threshold"] == 48
    np.testing.assert_allclose(summary["grpo"]["final_reward"][0], 0.41)
    md = study.table(summary, _study(), 2)
    assert "| bpgo | 0.4600 ± 0.0100 | 0.860 ± 0.010 | 48 |" in md
    study.plot(summary, _study(), tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_report_columns_and_panels(tmp_path):
    results = {"grpo": _runs([0.0, 0.02]), "bpgo": _runs([0.05, 0.07])}
    cfg = _study(report=("eval_r", "reward_mean"))
    summary = study.summarise(results, cfg)
    np.testing.assert_allclose(summary["bpgo"]["final_eval_r"], (0.36, 0.01))
    md = study.table(summary, cfg, 2)
    assert "| final eval_r | final reward_mean | final oracle_accuracy |" in md.splitlines()[0]
    row = "| bpgo | 0.4600 ± 0.0100 | 0.3600 ± 0.0100 | 0.4600 ± 0.0100 | 0.860 ± 0.010 | 48 |"
    assert row in md
    assert md.splitlines()[1] == "|---|---|---|---|---|---|"
    study.plot(summary, cfg, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_run_config_only_changes_method_and_seed(tmp_path):
    base = tiny_config(tmp_path)
    base.study = {"seeds": (0,), "methods": {}}
    cfg = study.run_config(base, {"method": "bpgo", "alpha": 0.0}, seed=7)
    assert cfg.seed == 7 and cfg.advantage.alpha == 0.0 and "study" not in cfg
    assert cfg.train == base.train and base.advantage.alpha == 0.5


def test_parallel_workers_reproduce_an_in_process_run(tmp_path):
    """Runs trained in spawned worker processes log what the same run logs in-process."""
    base = tiny_config(
        tmp_path,
        **{
            "eval.rewards": {"saturation": {"weight": 1.0, "log_as": "sat"}},
            "eval.prompts_path": str(tmp_path / "prompts.txt"),
            "eval.num_prompts": 4,
            "eval.every": 1,
        },
    )
    base.study = {
        "seeds": (0,),
        "methods": {"grpo": {"method": "grpo"}, "bpgo": {"method": "bpgo"}},
        "threshold_metric": "sat",
        "threshold": 0.0,
        "workers": 2,
    }
    summary = study.run_study(base, tmp_path / "study")
    assert (tmp_path / "study" / "study.png").is_file()
    ref_dir = tmp_path / "in_process"
    train(study.run_config(base, {"method": "grpo"}, 0), ref_dir)
    ref = [[json.loads(x) for x in (ref_dir / "metrics.jsonl").read_text().splitlines()]]
    for key, metric in (("reward", "reward_mean"), ("sat", "sat")):
        assert summary["grpo"][key] == study.curves(ref, metric)
    assert summary["grpo"]["sat"]["samples"] == [0, 16, 32]
    # the two methods are different runs, not one run reported twice
    assert summary["bpgo"]["reward"] != summary["grpo"]["reward"]


def test_bad_method_fails_before_any_run(tmp_path):
    base = tiny_config(tmp_path)
    base.study = {
        "seeds": (0,),
        "methods": {"grpo": {"method": "grpo"}, "typo": {"method": "bgpo"}},
        "threshold_metric": "sat",
        "threshold": 0.0,
        "workers": 2,
    }
    with pytest.raises(ConfigError, match="advantage.method='bgpo'"):
        study.run_study(base, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # the valid method did not start either


def test_study_command_reports_a_bad_config_in_one_line(tmp_path):
    run = run_launch(
        "study.py",
        "--config=configs/study.py",
        f"--outdir={tmp_path / 'out'}",
        "--config.study.methods.grpo.method=gpro",
    )
    assert run.returncode == 1, run.stderr
    last = last_line(run.stderr)
    assert last.startswith("error: advantage.method='gpro' is not one of"), last


def test_written_configs_hold_no_machine_paths():
    inside = str(Path(study.__file__).resolve().parent / "world" / "assets" / "prompts_val.jsonl")
    config = {"prompts": {"path": inside}, "eval": {"extra": [inside, "/elsewhere/x.txt"]}}
    assert study.portable(config) == {
        "prompts": {"path": "bpgo_jax/world/assets/prompts_val.jsonl"},
        "eval": {"extra": ["bpgo_jax/world/assets/prompts_val.jsonl", "/elsewhere/x.txt"]},
    }
