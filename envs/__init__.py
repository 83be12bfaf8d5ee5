"""Worlds as text: each adapter turns an environment into trajectories of text units, behind one protocol.

The library uses only what this package exports: the ``EnvConfig`` of a run, ``make_world`` / ``world_vocabulary``
/ ``env_problems`` / ``evaluation_env`` / ``prepare_env`` (the registry), the ``World`` protocol, the expert-episode
loop and the ``Trajectory`` record.
"""

from envs.base import CollectStats, ExpertUnavailable, StepResult, World, collect_expert_trajectories, expert_episode
from envs.registry import (
    EnvConfig,
    env_problems,
    evaluation_env,
    make_world,
    prepare_env,
    register_world,
    registered_worlds,
    world_vocabulary,
)
from envs.trajectory import UNIT_KINDS, Trajectory, Unit, UnitKind

__all__ = [
    "UNIT_KINDS",
    "CollectStats",
    "EnvConfig",
    "ExpertUnavailable",
    "StepResult",
    "Trajectory",
    "Unit",
    "UnitKind",
    "World",
    "collect_expert_trajectories",
    "env_problems",
    "evaluation_env",
    "expert_episode",
    "make_world",
    "prepare_env",
    "register_world",
    "registered_worlds",
    "world_vocabulary",
]
