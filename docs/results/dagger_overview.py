"""Every committed DAgger-vs-pure-imitation comparison in one table (issue 13), from the studies' own results.

Each row pairs two committed result folders of one study (``results.csv`` as ``anyorder_ray.results.tables`` wrote
it, ``experiment*.yaml`` beside it or, for a ``greedy/`` re-evaluation, in the folder above): the same level, model,
demos, window and training FLOP budget, pure imitation against DAgger, one arm, all its seeds pooled. The setting
columns are read from the configs, not typed here; the script refuses a pair whose configs differ in anything but the
regime and the rollout settings, or whose seeds differ. A DAgger arm with ``masking.onpolicy_mode`` (label
``+onpolicy_<mode>``) is paired with the same arm's pure imitation, which has no on-policy data for it to shape.
Success is pooled over the seeds' held-out episodes; the difference has a two-sided two-proportion z-test p-value;
"DAgger total / training FLOPs" counts the rollout actors' policy forwards as well.

A second table holds the "same success with at most half the demos" route: DAgger with fewer demos against pure
imitation with twice as many, at the same training budget (there the configs also differ in ``data.num_demos``). A
third holds the studies that gave pure imitation DAgger's total compute (training plus the actors' forwards) as its
training budget (there the configs differ in ``train.flop_budget``, which must be within 10% of DAgger's total).

Run: python docs/results/dagger_overview.py   (prints the markdown tables of docs/results/DAGGER.md)
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from anyorder_ray.evaluation.stats import two_proportion_test, wilson_interval
from anyorder_ray.results.tables import read_rows

HERE = Path(__file__).resolve().parent
CAUSAL, CFBLK, CFBLK_BR = "causal", "cut_focus+block+unit", "cut_focus+block+unit+br0.5"

# (imitation folder, DAgger folder, arms): the pairs each study was designed as, relative to docs/results/.
SAME_DEMOS: list[tuple[str, str, tuple[str, ...]]] = [
    ("dagger_default_level/imitation", "dagger_default_level/dagger", (CAUSAL, CFBLK)),
    ("dagger_gotolocal/causal_3seeds/imitation", "dagger_gotolocal/causal_3seeds/dagger", (CAUSAL,)),
    ("dagger_gotolocal/cfblk_3seeds/imitation", "dagger_gotolocal/cfblk_3seeds/dagger", (CFBLK,)),
    ("dagger_gotolocal/cfblk_3seeds/imitation_250demos", "dagger_gotolocal/cfblk_3seeds/dagger_250demos", (CFBLK,)),
    ("dagger_gotolocal/causal_2000demos/imitation", "dagger_gotolocal/causal_2000demos/dagger", (CAUSAL,)),
    ("dagger_gotolocal/cfblk_2000demos/imitation", "dagger_gotolocal/cfblk_2000demos/dagger", (CFBLK,)),
    ("dagger_gotolocal/causal_3seeds_sampled/imitation/greedy", "dagger_gotolocal/causal_3seeds_sampled/dagger/greedy",
     (CAUSAL,)),
    ("dagger_gotolocal/causal_3seeds_sampled/imitation", "dagger_gotolocal/causal_3seeds_sampled/dagger", (CAUSAL,)),
    ("dagger_gotolocal/cfblk_3seeds_sampled/imitation/greedy", "dagger_gotolocal/cfblk_3seeds_sampled/dagger/greedy",
     (CFBLK,)),
    ("dagger_gotolocal/cfblk_3seeds_sampled/imitation", "dagger_gotolocal/cfblk_3seeds_sampled/dagger", (CFBLK,)),
    ("dagger_gotolocal/causal_window1_sampled/imitation/greedy",
     "dagger_gotolocal/causal_window1_sampled/dagger/greedy", (CAUSAL,)),
    ("dagger_gotolocal/causal_window1_sampled/imitation", "dagger_gotolocal/causal_window1_sampled/dagger", (CAUSAL,)),
    ("dagger_gotolocal/defaults_3seeds/imitation", "dagger_gotolocal/defaults_3seeds/dagger", (CAUSAL,)),
    ("dagger_gotolocal/scarce_demos/imitation", "dagger_gotolocal/scarce_demos/dagger", (CAUSAL,)),
    ("dagger_gotolocal/scarce_demos/cfblk/imitation", "dagger_gotolocal/scarce_demos/cfblk/dagger", (CFBLK,)),
    ("iwm_gotolocal/block_12e12", "dagger_gotolocal/block_12e12/dagger", (CAUSAL, CFBLK, CFBLK_BR)),
    ("iwm_gotolocal/block_12e12", "dagger_gotolocal/block_12e12/dagger_onpolicy_causal",
     (f"{CFBLK}+onpolicy_causal", f"{CFBLK_BR}+onpolicy_causal")),
]  # fmt: skip

# (imitation with N demos, DAgger with at most N/2, arms).
HALF_DEMOS: list[tuple[str, str, tuple[str, ...]]] = [
    ("dagger_gotolocal/cfblk_3seeds/imitation", "dagger_gotolocal/cfblk_3seeds/dagger_250demos", (CFBLK,)),
    ("dagger_gotolocal/cfblk_2000demos/imitation", "dagger_gotolocal/cfblk_2000demos/dagger_1000demos", (CFBLK,)),
    ("dagger_gotolocal/scarce_demos/imitation_500demos", "dagger_gotolocal/scarce_demos/dagger", (CAUSAL,)),
    ("dagger_gotolocal/scarce_demos/cfblk/imitation_500demos", "dagger_gotolocal/scarce_demos/cfblk/dagger", (CFBLK,)),
]

# (imitation given DAgger's total compute as its training budget, DAgger, arms): success per unit of total compute.
TOTAL_COMPUTE: list[tuple[str, str, tuple[str, ...]]] = [
    ("dagger_default_level/imitation_total_compute/causal", "dagger_default_level/dagger", (CAUSAL,)),
    ("dagger_default_level/imitation_total_compute/cfblk", "dagger_default_level/dagger", (CFBLK,)),
    ("dagger_gotolocal/causal_3seeds/imitation_at_dagger_total", "dagger_gotolocal/causal_3seeds/dagger", (CAUSAL,)),
    ("dagger_gotolocal/cfblk_3seeds/imitation_total_compute", "dagger_gotolocal/cfblk_3seeds/dagger", (CFBLK,)),
]

ALLOWED_TO_DIFFER = {("data", "regime"), ("data", "eviction"), ("data", "buffer_capacity"), ("rollout", "*"),
                     ("sweep", "*"), ("train", "output_dir")}  # fmt: skip
"""Config keys a pair may differ in: the regime and how the on-policy data are collected and kept, the sweep's name,
arms and seeds (the arm and seeds are checked on the rows), where the run wrote. Everything else (level, model,
demos, window, budget, evaluation) must be equal."""


@dataclass(frozen=True)
class Side:
    """One arm of one folder, its seeds pooled."""

    folder: str
    config: dict[str, Any]
    seeds: tuple[int, ...]
    solved: int
    episodes: int
    decoding: str
    train_flops: float
    total_flops: float

    @property
    def success(self) -> float:
        return self.solved / self.episodes


def config_of(folder: Path) -> dict[str, Any]:
    """The folder's experiment config (a ``greedy/`` re-evaluation has its run's, one level up); the first of several
    (seeds run as separate sweeps differ only in ``sweep.seeds`` and the output directory)."""
    for where in (folder, folder.parent):
        found = sorted(where.glob("experiment*.yaml"))
        if found:
            return yaml.safe_load(found[0].read_text())
    raise SystemExit(f"{folder}: no experiment*.yaml here or one level up")


def side(folder: str, arm: str) -> Side:
    path = HERE / folder
    rows = [r for r in read_rows(path / "results.csv") if r["arm"] == arm and r["status"] == "ok"]
    rows = [r for r in rows if not math.isnan(r["success"]) and r["episodes"]]
    if not rows:
        raise SystemExit(f"{folder}: no finished trial of arm {arm!r}")
    decodings = {r["decoding"] for r in rows}
    if len(decodings) != 1:
        raise SystemExit(f"{folder}: arm {arm!r} was evaluated with several decodings {sorted(decodings)}")
    total = [r["total_flops"] for r in rows]
    return Side(
        folder=folder,
        config=config_of(path),
        seeds=tuple(sorted(r["seed"] for r in rows)),
        solved=int(round(sum(r["success"] * r["episodes"] for r in rows))),
        episodes=int(sum(r["episodes"] for r in rows)),
        decoding=decodings.pop(),
        train_flops=sum(r["train_flops"] for r in rows) / len(rows),
        total_flops=sum(total) / len(total) if not any(math.isnan(t) for t in total) else math.nan,
    )


def without_onpolicy(arm: str) -> str:
    """The pure-imitation counterpart of a DAgger arm: ``masking.onpolicy_mode`` (label ``+onpolicy_<mode>``) shapes
    only on-policy data, which pure imitation has none of, so its imitation run is the arm without it."""
    return re.sub(r"\+onpolicy_\w+$", "", arm)


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    out = []
    for section in sorted(set(a) | set(b)):
        sa, sb = a.get(section) or {}, b.get(section) or {}
        if not isinstance(sa, dict) or not isinstance(sb, dict):
            if sa != sb:
                out.append(section)
            continue
        for key in sorted(set(sa) | set(sb)):
            allowed = (section, key) in ALLOWED_TO_DIFFER or (section, "*") in ALLOWED_TO_DIFFER
            if sa.get(key) != sb.get(key) and not allowed:
                out.append(f"{section}.{key}")
    return out


def setting(imitation: dict[str, Any], dagger: dict[str, Any]) -> str:
    level = dagger["env"]["level"].removeprefix("BabyAI-").removesuffix("-v0")
    budgets = [f"{c['train']['flop_budget']:.1e}".replace("e+", "e") for c in (imitation, dagger)]
    budget = budgets[0] if budgets[0] == budgets[1] else f"{budgets[0]} (imitation) / {budgets[1]} (DAgger)"
    return f"{level}, {dagger['data']['window_steps']}-step windows, {budget} training FLOPs"


def pair_row(imitation: Side, dagger: Side, arm: str, extra_diff: set[str] = frozenset()) -> str:
    diff = set(differences(imitation.config, dagger.config)) - extra_diff
    if diff:
        raise SystemExit(f"{imitation.folder} vs {dagger.folder}: the configs differ in {sorted(diff)}")
    if imitation.seeds != dagger.seeds:
        raise SystemExit(f"{imitation.folder} vs {dagger.folder}: seeds {imitation.seeds} vs {dagger.seeds}")
    if imitation.decoding != dagger.decoding:
        raise SystemExit(f"{imitation.folder} vs {dagger.folder}: decodings differ")
    delta, p = two_proportion_test(dagger.solved, dagger.episodes, imitation.solved, imitation.episodes)

    def pct(s: Side) -> str:
        low, high = wilson_interval(s.solved, s.episodes)
        return f"{s.success:.3f} [{low:.3f}, {high:.3f}]"

    demos = f"{imitation.config['data']['num_demos']} / {dagger.config['data']['num_demos']}"
    cost = dagger.total_flops / dagger.train_flops
    mark = "**" if delta >= 0.15 else ""
    where = setting(imitation.config, dagger.config)
    folders = f"`{imitation.folder}` / `{dagger.folder}`"
    cells = [where, demos, arm, dagger.decoding, str(len(dagger.seeds)), pct(imitation), pct(dagger),
             f"{mark}{100 * delta:+.1f}{mark} ({p:.2g})", f"{cost:.2f}x", folders]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


HEADER = ("| setting | demos (imitation / DAgger) | arm | evaluation | seeds | pure imitation [95% CI] | "
          "DAgger [95% CI] | DAgger - imitation, points (p) | DAgger total / training FLOPs | folders |\n"
          "|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip


def main() -> int:
    print("## DAgger against pure imitation with the same demos and training budget\n")
    print(HEADER)
    for imitation, dagger, arms in SAME_DEMOS:
        for arm in arms:
            print(pair_row(side(imitation, without_onpolicy(arm)), side(dagger, arm), arm))
    print("\n## DAgger with at most half the demos against pure imitation with all of them\n")
    print(HEADER)
    for imitation, dagger, arms in HALF_DEMOS:
        for arm in arms:
            a, b = side(imitation, arm), side(dagger, arm)
            if 2 * b.config["data"]["num_demos"] > a.config["data"]["num_demos"]:
                raise SystemExit(f"{dagger}: more than half of {imitation}'s demos")
            print(pair_row(a, b, arm, extra_diff={"data.num_demos"}))
    print("\n## DAgger against pure imitation given DAgger's total compute as its training budget\n")
    print(HEADER)
    for imitation, dagger, arms in TOTAL_COMPUTE:
        for arm in arms:
            a, b = side(imitation, arm), side(dagger, arm)
            if abs(a.config["train"]["flop_budget"] / b.total_flops - 1) > 0.1:
                raise SystemExit(f"{imitation}: its budget is not DAgger's total compute ({b.total_flops:.3g})")
            print(pair_row(a, b, arm, extra_diff={"train.flop_budget"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
