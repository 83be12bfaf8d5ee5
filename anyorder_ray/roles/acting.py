"""The policy a dagger rollout actor acts with (``roles.rollout``): the model skeleton built once, the trial's newest
loadable weights from its ``PolicyBoard`` loaded into it, and the eval actor's ``ActionScorer`` choosing the actions.

A module of its own so that an expert-only rollout actor never imports torch, transformers or the model.
"""

from __future__ import annotations

import logging

import numpy as np
import ray
import torch

from anyorder_ray.data.encoding import UnitEncoder
from anyorder_ray.evaluation.episodes import choose_actions
from anyorder_ray.evaluation.proposer import PolicyProposer
from anyorder_ray.evaluation.scoring import ActionScorer, PolicyQuery
from anyorder_ray.models.factory import build_model, build_model_config, build_tokenizer
from anyorder_ray.roles.rollout import PolicySource
from anyorder_ray.roles.weights import load_policy_weights
from envs import EnvConfig

__all__ = ["ActingPolicy"]

logger = logging.getLogger(__name__)


class ActingPolicy:
    """The model a dagger actor acts with: a skeleton built once, the board's newest loadable version in it."""

    def __init__(
        self, source: PolicySource, env: EnvConfig, action_names: tuple[str, ...], worker: int, temperature: float = 0.0
    ) -> None:
        """``temperature``: 0 acts greedily; > 0 samples each action (``rollout.temperature``)."""
        self.temperature = float(temperature)
        tokenizer = build_tokenizer(source.model, env)
        self._model = build_model(source.model, tokenizer, load_weights=False).float().eval()
        self._model_config = build_model_config(source.model, tokenizer)
        self.scorer = ActionScorer(UnitEncoder(tokenizer), action_names, source.history_steps, source.max_length,
                                   source.layout, count_flops=self._model_config)  # fmt: skip
        self._flops_sent = 0.0
        self._board = ray.get_actor(source.board_name)
        self._worker = worker
        self._seen: tuple[str, int] | None = None  # the board stamp last looked at (loaded or rejected)
        self.version = 0
        self.planned_steps: int | None = None
        self.rejected = 0

    def refresh(self) -> bool:
        """Load the board's latest version if it is new; True when the weights changed. Never waits for weights."""
        stamp = ray.get(self._board.stamp.remote())
        if stamp == self._seen or stamp[1] == 0:  # nothing new, or a board (re)started empty
            return False
        stamp, version, planned, weights = ray.get(self._board.latest.remote())
        self._seen = stamp
        try:
            self._model = load_policy_weights(self._model, weights, self._model_config, torch.device("cpu"))
        except Exception as e:  # noqa: BLE001 (a bad version must never stop the actor: it is reported and skipped)
            self.rejected += 1
            reason = f"{type(e).__name__}: {e}"[:2000]
            logger.warning("rollout actor %d: policy version %d rejected, keeping version %d: %s",
                           self._worker, version, self.version, reason)  # fmt: skip
            self._board.reject.remote(self._worker, version, reason, stamp)
            return False
        self.version, self.planned_steps = int(version), planned
        self._board.loaded.remote(self._worker, stamp)
        return True

    def take_flops(self) -> float:
        """Model FLOPs of the forwards since the last call."""
        new, self._flops_sent = self.scorer.flops - self._flops_sent, self.scorer.flops
        return new

    def proposer(self, temperature: float = 1.0) -> PolicyProposer:
        """An early-experience proposer over the current weights and the acting scorer (its forwards counted in
        ``take_flops`` like the acting ones)."""
        return PolicyProposer(self.scorer, self._model, temperature)

    def act(
        self, queries: list[PolicyQuery], candidates: list[tuple[str, ...]], rngs: list[np.random.Generator]
    ) -> list[str]:
        """The action of each query: the argmax, or with ``temperature > 0`` a draw from its episode's generator."""
        return choose_actions(self.scorer, self._model, queries, candidates, self.temperature, rngs)
