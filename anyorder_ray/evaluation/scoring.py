"""The model as a policy: ``ActionScorer`` scores every valid action of a batch of queries in one forward pass.

One query layout serves acting, action NLL and world-model NLL (``encode_query`` does the encoding, in the layout the
arm trained with: ``sequence`` or ``block``)::

    mission, (obs, act) x history_steps, obs_t, [act_t masked]            action query / policy
    mission, (obs, act) x history_steps, obs_t, act_t, [obs_t+1 masked]   world-model query

An action's score is the summed log-probability of its tokens at the masked positions; ``act`` takes the argmax.
The same scorer serves the eval actor, training-time checks and the tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

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
from envs.trajectory import Unit

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

    def __init__(
        self,
        encoder: UnitEncoder,
        action_names: Sequence[str],
        history_steps: int,
        max_length: int,
        layout: str = "sequence",
    ) -> None:
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
        self.layout = layout
        self.pad_id = pad_id_of(encoder)
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
        units = query_units(history, query.obs, [("act", placeholder or self.action_names[0])])
        return encode_query(query.mission, units, self.encoder, self.max_length, self.layout)

    def log_probs(self, model: nn.Module, queries: Sequence[PolicyQuery]) -> torch.Tensor:
        """``[len(queries), len(action_names)]`` log-probabilities (each <= 0), on the CPU, fp32."""
        if not queries:
            return torch.empty((0, len(self.action_names)))
        out = torch.empty((len(queries), len(self.action_names)))
        with eval_mode(model):
            for n, (idx, cand) in self._groups.items():
                placeholder = self.action_names[int(idx[0])]
                examples = [self.encode(q, placeholder) for q in queries]
                per_query = target_log_probs(model, examples, self.pad_id)
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
