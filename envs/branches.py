"""Early-experience branches: from states along an expert trajectory, take an alternative action and record what the
world answered (Zhang et al. 2025, "Agent Learning via Early Experience": the data of implicit world modelling).

A branch is stored as a ``Trajectory`` with provenance ``branch``: up to ``history_steps`` expert steps before the
branch state ``obs_t``, then ``obs_t``, the alternative action ``a'`` (not the expert's label) and the observation
``obs'`` that ``a'`` led to. Every ``obs, act, obs`` in it is a real transition of the world; only its last action is
not a label (``Trajectory.labelled_actions``), so imitation must never train on it while world-model targets may.
``meta`` records ``branch_step`` (t in the expert episode), ``label`` (the expert's action at ``obs_t``),
``reward`` and ``done`` (whether ``a'`` ended the episode; ``success`` says whether it ended it in success).

The world is brought to ``obs_t`` by replaying the expert's actions from ``reset(seed)`` (worlds are deterministic
given the seed and the actions; the replay checks it observation by observation and raises if not). That costs
O(T^2 k) steps per episode of T steps, which is small next to a policy forward pass for the worlds here (BabyAI
steps take microseconds, TextWorld cooking episodes are a few steps long).

No Ray and no model here: the rollout actor supplies a proposer (``uniform_proposer``, or one backed by the policy:
``anyorder_ray.evaluation.proposer.PolicyProposer``, ``data.branch_proposer: policy``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from envs.base import World
from envs.trajectory import Provenance, Trajectory

__all__ = ["Proposer", "ReplayMismatch", "branch_trajectories", "uniform_proposer"]

Proposer = Callable[[Trajectory, int, Sequence[str], int, np.random.Generator], list[str]]
"""``(trajectory, t, candidates, k, rng) -> up to k distinct alternative actions`` for state ``obs_t`` of the expert
``trajectory``; ``candidates`` are the state's valid actions other than the expert's label."""


class ReplayMismatch(RuntimeError):
    """Replaying a trajectory's actions from its seed did not give back its observations (a non-deterministic world,
    or a trajectory recorded with another world configuration)."""


def uniform_proposer(
    trajectory: Trajectory, t: int, candidates: Sequence[str], k: int, rng: np.random.Generator
) -> list[str]:
    """``k`` distinct alternatives drawn uniformly without replacement (all of them when there are ``k`` or fewer)."""
    if len(candidates) <= k:
        return list(candidates)
    picks = rng.choice(len(candidates), size=k, replace=False)
    return [candidates[int(i)] for i in sorted(picks)]


def _replay(world: World, trajectory: Trajectory, t: int) -> None:
    """Bring ``world`` to state ``obs_t`` of ``trajectory`` (reset by its seed, then its first ``t`` actions)."""
    obs, _ = world.reset(trajectory.seed)
    observations, actions = trajectory.observations, trajectory.actions
    for i in range(t + 1):
        if obs != observations[i]:
            raise ReplayMismatch(
                f"{trajectory.level} seed {trajectory.seed}: replaying the expert's actions gave another observation "
                f"at step {i} than the recorded one (is the world deterministic and configured as when recorded?)"
            )
        if i < t:
            obs = world.step(actions[i]).obs


def branch_trajectories(
    world: World,
    trajectory: Trajectory,
    k: int,
    rng: np.random.Generator,
    history_steps: int,
    proposer: Proposer = uniform_proposer,
    steps: Sequence[int] | None = None,
    policy_version: int = 0,
) -> list[Trajectory]:
    """The branches of an expert ``trajectory``: at each state ``obs_t`` (``t`` in ``steps``, default every state
    with an expert action), up to ``k`` alternative actions from ``proposer``, each as a branch trajectory.

    Args:
        world: a world of the trajectory's level (its expert is not needed), used and left at the last branch.
        trajectory: an expert trajectory (``provenance.source == "expert"``) recorded on ``world``'s configuration.
        k: alternatives per state (>= 1).
        rng: the proposer's randomness.
        history_steps: expert steps kept before ``obs_t`` in each branch (the training window minus one).
        proposer: chooses the alternatives (``uniform_proposer``, or one that asks the policy).
        steps: the states to branch from; None: every ``t`` with an action.
        policy_version: the weights behind ``proposer`` (0 for a uniform one), recorded in the provenance.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if history_steps < 0:
        raise ValueError(f"history_steps must be >= 0, got {history_steps}")
    if trajectory.provenance.source != "expert":
        raise ValueError(f"branches start from expert trajectories, got a {trajectory.provenance.source} one")
    observations, actions = trajectory.observations, trajectory.actions
    steps = range(len(actions)) if steps is None else [int(t) for t in steps]
    provenance = Provenance("branch", int(policy_version), 1.0, int(policy_version > 0))
    out: list[Trajectory] = []
    for t in steps:
        if not 0 <= t < len(actions):
            raise ValueError(f"branch step {t} is not a state with an action (the trajectory has {len(actions)})")
        label = actions[t]
        _replay(world, trajectory, t)
        candidates = [a for a in world.valid_actions() if a != label]
        alternatives = proposer(trajectory, t, candidates, k, rng) if candidates else []
        if len(set(alternatives)) != len(alternatives) or not set(alternatives) <= set(candidates):
            raise ValueError(f"the proposer must return distinct valid non-expert actions, got {alternatives}")
        lo = max(0, t - history_steps)
        for j, action in enumerate(alternatives):
            if j:
                _replay(world, trajectory, t)
            result = world.step(action)
            meta = {"branch_step": t, "label": label, "reward": round(result.reward, 4), "done": bool(world.done),
                    "source_episode_steps": len(actions)}  # fmt: skip
            out.append(
                Trajectory.from_steps(
                    trajectory.mission,
                    trajectory.level,
                    trajectory.seed,
                    [*observations[lo : t + 1], result.obs],
                    [*actions[lo:t], action],
                    success=bool(world.done and world.success),
                    meta=meta,
                    provenance=provenance,
                )  # fmt: skip
            )
    return out
