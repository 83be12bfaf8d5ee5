"""Held-out NLL: the world-model and action queries of every step of fixed expert trajectories, in the policy's
window (the same encoder and query layout as ``ActionScorer``)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from anyorder_ray.data.encoding import IGNORE_INDEX, EncodedExample, UnitEncoder
from anyorder_ray.evaluation.scoring import encode_query, eval_mode, pad_id_of, query_units, target_log_probs
from envs.trajectory import Trajectory

__all__ = ["NLLStats", "heldout_nll", "nll_queries"]


@dataclass(frozen=True, slots=True)
class NLLStats:
    """Token-mean NLLs (nats) over a held-out trajectory set, and what they were averaged over.

    ``world_model_nll_per_obs`` is the summed NLL of a whole next observation (nats per observation): unlike the
    token mean it does not depend on how many tokens an observation encoding uses, so it compares encodings.
    """

    world_model_nll: float
    action_nll: float
    world_model_tokens: int
    action_tokens: int
    queries: int
    seconds: float
    world_model_nll_per_obs: float = float("nan")


def nll_queries(
    trajectory: Trajectory, encoder: UnitEncoder, history_steps: int, max_length: int, layout: str = "sequence"
) -> tuple[list[EncodedExample], list[EncodedExample]]:
    """The (world-model, action) queries of every step t of ``trajectory``, in the scorer's window.

    World model: history + obs_t + act_t visible, obs_{t+1} masked, nothing after it.
    Action: history + obs_t visible, act_t masked (exactly the policy's query, with the true action: the summed NLL of
    a multi-token command is minus ``ActionScorer``'s score of it).
    """
    obs, acts = trajectory.observations, trajectory.actions
    world, action = [], []
    for t in range(len(acts)):
        lo = max(0, t - history_steps)
        history = list(zip(obs[lo:t], acts[lo:t], strict=True))
        a_units = query_units(history, obs[t], [("act", acts[t])])
        action.append(encode_query(trajectory.mission, a_units, encoder, max_length, layout))
        if t + 1 < len(obs):
            w_units = query_units(history, obs[t], [("act", acts[t]), ("obs", obs[t + 1])])
            world.append(encode_query(trajectory.mission, w_units, encoder, max_length, layout))
    return world, action


def _nll_sum(model: nn.Module, examples: list[EncodedExample], pad_id: int, batch_size: int) -> tuple[float, int]:
    """Summed NLL of all target tokens and their count; batches sorted by length to keep padding low."""
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    for s in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[s : s + batch_size]]
        rows = torch.cat(target_log_probs(model, chunk, pad_id))  # [n_targets, V]
        labels = torch.tensor([y for e in chunk for y in e.labels if y != IGNORE_INDEX], device=rows.device)
        total -= float(rows.gather(1, labels[:, None]).sum())
        count += len(labels)
    return total, count


def heldout_nll(
    model: nn.Module,
    encoder: UnitEncoder,
    trajectories: Sequence[Trajectory],
    history_steps: int,
    max_length: int,
    batch_size: int = 64,
    layout: str = "sequence",
) -> NLLStats:
    """World-model and action NLL per token over every step of ``trajectories`` (see ``nll_queries``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    world: list[EncodedExample] = []
    action: list[EncodedExample] = []
    for traj in trajectories:
        w, a = nll_queries(traj, encoder, history_steps, max_length, layout)
        world += w
        action += a
    pad_id = pad_id_of(encoder)
    with eval_mode(model):
        w_sum, w_n = _nll_sum(model, world, pad_id, batch_size)
        a_sum, a_n = _nll_sum(model, action, pad_id, batch_size)
    return NLLStats(
        world_model_nll=w_sum / w_n if w_n else float("nan"),
        action_nll=a_sum / a_n if a_n else float("nan"),
        world_model_tokens=w_n,
        action_tokens=a_n,
        queries=len(world) + len(action),
        seconds=time.perf_counter() - start,
        world_model_nll_per_obs=w_sum / len(world) if world else float("nan"),
    )
