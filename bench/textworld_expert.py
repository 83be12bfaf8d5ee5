"""TextWorld expert: success and steps per game type, game generation time, episode speed, unit lengths in words.

For each game type (its default options, ``envs.textworld.DEFAULT_OPTIONS``) the script generates N training games
into a fresh cache folder and runs the expert (TextWorld's re-planned ``policy_commands``) on each through the
environment registry, twice: the first pass generates the games as the episodes need them, the second finds them
cached, so ``gen_s_per_game`` is the difference per game and ``episodes_per_s`` / ``s_per_step`` are the second
pass alone. Unit lengths are counted with the world tokenizer (``build_world_tokenizer(world_vocabulary(env))``, one
token per word or punctuation mark): the mean over every observation and every action of the expert's episodes.

Needs the ``textworld`` extra. Run: ``python bench/textworld_expert.py`` (5 games per type, ~2 minutes) or
``--quick`` (2 per type); ``--game-dir`` keeps the games (a second run then measures no generation).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from _common import Result, load_average, print_results

from anyorder_ray.data.tokenization import build_world_tokenizer
from envs import EnvConfig, collect_expert_trajectories, make_world, world_vocabulary

GAME_TYPES = ("tw-simple", "tw-coin_collector", "tw-treasure_hunter", "tw-cooking")


def bench_type(level: str, games: int, game_dir: str) -> list[Result]:
    env = EnvConfig(world="textworld", level=level, num_games=games, game_dir=game_dir)
    world = make_world(env)
    start = time.perf_counter()
    collect_expert_trajectories(world, range(games))  # generates the games it does not find
    first = time.perf_counter() - start
    trajectories, stats = collect_expert_trajectories(world, range(games))
    steps = [t.num_actions for t in trajectories]
    tokenizer = build_world_tokenizer(world_vocabulary(env))

    def words(texts: list[str]) -> list[int]:
        return [len(tokenizer.encode(text, add_special_tokens=False)) for text in texts]

    obs_words = words([o for t in trajectories for o in t.observations])
    act_words = words([a for t in trajectories for a in t.actions])
    mission_words = words([t.mission for t in trajectories])
    name = level.removeprefix("tw-")
    print(
        f"[{name}] {world.level!r}: {stats.succeeded}/{stats.attempted} won, steps {steps}, first pass {first:.1f}s, "
        f"cached pass {stats.seconds:.2f}s; words per obs {statistics.mean(obs_words):.0f} (max {max(obs_words)}), "
        f"per action {statistics.mean(act_words):.1f}, per mission {statistics.mean(mission_words):.0f} "
        f"({load_average()})",
        flush=True,
    )
    return [
        Result(f"tw_{name}_expert_success", stats.success_rate, ">=", 1.0),
        Result(f"tw_{name}_expert_steps", statistics.mean(steps) if steps else float("nan")),
        Result(f"tw_{name}_gen_s_per_game", max(first - stats.seconds, 0.0) / games),
        Result(f"tw_{name}_episodes_per_s", stats.episodes_per_s),
        Result(f"tw_{name}_s_per_step", stats.seconds / max(sum(steps), 1)),
        Result(f"tw_{name}_words_per_obs", statistics.mean(obs_words)),
        Result(f"tw_{name}_words_per_obs_max", max(obs_words)),
        Result(f"tw_{name}_words_per_action", statistics.mean(act_words)),
        Result(f"tw_{name}_words_per_mission", statistics.mean(mission_words)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--games", type=int, default=5, help="games per type (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="2 games per type")
    parser.add_argument("--game-dir", help="game cache to use and keep (default: a temporary folder)")
    args = parser.parse_args()
    games = 2 if args.quick else args.games
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="tw-bench-") as tmp:
        for level in GAME_TYPES:
            results += bench_type(level, games, args.game_dir or tmp)
    print_results(results)


if __name__ == "__main__":
    main()
