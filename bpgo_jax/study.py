"""Method comparison at an equal sample budget: runs, aggregation, plots, table."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import ml_collections
import numpy as np

from bpgo_jax.train import Trainer


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
    summary = {}
    for name, runs in results.items():
        reward = curves(runs, "reward_mean")
        target = curves(runs, study.threshold_metric)
        summary[name] = {
            "reward": reward,
            study.threshold_metric: target,
            "final_reward": (reward["mean"][-1], reward["std"][-1]) if reward["mean"] else None,
            "final_" + study.threshold_metric: (
                (target["mean"][-1], target["std"][-1]) if target["mean"] else None
            ),
            "samples_to_threshold": samples_to_threshold(target, study.threshold),
        }
    return summary


def table(summary: dict, study, num_seeds: int) -> str:
    metric = study.threshold_metric
    lines = [
        f"| method | final reward (mean ± std, {num_seeds} seeds) | final {metric} | "
        f"samples to {metric} ≥ {study.threshold} |",
        "|---|---|---|---|",
    ]
    for name, s in summary.items():
        fr = s["final_reward"]
        fm = s["final_" + metric]
        sts = s["samples_to_threshold"]
        lines.append(
            f"| {name} | {fr[0]:.4f} ± {fr[1]:.4f} | "
            + (f"{fm[0]:.3f} ± {fm[1]:.3f}" if fm else "-")
            + f" | {sts if sts is not None else 'not reached'} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict, study, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = study.threshold_metric
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, s in summary.items():
        for ax, key in zip(axes, ("reward", metric), strict=True):
            c = s[key]
            if not c["samples"]:
                continue
            (line,) = ax.plot(c["samples"], c["mean"], label=name)
            ax.fill_between(c["samples"], c["min"], c["max"], alpha=0.2, color=line.get_color())
    axes[0].set_title("training reward (seed mean, min-max band)")
    axes[1].set_title(f"held-out {metric}")
    axes[1].axhline(study.threshold, color="grey", ls=":", lw=1)
    for ax in axes:
        ax.set_xlabel("samples")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_study(config: ml_collections.ConfigDict, outdir: Path) -> dict:
    study = config.study
    results: dict[str, list[list[dict]]] = {}
    for name, method in study.methods.items():
        results[name] = []
        for seed in study.seeds:
            workdir = outdir / name / f"seed_{seed}"
            trainer = Trainer(run_config(config, dict(method), seed), workdir)
            trainer.train()
            metrics = workdir / "metrics.jsonl"
            results[name].append([json.loads(x) for x in metrics.read_text().splitlines()])
    summary = summarise(results, study)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "study.json").write_text(
        json.dumps(
            {"config": config.to_dict(), "runs": results, "summary": summary}, indent=1, default=str
        )
    )
    (outdir / "study.md").write_text(table(summary, study, len(study.seeds)))
    plot(summary, study, outdir / "study.png")
    return summary
