"""Method comparison at an equal sample budget: runs, aggregation, plots, table."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import ml_collections
import numpy as np

from bpgo_jax.config import validate
from bpgo_jax.train import train


def run_config(base: ml_collections.ConfigDict, method: dict, seed: int):
    """The base config with one method's advantage settings and one seed."""
    config = copy.deepcopy(base)
    with config.unlocked():
        del config["study"]
        config.seed = seed
        config.advantage.update(method)
    return config


def curves(runs: list[list[dict]], metric: str) -> dict:
    """Seed mean / min / max of `metric` at the epochs where every run logged it."""
    points = {}
    for records in runs:
        for r in records:
            if metric in r:
                points.setdefault(r["samples_seen"], []).append(r[metric])
    xs = sorted(x for x, v in points.items() if len(v) == len(runs))
    vals = np.array([points[x] for x in xs]) if xs else np.zeros((0, len(runs)))
    return {
        "samples": xs,
        "mean": vals.mean(1).tolist(),
        "min": vals.min(1).tolist(),
        "max": vals.max(1).tolist(),
        "std": vals.std(1).tolist(),
    }


def samples_to_threshold(curve: dict, threshold: float) -> int | None:
    for x, m in zip(curve["samples"], curve["mean"], strict=True):
        if m >= threshold:
            return x
    return None


def summarise(results: dict[str, list[list[dict]]], study) -> dict:
    """Per method: curves, final values (mean, std over seeds), samples-to-threshold.

    `study.report` (optional) names further eval metrics to tabulate and plot,
    e.g. the training reward on fixed held-out prompts and seeds (a far less
    noisy view of "reward rising" than one epoch's rollout mean, whose prompts
    change) or the oracle accuracy on a second held-out set.
    """
    summary = {}
    metrics = {"reward": "reward_mean", study.threshold_metric: study.threshold_metric}
    metrics |= {m: m for m in study.get("report", ())}
    for name, runs in results.items():
        summary[name] = {}
        for key, metric in metrics.items():
            c = curves(runs, metric)
            summary[name][key] = c
            summary[name]["final_" + key] = (c["mean"][-1], c["std"][-1]) if c["mean"] else None
        target = summary[name][study.threshold_metric]
        summary[name]["samples_to_threshold"] = samples_to_threshold(target, study.threshold)
    return summary


def _cell(value, digits: int) -> str:
    return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}" if value else "-"


def table(summary: dict, study, num_seeds: int) -> str:
    metric = study.threshold_metric
    report = tuple(study.get("report", ()))
    lines = [
        f"| method | final reward (mean ± std, {num_seeds} seeds) | "
        + "".join(f"final {m} | " for m in report)
        + f"final {metric} | samples to {metric} ≥ {study.threshold} |",
        "|---|---|---|---|" + "---|" * len(report),
    ]
    for name, s in summary.items():
        sts = s["samples_to_threshold"]
        lines.append(
            f"| {name} | {_cell(s['final_reward'], 4)} | "
            + "".join(f"{_cell(s['final_' + m], 4)} | " for m in report)
            + f"{_cell(s['final_' + metric], 3)} | "
            + f"{sts if sts is not None else 'not reached'} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict, study, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = study.threshold_metric
    panels = [("reward", "training reward (rollout mean)")]
    panels += [(m, m) for m in study.get("report", ())]
    panels.append((metric, metric))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
    for name, s in summary.items():
        for ax, (key, _) in zip(axes, panels, strict=True):
            c = s[key]
            if not c["samples"]:
                continue
            (line,) = ax.plot(c["samples"], c["mean"], label=name)
            ax.fill_between(c["samples"], c["min"], c["max"], alpha=0.2, color=line.get_color())
    for ax, (_, title) in zip(axes, panels, strict=True):
        ax.set_title(f"{title}\n(seed mean, min-max band)", fontsize=10)
        ax.set_xlabel("samples")
        ax.legend()
    axes[-1].axhline(study.threshold, color="grey", ls=":", lw=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _train(config: ml_collections.ConfigDict, workdir: Path) -> list[dict]:
    train(config, workdir)
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def _worker_init(compile_cache: str) -> None:
    """Set-up of a study worker process: quiet logs, the shared compile cache."""
    from bpgo_jax import runtime

    runtime.quiet_absl()
    runtime.enable_compile_cache(compile_cache)


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


def run_study(config: ml_collections.ConfigDict, outdir: Path, compile_cache: str = "") -> dict:
    """Trains every (method, seed) run, then writes study.json, study.md and study.png.

    `study.workers` > 1 trains that many runs at once, each in its own spawned
    process (JAX state is per process; a fork would copy a live runtime). On
    CPU one run's programs keep about one core busy, so two workers on two
    cores finish a study about 1.6x sooner (docs/performance.md); on a single
    accelerator keep 1. Results do not depend on the worker count.
    """
    study = config.study
    jobs = [
        (name, seed, run_config(config, dict(method), seed), outdir / name / f"seed_{seed}")
        for name, method in study.methods.items()
        for seed in study.seeds
    ]
    for _, _, run, _ in jobs:  # device-independent checks, before any run starts
        validate(run, num_devices=1)
    workers = min(int(study.get("workers", 1)), len(jobs))
    runs: dict[tuple[str, int], list[dict]] = {}
    if workers <= 1:
        for name, seed, run, workdir in jobs:
            runs[name, seed] = _train(run, workdir)
    else:
        import concurrent.futures
        import multiprocessing

        from tqdm import tqdm

        for _, _, run, _ in jobs:  # workers' bars would interleave; one bar over runs instead
            run.log.progress = False
        with concurrent.futures.ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=(compile_cache,),
        ) as pool:
            futures = {
                pool.submit(_train, run, workdir): (name, seed) for name, seed, run, workdir in jobs
            }
            done = concurrent.futures.as_completed(futures)
            try:
                for future in tqdm(done, total=len(jobs), desc=f"study runs ({workers} workers)"):
                    runs[futures[future]] = future.result()
            except BaseException:
                for future in futures:  # a failed run stops the study: drop queued runs
                    future.cancel()
                raise
    results = {name: [runs[name, seed] for seed in study.seeds] for name in study.methods}
    summary = summarise(results, study)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "study.json").write_text(
        json.dumps(
            {"config": portable(config.to_dict()), "runs": results, "summary": summary},
            indent=1,
            default=str,
        )
    )
    (outdir / "study.md").write_text(table(summary, study, len(study.seeds)))
    plot(summary, study, outdir / "study.png")
    return summary
