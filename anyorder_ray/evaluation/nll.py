"""Held-out NLL and exact match: the world-model and action queries of fixed trajectories, in the policy's window (the
same encoder and query layout as ``ActionScorer``).

Three transition sets share one protocol (``world_model_query``: history + obs_t + act_t visible, obs_{t+1} masked):

- the held-out expert trajectories (``heldout_nll``): every step's world-model query, every expert label's action query;
- off-expert branches (``heldout_nll(..., last_only=True)`` on ``envs.branches`` trajectories): only the branch's last
  transition, ``obs_t`` + an alternative action -> the observation it led to (the earlier steps are expert ones, and the
  last action is no label, so it has no action query);
- on-policy transitions (``transition_nll`` on ``Transition``s of live episodes): the executed actions, whatever chose
  them.

Exact match is read off the same forward as the NLL: a query is an exact match iff the argmax at every masked position
of the observation is its true token (one greedy pass, no iterative unmasking). The observation encodings are lossless,
so an exact match is the whole next observation right.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from anyorder_ray.data.encoding import IGNORE_INDEX, EncodedExample, UnitEncoder
from anyorder_ray.evaluation.scoring import encode_query, eval_mode, pad_id_of, query_units, target_log_probs
from envs.trajectory import Trajectory

__all__ = ["NLLStats", "Transition", "heldout_nll", "nll_queries", "transition_nll", "world_model_query"]


@dataclass(frozen=True, slots=True)
class NLLStats:
    """Token-mean NLLs (nats) over a held-out query set, the world model's exact-match rate, and what they were
    averaged over.

    ``world_model_nll_per_obs`` is the summed NLL of a whole next observation (nats per observation): unlike the
    token mean it does not depend on how many tokens an observation encoding uses, so it compares encodings.
    ``world_model_exact`` is the fraction of world-model queries whose greedy one-pass reconstruction (argmax at every
    masked position, from the forward that gives the NLL) is the whole observation, token for token.
    A set without action queries (off-expert branches, on-policy transitions) has ``action_nll`` NaN.
    """

    world_model_nll: float
    action_nll: float
    world_model_tokens: int
    action_tokens: int
    queries: int
    seconds: float
    world_model_nll_per_obs: float = float("nan")
    world_model_exact: float = float("nan")


@dataclass(frozen=True, slots=True)
class Transition:
    """One step ``obs_t, act_t -> obs_{t+1}`` of an episode, with the steps before it (its query's history).

    ``observations`` are ``obs_0 .. obs_{t+1}`` and ``actions`` ``act_0 .. act_t`` (the executed ones, which need not
    be an expert's); only the last ``history_steps`` earlier steps reach the query.
    """

    mission: str
    observations: tuple[str, ...]
    actions: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.actions or len(self.observations) != len(self.actions) + 1:
            raise ValueError(
                f"a transition needs one observation more than its actions (>= 1), got {len(self.observations)} "
                f"and {len(self.actions)}"
            )


def world_model_query(
    mission: str,
    observations: Sequence[str],
    actions: Sequence[str],
    t: int,
    encoder: UnitEncoder,
    history_steps: int,
    max_length: int,
    layout: str = "sequence",
) -> EncodedExample:
    """The world-model query of step ``t``: history + obs_t + act_t visible, obs_{t+1} masked, nothing after it."""
    lo = max(0, t - history_steps)
    history = list(zip(observations[lo:t], actions[lo:t], strict=True))
    units = query_units(history, observations[t], [("act", actions[t]), ("obs", observations[t + 1])])
    return encode_query(mission, units, encoder, max_length, layout)


def nll_queries(
    trajectory: Trajectory,
    encoder: UnitEncoder,
    history_steps: int,
    max_length: int,
    layout: str = "sequence",
    last_only: bool = False,
) -> tuple[list[EncodedExample], list[EncodedExample]]:
    """The (world-model, action) queries of every step t of ``trajectory`` (only its last one with ``last_only``), in
    the scorer's window.

    World model: history + obs_t + act_t visible, obs_{t+1} masked, nothing after it (``world_model_query``).
    Action: history + obs_t visible, act_t masked (exactly the policy's query, with the true action: the summed NLL of
    a multi-token command is minus ``ActionScorer``'s score of it); only where act_t is the expert's label
    (``Trajectory.labelled_actions``: not a branch's last action).
    """
    obs, acts = trajectory.observations, trajectory.actions
    labelled = trajectory.labelled_actions
    world, action = [], []
    steps = range(len(acts))
    for t in steps[-1:] if last_only else steps:
        if labelled[t]:
            lo = max(0, t - history_steps)
            history = list(zip(obs[lo:t], acts[lo:t], strict=True))
            a_units = query_units(history, obs[t], [("act", acts[t])])
            action.append(encode_query(trajectory.mission, a_units, encoder, max_length, layout))
        if t + 1 < len(obs):
            world.append(
                world_model_query(trajectory.mission, obs, acts, t, encoder, history_steps, max_length, layout)
            )
    return world, action


@dataclass(frozen=True, slots=True)
class _Sums:
    nll: float
    tokens: int
    exact: int


def _score(model: nn.Module, examples: list[EncodedExample], pad_id: int, batch_size: int) -> _Sums:
    """Summed NLL of all target tokens, their count, and the examples whose every target token is the argmax (one
    forward per batch gives all three); batches sorted by length to keep padding low."""
    total, count, exact = 0.0, 0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    for s in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[s : s + batch_size]]
        rows = torch.cat(target_log_probs(model, chunk, pad_id))  # [n_targets, V]
        labels = torch.tensor([y for e in chunk for y in e.labels if y != IGNORE_INDEX], device=rows.device)
        total -= float(rows.gather(1, labels[:, None]).sum())
        count += len(labels)
        hits = rows.argmax(-1) == labels
        exact += sum(bool(h.all()) for h in torch.split(hits, [e.num_targets for e in chunk]))
    return _Sums(total, count, exact)


def _stats(model: nn.Module, encoder: UnitEncoder, world: list[EncodedExample], action: list[EncodedExample],
           batch_size: int, start: float) -> NLLStats:  # fmt: skip
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad_id = pad_id_of(encoder)
    with eval_mode(model):
        w = _score(model, world, pad_id, batch_size)
        a = _score(model, action, pad_id, batch_size)
    nan = float("nan")
    return NLLStats(
        world_model_nll=w.nll / w.tokens if w.tokens else nan,
        action_nll=a.nll / a.tokens if a.tokens else nan,
        world_model_tokens=w.tokens,
        action_tokens=a.tokens,
        queries=len(world) + len(action),
        seconds=time.perf_counter() - start,
        world_model_nll_per_obs=w.nll / len(world) if world else nan,
        world_model_exact=w.exact / len(world) if world else nan,
    )


def heldout_nll(
    model: nn.Module,
    encoder: UnitEncoder,
    trajectories: Sequence[Trajectory],
    history_steps: int,
    max_length: int,
    batch_size: int = 64,
    layout: str = "sequence",
    last_only: bool = False,
) -> NLLStats:
    """World-model and action NLL per token, and world-model exact match, over every step of ``trajectories`` (only
    each one's last step with ``last_only``: the off-expert transition of a branch; see ``nll_queries``)."""
    start = time.perf_counter()
    world: list[EncodedExample] = []
    action: list[EncodedExample] = []
    for traj in trajectories:
        w, a = nll_queries(traj, encoder, history_steps, max_length, layout, last_only)
        world += w
        action += a
    return _stats(model, encoder, world, action, batch_size, start)


def transition_nll(
    model: nn.Module,
    encoder: UnitEncoder,
    transitions: Sequence[Transition],
    history_steps: int,
    max_length: int,
    batch_size: int = 64,
    layout: str = "sequence",
) -> NLLStats:
    """World-model NLL per token and per observation, and exact match, of each transition's last step (the action
    executed there, not an expert label: no action NLL, ``action_nll`` is NaN)."""
    start = time.perf_counter()
    world = [
        world_model_query(tr.mission, tr.observations, tr.actions, len(tr.actions) - 1, encoder, history_steps,
                          max_length, layout)
        for tr in transitions
    ]  # fmt: skip
    return _stats(model, encoder, world, [], batch_size, start)
