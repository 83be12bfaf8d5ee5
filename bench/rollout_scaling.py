"""Rollout scaling: trajectories/s of the Ray rollout path with 1 and 2 actors vs the bot in one plain process.

Plain process: ``envs.babyai.collect_bot_trajectories_with_stats`` over N seeds in this (driver) process, measured
once before Ray starts and once after it shut down; the baseline is their mean (it controls for drift of the
machine during the run).

Ray path: exactly what a trial starts (``anyorder_ray.roles.trial.start_actors``): a ``TrajectoryBuffer`` actor
(``num_cpus=0``) with a fixed budget ``target=N`` and ``RolloutWorker`` actors with ``num_cpus=1`` each on a Ray
started with ``num_cpus=2``. Each actor runs the bot on its own seed range, hands batches of
``episodes_per_batch`` trajectories to the buffer by value, and the buffer puts them into the object store (it owns
them). The clock starts at the first ``run.remote()`` and stops when the buffer holds N; actor start-up
(process spawn, imports, env construction) is excluded and reported separately.

Counted are successful trajectories (the bot's failures are dropped on both paths). What bounds the 2-actor figure
on a 2-core machine: the two actors take both cores, and the buffer actor (deserialises each batch it receives,
``ray.put``s it), the driver's polling and Ray's own processes (raylet, GCS) have to share them.

Run: ``python bench/rollout_scaling.py`` (full, ~1.5 minutes) or ``--quick`` (< 1 minute).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

from _common import Result, expert_data, init_local_ray, load_average, print_results

from anyorder_ray.config import RolloutConfig
from anyorder_ray.roles.buffer import TrajectoryBuffer
from anyorder_ray.roles.rollout import RolloutWorker
from envs import EnvConfig, make_world


@dataclass(frozen=True)
class RayTiming:
    """One run of the Ray rollout path."""

    actors: int
    trajectories: int
    startup_s: float
    seconds: float

    @property
    def per_s(self) -> float:
        return self.trajectories / self.seconds


def plain_process(level: str, n: int, seed_start: int) -> float:
    """Successful bot trajectories per second over ``n`` seeds in this process."""
    trajectories, stats = expert_data(EnvConfig(level=level), range(seed_start, seed_start + n))
    rate = len(trajectories) / stats.seconds
    print(
        f"[plain] {len(trajectories)}/{stats.attempted} successful in {stats.seconds:.1f} s: {rate:.0f} traj/s "
        f"({load_average()})",
        flush=True,
    )
    return rate


def ray_rollout(level: str, n: int, actors: int, episodes_per_batch: int, poll_s: float = 0.05) -> RayTiming:
    """Time the actors -> object store -> buffer path until the buffer holds ``n`` trajectories."""
    import ray

    env = EnvConfig(level=level)
    rollout = RolloutConfig(
        num_actors=actors, num_cpus_per_actor=1.0, episodes_per_batch=episodes_per_batch, max_restarts=0
    )
    # Created as in anyorder_ray.roles.trial.start_actors (fixed-budget regime: target = capacity = n).
    name = f"scaling-buffer-{actors}-{n}-{time.monotonic_ns()}"
    buffer = ray.remote(TrajectoryBuffer).options(name=name, num_cpus=0, max_restarts=0).remote(n, target=n)
    start = time.perf_counter()
    workers = [
        ray.remote(RolloutWorker)
        .options(num_cpus=rollout.num_cpus_per_actor, max_restarts=0)
        .remote(env, rollout, i, name)
        for i in range(actors)
    ]
    ray.get([w.next_seed.remote() for w in workers])  # constructors done: start-up is over
    startup_s = time.perf_counter() - start
    start = time.perf_counter()
    runs = [w.run.remote() for w in workers]
    while (size := ray.get(buffer.size.remote())) < n:
        done, _ = ray.wait(runs, num_returns=len(runs), timeout=0)
        if len(done) == len(runs) and ray.get(buffer.size.remote()) < n:
            ray.get(done)  # raises an actor's error, if any
            raise RuntimeError(f"rollout actors finished with only {size} of {n} trajectories in the buffer")
        time.sleep(poll_s)
    seconds = time.perf_counter() - start
    ray.get(runs)  # the actors stop at their next add (the buffer says it has enough)
    for actor in [*workers, buffer]:
        ray.kill(actor, no_restart=True)
    timing = RayTiming(actors, n, startup_s, seconds)
    print(
        f"[ray] {actors} actor(s): {n} trajectories in the buffer after {seconds:.1f} s: {timing.per_s:.0f} traj/s "
        f"(actor start-up {startup_s:.1f} s, excluded; {load_average()})",
        flush=True,
    )
    return timing


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer trajectories (< 1 minute)")
    parser.add_argument("--level", default="BabyAI-GoToRedBallGrey-v0")
    parser.add_argument(
        "--trajectories", type=int, default=None, help="N per timing (default 8000: >= ~10 s each on 2 cores)"
    )
    parser.add_argument("--episodes-per-batch", type=int, default=128)
    args = parser.parse_args(argv)
    level = make_world(EnvConfig(level=args.level), expert=False).level
    n = args.trajectories or (1000 if args.quick else 8000)
    print(f"rollout scaling on {level}: N={n} trajectories per timing, {args.episodes_per_batch} per batch", flush=True)

    expert_data(EnvConfig(level=level), range(10**8, 10**8 + 20))  # warm imports and level generation
    before = plain_process(level, n, seed_start=0)

    import ray

    init_local_ray(num_cpus=2, object_store_mb=256)
    try:
        timings = {k: ray_rollout(level, n, k, args.episodes_per_batch) for k in (1, 2)}
    finally:
        ray.shutdown()
    time.sleep(2.0)  # let Ray's processes exit before the second plain timing
    after = plain_process(level, n, seed_start=0)
    plain = statistics.mean([before, after])
    print(f"plain process: {plain:.0f} traj/s (mean of {before:.0f} before and {after:.0f} after the Ray runs)")
    for k, t in timings.items():
        print(f"{k} actor(s): {t.per_s:.0f} traj/s = {t.per_s / plain:.2f}x the plain process")
    results = [
        Result("rollout_speedup_1_actor", timings[1].per_s / plain, ">=", 0.9),
        Result("rollout_speedup_2_actors", timings[2].per_s / plain, ">=", 1.7),
        Result("rollout_plain_traj_per_s", plain),
        Result("rollout_actor_startup_s", max(t.startup_s for t in timings.values())),
    ]
    print_results(results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
