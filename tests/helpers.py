"""Helpers shared by the tests: a BabyAI world config, expert trajectories and the world tokenizer through the
environment registry (as the library reaches them), and the fault-injection hook for training workers."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import ray.cloudpickle

from anyorder_ray.data.tokenization import build_world_tokenizer
from envs import EnvConfig, Trajectory, collect_expert_trajectories, make_world, world_vocabulary

HANG_GUARD_S = 1800
"""The one time limit of the tests: a guard against a hang, far above what any test takes on a slow or loaded machine
(the whole suite runs in well under this on 2 busy cores), so no verdict depends on how fast the machine is."""

# Ray workers cannot import this module (tests/ is not a package on their path): ship it by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def babyai(level: str = "BabyAI-GoToRedBallGrey-v0", **kwargs) -> EnvConfig:
    return EnvConfig(world="babyai", level=level, **kwargs)


def expert_trajectories(level: str, seeds: Iterable[int], **env_kwargs) -> list[Trajectory]:
    """Successful expert trajectories of ``level`` for ``seeds`` (failed episodes dropped)."""
    trajectories, _ = collect_expert_trajectories(make_world(babyai(level, **env_kwargs)), seeds)
    return trajectories


def world_tokenizer(env: EnvConfig | None = None):
    """The word-level tokenizer of ``env``'s world (BabyAI by default)."""
    return build_world_tokenizer(world_vocabulary(env or babyai()))


@dataclass(frozen=True)
class KillOnce:
    """Fault injection: SIGKILL the worker process of ``rank`` once, right after step ``step`` (pass it as the train
    loop's ``after_step``).

    ``marker`` is a file created just before the kill; the restarted worker group finds it and goes on. It
    simulates a crashed training worker from inside, at a chosen step.
    """

    step: int
    marker: str
    rank: int = 0

    def __call__(self, step: int, rank: int) -> None:
        if step != self.step or rank != self.rank or os.path.exists(self.marker):
            return
        Path(self.marker).write_text(f"killed pid {os.getpid()} after step {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)
