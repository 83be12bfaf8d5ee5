"""The model as a policy, and the evaluation protocol shared by every training mode (no Ray here).

One query layout serves acting, action NLL and world-model NLL (``encode_units`` does the encoding)::

    mission, (obs, act) x history_steps, obs_t, [act_t masked]            action query / policy
    mission, (obs, act) x history_steps, obs_t, act_t, [obs_t+1 masked]   world-model query

``ActionScorer`` runs one bidirectional forward over a batch of action queries and scores every valid
action by the summed log-probability of its tokens at the masked positions; ``act`` takes the argmax.
``run_episodes`` steps many environments in lockstep so each step of all live episodes costs one forward.
``heldout_nll`` evaluates both NLLs on fixed bot trajectories with the same windows.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from anyorder_ray.masking import UnitRole
from anyorder_ray.trajectory import Trajectory, Unit
from anyorder_ray.transform import IGNORE_INDEX, EncodedExample, UnitEncoder, collate, encode_units

__all__ = [
    "ActionScorer",
    "EpisodeResult",
    "EpisodeStats",
    "NLLStats",
    "PolicyQuery",
    "eval_metrics",
    "heldout_nll",
    "run_episodes",
    "wilson_interval",
]

_V, _T, _D = UnitRole.VISIBLE, UnitRole.TARGET, UnitRole.DROPPED


@dataclass(frozen=True, slots=True)
class PolicyQuery:
    """What the policy sees before acting at step t.

    Attributes:
        mission: the goal text.
        history: past ``(obs, act)`` text pairs, oldest first; the scorer keeps only the last
            ``history_steps`` of them.
        obs: the current observation text (obs_t).
    """

    mission: str
    history: tuple[tuple[str, str], ...]
    obs: str


def _query_units(history: Sequence[tuple[str, str]], obs: str, tail: Sequence[tuple[str, str]]) -> list[Unit]:
    """``history`` pairs, then ``obs``, then ``tail`` (kind, text) units, numbered as one trajectory."""
    units: list[Unit] = []
    for step, (o, a) in enumerate(history):
        units += [Unit("obs", o, step), Unit("act", a, step)]
    step = len(history)
    units.append(Unit("obs", obs, step))
    for kind, text in tail:
        if kind == "obs":
            step += 1
        units.append(Unit(kind, text, step))  # type: ignore[arg-type]
    return units


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _pad_id(encoder: UnitEncoder) -> int:
    # Padding is removed by the attention mask, so any id works; prefer the tokenizer's own.
    tok = encoder.tokenizer
    for tid in (tok.pad_token_id, tok.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluation needs eval mode (no dropout); restore the caller's mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _target_log_probs(model: nn.Module, examples: Sequence[EncodedExample], pad_id: int) -> list[torch.Tensor]:
    """One forward over ``examples``; per example, the log-softmax ``[n_targets, V]`` at its target positions.

    Only the target rows get a log-softmax (a query has a handful among hundreds of positions).
    """
    batch = collate(examples, pad_id)
    device = _model_device(model)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    is_target = (batch["labels"] != IGNORE_INDEX).to(device)
    rows = torch.log_softmax(logits[is_target].float(), dim=-1)  # [sum n_targets, V], row-major order
    counts = [e.num_targets for e in examples]
    return list(torch.split(rows, counts))


class ActionScorer:
    """Scores every valid action of a batch of policy queries with one forward pass (per action length).

    Each query is encoded as mission + the last ``history_steps`` steps + the current observation (visible)
    + a next-action unit (target). The target unit's tokens are mask tokens whatever text it holds, so a
    placeholder of the right token length stands in for it. An action's score is the sum of the log-softmax
    of its tokens at the masked positions. Actions whose texts tokenize to different lengths are grouped by
    length (one forward per distinct length); with the world tokenizer every action is one token.

    Args:
        encoder: the cached ``UnitEncoder`` of the model's tokenizer.
        action_names: the valid actions, as unit texts.
        history_steps: past (obs, act) steps kept in a query (>= 0).
        max_length: token budget per query; older steps are cropped by ``encode_units`` beyond it.
    """

    def __init__(self, encoder: UnitEncoder, action_names: Sequence[str], history_steps: int, max_length: int) -> None:
        if not action_names:
            raise ValueError("action_names is empty")
        if len(set(action_names)) != len(action_names):
            raise ValueError(f"action_names has duplicates: {list(action_names)}")
        if history_steps < 0:
            raise ValueError(f"history_steps must be >= 0, got {history_steps}")
        self.encoder = encoder
        self.action_names = tuple(action_names)
        self.history_steps = int(history_steps)
        self.max_length = int(max_length)
        self.pad_id = _pad_id(encoder)
        # length -> (action indices, their token ids [n_actions, length]); the placeholder is any member.
        groups: dict[int, list[int]] = {}
        token_ids = [encoder.encode_text(name) for name in self.action_names]  # raises on unknown words
        for i, ids in enumerate(token_ids):
            groups.setdefault(len(ids), []).append(i)
        self._groups = {
            n: (torch.tensor(idx), torch.tensor([token_ids[i] for i in idx], dtype=torch.long))
            for n, idx in sorted(groups.items())
        }

    @property
    def num_forwards(self) -> int:
        """Forward passes per ``log_probs`` call (distinct token lengths among the actions)."""
        return len(self._groups)

    def encode(self, query: PolicyQuery, placeholder: str | None = None) -> EncodedExample:
        """The encoded action query (target = next action, written as ``placeholder``)."""
        history = query.history[len(query.history) - self.history_steps :] if self.history_steps else ()
        units = _query_units(history, query.obs, [("act", placeholder or self.action_names[0])])
        roles = [_V] * (len(units) - 1) + [_T]
        return encode_units(query.mission, units, roles, self.encoder, self.max_length)

    def log_probs(self, model: nn.Module, queries: Sequence[PolicyQuery]) -> torch.Tensor:
        """``[len(queries), len(action_names)]`` log-probabilities (each <= 0), on the CPU, fp32."""
        if not queries:
            return torch.empty((0, len(self.action_names)))
        out = torch.empty((len(queries), len(self.action_names)))
        with _eval_mode(model):
            for n, (idx, cand) in self._groups.items():
                placeholder = self.action_names[int(idx[0])]
                examples = [self.encode(q, placeholder) for q in queries]
                per_query = _target_log_probs(model, examples, self.pad_id)
                lp = torch.stack(per_query).cpu()  # [B, n, V]: every query has exactly n targets
                # score[b, a] = sum_j lp[b, j, cand[a, j]]
                gathered = lp[:, torch.arange(n)[None, :], cand]  # [B, A_g, n]
                out[:, idx] = gathered.sum(-1)
        return out

    def act(self, model: nn.Module, queries: Sequence[PolicyQuery]) -> list[str]:
        """The highest-scoring action per query (ties: the first in ``action_names``)."""
        if not queries:
            return []
        best = self.log_probs(model, queries).argmax(dim=-1).tolist()
        return [self.action_names[i] for i in best]


# ---------------------------------------------------------------------------------------------------------
# Live episodes.


@dataclass(frozen=True, slots=True)
class EpisodeResult:
    """One policy episode: success is termination with positive reward; ``actions`` as taken."""

    seed: int
    success: bool
    length: int
    reward: float
    actions: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class EpisodeStats:
    """Outcome of ``run_episodes``; ``results`` are in the order of the seeds given."""

    successes: int
    episodes: int
    mean_length: float
    results: tuple[EpisodeResult, ...]
    seconds: float

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


def run_episodes(
    model: nn.Module,
    scorer: ActionScorer,
    level: str,
    seeds: Sequence[int],
    *,
    batch_envs: int,
    max_steps: int | None = None,
    encoding: str = "grid",
) -> EpisodeStats:
    """Play one episode per seed with ``scorer.act``, ``batch_envs`` environments in lockstep.

    Every lockstep step scores all live environments with one batched forward; a finished slot is refilled
    with the next seed. ``batch_envs=1`` is the one-environment-at-a-time loop. Results do not depend on
    ``batch_envs`` for a model whose per-sequence output does not depend on the rest of the batch.
    """
    from envs.babyai import BabyAIWorld  # the env stack is heavy; only needed here

    if batch_envs < 1:
        raise ValueError(f"batch_envs must be >= 1, got {batch_envs}")
    seeds = [int(s) for s in seeds]
    start = time.perf_counter()
    results: list[EpisodeResult | None] = [None] * len(seeds)
    worlds = [
        BabyAIWorld(level, max_steps=max_steps, encoding=encoding, expert=False)
        for _ in range(min(batch_envs, len(seeds)))
    ]
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
        slots[k] = _Slot(next_seed, seeds[next_seed], mission, obs, deque(maxlen=keep), [])
        next_seed += 1

    for k in range(len(worlds)):
        refill(k)
    while True:
        live = [k for k, s in enumerate(slots) if s is not None]
        if not live:
            break
        queries = [PolicyQuery(slots[k].mission, tuple(slots[k].history), slots[k].obs) for k in live]
        actions = scorer.act(model, queries)
        for k, action in zip(live, actions, strict=True):
            slot, world = slots[k], worlds[k]
            res = world.step(action)
            if keep:
                slot.history.append((slot.obs, action))
            slot.obs = res.obs
            slot.actions.append(action)
            if world.done:
                success = bool(res.terminated and res.reward > 0)
                results[slot.index] = EpisodeResult(
                    slot.seed, success, world.num_steps, float(res.reward), tuple(slot.actions)
                )
                refill(k)
    done = tuple(r for r in results if r is not None)
    n = len(done)
    return EpisodeStats(
        successes=sum(r.success for r in done),
        episodes=n,
        mean_length=sum(r.length for r in done) / n if n else 0.0,
        results=done,
        seconds=time.perf_counter() - start,
    )


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; ``(0.0, 1.0)`` when ``n == 0``."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


# ---------------------------------------------------------------------------------------------------------
# Held-out NLL.


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
    trajectory: Trajectory, encoder: UnitEncoder, history_steps: int, max_length: int
) -> tuple[list[EncodedExample], list[EncodedExample]]:
    """The (world-model, action) queries of every step t of ``trajectory``, in the scorer's window.

    World model: history + obs_t + act_t visible, obs_{t+1} masked, nothing after it.
    Action: history + obs_t visible, act_t masked (exactly the policy's query, with the true action).
    """
    obs, acts = trajectory.observations, trajectory.actions
    world, action = [], []
    for t in range(len(acts)):
        lo = max(0, t - history_steps)
        history = list(zip(obs[lo:t], acts[lo:t], strict=True))
        a_units = _query_units(history, obs[t], [("act", acts[t])])
        action.append(encode_units(trajectory.mission, a_units, [_V] * (len(a_units) - 1) + [_T], encoder, max_length))
        if t + 1 < len(obs):
            w_units = _query_units(history, obs[t], [("act", acts[t]), ("obs", obs[t + 1])])
            world.append(
                encode_units(trajectory.mission, w_units, [_V] * (len(w_units) - 1) + [_T], encoder, max_length)
            )
    return world, action


def _nll_sum(model: nn.Module, examples: list[EncodedExample], pad_id: int, batch_size: int) -> tuple[float, int]:
    """Summed NLL of all target tokens and their count; batches sorted by length to keep padding low."""
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    for s in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[s : s + batch_size]]
        rows = torch.cat(_target_log_probs(model, chunk, pad_id))  # [n_targets, V]
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
) -> NLLStats:
    """World-model and action NLL per token over every step of ``trajectories`` (see ``nll_queries``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    world: list[EncodedExample] = []
    action: list[EncodedExample] = []
    for traj in trajectories:
        w, a = nll_queries(traj, encoder, history_steps, max_length)
        world += w
        action += a
    pad_id = _pad_id(encoder)
    with _eval_mode(model):
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


def eval_metrics(episodes: EpisodeStats, nll: NLLStats | None, step: int, seconds: float) -> dict[str, float]:
    """The ``eval/...`` metrics of one evaluation (NLL entries are NaN when ``nll`` is None)."""
    low, high = wilson_interval(episodes.successes, episodes.episodes)
    return {
        "eval/success_rate": episodes.success_rate,
        "eval/success_low": low,
        "eval/success_high": high,
        "eval/episodes": float(episodes.episodes),
        "eval/mean_episode_length": episodes.mean_length,
        "eval/episodes_per_s": episodes.episodes_per_s,
        "eval/world_model_nll": nll.world_model_nll if nll is not None else float("nan"),
        "eval/world_model_nll_per_obs": nll.world_model_nll_per_obs if nll is not None else float("nan"),
        "eval/action_nll": nll.action_nll if nll is not None else float("nan"),
        "eval/seconds": float(seconds),
        "eval/step": float(step),
    }
