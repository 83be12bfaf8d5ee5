"""``EnvConfig``: which world a run lives in. It belongs to the world layer; the library's ``ExperimentConfig``
holds it as its ``env`` section."""

from __future__ import annotations

from dataclasses import dataclass

from envs.registry import registered_worlds


@dataclass(frozen=True)
class EnvConfig:
    """Which world the agent lives in. Keys only the world's adapter can judge (``level``, ``obs_encoding``) are
    checked by ``envs.validate_env``, once, before Ray starts (it imports the world's packages)."""

    world: str = "babyai"
    """Registered world adapter (``envs.registry.registered_worlds()``)."""
    level: str = "BabyAI-GoToRedBallGrey-v0"
    """The world's level or task id (BabyAI: a registered id or a short name like ``GoToLocal``)."""
    max_episode_steps: int | None = None
    """Cap on episode length; None uses the level's own limit."""
    obs_encoding: str = "grid"
    """How observations are written as text (BabyAI: ``grid`` or ``compact``, see ``envs.babyai``)."""

    def __post_init__(self) -> None:
        problems = []
        if self.world not in registered_worlds():
            problems.append(f"world {self.world!r} is unknown; allowed: {', '.join(registered_worlds())}")
        if self.max_episode_steps is not None and self.max_episode_steps <= 0:
            problems.append("max_episode_steps must be > 0")
        if problems:
            raise ValueError("invalid env config: " + "; ".join(problems))
