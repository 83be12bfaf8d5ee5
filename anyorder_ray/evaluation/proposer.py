"""The policy as an early-experience proposer (``envs.branches.Proposer``): the alternatives tried from an expert state
are drawn from the policy's own distribution over the state's candidate actions, as in Zhang et al. 2025 ("Agent
Learning via Early Experience", which samples the alternatives from the policy at the expert states).

At state ``obs_t`` of an expert trajectory the policy is asked exactly as when it acts (``ActionScorer``: mission, the
last ``history_steps`` expert ``(obs, act)`` steps, ``obs_t``, the next action masked); each candidate (the state's
valid actions other than the expert's label) gets its score ``s`` (summed log-probability of its tokens). ``k``
distinct candidates are drawn without replacement, one after the other, each with probability proportional to
``exp(s / temperature)`` among those not drawn yet (Plackett-Luce), returned in draw order: the first is a draw of the
policy's distribution restricted to the candidates. The draw is a Gumbel top-k (``s / temperature`` plus one Gumbel
noise per candidate from the given generator, the ``k`` largest), so it is deterministic given the generator and the
weights. Temperature 1 is the policy's own distribution; towards 0 its ranking (the first alternative is the action
the policy would take if the label were not allowed); large: uniform.

No Ray here: the rollout actor (``roles.rollout``) builds one around its acting model and scorer, so the proposer's
forwards are counted in the scorer's ``flops`` like the acting ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from anyorder_ray.evaluation.scoring import ActionScorer, PolicyQuery
from envs.trajectory import Trajectory

__all__ = ["PolicyProposer", "gumbel_top_k"]


def gumbel_top_k(
    candidates: Sequence[str], scores: Sequence[float], temperature: float, k: int, rng: np.random.Generator
) -> list[str]:
    """``k`` distinct candidates drawn without replacement with probabilities ``softmax(scores / temperature)``
    (Plackett-Luce, in draw order): ``scores / temperature`` plus one Gumbel noise per candidate from ``rng``, the ``k``
    largest (ties: the first). With ``k = 1`` it is one draw from the tempered softmax."""
    keys = np.asarray(scores, dtype=np.float64) / temperature + rng.gumbel(size=len(candidates))
    order = np.argsort(-keys, kind="stable")[:k]
    return [candidates[int(i)] for i in order]


class PolicyProposer:
    """``(trajectory, t, candidates, k, rng) -> k distinct alternatives`` drawn from the policy's scores (module
    docstring); an ``envs.branches.Proposer``.

    ``prefetch(trajectory, steps)`` scores the world's fixed action set at all those states in one batched call
    (one forward per action token length) and the calls that follow for that trajectory read their scores from it:
    one forward per demo instead of one per state. Without it (or for candidates outside the fixed set, e.g.
    TextWorld's commands) each call scores its own candidates.

    Args:
        scorer: the policy's ``ActionScorer`` (the acting one: its ``flops`` count the proposer's forwards too).
        model: the policy's weights.
        temperature: divides the scores before the draw (> 0).
    """

    def __init__(self, scorer: ActionScorer, model: nn.Module, temperature: float = 1.0) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.scorer = scorer
        self.model = model
        self.temperature = float(temperature)
        self._prefetched: tuple[Trajectory, dict[int, torch.Tensor]] | None = None
        self._index = {name: i for i, name in enumerate(scorer.action_names)}

    def prefetch(self, trajectory: Trajectory, steps: Sequence[int]) -> None:
        """Score the fixed action set at the states ``steps`` of ``trajectory`` at once (nothing for a world without
        a fixed action set); replaces the previous trajectory's scores."""
        steps = [int(t) for t in steps]
        if not self.scorer.action_names or not steps:
            self._prefetched = None
            return
        rows = self.scorer.log_probs(self.model, [PolicyQuery.at(trajectory, t) for t in steps])
        self._prefetched = (trajectory, dict(zip(steps, rows, strict=True)))

    def scores(self, trajectory: Trajectory, t: int, candidates: Sequence[str]) -> np.ndarray:
        """The policy's score of each candidate at state ``obs_t`` (float64, in the candidates' order)."""
        cached = self._prefetched
        if cached is not None and cached[0] is trajectory and t in cached[1] and set(candidates) <= self._index.keys():
            row = cached[1][t]
            return np.array([float(row[self._index[c]]) for c in candidates], dtype=np.float64)
        scores = self.scorer.score(self.model, [PolicyQuery.at(trajectory, t)], [list(candidates)])[0]
        return scores.double().numpy()

    def __call__(
        self, trajectory: Trajectory, t: int, candidates: Sequence[str], k: int, rng: np.random.Generator
    ) -> list[str]:
        if not candidates:
            return []
        return gumbel_top_k(candidates, self.scores(trajectory, t, candidates), self.temperature, k, rng)
