"""The evaluations each trial of finished runs made while it trained: per evaluation, the training step, the success
of its episodes and the held-out bot trajectories' action NLL (the last row is the final evaluation).

    python docs/results/dagger_gotolocal/scarce_demos/curves.py RUN [RUN ...] > curves.md

Reads ``RUN/results.csv`` (which trial is which arm and seed) and each trial's ``RUN/train/train-<trial>/metrics.jsonl``
(every report; an evaluation's metrics repeat in the reports until the next one, so only changes are printed).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def evaluations(metrics_jsonl: Path) -> list[tuple[int, float, int, float]]:
    """(eval step, success, episodes, action NLL) of each evaluation in a trial's reports, in order."""
    out: list[tuple[int, float, int, float]] = []
    with metrics_jsonl.open(encoding="utf-8") as f:
        for line in f:
            m = json.loads(line)
            if "eval/success_rate" not in m:
                continue
            row = (int(m["eval/step"]), float(m["eval/success_rate"]), int(m["eval/episodes"]),
                   float(m.get("eval/action_nll", float("nan"))))  # fmt: skip
            if not out or row[0] != out[-1][0] or row[2] != out[-1][2]:
                out.append(row)
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    print("| run | arm | seed | step | success | episodes | held-out action NLL |")
    print("|---|---|---|---|---|---|---|")
    for run in map(Path, argv):
        with (run / "results.csv").open(newline="", encoding="utf-8") as f:
            trials = sorted(csv.DictReader(f), key=lambda r: int(r["seed"]))
        for t in trials:
            path = run / "train" / f"train-{t['trial']}" / "metrics.jsonl"
            if not path.is_file():
                print(f"{path}: missing", file=sys.stderr)
                return 2
            for step, success, episodes, nll in evaluations(path):
                print(f"| {run.name} | {t['arm']} | {t['seed']} | {step} | {success:.3f} | {episodes} | {nll:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
