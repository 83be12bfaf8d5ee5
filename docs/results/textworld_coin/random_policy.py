"""A uniform-random policy over each state's admissible commands on the study's 150 held-out games (its eval seeds).

Run: python docs/results/textworld_coin/random_policy.py <game_dir>  (the env.game_dir of the sweep).
"""

from __future__ import annotations

import random
import sys

from anyorder_ray.evaluation.stats import wilson_interval
from envs import EnvConfig, make_world


def main() -> None:
    env = EnvConfig(world="textworld", level="tw-coin_collector --level 5", split="heldout", num_games=150,
                    game_dir=sys.argv[1], max_episode_steps=10)  # fmt: skip
    world, rng, wins = make_world(env, expert=False), random.Random(0), 0
    for s in range(150):
        world.reset(1_000_000_000 + s)
        while not world.done:
            world.step(rng.choice(world.valid_actions()))
        wins += world.success
    low, high = wilson_interval(wins, 150)
    print(f"random: {wins}/150 = {wins / 150:.3f} [{low:.3f}, {high:.3f}]")


if __name__ == "__main__":
    main()
