"""Compare two evaluations of the same checkpoints episode by episode (e.g. greedy against sampled actions).

Reads the ``episodes.csv`` that ``python -m anyorder_ray.evaluate`` writes into ``<run>/evaluations/<name>/``, from
one or more runs per side, and pairs the episodes by (trial, episode seed): both sides must have played the same
trials on the same seeds. Per arm (all its seeds pooled) it prints the success of each side, the difference B - A, the
discordant pairs (episodes only A solved, only B solved) and the exact two-sided McNemar p-value of the difference,
as ``RESULT`` lines.

Run: python -m anyorder_ray.results.compare --a EVAL_DIR [EVAL_DIR ...] --b EVAL_DIR [EVAL_DIR ...]
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import defaultdict
from pathlib import Path

__all__ = ["compare", "mcnemar_p", "read_episodes"]


def read_episodes(folders: list[Path]) -> dict[tuple[str, str], tuple[str, int]]:
    """(trial, episode seed) -> (arm, success) over the ``episodes.csv`` of ``folders``."""
    out: dict[tuple[str, str], tuple[str, int]] = {}
    for folder in folders:
        path = folder / "episodes.csv"
        if not path.is_file():
            raise FileNotFoundError(f"no episodes.csv in {folder} (an output of python -m anyorder_ray.evaluate)")
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                key = (row["trial"], row["episode_seed"])
                if key in out:
                    raise ValueError(f"{path}: trial {key[0]} episode seed {key[1]} appears twice")
                out[key] = (row["arm"], int(row["success"]))
    return out


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar test: the binomial tail of the discordant pairs at 1/2, doubled, at most 1."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare(a: dict[tuple[str, str], tuple[str, int]], b: dict[tuple[str, str], tuple[str, int]]) -> list[dict]:
    """Per arm (sorted by name): episodes, success of A and B, ``diff`` = B - A, the discordant pairs ``only_a`` /
    ``only_b`` and McNemar's ``p``."""
    if a.keys() != b.keys():
        missing = sorted(a.keys() ^ b.keys())[:3]
        raise ValueError(f"the two sides played different (trial, episode seed) pairs, e.g. {missing}")
    per_arm: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for key, (arm, success_a) in a.items():
        arm_b, success_b = b[key]
        if arm_b != arm:
            raise ValueError(f"trial {key[0]} is arm {arm!r} in A but {arm_b!r} in B")
        per_arm[arm].append((success_a, success_b))
    rows = []
    for arm, pairs in sorted(per_arm.items()):
        n = len(pairs)
        sa, sb = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
        only_a = sum(1 for x, y in pairs if x and not y)
        only_b = sum(1 for x, y in pairs if y and not x)
        rows.append({"arm": arm, "episodes": n, "success_a": sa / n, "success_b": sb / n, "diff": (sb - sa) / n,
                     "only_a": only_a, "only_b": only_b, "p": mcnemar_p(only_a, only_b)})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", nargs="+", type=Path, required=True, help="evaluation folders of side A")
    p.add_argument("--b", nargs="+", type=Path, required=True, help="evaluation folders of side B")
    args = p.parse_args(argv)
    try:
        rows = compare(read_episodes(args.a), read_episodes(args.b))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for row in rows:
        print(f"RESULT arm={row['arm']} episodes={row['episodes']} success_a={row['success_a']:.3f} "
              f"success_b={row['success_b']:.3f} b_minus_a={row['diff']:+.3f} only_a={row['only_a']} "
              f"only_b={row['only_b']} mcnemar_p={row['p']:.2g}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
