"""What the failed episodes of an ``python -m anyorder_ray.evaluate`` run look like (its ``episodes.csv``).

Per arm: the failures, their lengths (a failure that hits the level's step limit is a timeout), how many end in a
short action cycle (the last 24 actions repeat with a period of at most 8: the argmax loops of a memoryless policy),
which failed episode seeds the arms share, and for each outcome whether the red ball was in the agent's first view
(reset of the level with the episode's seed; GoToRedBallGrey: object ``ball``, colour ``red``).

    python docs/results/default_sweep_x8/failures/analyze.py docs/results/default_sweep_x8/failures/episodes.csv
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict

import gymnasium as gym
import minigrid  # noqa: F401  (registers the BabyAI levels)
from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX

LEVEL = "BabyAI-GoToRedBallGrey-v0"
TAIL, MAX_PERIOD = 24, 8


def cycles(actions: list[str]) -> bool:
    tail = actions[-TAIL:]
    return len(tail) == TAIL and any(all(tail[i] == tail[i + p] for i in range(TAIL - p))
                                     for p in range(1, MAX_PERIOD + 1))  # fmt: skip


def ball_in_first_view(seed: int) -> bool:
    env = gym.make(LEVEL)
    obs, _ = env.reset(seed=seed)
    image = obs["image"]
    return bool(((image[:, :, 0] == OBJECT_TO_IDX["ball"]) & (image[:, :, 1] == COLOR_TO_IDX["red"])).any())


def main(path: str) -> None:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    failed: dict[str, set[int]] = defaultdict(set)
    for arm in sorted({r["arm"] for r in rows}):
        mine = [r for r in rows if r["arm"] == arm]
        fails = [r for r in mine if r["success"].lower() in ("false", "0")]
        failed[arm] = {int(r["episode_seed"]) for r in fails}
        lengths = sorted(int(r["length"]) for r in fails)
        looping = sum(cycles(r["actions"].split(" | ")) for r in fails)
        view = {True: [0, 0], False: [0, 0]}
        for r in mine:
            view[ball_in_first_view(int(r["episode_seed"]))][r in fails] += 1
        print(f"{arm}: {len(fails)} of {len(mine)} failed; lengths {lengths}; {looping} end in an action cycle of "
              f"period <= {MAX_PERIOD}; red ball in the first view: {view[True][0]} successes / {view[True][1]} "
              f"failures, not in view: {view[False][0]} / {view[False][1]}")  # fmt: skip
    arms = list(failed)
    if len(arms) > 1:
        shared = set.intersection(*failed.values())
        print(f"failed seeds shared by all {len(arms)} arms: {len(shared)} ({sorted(shared)})")


if __name__ == "__main__":
    main(sys.argv[1])
