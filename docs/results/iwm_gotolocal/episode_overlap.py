"""Which held-out episodes each trial of a run solved, and how far two trials' solved sets overlap.

    python -m anyorder_ray.evaluate RUN                       # plays every trial again: RUN/evaluations/own-world/
    python docs/results/iwm_gotolocal/episode_overlap.py RUN/evaluations/own-world/episodes.csv

Prints one line per trial (arm, seed, episodes solved, the actions it took most often) and, per arm, how many episodes
every seed of the arm solved (the seeds' intersection).
"""

from __future__ import annotations

import collections
import csv
import sys


def main(path: str) -> None:
    solved: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    actions: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            key = (row["arm"], row["seed"])
            actions[key].update(a.strip() for a in row["actions"].split("|"))
            if int(row["success"]):  # 0 or 1, as python -m anyorder_ray.evaluate writes it
                solved[key].add(row["episode_seed"])
    for key in sorted(actions):
        total = sum(actions[key].values())
        top = ", ".join(f"{a} {n / total:.0%}" for a, n in actions[key].most_common(3))
        print(f"{key[0]} seed {key[1]}: solved {len(solved[key])}; actions {top}")
    for arm in sorted({arm for arm, _ in actions}):
        sets = [solved[key] for key in actions if key[0] == arm]
        print(f"{arm}: solved by every seed {len(set.intersection(*sets))} (per seed {[len(s) for s in sets]})")


if __name__ == "__main__":
    main(sys.argv[1])
