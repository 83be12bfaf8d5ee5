"""Turn a Tune ``ResultGrid`` into the results table (CSV + Markdown) and plots (PNG).

Pure formatting over plain rows, so it is tested without Ray: ``results_rows`` is the only function that
reads the grid. Every file is written atomically (temp file in the same folder, then ``os.replace``): a
crash or an error mid-write leaves the previous version of the file, never a truncated one.
"""

from __future__ import annotations

import csv
import io
import math
import os
import secrets
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from anyorder_ray.config import P_MODES, MaskingConfig

COLUMNS = (
    "trial",
    "arm",
    "mode",
    "mask_prob",
    "seed",
    "success",
    "success_low",
    "success_high",
    "episodes",
    "world_model_nll",
    "world_model_nll_per_obs",
    "action_nll",
    "train_steps",
    "train_tokens",
    "wall_s",
    "checkpoint",
    "status",
)


def _num(metrics: dict, key: str) -> float:
    v = metrics.get(key)
    return float(v) if isinstance(v, int | float) else math.nan


def make_row(trial: str, params: dict, metrics: dict, status: str) -> dict[str, Any]:
    arm = dict(params.get("arm") or {})
    mode = arm.get("mode", "any_order")
    p = params.get("mask_prob", arm.get("mask_prob", 0.5)) if mode in P_MODES else math.nan
    if mode in P_MODES:
        arm["mask_prob"] = p
    return {
        "trial": trial,
        "arm": MaskingConfig(**arm).label(),
        "mode": mode,
        "mask_prob": p,
        "seed": params.get("seed", 0),
        "success": _num(metrics, "eval/success_rate"),
        "success_low": _num(metrics, "eval/success_low"),
        "success_high": _num(metrics, "eval/success_high"),
        "episodes": _num(metrics, "eval/episodes"),
        "world_model_nll": _num(metrics, "eval/world_model_nll"),
        "world_model_nll_per_obs": _num(metrics, "eval/world_model_nll_per_obs"),
        "action_nll": _num(metrics, "eval/action_nll"),
        "train_steps": _num(metrics, "train/step"),
        "train_tokens": _num(metrics, "train/total_tokens"),
        "wall_s": _num(metrics, "time_total_s"),
        "checkpoint": metrics.get("checkpoint_path", ""),
        "status": status,
    }


def results_rows(grid: Any) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        metrics = dict(result.metrics or {})
        trial = str(metrics.get("trial_id") or Path(result.path).name)
        status = "ok" if result.error is None and metrics.get("eval/final") else "error" if result.error else "partial"
        rows.append(make_row(trial, dict(result.config or {}), metrics, status))
    return sorted(rows, key=lambda r: (r["mode"], _nan_last(r["mask_prob"]), r["seed"]))


def _nan_last(x: float) -> float:
    return math.inf if math.isnan(x) else x


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    cols = ["arm", "seed", "success [95% CI]", "episodes", "world-model NLL", "action NLL", "steps", "train tokens",
            "wall s", "status"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        ci = f"{_fmt(r['success'])} [{_fmt(r['success_low'])}, {_fmt(r['success_high'])}]"
        vals = [r["arm"], r["seed"], ci, r["episodes"], r["world_model_nll"], r["action_nll"], r["train_steps"],
                r["train_tokens"], r["wall_s"], r["status"]]  # fmt: skip
        lines.append("| " + " | ".join(_fmt(v) for v in vals) + " |")
    return "\n".join(lines)


def write_tables(rows: list[dict[str, Any]], run_dir: Path) -> str:
    """Write ``results.csv`` and ``results.md`` (each atomically) and return the Markdown table."""
    run_dir = Path(run_dir)
    # Format everything before touching the files, then swap each one in whole.
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    md = markdown_table(rows)
    atomic_write(run_dir / "results.csv", lambda tmp: tmp.write_text(buf.getvalue(), encoding="utf-8", newline=""))
    atomic_write(run_dir / "results.md", lambda tmp: tmp.write_text(md + "\n", encoding="utf-8"))
    return md


SUMMARY_COLUMNS = (
    "arm",
    "seeds",
    "episodes",
    "success",
    "success_low",
    "success_high",
    "seed_success_min",
    "seed_success_max",
    "vs_reference",
    "p_value",
    "world_model_nll_per_obs",
    "world_model_nll",
    "action_nll",
    "train_steps",
    "wall_s",
)


def arm_summary(rows: list[dict[str, Any]], reference: str = "causal") -> list[dict[str, Any]]:
    """One row per arm over its seeds: success pooled over every seed's episodes with a Wilson 95% interval, the
    seeds' range, the difference to the ``reference`` arm with a two-sided two-proportion z-test p-value, and the
    seed means of the NLLs, steps and wall time. Trials without a final evaluation are left out."""
    from anyorder_ray.policy import wilson_interval

    by_arm: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["status"] == "ok" and not math.isnan(r["success"]) and not math.isnan(r["episodes"]):
            by_arm[r["arm"]].append(r)
    pooled = {}
    for arm, rs in by_arm.items():
        n = int(sum(r["episodes"] for r in rs))
        k = int(round(sum(r["success"] * r["episodes"] for r in rs)))
        pooled[arm] = (k, n)
    out = []
    for arm, rs in by_arm.items():
        k, n = pooled[arm]
        low, high = wilson_interval(k, n)
        diff, p_value = math.nan, math.nan
        if reference in pooled and arm != reference:
            diff, p_value = _two_proportion_test(k, n, *pooled[reference])
        out.append({
            "arm": arm,
            "seeds": len(rs),
            "episodes": n,
            "success": k / n if n else math.nan,
            "success_low": low,
            "success_high": high,
            "seed_success_min": min(r["success"] for r in rs),
            "seed_success_max": max(r["success"] for r in rs),
            "vs_reference": diff,
            "p_value": p_value,
            "world_model_nll_per_obs": _mean([r["world_model_nll_per_obs"] for r in rs]),
            "world_model_nll": _mean([r["world_model_nll"] for r in rs]),
            "action_nll": _mean([r["action_nll"] for r in rs]),
            "train_steps": _mean([r["train_steps"] for r in rs]),
            "wall_s": _mean([r["wall_s"] for r in rs]),
        })  # fmt: skip
    return sorted(out, key=lambda r: -r["success"])


def _two_proportion_test(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """``p1 - p2`` and the two-sided p-value of the pooled two-proportion z-test."""
    if n1 == 0 or n2 == 0:
        return math.nan, math.nan
    p1, p2 = k1 / n1, k2 / n2
    pool = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pool * (1 - pool) * (1 / n1 + 1 / n2))
    if se == 0:
        return p1 - p2, 1.0
    return p1 - p2, math.erfc(abs(p1 - p2) / se / math.sqrt(2))


def summary_markdown(summary: list[dict[str, Any]], reference: str = "causal") -> str:
    cols = ["arm", "seeds", "success [95% CI] (pooled episodes)", "seed range", f"vs {reference} (p)",
            "world-model NLL / obs", "action NLL", "steps", "wall s"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in summary:
        ci = f"{_fmt(r['success'])} [{_fmt(r['success_low'])}, {_fmt(r['success_high'])}] of {r['episodes']}"
        spread = f"{_fmt(r['seed_success_min'])}–{_fmt(r['seed_success_max'])}"
        vs = "–" if math.isnan(r["vs_reference"]) else f"{r['vs_reference']:+.3f} ({r['p_value']:.2g})"
        vals = [r["arm"], r["seeds"], ci, spread, vs, r["world_model_nll_per_obs"], r["action_nll"],
                r["train_steps"], r["wall_s"]]  # fmt: skip
        lines.append("| " + " | ".join(v if isinstance(v, str) else _fmt(v) for v in vals) + " |")
    return "\n".join(lines)


def write_summary(rows: list[dict[str, Any]], run_dir: Path, reference: str = "causal") -> str:
    """Write ``summary.csv`` and ``summary.md`` (per arm over seeds, see ``arm_summary``); returns the Markdown."""
    summary = arm_summary(rows, reference)
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    writer.writerows(summary)
    md = summary_markdown(summary, reference)
    run_dir = Path(run_dir)
    atomic_write(run_dir / "summary.csv", lambda tmp: tmp.write_text(buf.getvalue(), encoding="utf-8", newline=""))
    atomic_write(run_dir / "summary.md", lambda tmp: tmp.write_text(md + "\n", encoding="utf-8"))
    return md


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temp file next to ``path``, flush it to disk, then rename it over ``path``.

    The temp file keeps the suffix (``savefig`` picks the format from it) and starts with a dot so a reader
    listing the folder never takes it for a result; it is removed if anything fails. It is created with
    ``os.open`` rather than ``tempfile.mkstemp`` so the result gets the usual umask permissions, not 0600.
    """
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        write(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def success_curves(grid: Any) -> dict[str, tuple[list[float], list[float]]]:
    """trial label -> (training steps, success rates) from each trial's reported history."""
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for result in grid:
        df = result.metrics_dataframe
        if df is None or "eval/success_rate" not in df or "eval/step" not in df:
            continue
        df = df.dropna(subset=["eval/success_rate", "eval/step"]).drop_duplicates(subset=["eval/step"])
        label = make_row("", dict(result.config or {}), {}, "")["arm"] + f" s{(result.config or {}).get('seed', 0)}"
        curves[label] = (df["eval/step"].astype(float).tolist(), df["eval/success_rate"].astype(float).tolist())
    return curves


def write_plots(grid: Any, rows: list[dict[str, Any]], run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (steps, success) in sorted(success_curves(grid).items()):
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
        means = [_mean([r[key] for r in by_arm[a]]) for a in arms]
        ax.bar(range(len(arms)), means, color="tab:blue")
        if key == "success":
            lows = [_mean([r["success_low"] for r in by_arm[a]]) for a in arms]
            highs = [_mean([r["success_high"] for r in by_arm[a]]) for a in arms]
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


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan
