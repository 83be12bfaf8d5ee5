"""The protocol every world adapter implements, and what the library builds on it for any world.

A world turns an environment into text: observations become one string each, actions are strings, and an
expert that can answer from any state (a replanning bot) suggests the next action. Rollout and eval actors, the
policy and the tokenizer reach a world only through this protocol and the registry (``envs.registry``), so a new
benchmark is one adapter module plus one registry line.

``collect_expert_trajectories`` runs the expert on a list of seeds: the one episode loop behind demonstrations,
held-out evaluation trajectories and the benches.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

from envs.trajectory import Trajectory


class StepResult(NamedTuple):
    """What ``World.step`` returns; a plain tuple so it unpacks like gymnasium's step."""

    obs: str
    reward: float
    terminated: bool
    truncated: bool


class ExpertUnavailable(RuntimeError):
    """The world's expert cannot act in the current state (a bot that gives up on this episode)."""


@runtime_checkable
class World(Protocol):
    """One episode at a time of a text-rendered environment (not thread-safe; one per actor slot)."""

    level: str
    """The world's level / task id, as recorded in trajectories."""

    @property
    def action_names(self) -> tuple[str, ...]:
        """Every action of the world's fixed action set, in the environment's action-index order; empty for a world
        without one (TextWorld), whose policy scores each state's ``valid_actions()`` instead."""
        ...

    def valid_actions(self) -> tuple[str, ...]:
        """The actions the current state admits (a fixed-action world returns ``action_names``)."""
        ...

    def reset(self, seed: int) -> tuple[str, str]:
        """Start the episode for ``seed``; returns ``(obs_text, mission)``."""
        ...

    def step(self, action: str) -> StepResult:
        """Take one action by name; returns the next observation text, reward and end flags."""
        ...

    def expert_action(self) -> str:
        """The expert's action for the current state, whatever was done so far; ``ExpertUnavailable`` if none."""
        ...

    @property
    def done(self) -> bool:
        """The current episode has ended (terminated or truncated)."""
        ...

    @property
    def success(self) -> bool:
        """The current episode ended in success: the one success check of rollouts, evaluation and tests."""
        ...

    @property
    def num_steps(self) -> int:
        """Actions taken in the current episode."""
        ...

    def serialize(self, obs: Any) -> str:
        """Render a raw observation as text."""
        ...

    def parse(self, text: str) -> Any:
        """Exact inverse of ``serialize``."""
        ...


@dataclass(frozen=True, slots=True)
class CollectStats:
    """Outcome counts of one ``collect_expert_trajectories`` call."""

    level: str
    attempted: int
    succeeded: int
    failed: int
    failed_seeds: tuple[int, ...]
    seconds: float

    @property
    def success_rate(self) -> float:
        return self.succeeded / self.attempted if self.attempted else 0.0

    @property
    def episodes_per_s(self) -> float:
        return self.attempted / self.seconds if self.seconds > 0 else float("inf")


def expert_episode(world: World, seed: int) -> Trajectory | None:
    """One expert episode as a trajectory; None when the expert fails (gives up, or the episode ends unsolved)."""
    obs_text, mission = world.reset(seed)
    observations, actions = [obs_text], []
    reward = 0.0
    while not world.done:
        try:
            action = world.expert_action()
        except ExpertUnavailable:
            return None
        obs_text, reward, _, _ = world.step(action)
        observations.append(obs_text)  # includes obs_T after the last action
        actions.append(action)
    if not world.success:
        return None
    return Trajectory.from_steps(
        mission, world.level, seed, observations, actions, success=True,
        meta={"num_steps": len(actions), "reward": round(reward, 4)},
    )  # fmt: skip


def collect_expert_trajectories(world: World, seeds: Iterable[int]) -> tuple[list[Trajectory], CollectStats]:
    """Expert trajectories for ``seeds`` (successful episodes only, in seed order) and their counts."""
    out: list[Trajectory] = []
    failed: list[int] = []
    attempted = 0
    start = time.perf_counter()
    for seed in seeds:
        attempted += 1
        traj = expert_episode(world, int(seed))
        if traj is None:
            failed.append(int(seed))
        else:
            out.append(traj)
    stats = CollectStats(
        level=world.level,
        attempted=attempted,
        succeeded=len(out),
        failed=len(failed),
        failed_seeds=tuple(failed),
        seconds=time.perf_counter() - start,
    )
    return out, stats
