"""Rollout actors: run the world's expert on their own seed range and feed the trajectory buffer.

Each batch goes to ``buffer.add`` by value and the buffer puts it into the object store, so the buffer
owns it. Once the buffer acknowledged a batch, the data survives this actor's death; a restarted actor asks the buffer
where it left off and continues from the next seed, so no acknowledged trajectory is lost and no seed
is used twice (should the dead actor's last ``add`` land after its successor read the resume seed, the
buffer drops whichever copy of those seeds arrives second).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray

from anyorder_ray.config import RolloutConfig
from anyorder_ray.data.seeds import rollout_seed_range
from envs import EnvConfig, collect_expert_trajectories, make_world


@dataclass(frozen=True)
class RolloutReport:
    """What one actor did in one ``run`` call."""

    worker: int
    episodes: int
    trajectories: int
    failed: int
    seconds: float
    next_seed: int


class RolloutWorker:
    """Actor class: ``ray.remote(RolloutWorker).options(num_cpus=..., max_restarts=...)``."""

    def __init__(self, env: EnvConfig, rollout: RolloutConfig, worker: int, buffer_name: str) -> None:
        """``buffer_name``: the trial's named ``TrajectoryBuffer`` actor, looked up on every (re)start. A handle passed
        as a constructor argument would be a reference Ray has to keep alive for restarts (it logs an ERROR that
        such a restart can fail); a name is plain data."""
        self._cfg = rollout
        self._worker = worker
        self._buffer = ray.get_actor(buffer_name)
        self._world = make_world(env, expert=True)
        self._seeds = rollout_seed_range(rollout, worker)
        resume = ray.get(self._buffer.resume_seed.remote(worker))
        self._next_seed = resume if resume is not None else self._seeds.start

    def next_seed(self) -> int:
        return self._next_seed

    def run(self, max_batches: int | None = None) -> RolloutReport:
        """Produce batches until the buffer has enough (or ``max_batches``); returns a report."""
        start, episodes, kept, failed, batches = time.perf_counter(), 0, 0, 0, 0
        keep_going = True
        while keep_going and (max_batches is None or batches < max_batches):
            lo = self._next_seed
            hi = min(lo + self._cfg.episodes_per_batch, self._seeds.stop)
            if lo >= hi:
                break  # seed range exhausted
            trajs, stats = collect_expert_trajectories(self._world, range(lo, hi))
            keep_going = ray.get(self._buffer.add.remote(trajs, self._worker, hi))
            self._next_seed = hi
            episodes += stats.attempted
            kept += stats.succeeded
            failed += stats.failed
            batches += 1
        return RolloutReport(self._worker, episodes, kept, failed, time.perf_counter() - start, self._next_seed)
