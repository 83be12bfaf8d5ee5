"""The two off-expert transition sets of world-model evaluation, next to the held-out expert trajectories.

- **Off-expert** (``offexpert_branches``): early-experience branches (``envs.branches``, uniform alternatives) of the
  held-out expert trajectories: at a state ``obs_t`` of an expert episode, an action the expert did not take, and the
  observation it led to. Built once from fixed trajectories with a fixed seed, so it is the same set for every arm.
- **On-policy** (``onpolicy_transitions``): the transitions of the evaluation's own live episodes, ``obs_t``, the
  action the policy executed, ``obs_{t+1}``: the states this arm's policy actually meets. It differs per arm (and per
  evaluation): each arm is scored on its own states.

Both are capped by a seeded uniform draw (over transitions, so a long episode weighs as much as its steps). No Ray and
no model here; ``nll.heldout_nll(..., last_only=True)`` and ``nll.transition_nll`` score them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from anyorder_ray.evaluation.episodes import EpisodeResult
from anyorder_ray.evaluation.nll import Transition
from envs.base import World
from envs.branches import branch_trajectories, uniform_proposer
from envs.trajectory import Trajectory

__all__ = ["offexpert_branches", "onpolicy_transitions"]


def _choose(n: int, cap: int, rng: np.random.Generator) -> list[int]:
    """``min(n, cap)`` indices of ``range(n)``, uniformly without replacement, in increasing order."""
    if n <= cap:
        return list(range(n))
    return sorted(int(i) for i in rng.choice(n, size=cap, replace=False))


def offexpert_branches(
    world: World,
    trajectories: Sequence[Trajectory],
    k: int,
    cap: int,
    rng: np.random.Generator,
    history_steps: int,
) -> list[Trajectory]:
    """At most ``cap`` branch trajectories of the expert ``trajectories``: ``k`` uniform alternatives per state, at
    every state when that fits under ``cap``, else at ``ceil(cap / k)`` states drawn uniformly (then ``cap`` of their
    branches). Each branch's last transition is its off-expert transition; ``history_steps`` expert steps precede it.

    Args:
        world: a world of the trajectories' configuration (without its expert), stepped to replay them.
        trajectories: expert trajectories (the eval actor's held-out ones).
        k: alternatives per state (``eval.offexpert_branches_per_state``).
        cap: the most branches returned (``eval.offexpert_transitions``); 0 returns none.
        rng: chooses the states, the alternatives and the branches kept (seeded: the same set at every call).
        history_steps: expert steps kept before the branch state (the policy's history).
    """
    if cap <= 0:
        return []
    pairs = [(i, t) for i, traj in enumerate(trajectories) for t in range(traj.num_actions)]
    picked = [pairs[j] for j in _choose(len(pairs), math.ceil(cap / k), rng)]
    out: list[Trajectory] = []
    for i, traj in enumerate(trajectories):
        steps = [t for j, t in picked if j == i]
        if steps:
            out += branch_trajectories(world, traj, k, rng, history_steps, uniform_proposer, steps)
    return [out[j] for j in _choose(len(out), cap, rng)]


def onpolicy_transitions(
    episodes: Sequence[EpisodeResult], history_steps: int, cap: int, rng: np.random.Generator
) -> list[Transition]:
    """At most ``cap`` transitions ``obs_t, executed act_t -> obs_{t+1}`` of ``episodes`` (played by the policy, with
    ``observations`` recorded), drawn uniformly over all their steps; each keeps ``history_steps`` earlier steps."""
    if cap <= 0:
        return []
    steps = [(e, t) for e, ep in enumerate(episodes) for t in range(min(len(ep.actions), len(ep.observations) - 1))]
    out = []
    for j in _choose(len(steps), cap, rng):
        e, t = steps[j]
        ep, lo = episodes[e], max(0, t - history_steps)
        out.append(Transition(ep.mission, tuple(ep.observations[lo : t + 2]), tuple(ep.actions[lo : t + 1])))
    return out
