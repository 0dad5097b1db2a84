"""The study: grid and selection, statistics, summary, resuming run by run, the test split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from commands import config_file, run_launch
from scipy import stats
from tiny_config import tiny_config

from bpgo_jax import study
from bpgo_jax.config import ConfigError

ASSETS = Path(study.__file__).resolve().parent / "world" / "assets"


def _study_block(**kw) -> dict:
    block = {
        "methods": {
            "grpo": {"advantage": {"method": "grpo"}, "knob": "train.kl_beta", "grid": (0.0, 0.1)},
            "bpgo": {"advantage": {"method": "bpgo"}, "knob": "advantage.k", "grid": (1.0, 10.0)},
        },
        "baseline": "grpo",
        "tune": {"seeds": (7, 8), "lr": (1e-3, 3e-4)},
        "report": {"seeds": (0, 1, 2)},
        "primary": {"name": "acc", "metrics": ("a", "b")},
        "metrics": ("r",),
        "threshold": ml_collections.config_dict.placeholder(float),
        "threshold_gain": 0.1,
        "workers": 1,
    }
    return block | kw


def _config(tmp_path, **kw) -> ml_collections.ConfigDict:
    c = tiny_config(tmp_path)
    c.study = _study_block(**kw)
    return c


def _records(final_a: float, final_b: float, start: float = 0.2, r: float = 0.5) -> list[dict]:
    """Rows of a finished run: evaluations at 0, 16 and 32 samples."""
    mid_a, mid_b = (start + final_a) / 2, (start + final_b) / 2
    return [
        {"epoch": 0, "samples_seen": 0, "a": start, "b": start, "r": r},
        {"epoch": 0, "samples_seen": 16, "reward_mean": 0.1, "a": mid_a, "b": mid_b, "r": r},
        {"epoch": 1, "samples_seen": 32, "reward_mean": 0.2, "a": final_a, "b": final_b, "r": r},
    ]


def _result(spec: study.RunSpec, records: list[dict], status: str = "finished") -> dict:
    return {"status": status, "records": records, "seed": spec.seed, "method": spec.method}


def test_grid_order_and_labels(tmp_path):
    s = _config(tmp_path).study
    assert study.grid(s, "bpgo") == [
        (("train.lr", 1e-3), ("advantage.k", 1.0)),
        (("train.lr", 1e-3), ("advantage.k", 10.0)),
        (("train.lr", 3e-4), ("advantage.k", 1.0)),
        (("train.lr", 3e-4), ("advantage.k", 10.0)),
    ]
    assert study.point_label(study.grid(s, "bpgo")[1]) == "train.lr=0.001,advantage.k=10.0"
    assert len(study.tune_runs(s)) == 2 * 4 * 2
    s.tune.seeds = ()  # no tuning: one point, the base config
    assert study.grid(s, "bpgo") == [()] and study.tune_runs(s) == []
    assert study.point_label(()) == "default"


def test_run_config_sets_method_point_seed_and_phase_eval(tmp_path):
    c = _config(tmp_path)
    c.study.report.eval = {"num_prompts": 5, "every": 3}
    spec = study.RunSpec("report", "bpgo", (("train.lr", 3e-4), ("advantage.k", 10.0)), 2)
    run = study.run_config(c, spec)
    assert "study" not in run and run.seed == 2
    assert (run.advantage.method, run.advantage.k, run.train.lr) == ("bpgo", 10.0, 3e-4)
    assert (run.eval.num_prompts, run.eval.every) == (5, 3)
    assert c.advantage.k == 1.0 and c.eval.every == 5  # the base is untouched
    c.study.methods.bpgo.advantage.kk = 2.0  # a typo is refused, not added silently
    with pytest.raises(ConfigError, match=r"study.methods.bpgo.advantage.kk: 'advantage.kk'"):
        study.run_config(c, spec)


def test_selection_on_a_finished_run_table(tmp_path):
    """Synthetic finished tuning runs: the highest seed-mean dev score wins, ties go
    to the earlier grid point, a diverged seed loses, a missing run means no choice."""
    c = _config(tmp_path)
    s = c.study
    g_points, b_points = study.grid(s, "grpo"), study.grid(s, "bpgo")
    # (a + b) / 2 at the last evaluation, per point, per tuning seed (7, 8)
    grpo_scores = [(0.5, 0.5), (0.6, 0.4), (0.7, 0.3), (0.2, 0.2)]  # the first three tie at 0.5
    bpgo_scores = [(0.5, 0.5), (0.6, 0.6), (0.9, 0.9), (0.55, 0.7)]  # the third diverges on seed 8
    results = {}
    for method, points, scores in (
        ("grpo", g_points, grpo_scores),
        ("bpgo", b_points, bpgo_scores),
    ):
        for point, per_seed in zip(points, scores, strict=True):
            for seed, score in zip((7, 8), per_seed, strict=True):
                spec = study.RunSpec("tune", method, point, seed)
                status = (
                    "diverged" if (method, point, seed) == ("bpgo", b_points[2], 8) else "finished"
                )
                results[spec.key] = _result(spec, _records(score + 0.1, score - 0.1), status)
    chosen = study.chosen_points(s, results)
    assert chosen == {"grpo": g_points[0], "bpgo": b_points[3]}
    scores = study.tuning_scores(s, results)
    assert scores["bpgo"][study.point_label(b_points[2])] == {
        "score": None,
        "seeds": 2,
        "diverged": 1,
    }
    np.testing.assert_allclose(scores["bpgo"][study.point_label(b_points[3])]["score"], 0.625)
    del results[study.RunSpec("tune", "bpgo", b_points[1], 7).key]
    assert study.chosen_points(s, results)["bpgo"] is None  # waits for its tuning
    # Report runs exist only for methods with a choice, seed by seed.
    keys = [r.key for r in study.report_runs(s, study.chosen_points(s, results))]
    assert keys == [f"report/grpo/{study.point_label(g_points[0])}/seed_{i}" for i in (0, 1, 2)]


def test_interval_is_a_t_interval():
    iv = study.interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2 df) * sd / sqrt(n), sd = 1
    assert iv["n"] == 3 and iv["mean"] == 2.0 and iv["std"] == 1.0
    np.testing.assert_allclose(iv["ci"], [2.0 - half, 2.0 + half])
    assert study.interval([0.4])["ci"] is None and study.interval([])["mean"] is None
    assert study.p_value([0.1, 0.1]) == 0.0 and study.p_value([0.0, 0.0]) == 1.0
    assert study.p_value([0.1]) is None


def test_detectable_difference_has_the_stated_power():
    """A simulated paired t-test at the returned difference rejects ~80% of the time."""
    d = study.detectable_difference(1.0, 5)
    assert 1.5 < d < 2.0  # (t crit 2.78 + ~0.94) / sqrt(5) ~ 1.66 by the normal shortcut
    x = np.random.default_rng(0).normal(d, 1.0, size=(20000, 5))
    rejected = stats.ttest_1samp(x, 0.0, axis=1).pvalue < 0.05
    assert abs(rejected.mean() - 0.8) < 0.015
    np.testing.assert_allclose(
        study.detectable_difference(1.0, 2000), 2.8016 / math.sqrt(2000), 1e-2
    )


def _report_results(c, missing=()) -> dict:
    """grpo and bpgo at their chosen points over report seeds 0-2; bpgo is 0.05
    above grpo on `a` in every seed, and 0.01 / 0.03 / 0.02 above on `b`."""
    s = c.study
    results = {}
    for method, points in (("grpo", study.grid(s, "grpo")), ("bpgo", study.grid(s, "bpgo"))):
        for point in points:
            for seed in s.tune.seeds:
                spec = study.RunSpec("tune", method, point, seed)
                good = point == points[1]
                results[spec.key] = _result(spec, _records(0.6 if good else 0.3, 0.5))
        for seed, (a, b) in enumerate(((0.40, 0.30), (0.50, 0.32), (0.45, 0.40))):
            if (method, seed) in missing:
                continue
            up = (0.05, (0.01, 0.03, 0.02)[seed]) if method == "bpgo" else (0.0, 0.0)
            spec = study.RunSpec("report", method, points[1], seed)
            results[spec.key] = _result(
                spec, _records(a + up[0], b + up[1], start=0.2 + seed / 100)
            )
    return results


def test_summary_of_synthetic_runs(tmp_path):
    c = _config(tmp_path)
    summary = study.summarise(c, _report_results(c))
    bpgo, grpo = summary["methods"]["bpgo"], summary["methods"]["grpo"]
    assert bpgo["point"] == "train.lr=0.001,advantage.k=10.0" and bpgo["seeds"] == [0, 1, 2]
    # final acc = (a + b) / 2 per seed
    np.testing.assert_allclose(grpo["final"]["acc"]["values"][1], 0.41)
    diff = bpgo["difference"]["a"]
    np.testing.assert_allclose(list(diff["values"].values()), [0.05] * 3)
    np.testing.assert_allclose(diff["ci"], [0.05, 0.05], atol=1e-12)
    np.testing.assert_allclose(bpgo["difference"]["b"]["mean"], 0.02)
    np.testing.assert_allclose(bpgo["difference"]["acc"]["mean"], 0.035)
    assert grpo["difference"] == {}
    # primary differences 0.03, 0.04, 0.035: t = 0.035 / (0.005 / sqrt 3), and for
    # 2 degrees of freedom the two-sided p is 1 - t / sqrt(2 + t^2)
    t = 0.035 / (0.005 / math.sqrt(3))
    np.testing.assert_allclose(bpgo["difference"]["acc"]["p"], 1 - t / math.sqrt(2 + t * t))
    assert bpgo["difference"]["a"]["p"] == 0.0  # the same difference in every seed
    np.testing.assert_allclose(summary["power"]["pooled_std_difference"], 0.005)
    np.testing.assert_allclose(
        summary["power"]["detectable_difference"], study.detectable_difference(0.005, 3)
    )
    # threshold: mean start (0.20, 0.21, 0.22) + 0.1; grpo's seed mean crosses it at 32 samples
    np.testing.assert_allclose(summary["threshold"], 0.31)
    assert grpo["samples_to_threshold"] == 32 and bpgo["samples_to_threshold"] == 16
    assert summary["missing"] == [] and summary["waiting_for_tuning"] == []
    md = study.table(summary, c.study)
    assert "| bpgo | train.lr=0.001,advantage.k=10.0 | 3 |" in md
    assert "+0.050 [+0.050, +0.050]" in md and "All runs finished." in md
    study.plot(summary, c.study, tmp_path)
    assert (tmp_path / "study.png").stat().st_size > 1000


def test_summary_of_a_partial_study_names_what_is_missing(tmp_path):
    c = _config(tmp_path)
    results = _report_results(c, missing={("bpgo", 2)})
    summary = study.summarise(c, results)
    bpgo = summary["methods"]["bpgo"]
    assert bpgo["seeds"] == [0, 1] and bpgo["difference"]["a"]["n"] == 2  # paired where both ran
    assert summary["missing"] == ["report/bpgo/train.lr=0.001,advantage.k=10.0/seed_2"]
    c.study.report.seeds = (0, 1, 2, 3)
    del results[study.RunSpec("tune", "grpo", study.grid(c.study, "grpo")[0], 8).key]
    summary = study.summarise(c, results)
    assert summary["waiting_for_tuning"] == ["grpo"]
    md = study.table(summary, c.study)
    assert "| grpo | tuning unfinished | 0 |" in md and "report runs of grpo wait for tuning" in md
    assert "(1 of 2 seeds)" in md


def test_finished_results_of_another_config_are_not_reused(tmp_path):
    c = _config(tmp_path, tune={"seeds": (), "lr": ()})
    spec = study.RunSpec("report", "grpo", (), 0)
    workdir = tmp_path / "out" / spec.key
    workdir.mkdir(parents=True)
    result = _result(spec, _records(0.5, 0.5)) | {
        "config": study.run_record(study.run_config(c, spec))
    }
    (workdir / study.RESULT_FILE).write_text(json.dumps(result))
    assert list(study.current_results(c, tmp_path / "out")) == [spec.key]
    c.log.progress = False  # presentation: still the same run
    assert list(study.current_results(c, tmp_path / "out")) == [spec.key]
    c.train.lr = 5e-4  # another run: trained again (resuming its checkpoint, if any)
    assert study.current_results(c, tmp_path / "out") == {}
    assert list(study.current_results(c, tmp_path / "out", allow_change=True)) == [spec.key]


def test_finished_results_of_another_checkout_are_reused(tmp_path, monkeypatch):
    """A run recorded where the package sat elsewhere (another clone or machine, an
    outdir copied over) is the same run: the package's files are named relative to it."""
    from bpgo_jax.configs import study as study_config

    c = study_config.get_config()
    spec = study.tune_runs(c.study)[0]
    here = str(study._PACKAGE_ROOT)
    elsewhere = json.loads(
        json.dumps(study.run_config(c, spec).to_dict(), default=str).replace(
            here, "/elsewhere/clone"
        )
    )
    monkeypatch.setattr(study, "_PACKAGE_ROOT", Path("/elsewhere/clone"))
    record = study.run_record(ml_collections.ConfigDict(elsewhere))
    monkeypatch.undo()
    assert record["prompts"]["path"] == "bpgo_jax/world/assets/prompts_train.jsonl"
    workdir = tmp_path / "out" / spec.key
    workdir.mkdir(parents=True)
    result = _result(spec, _records(0.5, 0.5)) | {"config": record}
    (workdir / study.RESULT_FILE).write_text(json.dumps(result))
    assert list(study.current_results(c, tmp_path / "out")) == [spec.key]


def _tiny_study_file(tmp_path: Path) -> Path:
    """A config file of `_tiny_study(tmp_path, workers=2)`, for the command."""
    return config_file(
        tmp_path / "tiny_study.py",
        "from test_study import _tiny_study",
        f"_tiny_study(Path({str(tmp_path)!r}), workers=2)",
    )


def _tiny_study(tmp_path, workers: int, seeds=(0,)) -> ml_collections.ConfigDict:
    base = tiny_config(
        tmp_path,
        **{
            "eval.rewards": {"saturation": {"weight": 1.0, "log_as": "sat"}},
            "eval.prompts_path": str(tmp_path / "prompts.txt"),
            "eval.num_prompts": 4,
            "eval.every": 1,
            "mesh.num_devices": 1,
            "checkpoint.every": 2,  # a checkpoint at the end of a run (or of a cut-short one)
        },
    )
    base.study = _study_block(
        tune={"seeds": (), "lr": ()},
        report={"seeds": seeds},
        primary={"name": "sat_mean", "metrics": ("sat",)},
        metrics=(),
        threshold=0.0,
        workers=workers,
    )
    return base


@pytest.mark.slow
def test_interrupted_study_resumes_and_matches_an_uninterrupted_one(tmp_path):
    """2 methods x 1 seed, stopped after one run: the rerun skips the finished
    run and ends with the summary of an uninterrupted study (which ran in two
    worker processes). A run killed after its last checkpoint but before its
    result was written resumes from that checkpoint instead of starting over
    (resuming mid-run is the trainer's own, tests/test_engine.py)."""
    two_seeds = _tiny_study(tmp_path, workers=1, seeds=(0, 1)).study
    assert [s.key for s in study.report_runs(two_seeds, {"grpo": (), "bpgo": ()})] == [
        "report/bpgo/default/seed_0",  # seed by seed
        "report/grpo/default/seed_0",
        "report/bpgo/default/seed_1",
        "report/grpo/default/seed_1",
    ]
    cfg = _tiny_study(tmp_path, workers=1)
    out = tmp_path / "interrupted"
    partial = study.run_study(cfg, out, max_runs=1)
    order = study.report_runs(cfg.study, {"grpo": (), "bpgo": ()})
    assert partial["methods"]["bpgo"]["seeds"] == [0] and len(partial["missing"]) == 1
    assert "1 run(s) missing" in (out / "study.md").read_text()
    first = (out / order[0].key / study.RESULT_FILE).read_text()

    resumed = study.run_study(cfg, out)
    assert (out / order[0].key / study.RESULT_FILE).read_text() == first  # skipped
    assert resumed["missing"] == []
    # The uninterrupted study as a user runs it: the command, with two worker processes
    # (each imports launch/study.py again as its main module).
    done = run_launch(
        "study.py",
        f"--config={_tiny_study_file(tmp_path)}",
        f"--outdir={tmp_path / 'whole'}",
        "--compile_cache=",  # the tests' cache, from the environment
    )
    assert done.returncode == 0, done.stderr[-3000:]
    whole = study.run_study(_tiny_study(tmp_path, workers=2), tmp_path / "whole", max_runs=0)
    assert resumed == whole
    assert (out / "study.md").read_text() == (tmp_path / "whole" / "study.md").read_text()
    assert whole["methods"]["grpo"]["curves"]["sat"]["samples"] == [0, 16, 32]
    # the two methods are different runs, not one run reported twice
    curves = {m: whole["methods"][m]["curves"]["reward_mean"] for m in ("grpo", "bpgo")}
    assert curves["grpo"] != curves["bpgo"]

    killed = out / order[1].key
    rows = (killed / "metrics.jsonl").read_text()
    (killed / study.RESULT_FILE).unlink()
    assert study.run_study(cfg, out) == resumed
    assert (killed / "metrics.jsonl").read_text() == rows  # no epoch redone (same timings)
    assert (killed / study.RESULT_FILE).is_file()
    assert study.run_study(cfg, out, max_runs=0) == resumed  # rebuilt from the runs alone


def test_bad_method_fails_before_any_run(tmp_path):
    c = _config(tmp_path)
    c.study.methods.typo = {"advantage": {"method": "bgpo"}}
    with pytest.raises(ConfigError, match="advantage.method='bgpo'"):
        study.run_study(c, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # the valid method did not start either
    c = _config(tmp_path, baseline="ppo")
    with pytest.raises(ConfigError, match="study.baseline='ppo'"):
        study.check_study(c)
    c = _tiny_study(tmp_path, workers=1)
    study.check_study(c)
    c.study.primary.metrics = ("sat", "sat_heldout")  # no such eval set
    with pytest.raises(ConfigError, match="metric 'sat_heldout' is not logged by the tune runs"):
        study.check_study(c)


def test_noisy_condition_reads_the_weak_reward_model(tmp_path):
    from bpgo_jax.configs import study_noisy

    c = study_noisy.get_config(str(tmp_path / "weak" / "reward_model.msgpack"))
    assert c.rewards.world_clip.path == c.eval.rewards.world_clip.path
    assert c.rewards.world_clip.path.endswith("weak/reward_model.msgpack")
    with pytest.raises(ConfigError, match="rewards.world_clip.path"):
        study.check_study(c)  # no weights there yet: refused before any run
    # By default, the shipped weak model: WorldCLIP's architecture, other weights.
    from bpgo_jax.world import reward_model

    c = study_noisy.get_config()
    study.check_study(c)
    weak, weak_cfg = reward_model.load(c.rewards.world_clip.path)
    shipped, shipped_cfg = reward_model.load()
    assert weak_cfg == shipped_cfg
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), weak, shipped)
    assert not all(jax.tree.leaves(same))


def test_dry_run_lists_the_runs_and_the_time(tmp_path):
    run = run_launch(
        "study.py", "--config=configs/study.py", f"--outdir={tmp_path / 'out'}", "--dry_run"
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert "tune/grpo/train.lr=0.0001,train.kl_beta=0.04/seed_100: to run" in run.stdout
    assert "report/grpo/*: 5 runs wait for its tuning" in run.stdout
    assert lines[-1].startswith("0 of ") and "h left with 2 worker(s)" in lines[-1]
    assert not (tmp_path / "out").exists()


def test_test_prompt_files_are_reproducible_and_disjoint():
    """The test sets regenerate byte for byte and share no prompt with any other
    prompt file or with the reward models' early-stopping sets."""
    from bpgo_jax.cli import make_world_prompts as mwp

    files = mwp.prompt_files()
    prompts = {}
    for name, entries in files.items():
        lines = [json.dumps(e, sort_keys=True) for e in entries]
        assert (ASSETS / f"prompts_{name}.jsonl").read_text() == "\n".join(lines) + "\n", name
        prompts[name] = {e["prompt"] for e in entries}
        assert len(prompts[name]) == len(entries)
        assert {e["metadata"]["split"] for e in entries} == {name}
    assert len(prompts["test_val"]) == len(prompts["test_heldout"]) == 512
    selection = mwp.selection_captions()
    for test in ("test_val", "test_heldout"):
        assert not prompts[test] & selection
        for other in ("train", "val", "heldout", "test_val", "test_heldout"):
            if other != test:
                assert not prompts[test] & prompts[other], (test, other)


def test_written_configs_hold_no_machine_paths():
    inside = str(ASSETS / "prompts_val.jsonl")
    config = {"prompts": {"path": inside}, "eval": {"extra": [inside, "/elsewhere/x.txt"]}}
    assert study.portable(config) == {
        "prompts": {"path": "bpgo_jax/world/assets/prompts_val.jsonl"},
        "eval": {"extra": ["bpgo_jax/world/assets/prompts_val.jsonl", "/elsewhere/x.txt"]},
    }
