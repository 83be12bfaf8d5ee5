"""DAgger episodes: the policy and the expert share the wheel, the expert labels every state visited.

At each step of an episode the expert's action for the current state is asked first (the label); then, with
probability ``beta``, the expert's action is executed, otherwise the policy's (from the same ``ActionScorer`` the eval
actor uses: its argmax, or a draw from its distribution, as the ``policy`` callable decides with the generator it is
given). The stored data are the states actually visited with the expert's labels as
their actions, so imitation on them teaches the expert's answer in the states the policy leads to (Ross et al. 2011).

Every stored ``obs_t, act_t, obs_t+1`` is a transition of the world, because world-model targets (prefix, any-order,
``cut_focus``) train on them: where the executed action differs from the label, the next observation followed the
executed action, not the label, so an episode is stored as segments cut there. A segment ends with the label of the
state where the policy's choice departed from the expert's (no observation after it); the next segment starts in the
state that choice led to. With ``beta = 1`` (or a policy that agrees with the expert) an episode is one segment, the
expert's own trajectory. A segment's ``Provenance`` says which weights acted, with which beta, and how many of its
steps executed the policy's choice; ``meta`` holds the executed actions (``executed``), the segment's index in its
episode (``segment``) and the episode's length (``episode_steps``); ``success`` is the episode's, on its last segment.

Each episode draws its coin flips from its own generator, seeded by ``(rng_seed, episode seed)``, one draw per step
whatever the outcome, and hands the policy a second generator of its own (seeded by ``(rng_seed, episode seed, 1)``) for
sampled actions, so an episode does not depend on the other episodes of its lockstep batch: with ``beta = 1`` it is
exactly the expert's episode, with ``beta = 0`` every executed action is the policy's.

Episodes run in lockstep over the given worlds: one batched policy call per step for the live episodes whose coin
chose the policy. No Ray here: the rollout actor (``roles.rollout``) supplies the worlds, the policy and the weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from anyorder_ray.evaluation.scoring import PolicyQuery
from envs.base import ExpertUnavailable, World
from envs.trajectory import Provenance, Trajectory

__all__ = ["DaggerStats", "Policy", "dagger_episodes"]

Policy = Callable[[Sequence[PolicyQuery], Sequence[Sequence[str]], Sequence[np.random.Generator]], list[str]]
"""Chooses one action per query among its candidates, given each query's episode generator for sampled choices, e.g.
``lambda q, c, rngs: scorer.act(model, q, c)`` (greedy: no draw); ``evaluation.episodes.choose_actions`` either way."""


@dataclass(frozen=True, slots=True)
class DaggerStats:
    """Counts of one ``dagger_episodes`` call."""

    attempted: int
    kept: int
    """Episodes stored (every episode with at least one labelled step)."""
    segments: int
    """Trajectories stored: the kept episodes cut where an executed action departed from its label."""
    succeeded: int
    """Stored episodes that ended in success."""
    expert_gave_up: int
    """Episodes the expert could not label to their end (kept up to the state it gave up in)."""
    steps: int
    policy_actions: int
    seconds: float


@dataclass
class _Slot:
    seed: int
    mission: str
    rng: np.random.Generator
    """The coin flips (expert or policy), one per step."""
    act_rng: np.random.Generator
    """What the policy draws sampled actions from."""
    observations: list[str]
    labels: list[str]
    executed: list[str]
    by_policy: list[bool] = field(default_factory=list)
    """Per step: whether the policy's choice was executed (the coin said so), whatever it chose."""
    reward: float = 0.0
    gave_up: bool = False
    success: bool = False


def dagger_episodes(
    worlds: Sequence[World],
    seeds: Sequence[int],
    policy: Policy,
    beta: float,
    version: int,
    history_steps: int,
    rng_seed: int = 0,
) -> tuple[list[Trajectory], DaggerStats]:
    """One DAgger episode per seed (``len(worlds)`` at a time, in lockstep), stored in seed order.

    Args:
        worlds: worlds with their expert (``make_world(env, expert=True)``), reused from episode to episode.
        seeds: episode seeds.
        policy: the policy's choice among each query's candidates (the world's ``valid_actions()``).
        beta: probability of executing the expert's action at each step.
        version: the training step of the policy's weights (>= 1), recorded in the provenance.
        history_steps: past (obs, executed action) steps in the policy's query.
        rng_seed: with each episode's seed, seeds its coin flips (the rollout actor passes its index).
    """
    if not worlds:
        raise ValueError("need at least one world")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    start = time.perf_counter()
    seeds = [int(s) for s in seeds]
    done: dict[int, _Slot] = {}
    slots: list[_Slot | None] = [None] * len(worlds)
    pending = iter(seeds)

    def refill(k: int) -> None:
        seed = next(pending, None)
        if seed is None:
            slots[k] = None
            return
        obs, mission = worlds[k].reset(seed)
        rngs = np.random.default_rng([rng_seed, seed]), np.random.default_rng([rng_seed, seed, 1])
        slots[k] = _Slot(seed, mission, *rngs, [obs], [], [])

    def finish(k: int) -> None:
        slot, world = slots[k], worlds[k]
        slot.success = world.done and world.success  # read before the world is reset for the next seed
        done[slot.seed] = slot
        refill(k)

    for k in range(len(worlds)):
        refill(k)
    while any(s is not None for s in slots):
        live = [k for k, s in enumerate(slots) if s is not None]
        labels: dict[int, str] = {}
        for k in live:
            try:
                labels[k] = worlds[k].expert_action()
            except ExpertUnavailable:
                slots[k].gave_up = True
        for k in [k for k in live if k not in labels]:
            finish(k)  # the expert cannot label this state: the episode ends here
        live = [k for k in live if k in labels]
        by_policy = [k for k in live if slots[k].rng.random() >= beta]  # one draw per step and episode
        chosen = {k: labels[k] for k in live}
        policy_set = set(by_policy)
        if by_policy:
            queries = []
            for k in by_policy:
                s = slots[k]
                past = list(zip(s.observations[:-1], s.executed, strict=True))
                history = tuple(past[len(past) - history_steps :]) if history_steps else ()
                queries.append(PolicyQuery(s.mission, history, s.observations[-1]))
            actions = policy(queries, [worlds[k].valid_actions() for k in by_policy],
                             [slots[k].act_rng for k in by_policy])  # fmt: skip
            chosen.update(zip(by_policy, actions, strict=True))
        for k in live:
            s, world = slots[k], worlds[k]
            obs, reward, _, _ = world.step(chosen[k])
            s.labels.append(labels[k])
            s.executed.append(chosen[k])
            s.by_policy.append(k in policy_set)
            s.observations.append(obs)
            s.reward = reward
            if world.done:
                finish(k)
    out, kept, succeeded, gave_up, steps, by_policy_total = [], 0, 0, 0, 0, 0
    for seed in seeds:
        s = done[seed]
        gave_up += s.gave_up
        steps += len(s.labels)
        if not s.labels:
            continue
        kept += 1
        by_policy_total += sum(s.by_policy)
        succeeded += s.success
        out += _segments(s, worlds[0].level, int(version), float(beta))
    stats = DaggerStats(len(seeds), kept, len(out), succeeded, gave_up, steps, by_policy_total,
                        time.perf_counter() - start)  # fmt: skip
    return out, stats


def _segments(s: _Slot, level: str, version: int, beta: float) -> list[Trajectory]:
    """The episode in ``s`` as trajectories whose every ``obs_t, act_t, obs_t+1`` is a transition of the world: cut
    after each step whose executed action is not its label (that step keeps its label and no next observation)."""
    n = len(s.labels)
    cuts = [t + 1 for t in range(n) if s.executed[t] != s.labels[t]]
    bounds = [0] + [c for c in cuts if c < n] + [n]
    out = []
    for index, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        last = hi == n
        # A segment ends in the observation after its last step when that step's label was executed (or at the
        # episode's end, where the final observation follows the executed action: kept only if it was the label).
        end = hi + 1 if s.executed[hi - 1] == s.labels[hi - 1] else hi
        executed = s.executed[lo:hi]
        policy_actions = sum(s.by_policy[lo:hi])  # steps of this segment that executed the policy's choice
        meta = {"num_steps": hi - lo, "reward": round(s.reward, 4) if last else 0.0, "executed": list(executed),
                "segment": index, "episode_steps": n}  # fmt: skip
        provenance = Provenance("on_policy", version, beta, policy_actions)
        out.append(Trajectory.from_steps(s.mission, level, s.seed, s.observations[lo:end], s.labels[lo:hi],
                                         s.success and last, meta=meta, provenance=provenance))  # fmt: skip
    return out
