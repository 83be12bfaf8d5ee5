"""Plots of a sweep (PNG, written atomically): success while training, final metrics per arm, and each arm's
success against its world-model NLL."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from anyorder_ray.config import ExperimentConfig
from anyorder_ray.fileio import atomic_write
from anyorder_ray.results.tables import arm_summary, mean_of, trial_label

__all__ = ["success_curves", "write_plots"]


def success_curves(grid: Any, cfg: ExperimentConfig) -> dict[str, tuple[list[float], list[float]]]:
    """trial label -> (training steps, success rates) from each trial's reported history."""
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for result in grid:
        df = result.metrics_dataframe
        if df is None or "eval/success_rate" not in df or "eval/step" not in df:
            continue
        df = df.dropna(subset=["eval/success_rate", "eval/step"]).drop_duplicates(subset=["eval/step"])
        label = trial_label(cfg, dict(result.config or {}))
        curves[label] = (df["eval/step"].astype(float).tolist(), df["eval/success_rate"].astype(float).tolist())
    return curves


def write_plots(grid: Any, cfg: ExperimentConfig, rows: list[dict[str, Any]], run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (steps, success) in sorted(success_curves(grid, cfg).items()):
        ax.plot(steps, success, marker="o", label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Success while training")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(run_dir / "success_vs_step.png")
    atomic_write(paths[-1], lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)

    by_arm: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_arm[r["arm"]].append(r)
    arms = list(by_arm)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, key, title in zip(axes, ("success", "world_model_nll", "action_nll"),
                              ("final success", "world-model NLL", "action NLL"), strict=True):  # fmt: skip
        means = [mean_of([r[key] for r in by_arm[a]]) for a in arms]
        ax.bar(range(len(arms)), means, color="tab:blue")
        if key == "success":
            lows = [mean_of([r["success_low"] for r in by_arm[a]]) for a in arms]
            highs = [mean_of([r["success_high"] for r in by_arm[a]]) for a in arms]
            err = [[max(0.0, m - lo) for m, lo in zip(means, lows, strict=True)],
                   [max(0.0, hi - m) for m, hi in zip(means, highs, strict=True)]]  # fmt: skip
            ax.errorbar(range(len(arms)), means, yerr=err, fmt="none", ecolor="black", capsize=3)
            ax.set_ylim(0, 1.02)
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths.append(run_dir / "final_per_arm.png")
    atomic_write(paths[-1], lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)

    # The trade-off the arms make: policy success against world-model quality (per observation, so encodings
    # compare), one point per arm pooled over its seeds.
    summary = [r for r in arm_summary(rows) if not math.isnan(r["world_model_nll_per_obs"])]
    if summary:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in summary:
            err = [[r["success"] - r["success_low"]], [r["success_high"] - r["success"]]]
            ax.errorbar(r["world_model_nll_per_obs"], r["success"], yerr=err, fmt="o", capsize=3)
            ax.annotate(r["arm"], (r["world_model_nll_per_obs"], r["success"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("world-model NLL per observation (nats, log scale; lower is better)")
        ax.set_ylabel("success rate (pooled over seeds)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(run_dir / "success_vs_world_model.png")
        atomic_write(paths[-1], lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
        plt.close(fig)
    return paths
