"""What the rollout actor did in each DAgger trial of one or more sweep runs, from the trials' last reports.

    python docs/results/dagger_gotolocal/block_12e12/dagger_stats.py RUN [RUN ...] > dagger_stats.md

One row per trial (arm and seed from the run's results.csv): trajectories produced and evicted, the on-policy share of
the buffer at the end, weight versions published and rejected, beta at the last version, the seconds the trainer waited
for the actor (``rollout.sync``) out of its training time, and the FLOPs of the actor's forwards against the trainer's.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

COLUMNS = ("run", "arm", "seed", "steps", "produced", "evicted", "on-policy share", "versions (rejected)", "last beta",
           "sync wait s / training s", "actor FLOPs / training FLOPs")  # fmt: skip


def last_report(trial_dir: Path) -> dict:
    lines = (trial_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def rows(run: Path):
    with open(run / "results.csv", newline="") as f:
        trials = sorted(csv.DictReader(f), key=lambda t: t["trial"])
    for t in trials:  # a trial without reports fails here, by name, instead of leaving a row out
        m = last_report(run / "train" / f"train-{t['trial']}")
        versions = f"{m['rollout/weights_published']} ({m['rollout/weights_rejected']})"
        yield (run.name, t["arm"], t["seed"], m["train/step"], m["rollout/produced"], m["rollout/evicted"],
               f"{m['rollout/onpolicy_fraction']:.3f}", versions, f"{m['rollout/beta']:.3f}",
               f"{m['train/sync_wait_s']:.0f} / {m['train/elapsed_s']:.0f}",
               f"{m['rollout/inference_flops'] / m['train/total_flops']:.2f}")  # fmt: skip


def main(argv: list[str]) -> None:
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for run in argv:
        for row in rows(Path(run)):
            print("| " + " | ".join(str(x) for x in row) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
