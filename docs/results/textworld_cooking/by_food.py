"""Success on the cooking test games split by whether the game's target food was ever a target in training.

The test distribution (``env.split=test``) mixes foods the training games use as the recipe's ingredient with foods
no training game ever asks for. For every episode of ``evaluations/<name>/episodes.csv`` this script replays the
expert on the same seed (its first command is ``take <food> from <container>``) and pools each arm's episodes into
"target seen in training" and "target never a training target", with Wilson 95% intervals. A uniform-random policy
over the admissible commands is the floor on the same seeds.

Run: python docs/results/textworld_cooking/by_food.py <run dir> <game_dir> [evaluation name, default split-test]
"""

from __future__ import annotations

import csv
import random
import re
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from anyorder_ray.evaluation.stats import wilson_interval
from envs import EnvConfig, collect_expert_trajectories, make_world

TAKE = re.compile(r"^take (.+) from .+$")


def target_foods(env: EnvConfig, seeds: list[int]) -> dict[int, str]:
    """Each seed's target food: the object of the expert's first ``take ... from ...``."""
    trajectories, stats = collect_expert_trajectories(make_world(env), seeds)
    assert stats.succeeded == len(seeds), f"the expert won {stats.succeeded}/{len(seeds)}"
    return {s: TAKE.sub(r"\1", t.actions[0]) for s, t in zip(seeds, trajectories, strict=True)}


def random_wins(env: EnvConfig, seeds: list[int]) -> dict[int, bool]:
    world, rng, out = make_world(env, expert=False), random.Random(0), {}
    for s in seeds:
        world.reset(s)
        while not world.done:
            world.step(rng.choice(world.valid_actions()))
        out[s] = bool(world.success)
    return out


def main() -> None:
    run, game_dir = Path(sys.argv[1]), sys.argv[2]
    name = sys.argv[3] if len(sys.argv) > 3 else "split-test"
    folder = run / "evaluations" / name
    played = yaml.safe_load((folder / "evaluation.yaml").read_text())["env"]
    trained = yaml.safe_load((run / "experiment.yaml").read_text())
    env = EnvConfig(**{**played, "game_dir": game_dir})
    train_env = EnvConfig(**{**played, "game_dir": game_dir, "split": "train"})
    with (folder / "episodes.csv").open() as f:
        episodes = list(csv.DictReader(f))
    seeds = sorted({int(e["episode_seed"]) for e in episodes})
    foods = target_foods(env, seeds)
    train_seeds = list(range(int(trained["env"]["num_games"])))  # one expert demo per training game
    seen = set(target_foods(train_env, train_seeds).values())
    floor = random_wins(env, seeds)
    pools: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for e in episodes:
        group = "seen" if foods[int(e["episode_seed"])] in seen else "unseen"
        pools[e["arm"]][group].append(int(e["success"]))
    for s in seeds:
        pools["random"]["seen" if foods[s] in seen else "unseen"].append(int(floor[s]))
    unseen = sorted({f for f in foods.values() if f not in seen})
    n_seen = sum(foods[s] in seen for s in seeds)
    print(f"{name}: {len(seeds)} games, {n_seen} with a target food seen in training, {len(seeds) - n_seen} without "
          f"({', '.join(unseen)})\n")  # fmt: skip
    print("| arm | target seen in training | target never a training target | all |\n|---|---|---|---|")
    for arm, groups in sorted(pools.items(), key=lambda kv: (kv[0] == "random", kv[0])):
        cells = []
        for wins in (groups["seen"], groups["unseen"], groups["seen"] + groups["unseen"]):
            k, n = sum(wins), len(wins)
            low, high = wilson_interval(k, n)
            cells.append(f"{k}/{n} = {k / n:.3f} [{low:.3f}, {high:.3f}]" if n else "–")
        print(f"| {arm} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
