"""The method study: an equal tuning budget on the dev sets, then seeds on the test sets.

Two phases, each a list of ordinary training runs (`bpgo_jax.train.train`):

- `tune`: every method at every point of its grid (`study.tune.lr` x the
  method's own knob) for every `study.tune.seeds`, evaluated on the dev sets
  (`study.tune.eval`). `select_point` picks each method's point from its
  finished tuning runs; every method gets the same number of points.
- `report`: every method at its chosen point for every `study.report.seeds`,
  evaluated on the test sets (`study.report.eval`). A seed fixes the prompt
  order, the rollout noises and the evaluation noises, so a seed's runs are
  paired across methods: differences to the baseline are taken seed by seed.

Runs are kept run by run under OUTDIR/PHASE/METHOD/POINT/seed_N (a train
workdir): a run is finished once its `result.json` (its metrics rows and
config) has been written, atomically, after training; finished runs are
skipped, an unfinished one resumes from its own checkpoint. The summary
(study.json, study.md, study.png, study_rewards.png) is rebuilt from every
finished run, and names the runs still missing.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import fnmatch
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from scipy import stats

from bpgo_jax.checkpoint.workdir import atomic_write, config_differences, config_record
from bpgo_jax.config import check_inputs, validate
from bpgo_jax.errors import ConfigError, DivergedError, WorkdirError

log = logging.getLogger("bpgo_jax")

PHASES = ("tune", "report")
RESULT_FILE = "result.json"
# Fields that may differ between a finished run's record and the study's config
# of it without making the run stale: where it is written and laid out, not
# what it computes (cf. checkpoint.RUN_NEUTRAL_FIELDS).
PRESENTATION_FIELDS = ("log.*", "checkpoint.*", "distributed.*", "mesh.*", "train.accumulate")


# ----------------------------------------------------------------- the runs
@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of the study: phase, method, grid point ((field, value) pairs), seed."""

    phase: str
    method: str
    point: tuple[tuple[str, Any], ...]
    seed: int

    @property
    def label(self) -> str:
        return point_label(self.point)

    @property
    def key(self) -> str:
        """Its path under the study's OUTDIR."""
        return f"{self.phase}/{self.method}/{self.label}/seed_{self.seed}"


def point_label(point: Sequence[tuple[str, Any]]) -> str:
    """`train.lr=0.0001,advantage.k=10.0`, or `default` for the empty point (a
    directory name: a "/" in a value becomes "_")."""
    label = ",".join(f"{field}={value!r}" for field, value in point) or "default"
    return label.replace("/", "_")


def grid(study: ml_collections.ConfigDict, method: str) -> list[tuple[tuple[str, Any], ...]]:
    """The method's grid points in grid order: `tune.lr` outer, its knob inner.

    Without tuning seeds there is no grid: one empty point (the base config).
    """
    if not study.tune.seeds:
        return [()]
    entry = study.methods[method]
    knob = entry.get("knob", "")
    values = tuple(entry.get("grid", ())) if knob else ()
    points = []
    for lr in study.tune.lr:
        inner = [((knob, v),) for v in values] or [()]
        points += [(("train.lr", lr), *k) for k in inner]
    return points


def tune_runs(study: ml_collections.ConfigDict) -> list[RunSpec]:
    """Every tuning run, method by method."""
    return [
        RunSpec("tune", m, point, seed)
        for m in study.methods
        for point in grid(study, m)
        for seed in study.tune.seeds
    ]


def report_runs(
    study: ml_collections.ConfigDict, chosen: Mapping[str, tuple | None]
) -> list[RunSpec]:
    """The report runs of methods with a chosen point, seed by seed (so an
    interrupted study has whole seeds to pair)."""
    return [
        RunSpec("report", m, chosen[m], seed)
        for seed in study.report.seeds
        for m in study.methods
        if chosen.get(m) is not None
    ]


def _set_field(config: ml_collections.ConfigDict, field: str, value: Any, where: str) -> None:
    *parents, leaf = field.split(".")
    node = config
    for part in parents:
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise ConfigError(f"{where}: {field!r} is not a config field")
        node = node[part]
    if leaf not in node:
        raise ConfigError(f"{where}: {field!r} is not a config field")
    try:
        node[leaf] = value
    except TypeError as err:
        raise ConfigError(f"{where}: {field}={value!r}: {err}") from None


def run_config(base: ml_collections.ConfigDict, spec: RunSpec) -> ml_collections.ConfigDict:
    """The base config with the spec's method, grid point, seed and phase's evaluation."""
    study = base.study
    if spec.method not in study.methods:
        raise ConfigError(f"study.methods has no method {spec.method!r}")
    config = copy.deepcopy(base)
    with config.unlocked():
        del config["study"]
        config.seed = spec.seed
        for key, value in study.methods[spec.method].get("advantage", {}).items():
            where = f"study.methods.{spec.method}.advantage.{key}"
            _set_field(config, f"advantage.{key}", value, where)
        for field, value in spec.point:
            _set_field(config, field, value, f"study.methods.{spec.method} grid point")
        for key, value in study[spec.phase].get("eval", {}).items():
            _set_field(config, f"eval.{key}", value, f"study.{spec.phase}.eval.{key}")
    return config


def check_study(config: ml_collections.ConfigDict) -> None:
    """Every check of every run the study can make, before any run starts.

    Each method's config is validated at every grid point of both phases (a
    report run may use any point), and each phase's files are read once.
    """
    study = config.study
    for field in ("methods", "tune", "report", "primary"):
        if field not in study:
            raise ConfigError(f"study.{field} is missing")
    if not study.report.seeds:
        raise ConfigError("study.report.seeds is empty: the study reports nothing")
    if study.baseline not in study.methods:
        raise ConfigError(f"study.baseline={study.baseline!r} is not one of study.methods")
    for m, entry in study.methods.items():
        if entry.get("knob") and not entry.get("grid"):
            raise ConfigError(f"study.methods.{m}: knob {entry.knob!r} needs a grid of values")
    for phase in PHASES:
        seeds = study[phase].seeds or study.report.seeds
        first = True
        for m in study.methods:
            for point in grid(study, m):
                run = run_config(config, RunSpec(phase, m, point, seeds[0]))
                validate(run, num_devices=1)
                if first:
                    check_inputs(run)
                    first = False
    for phase in PHASES:
        seeds = study[phase].seeds or study.report.seeds
        logged = eval_metrics(run_config(config, RunSpec(phase, study.baseline, (), seeds[0])))
        wanted = [*study.primary.metrics, *study.get("metrics", ())]
        wanted += [k for pair in study.get("reward_pairs", ()) for k in pair]
        for metric in wanted:
            if metric not in logged:
                raise ConfigError(
                    f"study: metric {metric!r} is not logged by the {phase} runs' evaluation "
                    f"(study.{phase}.eval and eval.rewards give {sorted(logged)})"
                )


def eval_metrics(run: ml_collections.ConfigDict) -> set[str]:
    """The names a run's evaluations log: each eval reward's `log_as` (default
    `eval_NAME`), and the same with `_SET` for every `eval.extra_prompts` set."""
    if not run.eval.prompts_path:
        return set()
    names = {r.get("log_as", f"eval_{n}") for n, r in run.eval.rewards.items()}
    suffixes = ["", *(f"_{k}" for k in run.eval.get("extra_prompts", {}))]
    return {n + s for n in names for s in suffixes}


# --------------------------------------------------------- finished results
def run_record(config: ml_collections.ConfigDict) -> dict:
    """What a finished run's result must match to count for `config`: its
    config with the package's own files named relative to the package, so
    finished runs stay current in another checkout (or on another machine)."""
    return portable(config_record(config))


def load_results(outdir: Path) -> dict[str, dict]:
    """key -> result of every run under `outdir` that wrote its result."""
    out = {}
    for path in sorted(Path(outdir).glob(f"*/*/*/seed_*/{RESULT_FILE}")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise WorkdirError(
                f"{path} is unreadable ({err}); move it aside to redo the run"
            ) from None
        out[path.parent.relative_to(outdir).as_posix()] = result
    return out


def is_current(result: Mapping, config: ml_collections.ConfigDict) -> bool:
    """Whether a finished result was trained with `config` (up to presentation fields)."""
    changes = config_differences(result["config"], run_record(config))
    return all(
        any(fnmatch.fnmatchcase(field, p) for p in PRESENTATION_FIELDS) for field, _, _ in changes
    )


def train_run(
    config: ml_collections.ConfigDict, workdir: Path, spec: RunSpec, allow_change: bool = False
) -> dict:
    """Trains (or resumes) one run, then records its result atomically.

    A run that diverges is finished too (status "diverged", its rows so far):
    running it again would diverge again. `allow_change`: resume a checkpoint
    whose config differs (the trainer's `allow_config_change`).
    """
    from bpgo_jax.train import train

    status = "finished"
    try:
        train(config, workdir, allow_config_change=allow_change)
    except DivergedError as err:
        log.warning("%s diverged: %s", spec.key, err)
        status = "diverged"
    rows = (workdir / "metrics.jsonl").read_text().splitlines()
    result = {
        "phase": spec.phase,
        "method": spec.method,
        "point": [list(p) for p in spec.point],
        "seed": spec.seed,
        "status": status,
        "records": [json.loads(r) for r in rows],
        "config": run_record(config),
    }
    atomic_write(workdir / RESULT_FILE, json.dumps(result, default=str) + "\n")
    return result


def _worker_init(compile_cache: str) -> None:
    """Set-up of a study worker process: quiet logs, the shared compile cache."""
    from bpgo_jax import runtime

    runtime.quiet_absl()
    runtime.enable_compile_cache(compile_cache)


# ---------------------------------------------------------------- selection
def final_value(records: Sequence[Mapping], metric: str) -> float | None:
    """The metric at the run's last evaluation that logged it."""
    values = [r[metric] for r in records if metric in r]
    return float(values[-1]) if values else None


def with_primary(records: Sequence[Mapping], primary: Mapping) -> list[dict]:
    """The rows with the primary endpoint added: the mean of `primary.metrics`
    on every row that has them all."""
    out = []
    for r in records:
        r = dict(r)
        if all(m in r for m in primary.metrics):
            r[primary.name] = float(np.mean([r[m] for m in primary.metrics]))
        out.append(r)
    return out


def tuning_scores(
    study: ml_collections.ConfigDict, results: Mapping[str, Mapping]
) -> dict[str, dict[str, dict]]:
    """method -> point label -> {"score", "seeds", "diverged"}: the mean over
    finished tuning seeds of the primary endpoint at the last evaluation (dev sets)."""
    out = {}
    for m in study.methods:
        out[m] = {}
        for point in grid(study, m):
            values, failed = [], 0
            for seed in study.tune.seeds:
                result = results.get(RunSpec("tune", m, point, seed).key)
                if result is None:
                    continue
                rows = with_primary(result["records"], study.primary)
                value = final_value(rows, study.primary.name)
                if result["status"] != "finished" or value is None:
                    failed += 1
                else:
                    values.append(value)
            score = float(np.mean(values)) if values and not failed else None
            out[m][point_label(point)] = {
                "score": score,
                "seeds": len(values) + failed,
                "diverged": failed,
            }
    return out


def select_point(
    points: Sequence[tuple], scores: Mapping[str, Mapping], num_seeds: int
) -> tuple | None:
    """The point with the highest score once every point has all its tuning
    seeds; ties go to the earlier point in grid order (the method's published
    defaults come first). A point with a diverged seed is out (when every
    point is, the first one runs, to show what happens). None while any
    tuning run is missing."""
    if not num_seeds:
        return points[0]
    best, best_score = points[0], None
    for point in points:
        s = scores[point_label(point)]
        if s["seeds"] < num_seeds:
            return None
        if s["score"] is not None and (best_score is None or s["score"] > best_score):
            best, best_score = point, s["score"]
    return best


def chosen_points(
    study: ml_collections.ConfigDict, results: Mapping[str, Mapping]
) -> dict[str, tuple | None]:
    """method -> its chosen grid point (None while its tuning is unfinished)."""
    scores = tuning_scores(study, results)
    return {
        m: select_point(grid(study, m), scores[m], len(study.tune.seeds)) for m in study.methods
    }


# ---------------------------------------------------------------- statistics
def interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean, sample std and the t-interval of the mean (None below two values)."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci": None}
    mean = float(x.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "ci": None}
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci": [mean - half, mean + half]}


def p_value(differences: Sequence[float]) -> float | None:
    """Two-sided paired t-test of the mean difference against 0 (None below two)."""
    x = np.asarray(differences, dtype=float)
    if len(x) < 2:
        return None
    if np.ptp(x) <= 1e-12 * max(1.0, float(np.abs(x).max())):  # no spread (up to rounding)
        return 1.0 if np.all(x == 0) else 0.0
    return float(stats.ttest_1samp(x, 0.0).pvalue)


def detectable_difference(
    std_diff: float, num_seeds: int, alpha: float = 0.05, power: float = 0.8
) -> float:
    """Smallest true mean paired difference a two-sided paired t-test at
    `alpha` detects with probability `power`, for differences of std `std_diff`."""
    df = num_seeds - 1
    crit = stats.t.ppf(1 - alpha / 2, df)

    def power_at(delta: float) -> float:
        nc = delta / (std_diff / math.sqrt(num_seeds))
        return stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)

    lo, hi = 0.0, 100.0 * std_diff
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if power_at(mid) < power else (lo, mid)
    return hi


def curves(runs: Sequence[Sequence[Mapping]], metric: str) -> dict:
    """Seed mean, min, max, std and 95% interval of `metric` at the sample counts
    where every run logged it."""
    points: dict[int, list[float]] = {}
    for records in runs:
        for r in records:
            if metric in r:
                points.setdefault(r["samples_seen"], []).append(r[metric])
    xs = sorted(x for x, v in points.items() if len(v) == len(runs))
    out = {"samples": xs, "mean": [], "min": [], "max": [], "std": [], "ci": []}
    for x in xs:
        v = points[x]
        iv = interval(v)
        out["mean"].append(float(np.mean(v)))
        out["min"].append(float(np.min(v)))
        out["max"].append(float(np.max(v)))
        out["std"].append(iv["std"])
        out["ci"].append(iv["ci"])
    return out


def samples_to_threshold(curve: Mapping, threshold: float) -> int | None:
    """The first sample count whose seed mean reaches `threshold`."""
    for x, m in zip(curve["samples"], curve["mean"], strict=True):
        if m >= threshold:
            return x
    return None


def report_metrics(study: ml_collections.ConfigDict) -> list[str]:
    """The primary endpoint, then the other reported metrics, without repeats."""
    names = [study.primary.name, *study.primary.metrics, *study.get("metrics", ())]
    return list(dict.fromkeys(names))


def summarise(config: ml_collections.ConfigDict, results: Mapping[str, Mapping]) -> dict:
    """Everything the study reports, from the finished runs in `results`."""
    study = config.study
    scores = tuning_scores(study, results)
    chosen = {
        m: select_point(grid(study, m), scores[m], len(study.tune.seeds)) for m in study.methods
    }
    planned = tune_runs(study) + report_runs(study, chosen)
    missing = [s.key for s in planned if s.key not in results]
    waiting = [m for m, p in chosen.items() if p is None]
    metrics = report_metrics(study)
    # Per method: seed -> rows of its finished report runs.
    rows: dict[str, dict[int, list[dict]]] = {}
    diverged: dict[str, list[int]] = {}
    for m in study.methods:
        rows[m], diverged[m] = {}, []
        if chosen[m] is None:
            continue
        for seed in study.report.seeds:
            result = results.get(RunSpec("report", m, chosen[m], seed).key)
            if result is None:
                continue
            if result["status"] != "finished":
                diverged[m].append(seed)
                continue
            rows[m][seed] = with_primary(result["records"], study.primary)
    threshold = _threshold(study, rows)
    base = rows[study.baseline]
    methods = {}
    for m in [study.baseline, *(m for m in study.methods if m != study.baseline)]:
        seeds = sorted(rows[m])
        runs = [rows[m][s] for s in seeds]
        entry: dict[str, Any] = {
            "point": None if chosen[m] is None else point_label(chosen[m]),
            "seeds": seeds,
            "diverged": diverged[m],
            "curves": {k: curves(runs, k) for k in [*metrics, "reward_mean"]} if runs else {},
            "final": {},
            "difference": {},
        }
        for k in metrics:
            values = {s: final_value(rows[m][s], k) for s in seeds}
            values = {s: v for s, v in values.items() if v is not None}
            entry["final"][k] = interval(list(values.values())) | {"values": values}
            if m != study.baseline:
                paired = {
                    s: v - final_value(base[s], k)
                    for s, v in values.items()
                    if s in base and final_value(base[s], k) is not None
                }
                diffs = list(paired.values())
                entry["difference"][k] = interval(diffs) | {"p": p_value(diffs), "values": paired}
        primary_curve = entry["curves"].get(study.primary.name)
        entry["samples_to_threshold"] = (
            samples_to_threshold(primary_curve, threshold)
            if primary_curve and threshold is not None
            else None
        )
        methods[m] = entry
    return {
        "baseline": study.baseline,
        "power": _power(study, methods),
        "primary": study.primary.to_dict(),
        "threshold": threshold,
        "methods": methods,
        "tuning": {m: {"scores": scores[m], "chosen": methods[m]["point"]} for m in study.methods},
        "missing": missing,
        "waiting_for_tuning": waiting,
    }


def _power(study: ml_collections.ConfigDict, methods: Mapping[str, Mapping]) -> dict:
    """The pooled std of the paired primary differences over every comparison, and
    the difference a paired t-test over `study.report.seeds` detects with it
    (`study.power`: alpha, power; docs/study_plan.md)."""
    cfg = study.get("power", {})
    alpha, power = cfg.get("alpha", 0.05), cfg.get("power", 0.8)
    stds = [
        e["difference"][study.primary.name]["std"]
        for m, e in methods.items()
        if m != study.baseline and e["difference"][study.primary.name]["std"] is not None
    ]
    pooled = math.sqrt(float(np.mean(np.square(stds)))) if stds else None
    seeds = len(study.report.seeds)
    detectable = (
        detectable_difference(pooled, seeds, alpha, power) if pooled and seeds > 1 else None
    )
    return {
        "pooled_std_difference": pooled,
        "seeds": seeds,
        "alpha": alpha,
        "power": power,
        "detectable_difference": detectable,
    }


def _threshold(study: ml_collections.ConfigDict, rows: Mapping[str, Mapping]) -> float | None:
    """`study.threshold`, or the mean starting primary endpoint over report
    seeds plus `study.threshold_gain` (every method of a seed starts from the
    same policy and evaluation noise, so any finished run gives its seed's start)."""
    if study.get("threshold", None) is not None:
        return float(study.threshold)
    starts = {}
    for by_seed in rows.values():
        for seed, records in by_seed.items():
            first = [r for r in records if r["samples_seen"] == 0 and study.primary.name in r]
            if first:
                starts.setdefault(seed, first[0][study.primary.name])
    if not starts:
        return None
    return float(np.mean(list(starts.values()))) + float(study.threshold_gain)


# ------------------------------------------------------------ written files
def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cell(iv: Mapping | None, digits: int = 3, signed: bool = False) -> str:
    if not iv or iv["mean"] is None:
        return "-"
    sign = "+" if signed else ""
    text = f"{iv['mean']:{sign}.{digits}f}"
    if iv["ci"] is not None:
        text += f" [{iv['ci'][0]:{sign}.{digits}f}, {iv['ci'][1]:{sign}.{digits}f}]"
    return text


def _diff_cell(iv: Mapping | None) -> str:
    text = _cell(iv, signed=True)
    if iv and iv.get("p") is not None:
        text += f" (p {iv['p']:.3f})"
    return text


def table(summary: Mapping, study: ml_collections.ConfigDict) -> str:
    """study.md: the report table, the tuning table and the missing runs."""
    primary = study.primary.name
    metrics = report_metrics(study)[1:]
    base = summary["baseline"]
    threshold = summary["threshold"]
    lines = [
        "# Study summary",
        "",
        f"Primary endpoint `{primary}`: the mean of "
        + ", ".join(f"`{m}`" for m in study.primary.metrics)
        + " at the last evaluation. Intervals: 95% t-intervals over seeds; "
        f"Δ: paired by seed against `{base}`. Samples to threshold: the first "
        f"evaluation whose seed mean of `{primary}` reaches {_fmt(threshold)}.",
        "",
        f"| method | chosen point | seeds | {primary} | Δ {primary} vs {base} | "
        + "".join(f"{m} | " for m in metrics)
        + "samples to threshold |",
        "|---|---|---|---|---|" + "---|" * len(metrics) + "---|",
    ]
    for m, s in summary["methods"].items():
        sts = s["samples_to_threshold"]
        seeds = f"{len(s['seeds'])}" + (
            f" ({len(s['diverged'])} diverged)" if s["diverged"] else ""
        )
        lines.append(
            f"| {m} | {s['point'] or 'tuning unfinished'} | {seeds} | "
            f"{_cell(s['final'].get(primary))} | "
            f"{_diff_cell(s['difference'].get(primary)) if m != base else '-'} | "
            + "".join(f"{_cell(s['final'].get(k))} | " for k in metrics)
            + f"{sts if sts is not None else ('not reached' if s['seeds'] else '-')} |"
        )
    lines.append("")
    pw = summary["power"]
    if pw["pooled_std_difference"] is not None:
        lines += [
            f"Pooled std of the paired `{primary}` differences: "
            f"{pw['pooled_std_difference']:.4f}; with {pw['seeds']} seeds a paired t-test at "
            f"alpha {pw['alpha']} detects {_fmt(pw['detectable_difference'], 4)} with power "
            f"{pw['power']}.",
            "",
        ]
    if len(metrics):
        lines += [
            f"Paired differences to `{base}` (95% intervals over seeds):",
            "",
            "| method | " + " | ".join(f"Δ {k}" for k in metrics) + " |",
            "|---|" + "---|" * len(metrics),
        ]
        for m, s in summary["methods"].items():
            if m == base:
                continue
            cells = [_cell(s["difference"].get(k), signed=True) for k in metrics]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    if study.tune.seeds:
        lines += [
            f"Tuning on the dev sets: `{primary}` at the last evaluation, mean over "
            f"{len(study.tune.seeds)} seed(s); the highest wins, ties to the earlier point.",
            "",
            "| method | point | dev score | chosen |",
            "|---|---|---|---|",
        ]
        for m, t in summary["tuning"].items():
            for label, s in t["scores"].items():
                score = s["score"]
                text = "diverged" if s["diverged"] else _fmt(score)
                if s["seeds"] < len(study.tune.seeds):
                    text += f" ({s['seeds']} of {len(study.tune.seeds)} seeds)"
                lines.append(
                    f"| {m} | {label} | {text} | {'yes' if label == t['chosen'] else ''} |"
                )
        lines.append("")
    if summary["missing"] or summary["waiting_for_tuning"]:
        lines.append(
            f"Unfinished: {len(summary['missing'])} run(s) missing"
            + (
                f"; report runs of {', '.join(summary['waiting_for_tuning'])} wait for tuning"
                if summary["waiting_for_tuning"]
                else ""
            )
            + ":"
        )
        lines += ["", *[f"- {k}" for k in summary["missing"]], ""]
    else:
        lines += ["All runs finished.", ""]
    return "\n".join(lines)


def plot(summary: Mapping, study: ml_collections.ConfigDict, outdir: Path) -> None:
    """study.png: seed mean and 95% band of each reported metric; study_rewards.png:
    per method, each oracle curve beside its learned-reward curve (twin axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = report_metrics(study)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for m, s in summary["methods"].items():
        for ax, k in zip(axes[0], metrics, strict=True):
            c = s["curves"].get(k)
            if not c or not c["samples"]:
                continue
            (line,) = ax.plot(c["samples"], c["mean"], marker=".", label=f"{m} ({len(s['seeds'])})")
            lo = [ci[0] if ci else v for ci, v in zip(c["ci"], c["mean"], strict=True)]
            hi = [ci[1] if ci else v for ci, v in zip(c["ci"], c["mean"], strict=True)]
            ax.fill_between(c["samples"], lo, hi, alpha=0.15, color=line.get_color())
    for ax, k in zip(axes[0], metrics, strict=True):
        ax.set_title(f"{k}\n(seed mean, 95% interval)", fontsize=10)
        ax.set_xlabel("samples")
        ax.legend(fontsize=7)
    if summary["threshold"] is not None:
        axes[0][0].axhline(summary["threshold"], color="grey", ls=":", lw=1)
    fig.tight_layout()
    fig.savefig(outdir / "study.png", dpi=100)
    plt.close(fig)

    pairs = [tuple(p) for p in study.get("reward_pairs", ())]
    names = list(summary["methods"])
    if not pairs or not names:
        return
    fig, axes = plt.subplots(
        len(pairs), len(names), figsize=(3.6 * len(names), 3 * len(pairs)), squeeze=False
    )
    for row, (oracle, learned) in enumerate(pairs):
        for col, m in enumerate(names):
            ax = axes[row][col]
            curves_ = summary["methods"][m]["curves"]
            ax.set_title(f"{m}", fontsize=9)
            if oracle in curves_ and curves_[oracle]["samples"]:
                c = curves_[oracle]
                ax.plot(c["samples"], c["mean"], color="C0", marker=".")
            ax.set_ylabel(oracle, color="C0", fontsize=8)
            twin = ax.twinx()
            if learned in curves_ and curves_[learned]["samples"]:
                c = curves_[learned]
                twin.plot(c["samples"], c["mean"], color="C3", marker=".", ls="--")
            twin.set_ylabel(learned, color="C3", fontsize=8)
            ax.set_xlabel("samples", fontsize=8)
    fig.suptitle("oracle (solid) beside learned reward (dashed), seed means", fontsize=10)
    fig.tight_layout()
    fig.savefig(outdir / "study_rewards.png", dpi=100)
    plt.close(fig)


_PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def portable(value):
    """`value` with absolute paths inside this package's tree made relative to it,
    so a written study names `bpgo_jax/world/assets/...`, not a machine's paths."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(portable(v) for v in value)
    if isinstance(value, str) and value.startswith("/"):
        path = Path(value)
        if path.is_relative_to(_PACKAGE_ROOT):
            return str(path.relative_to(_PACKAGE_ROOT))
    return value


def write_summary(
    config: ml_collections.ConfigDict, outdir: Path, allow_change: bool = False
) -> dict:
    """Rebuilds study.json / .md / .png from every finished run under `outdir`."""
    outdir.mkdir(parents=True, exist_ok=True)
    results = current_results(config, outdir, allow_change)
    summary = summarise(config, results)
    record = {
        "config": portable(config.to_dict()),
        "summary": summary,
        "runs": {k: {f: v for f, v in r.items() if f != "config"} for k, r in results.items()},
    }
    atomic_write(outdir / "study.json", json.dumps(record, indent=1, default=str) + "\n")
    atomic_write(outdir / "study.md", table(summary, config.study))
    plot(summary, config.study, outdir)
    return summary


def current_results(
    config: ml_collections.ConfigDict, outdir: Path, allow_change: bool = False
) -> dict[str, dict]:
    """The finished runs under `outdir` that belong to the study as configured now:
    its tuning runs, then the report runs at the points those tuning runs choose.

    A finished run whose recorded config differs from the study's config of it
    (beyond `PRESENTATION_FIELDS`) is left out, to be trained again, unless
    `allow_change`: then it is kept and the differences are logged.
    """
    study = config.study
    found = load_results(outdir)

    def keep(spec: RunSpec) -> bool:
        if spec.key not in found:
            return False
        run = run_config(config, spec)
        if is_current(found[spec.key], run):
            return True
        if allow_change:
            changed = [
                f for f, _, _ in config_differences(found[spec.key]["config"], run_record(run))
            ]
            log.warning("%s kept with a changed config: %s", spec.key, ", ".join(changed))
        return allow_change

    def current(specs: Iterable[RunSpec]) -> dict[str, dict]:
        return {s.key: found[s.key] for s in specs if keep(s)}

    out = current(tune_runs(study))
    return out | current(report_runs(study, chosen_points(study, out)))


# -------------------------------------------------------------- the driver
def estimate_seconds(config: ml_collections.ConfigDict, spec: RunSpec) -> float:
    """A run's wall time from `study.estimate` (measured costs; see configs/study.py)."""
    est = config.study.estimate
    run = run_config(config, spec)
    epochs = run.train.num_epochs
    evals = 1 + len({e for e in range(epochs) if e % run.eval.every == 0} | {epochs - 1})
    prompts = eval_prompt_count(run)
    samples = epochs * run.sample.prompts_per_epoch * run.sample.group_size
    return est.startup_s + samples * est.train_sample_s + evals * prompts * est.eval_sample_s


def eval_prompt_count(run: ml_collections.ConfigDict) -> int:
    """Prompts sampled per evaluation over every eval set (padded to whole batches)."""
    paths = [run.eval.prompts_path] if run.eval.prompts_path else []
    paths += [run.eval.extra_prompts[k] for k in sorted(run.eval.get("extra_prompts", {}))]
    bs = run.sample.batch_size
    total = 0
    for path in paths:
        lines = [x for x in Path(path).read_text().splitlines() if x.strip()]
        n = min(run.eval.num_prompts, len(lines))
        total += -(-n // bs) * bs
    return total


def describe_plan(
    config: ml_collections.ConfigDict, outdir: Path, allow_change: bool = False
) -> str:
    """The run list with each run's state and the estimated time left."""
    check_study(config)
    study = config.study
    results = current_results(config, outdir, allow_change)
    chosen = chosen_points(study, results)
    specs = tune_runs(study) + report_runs(study, chosen)
    lines, left = [], 0.0
    for spec in specs:
        done = spec.key in results
        seconds = estimate_seconds(config, spec)
        left += 0.0 if done else seconds
        state = results[spec.key]["status"] if done else f"to run (~{seconds / 60:.1f} min)"
        lines.append(f"{spec.key}: {state}")
    waiting = [m for m, p in chosen.items() if p is None]
    for m in waiting:  # its report runs cost about what its tuning runs cost
        point = grid(study, m)[0]
        for seed in study.report.seeds:
            left += estimate_seconds(config, RunSpec("report", m, point, seed))
        lines.append(f"report/{m}/*: {len(study.report.seeds)} runs wait for its tuning")
    workers = max(1, int(study.get("workers", 1)))
    speedup = study.estimate.parallel_speedup if workers > 1 else 1.0
    total = len(specs) + len(waiting) * len(study.report.seeds)
    finished = sum(s.key in results for s in specs)
    lines.append(
        f"{finished} of {total} runs finished; about {left / speedup / 3600:.1f} h left "
        f"with {workers} worker(s)"
    )
    return "\n".join(lines)


def run_study(
    config: ml_collections.ConfigDict,
    outdir: Path,
    compile_cache: str = "",
    *,
    max_runs: int | None = None,
    allow_config_change: bool = False,
) -> dict:
    """Runs every unfinished run of the study (at most `max_runs` of them), then
    rebuilds the summary from all finished runs and returns it.

    `study.workers` > 1 trains that many runs at once, each in its own spawned
    process (JAX state is per process; a fork would copy a live runtime). On
    CPU one run's programs keep about one core busy, so two workers on two
    cores finish a study about 1.5x sooner (docs/performance.md); on a single
    accelerator keep 1. Results do not depend on the worker count.
    `allow_config_change` keeps finished runs, and resumes unfinished ones,
    whose config differs from the study's (e.g. after the code added a field).
    """
    check_study(config)  # every run's config, before any run starts
    outdir = Path(outdir)
    study = config.study
    workers = max(1, int(study.get("workers", 1)))
    budget = math.inf if max_runs is None else max_runs
    try:
        if workers == 1:
            _run_inline(config, outdir, budget, allow_config_change)
        else:
            _run_parallel(config, outdir, budget, workers, compile_cache, allow_config_change)
    finally:
        summary = write_summary(config, outdir, allow_config_change)
    return summary


def _next_runs(
    config: ml_collections.ConfigDict, results: Mapping[str, Mapping], busy: Iterable[str]
) -> list[RunSpec]:
    """Runs that can start now: unfinished tuning runs, then the report runs of
    methods whose tuning is done."""
    study = config.study
    specs = tune_runs(study) + report_runs(study, chosen_points(study, results))
    busy = set(busy)
    return [s for s in specs if s.key not in results and s.key not in busy]


def _run_inline(
    config: ml_collections.ConfigDict, outdir: Path, budget: float, allow_change: bool
) -> None:
    started = 0
    results = current_results(config, outdir, allow_change)
    while started < budget:
        todo = _next_runs(config, results, ())
        if not todo:
            return
        spec = todo[0]
        run = run_config(config, spec)
        results[spec.key] = train_run(run, outdir / spec.key, spec, allow_change)
        started += 1


def _run_parallel(
    config: ml_collections.ConfigDict,
    outdir: Path,
    budget: float,
    workers: int,
    compile_cache: str,
    allow_change: bool,
) -> None:
    import multiprocessing

    results = current_results(config, outdir, allow_change)
    running: dict[concurrent.futures.Future, RunSpec] = {}
    started = 0
    with concurrent.futures.ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_init,
        initargs=(compile_cache,),
    ) as pool:
        while True:
            todo = _next_runs(config, results, (s.key for s in running.values()))
            while todo and len(running) < workers and started < budget:
                spec = todo.pop(0)
                run = run_config(config, spec)
                run.log.progress = False  # workers' bars would interleave
                future = pool.submit(train_run, run, outdir / spec.key, spec, allow_change)
                running[future] = spec
                log.info("started %s", spec.key)
                started += 1
            if not running:
                return
            done, _ = concurrent.futures.wait(running, return_when="FIRST_COMPLETED")
            for future in done:
                spec = running.pop(future)
                results[spec.key] = future.result()  # a failed run stops the study
                log.info("finished %s", spec.key)
