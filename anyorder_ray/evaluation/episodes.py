"""Live episodes: the policy plays many worlds in lockstep, so each step of all live episodes costs one forward."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from anyorder_ray.evaluation.proposer import gumbel_top_k
from anyorder_ray.evaluation.scoring import ActionScorer, PolicyQuery
from envs.base import World

__all__ = ["EpisodeResult", "EpisodeStats", "choose_actions", "run_episodes", "sample_action"]


@dataclass(frozen=True, slots=True)
class EpisodeResult:
    """One policy episode: ``success`` is the world's own success check; ``actions`` as taken, ``observations`` as
    met (``obs_0`` .. the one after the last action: one more than ``actions``), so every ``obs_t, actions[t],
    obs_{t+1}`` is an on-policy transition of the weights that played."""

    seed: int
    success: bool
    length: int
    reward: float
    actions: tuple[str, ...]
    mission: str = ""
    observations: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EpisodeStats:
    """Outcome of ``run_episodes``; ``results`` are in the order of the seeds given."""

    successes: int
    episodes: int
    mean_length: float
    results: tuple[EpisodeResult, ...]
    seconds: float
    temperature: float = 0.0
    """How the actions were picked (``run_episodes``' ``temperature``: 0 greedy, > 0 sampled)."""

    @property
    def success_rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0

    @property
    def episodes_per_s(self) -> float:
        return self.episodes / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class _Slot:
    """Mutable per-environment episode state inside ``run_episodes``."""

    index: int
    seed: int
    mission: str
    obs: str
    history: deque
    actions: list[str]
    observations: list[str]
    rng: np.random.Generator | None


def sample_action(
    candidates: Sequence[str], scores: Sequence[float], temperature: float, rng: np.random.Generator
) -> str:
    """One draw from ``softmax(scores / temperature)`` over ``candidates`` (``gumbel_top_k`` with ``k = 1``: the
    argmax of ``score / temperature`` plus one Gumbel noise per candidate)."""
    return gumbel_top_k(candidates, scores, temperature, 1, rng)[0]


def choose_actions(
    scorer: ActionScorer,
    model: nn.Module,
    queries: Sequence[PolicyQuery],
    candidates: Sequence[Sequence[str]],
    temperature: float,
    rngs: Sequence[np.random.Generator | None],
) -> list[str]:
    """The policy's action for each query among its candidates: the argmax (``scorer.act``) at temperature 0, else a
    draw of ``sample_action`` from each query's own generator (``rngs``, one per query)."""
    if temperature == 0:
        return scorer.act(model, queries, candidates)
    scores = scorer.score(model, queries, candidates)
    return [sample_action(c, s.tolist(), temperature, rng) for c, s, rng in zip(candidates, scores, rngs, strict=True)]


def run_episodes(
    model: nn.Module,
    scorer: ActionScorer,
    make_world: Callable[[], World],
    seeds: Sequence[int],
    *,
    batch_envs: int,
    temperature: float = 0.0,
) -> EpisodeStats:
    """Play one episode per seed, ``batch_envs`` worlds in lockstep.

    ``temperature`` 0 plays the policy's greedy action (``scorer.act``: the argmax, ties to the first candidate);
    ``temperature > 0`` samples each action from ``softmax(score / temperature)`` over the candidates, with a generator
    seeded by the episode's seed, so an episode is the same whatever ``batch_envs`` and the other seeds are.

    At every step each live world's ``valid_actions()`` are its query's candidates (a fixed-action world such as
    BabyAI gives its whole action set; TextWorld the commands its current state admits).

    ``make_world`` builds one world (e.g. ``lambda: envs.make_world(env_cfg, expert=False)``); ``min(batch_envs,
    len(seeds))`` are built. Every lockstep step scores all live worlds with one batched forward per candidate token
    length; a finished slot is refilled with the next seed. ``batch_envs=1`` is the one-world-at-a-time loop. Results
    do not depend on ``batch_envs`` for a model whose per-sequence output does not depend on the rest of the batch.
    """
    if batch_envs < 1:
        raise ValueError(f"batch_envs must be >= 1, got {batch_envs}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    seeds = [int(s) for s in seeds]
    start = time.perf_counter()
    results: list[EpisodeResult | None] = [None] * len(seeds)
    worlds = [make_world() for _ in range(min(batch_envs, len(seeds)))]
    # The policy sees at most history_steps past steps: keep no more than that.
    keep = max(scorer.history_steps, 0)
    slots: list[_Slot | None] = [None] * len(worlds)
    next_seed = 0

    def refill(k: int) -> None:
        nonlocal next_seed
        if next_seed >= len(seeds):
            slots[k] = None
            return
        obs, mission = worlds[k].reset(seeds[next_seed])
        rng = np.random.default_rng(seeds[next_seed]) if temperature > 0 else None
        slots[k] = _Slot(next_seed, seeds[next_seed], mission, obs, deque(maxlen=keep), [], [obs], rng)
        next_seed += 1

    for k in range(len(worlds)):
        refill(k)
    while True:
        live = [k for k, s in enumerate(slots) if s is not None]
        if not live:
            break
        queries = [PolicyQuery(slots[k].mission, tuple(slots[k].history), slots[k].obs) for k in live]
        candidates = [worlds[k].valid_actions() for k in live]
        actions = choose_actions(scorer, model, queries, candidates, temperature, [slots[k].rng for k in live])
        for k, action in zip(live, actions, strict=True):
            slot, world = slots[k], worlds[k]
            res = world.step(action)
            if keep:
                slot.history.append((slot.obs, action))
            slot.obs = res.obs
            slot.actions.append(action)
            slot.observations.append(res.obs)
            if world.done:
                results[slot.index] = EpisodeResult(
                    slot.seed, world.success, world.num_steps, float(res.reward), tuple(slot.actions), slot.mission,
                    tuple(slot.observations),
                )  # fmt: skip
                refill(k)
    done = tuple(r for r in results if r is not None)
    n = len(done)
    return EpisodeStats(
        successes=sum(r.success for r in done),
        episodes=n,
        mean_length=sum(r.length for r in done) / n if n else 0.0,
        results=done,
        seconds=time.perf_counter() - start,
        temperature=float(temperature),
    )
