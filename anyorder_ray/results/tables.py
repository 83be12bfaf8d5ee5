"""Turn a Tune ``ResultGrid`` into the results table (CSV + Markdown) and the per-arm summary over seeds.

Pure formatting over plain rows, so it is tested without Ray: ``results_rows`` is the only function that reads
the grid, and it labels every trial with the arm the trial really trained (``ExperimentConfig.trial``). Every file
is written atomically (``fileio.atomic_write``). Counts (seeds, episodes, steps, tokens) are integers everywhere.

``total_flops`` is the trial's ``compute/total_flops``: its training FLOPs plus its rollout actors' policy forwards
(DAgger's inference; the eval actor is not counted), for comparing arms by success per unit of total compute. The
Markdown tables show it where a row has it (runs from before it was reported have none).

The world-model metrics of issue 13 (exact match, the off-expert and on-policy sets) are NaN in the rows of runs
made before them; the Markdown tables show their columns only when some row has them, so such runs' tables read
as they did.

``decoding`` is how the evaluated policy picked its actions in the live episodes: ``greedy`` (the argmax) or
``sampled T=<temperature>`` (``eval.temperature``), from the evaluation's own ``eval/temperature``. Rows of runs from
before the option read as ``greedy`` (every evaluation was). The Markdown tables show the column only when some row
was not greedy, and an arm whose seeds were played both ways says so in the summary.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from anyorder_ray.config import ExperimentConfig
from anyorder_ray.evaluation.stats import two_proportion_test, wilson_interval
from anyorder_ray.fileio import atomic_write

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
    "decoding",
    "world_model_nll",
    "world_model_nll_per_obs",
    "world_model_exact",
    "offexpert_world_model_nll",
    "offexpert_world_model_nll_per_obs",
    "offexpert_world_model_exact",
    "onpolicy_world_model_nll",
    "onpolicy_world_model_nll_per_obs",
    "onpolicy_world_model_exact",
    "action_nll",
    "train_steps",
    "budget",
    "train_tokens",
    "train_flops",
    "total_flops",
    "wall_s",
    "checkpoint",
    "status",
)


WORLD_MODEL_EXTRA = COLUMNS[COLUMNS.index("world_model_exact") : COLUMNS.index("action_nll")]
"""Exact match on the expert set, and NLL / NLL per observation / exact match on the off-expert and on-policy sets."""
_EXTRA_HEADERS = {
    "world_model_exact": "WM exact",
    "offexpert_world_model_nll": "off-expert WM NLL",
    "offexpert_world_model_nll_per_obs": "off-expert WM NLL / obs",
    "offexpert_world_model_exact": "off-expert WM exact",
    "onpolicy_world_model_nll": "on-policy WM NLL",
    "onpolicy_world_model_nll_per_obs": "on-policy WM NLL / obs",
    "onpolicy_world_model_exact": "on-policy WM exact",
}


def _present(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> list[str]:
    """The keys of ``keys`` that some row has a number for (older runs have none of the newer metrics)."""
    return [k for k in keys if any(isinstance(r.get(k), int | float) and not math.isnan(r[k]) for r in rows)]


def _num(metrics: dict, key: str) -> float:
    v = metrics.get(key)
    return float(v) if isinstance(v, int | float) else math.nan


def _count(metrics: dict, key: str) -> int | None:
    """An integer count (steps, episodes, tokens), or None when the trial did not report it."""
    v = metrics.get(key)
    return int(round(v)) if isinstance(v, int | float) and not math.isnan(v) else None


def decoding_label(temperature: float) -> str:
    """``greedy`` for temperature 0, else ``sampled T=<temperature>``."""
    return "greedy" if temperature == 0 else f"sampled T={temperature:g}"


def make_row(trial: str, cfg: ExperimentConfig, metrics: dict, status: str) -> dict[str, Any]:
    """One table row of the trial whose resolved config is ``cfg`` (``ExperimentConfig.trial(params)``)."""
    arm = cfg.masking
    return {
        "trial": trial,
        "arm": arm.label(),
        "mode": arm.mode,
        "mask_prob": arm.mask_prob if arm.uses_mask_prob() else math.nan,
        "seed": cfg.train.seed,
        "success": _num(metrics, "eval/success_rate"),
        "success_low": _num(metrics, "eval/success_low"),
        "success_high": _num(metrics, "eval/success_high"),
        "episodes": _count(metrics, "eval/episodes"),
        "decoding": decoding_label(float(metrics.get("eval/temperature", cfg.eval.temperature))),
        "world_model_nll": _num(metrics, "eval/world_model_nll"),
        "world_model_nll_per_obs": _num(metrics, "eval/world_model_nll_per_obs"),
        **{key: _num(metrics, f"eval/{key}") for key in WORLD_MODEL_EXTRA},
        "action_nll": _num(metrics, "eval/action_nll"),
        "train_steps": _count(metrics, "train/step"),
        "budget": cfg.train.budget_label(),
        "train_tokens": _count(metrics, "train/total_tokens"),
        "train_flops": _num(metrics, "train/total_flops"),
        "total_flops": _num(metrics, "compute/total_flops"),
        "wall_s": _num(metrics, "time_total_s"),
        "checkpoint": metrics.get("checkpoint_path", ""),
        "status": status,
    }


def trial_label(cfg: ExperimentConfig, params: dict) -> str:
    """``arm s<seed>``: the label of one trial in plots."""
    trial = cfg.trial(params)
    return f"{trial.masking.label()} s{trial.train.seed}"


def results_rows(grid: Any, cfg: ExperimentConfig, configs: Mapping[str, dict] | None = None) -> list[dict[str, Any]]:
    """One row per trial of ``grid``, a Tune ``ResultGrid`` of the sweep configured by ``cfg``.

    A ``Result`` carries its trial's config only inside its last report, so a trial that failed before reporting
    has none there: ``configs`` (each trial's folder to its config, from ``ExperimentAnalysis.trials``) gives it.
    A trial whose config is known from neither has no row rather than one with the defaults' arm and seed; that
    is a trial pending when the sweep stopped (``--tables`` names it as not started)."""
    configs = configs or {}
    rows = []
    for result in grid:
        metrics = dict(result.metrics or {})
        params = result.config or configs.get(str(result.path))
        if params is None or (result.error is None and not set(metrics) - {"trial_id"}):
            continue
        trial = str(metrics.get("trial_id") or Path(result.path).name)
        failed = result.error is not None or metrics.get("eval/failed")  # the trial, or its final evaluation
        status = "error" if failed else "ok" if metrics.get("eval/final") else "partial"
        rows.append(make_row(trial, cfg.trial(dict(params)), metrics, status))
    return sort_rows(rows)


def sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table rows in their order: by mode, mask probability (none last) and seed."""
    return sorted(rows, key=lambda r: (r["mode"], _nan_last(r["mask_prob"]), r["seed"]))


def _nan_last(x: float) -> float:
    return math.inf if math.isnan(x) else x


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if abs(v) >= 1e7:
            return f"{v:.3g}"
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _has_total(rows: list[dict[str, Any]]) -> bool:
    """Whether any row reports its total compute (training + rollout inference)."""
    return any(not math.isnan(r.get("total_flops", math.nan)) for r in rows)


_TABLE_EXTRA = tuple(k for k in WORLD_MODEL_EXTRA if not k.endswith("_per_obs"))  # token means, as world-model NLL


def _sampled(rows: list[dict[str, Any]]) -> bool:
    """Whether any row's episodes were played other than greedily (then the tables show the ``decoding`` column)."""
    return any(r.get("decoding", "greedy") != "greedy" for r in rows)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results table; the newer world-model columns (``WORLD_MODEL_EXTRA``, per token), the total compute and the
    decoding only where present."""
    extra = _present(rows, _TABLE_EXTRA)
    total = _has_total(rows)
    decoding = ["decoding"] if _sampled(rows) else []
    cols = ["arm", "seed", "success [95% CI]", "episodes", *decoding, "world-model NLL",
            *(_EXTRA_HEADERS[k] for k in extra), "action NLL", "steps", "budget", "FLOPs used",
            *(["total FLOPs"] if total else []), "train tokens", "wall s", "status"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        ci = f"{_fmt(r['success'])} [{_fmt(r['success_low'])}, {_fmt(r['success_high'])}]"
        vals = [r["arm"], r["seed"], ci, r["episodes"], *(r[k] for k in decoding), r["world_model_nll"],
                *(r.get(k) for k in extra),
                r["action_nll"], r["train_steps"], r["budget"], r["train_flops"],
                *([r["total_flops"]] if total else []), r["train_tokens"], r["wall_s"], r["status"]]  # fmt: skip
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
    "decoding",
    "vs_reference",
    "p_value",
    "world_model_nll_per_obs",
    "world_model_nll",
    *WORLD_MODEL_EXTRA,
    "action_nll",
    "train_steps",
    "budget",
    "train_flops",
    "total_flops",
    "wall_s",
)
_SUMMARY_EXTRA = tuple(k for k in WORLD_MODEL_EXTRA if k == "world_model_exact" or not k.endswith("_nll"))
"""Per observation, as the summary's world-model NLL."""


_TEXT_COLUMNS = frozenset({"trial", "arm", "mode", "decoding", "budget", "checkpoint", "status"})
_COUNT_COLUMNS = frozenset({"episodes", "train_steps", "train_tokens"})  # ``_count``: an int, or None when unreported


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``results.csv`` as ``write_tables`` wrote them (numbers as floats, counts as ints), so the
    trials of several runs (e.g. seeds run apart) can be tabulated and summarised together. Columns a CSV lacks (runs
    from before they existed) read as NaN."""
    with Path(path).open(newline="") as f:
        raw = list(csv.DictReader(f))
    rows = []
    for r in raw:
        row: dict[str, Any] = {}
        for key in COLUMNS:
            value = r.get(key)
            if key == "decoding":
                row[key] = value or "greedy"  # every evaluation before the column existed was greedy
            elif key in _TEXT_COLUMNS:
                row[key] = value or ""
            elif key == "seed":
                row[key] = int(value)
            elif key in _COUNT_COLUMNS:
                row[key] = int(value) if value else None
            else:
                row[key] = float(value) if value not in (None, "") else math.nan
        rows.append(row)
    return rows


def arm_summary(rows: list[dict[str, Any]], reference: str = "causal") -> list[dict[str, Any]]:
    """One row per arm over its seeds: success pooled over every seed's episodes with a Wilson 95% interval, the
    seeds' range, the difference to the ``reference`` arm with a two-sided two-proportion z-test p-value, and the
    seed means of the NLLs, steps and wall time. Trials without a final evaluation are left out."""
    by_arm: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["status"] == "ok" and not math.isnan(r["success"]) and r["episodes"]:
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
            diff, p_value = two_proportion_test(k, n, *pooled[reference])
        out.append({
            "arm": arm,
            "seeds": len(rs),
            "episodes": n,
            "success": k / n if n else math.nan,
            "success_low": low,
            "success_high": high,
            "seed_success_min": min(r["success"] for r in rs),
            "seed_success_max": max(r["success"] for r in rs),
            "decoding": " / ".join(sorted({r.get("decoding", "greedy") for r in rs})),
            "vs_reference": diff,
            "p_value": p_value,
            "world_model_nll_per_obs": mean_of([r["world_model_nll_per_obs"] for r in rs]),
            "world_model_nll": mean_of([r["world_model_nll"] for r in rs]),
            **{key: mean_of([r.get(key) for r in rs]) for key in WORLD_MODEL_EXTRA},
            "action_nll": mean_of([r["action_nll"] for r in rs]),
            "train_steps": _round(mean_of([r["train_steps"] for r in rs])),
            "budget": " / ".join(sorted({r["budget"] for r in rs})),
            "train_flops": mean_of([r["train_flops"] for r in rs]),
            "total_flops": mean_of([r.get("total_flops", math.nan) for r in rs]),
            "wall_s": mean_of([r["wall_s"] for r in rs]),
        })  # fmt: skip
    return sorted(out, key=lambda r: -r["success"])


def summary_markdown(summary: list[dict[str, Any]], reference: str = "causal") -> str:
    """The per-arm table; the newer world-model columns (per observation) and the total compute only where present."""
    extra = _present(summary, _SUMMARY_EXTRA)
    total = _has_total(summary)
    decoding = ["decoding"] if _sampled(summary) else []
    cols = ["arm", "seeds", "success [95% CI] (pooled episodes)", "seed range", *decoding, f"vs {reference} (p)",
            "world-model NLL / obs", *(_EXTRA_HEADERS[k] for k in extra), "action NLL", "steps", "budget",
            "FLOPs used", *(["total FLOPs"] if total else []), "wall s"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in summary:
        ci = f"{_fmt(r['success'])} [{_fmt(r['success_low'])}, {_fmt(r['success_high'])}] of {r['episodes']}"
        spread = f"{_fmt(r['seed_success_min'])}–{_fmt(r['seed_success_max'])}"
        vs = "–" if math.isnan(r["vs_reference"]) else f"{r['vs_reference']:+.3f} ({r['p_value']:.2g})"
        vals = [r["arm"], r["seeds"], ci, spread, *(r[k] for k in decoding), vs, r["world_model_nll_per_obs"],
                *(r[k] for k in extra),
                r["action_nll"], r["train_steps"], r["budget"], r["train_flops"],
                *([r["total_flops"]] if total else []), r["wall_s"]]  # fmt: skip
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


def _round(x: float) -> int | None:
    return None if math.isnan(x) else int(round(x))


def mean_of(xs: list[float | int | None]) -> float:
    """The mean of the values that are present (not None, not NaN); NaN when none is."""
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan
