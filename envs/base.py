"""The small protocol every text-world adapter implements.

An adapter turns an environment into text: observations become one string each, actions are named by
words, and an expert (a scripted bot, or recorded demonstrations) can suggest the next action. Rollout
and eval actors only talk to this protocol, so a new benchmark needs a new adapter and nothing else.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable


class StepResult(NamedTuple):
    """What ``TextWorld.step`` returns; a plain tuple so it unpacks like gymnasium's step."""

    obs: str
    reward: float
    terminated: bool
    truncated: bool


@runtime_checkable
class TextWorld(Protocol):
    """One episode at a time of a text-rendered environment (not thread-safe; one per actor slot)."""

    @property
    def action_names(self) -> tuple[str, ...]:
        """Every action word, in the environment's action-index order."""
        ...

    def reset(self, seed: int) -> tuple[str, str]:
        """Start the episode for ``seed``; returns ``(obs_text, mission)``."""
        ...

    def step(self, action: str) -> StepResult:
        """Take one action by name; returns the next observation text, reward and end flags."""
        ...

    def expert_action(self) -> str:
        """The expert's suggestion for the current state (whatever actions were actually taken so far)."""
        ...

    def serialize(self, obs: Any) -> str:
        """Render a raw observation as text."""
        ...

    def parse(self, text: str) -> Any:
        """Exact inverse of ``serialize``."""
        ...
