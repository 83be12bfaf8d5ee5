"""The model as a policy: ``ActionScorer`` scores the candidate actions of a batch of queries, one forward pass per
candidate token length.

One query layout serves acting, action NLL and world-model NLL (``encode_query`` does the encoding, in the layout the
arm trained with: ``sequence`` or ``block``)::

    mission, (obs, act) x history_steps, obs_t, [act_t masked]            action query / policy
    mission, (obs, act) x history_steps, obs_t, act_t, [obs_t+1 masked]   world-model query

An action's score is the summed log-probability of its tokens at the masked positions (all masked at once: a product
of marginals); ``act`` takes the argmax. Candidates are a world's fixed action set or each state's ``valid_actions()``.
The same scorer serves the eval actor, training-time checks and the tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from anyorder_ray.data.encoding import (
    EncodedExample,
    UnitEncoder,
    collate,
    encode_blocks,
    encode_units,
    target_logits,
)
from anyorder_ray.data.masking import UnitRole
from anyorder_ray.training.budget import forward_flops
from envs.trajectory import Trajectory, Unit

__all__ = ["ActionScorer", "PolicyQuery", "encode_query", "query_units"]

_V, _T = UnitRole.VISIBLE, UnitRole.TARGET


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

    @classmethod
    def at(cls, trajectory: Trajectory, t: int) -> PolicyQuery:
        """The query at state ``obs_t`` of a recorded ``trajectory``: its steps before ``t`` as history (the scorer
        keeps the last ``history_steps`` of them), ``obs_t`` as the current observation."""
        observations, actions = trajectory.observations, trajectory.actions
        return cls(trajectory.mission, tuple(zip(observations[:t], actions[:t], strict=True)), observations[t])


def query_units(history: Sequence[tuple[str, str]], obs: str, tail: Sequence[tuple[str, str]]) -> list[Unit]:
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


def encode_query(
    mission: str, units: Sequence[Unit], encoder: UnitEncoder, max_length: int, layout: str = "sequence"
) -> EncodedExample:
    """The query "``units[:-1]`` visible, ``units[-1]`` masked" in ``layout`` (the layout the model trained with)."""
    if layout == "block":
        return encode_blocks(mission, units, [len(units) - 1], encoder, max_length)
    if layout != "sequence":
        raise ValueError(f"layout must be 'sequence' or 'block', got {layout!r}")
    return encode_units(mission, units, [_V] * (len(units) - 1) + [_T], encoder, max_length)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def pad_id_of(encoder: UnitEncoder) -> int:
    # Padding is removed by the attention mask, so any id works; prefer the tokenizer's own.
    tok = encoder.tokenizer
    for tid in (tok.pad_token_id, tok.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluation needs eval mode (no dropout); restore the caller's mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def target_log_probs(model: nn.Module, examples: Sequence[EncodedExample], pad_id: int) -> list[torch.Tensor]:
    """One forward over ``examples``; per example, the log-softmax ``[n_targets, V]`` at its target positions.

    Only the target rows get a log-softmax (a query has a handful among hundreds of positions).
    """
    batch = collate(examples, pad_id)
    device = model_device(model)
    rows = torch.log_softmax(target_logits(model, batch, device).float(), dim=-1)  # [sum n_targets, V], row-major
    counts = [e.num_targets for e in examples]
    return list(torch.split(rows, counts))


class ActionScorer:
    """Scores candidate actions of a batch of policy queries: one forward pass per candidate token length.

    Each query is encoded as mission + the last ``history_steps`` steps + the current observation (visible)
    + a next-action unit (target). The target unit's tokens are mask tokens whatever text it holds, so any candidate
    of the right token length stands in for it: the queries that have a candidate of length ``n`` are encoded once
    with an ``n``-token target and run in one forward, and every candidate of that length is read off it.

    A candidate's score is the sum of the log-softmax of its tokens at the masked positions, all of them masked at
    once: a product of per-position marginals, not the chain rule's joint probability (which would take one forward
    per token and candidate). It is exactly the action-NLL query of ``nll.py`` with that candidate as the true action,
    so the action NLL of a command is minus its score. ``act`` takes the argmax (ties: the first candidate).

    Candidates are either a world's fixed action set (``action_names``: BabyAI's seven one-token actions, the same
    for every query) or each query's own list (``valid_actions()`` of its world: TextWorld's admissible commands,
    of 1-6 world tokens, different in every state), passed to ``score`` / ``act``.

    Args:
        encoder: the cached ``UnitEncoder`` of the model's tokenizer.
        action_names: the world's fixed action set, as unit texts; empty for a world without one (then every call
            names each query's candidates).
        history_steps: past (obs, act) steps kept in a query (>= 0).
        max_length: token budget per query; older steps are cropped by ``encode_units`` beyond it.
        layout: the layout the model trained with (``sequence`` or ``block``).
        count_flops: the model's config (``LLaDA2MoeConfig``): add the matmul FLOPs of every forward to ``flops``
            (``training.budget.forward_flops``: real tokens, the LM head at the masked positions, as it runs).
    """

    def __init__(
        self,
        encoder: UnitEncoder,
        action_names: Sequence[str],
        history_steps: int,
        max_length: int,
        layout: str = "sequence",
        count_flops: Any = None,
    ) -> None:
        if len(set(action_names)) != len(action_names):
            raise ValueError(f"action_names has duplicates: {list(action_names)}")
        if history_steps < 0:
            raise ValueError(f"history_steps must be >= 0, got {history_steps}")
        self.encoder = encoder
        self.action_names = tuple(action_names)
        self.history_steps = int(history_steps)
        self.max_length = int(max_length)
        self.layout = layout
        self.pad_id = pad_id_of(encoder)
        self.count_flops = count_flops
        self.flops = 0.0
        """Model FLOPs of the forwards run so far (with ``count_flops``)."""
        for name in self.action_names:
            encoder.encode_text(name)  # raises on unknown words now rather than at the first query

    @property
    def num_forwards(self) -> int:
        """Forward passes per ``log_probs`` call: the distinct token lengths of the fixed action set."""
        return len({len(self.encoder.encode_text(name)) for name in self._fixed_set()})

    def _fixed_set(self) -> tuple[str, ...]:
        if not self.action_names:
            raise ValueError(
                "this scorer has no fixed action set (the world's action_names is empty): pass each query's "
                "candidates, e.g. world.valid_actions()"
            )
        return self.action_names

    def encode(self, query: PolicyQuery, placeholder: str | None = None) -> EncodedExample:
        """The encoded action query (target = next action, written as ``placeholder``: the first fixed action when
        None; only its token length matters)."""
        history = query.history[len(query.history) - self.history_steps :] if self.history_steps else ()
        units = query_units(history, query.obs, [("act", placeholder or self._fixed_set()[0])])
        return encode_query(query.mission, units, self.encoder, self.max_length, self.layout)

    def score(
        self, model: nn.Module, queries: Sequence[PolicyQuery], candidates: Sequence[Sequence[str]]
    ) -> list[torch.Tensor]:
        """Per query, the summed log-probability of each of its ``candidates`` (1-D fp32 on the CPU, each <= 0, in
        the order given).

        Candidates are grouped by token length; each group is one forward over the queries that have a candidate of
        that length (a query's placeholder is its first candidate of the length), and one gather reads every
        candidate of the group off it. A query's scores do not depend on the other queries of the batch (up to the
        model's own batch invariance).
        """
        if len(candidates) != len(queries):
            raise ValueError(f"need one candidate list per query, got {len(candidates)} for {len(queries)} queries")
        token_ids = [[self.encoder.encode_text(c) for c in cands] for cands in candidates]  # raises on unknown words
        out = [[0.0] * len(cands) for cands in candidates]
        # length -> (query, candidate) pairs in query order, then candidate order
        groups: dict[int, list[tuple[int, int]]] = {}
        for q, ids in enumerate(token_ids):
            if not ids:
                raise ValueError(f"query {q} has no candidate actions")
            for c, toks in enumerate(ids):
                groups.setdefault(len(toks), []).append((q, c))
        with eval_mode(model):
            for n, pairs in sorted(groups.items()):
                rows: dict[int, int] = {}  # query -> its row in this group's batch
                examples = []
                for q, c in pairs:
                    if q not in rows:
                        rows[q] = len(examples)
                        examples.append(self.encode(queries[q], candidates[q][c]))
                lp = torch.stack(target_log_probs(model, examples, self.pad_id)).cpu()  # [B_n, n, V]
                if self.count_flops is not None:
                    lengths = [len(e) for e in examples]
                    self.flops += forward_flops(self.count_flops, lengths, sum(e.num_targets for e in examples))
                row = torch.tensor([rows[q] for q, _ in pairs])
                cand = torch.tensor([token_ids[q][c] for q, c in pairs], dtype=torch.long)  # [P, n]
                # score[p] = sum_j lp[row[p], j, cand[p, j]]
                scores = lp[row[:, None], torch.arange(n)[None, :], cand].sum(-1)  # [P]
                for (q, c), value in zip(pairs, scores.tolist(), strict=True):
                    out[q][c] = value  # fp32 -> Python float -> fp32 below: exact
        return [torch.tensor(values, dtype=torch.float32) for values in out]

    def log_probs(self, model: nn.Module, queries: Sequence[PolicyQuery]) -> torch.Tensor:
        """``[len(queries), len(action_names)]`` log-probabilities of the fixed action set (``score`` with it as
        every query's candidates), on the CPU, fp32."""
        names = self._fixed_set()
        if not queries:
            return torch.empty((0, len(names)))
        return torch.stack(self.score(model, queries, [names] * len(queries)))

    def act(
        self, model: nn.Module, queries: Sequence[PolicyQuery], candidates: Sequence[Sequence[str]] | None = None
    ) -> list[str]:
        """The highest-scoring candidate per query (ties: the first); ``candidates`` default to the fixed set."""
        if not queries:
            return []
        if candidates is None:
            candidates = [self._fixed_set()] * len(queries)
        scores = self.score(model, queries, candidates)
        return [cands[int(s.argmax())] for cands, s in zip(candidates, scores, strict=True)]
