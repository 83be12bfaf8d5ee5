"""The one way into a world: ``EnvConfig`` (which world a run lives in) and the registry from ``EnvConfig.world`` to
the module that adapts it.

An adapter module provides three functions, imported lazily (a world's packages are heavy and optional):

- ``make_world(cfg: EnvConfig, expert: bool) -> World``: a world for ``cfg``, with its expert or without it
  (evaluation needs only the environment, and an expert's planning can be most of a step's cost);
- ``vocabulary(cfg: EnvConfig) -> list[str]``: every word its missions, observations and actions can hold, in a
  fixed order (the local word-level tokenizer is built from it);
- ``problems(cfg: EnvConfig) -> list[str]``: what is wrong with ``cfg`` for this world (empty when nothing);
- ``evaluation_config(cfg: EnvConfig) -> EnvConfig``: the world evaluation plays when training plays ``cfg``, so that
  evaluation episodes and held-out trajectories never come from training (BabyAI: ``cfg`` itself, since evaluation
  seeds are never training seeds; TextWorld: the ``heldout`` games, since with ``num_games`` set any seed plays a
  game of the training pool).

and optionally ``prepare(cfg: EnvConfig) -> list[Path]``: build ahead of time what episodes of ``cfg`` will load
(TextWorld: the games of a fixed pool), so that concurrent trials do not each build the same thing; returns what it
built or found.

Nothing outside ``envs/`` imports an adapter module: the library calls ``make_world``, ``world_vocabulary``,
``env_problems``, ``evaluation_env`` and ``prepare_env`` here, with the ``EnvConfig`` of the run.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from envs.base import World

_WORLDS: dict[str, str] = {"babyai": "envs.babyai", "textworld": "envs.textworld"}


def registered_worlds() -> tuple[str, ...]:
    return tuple(_WORLDS)


@dataclass(frozen=True)
class EnvConfig:
    """Which world the agent lives in (the ``env`` section of an experiment). Keys only the world's adapter can judge
    (``level``, ``obs_encoding``, ``split``) are checked by ``env_problems``, which entry points call once, before Ray
    starts (it imports the world's packages)."""

    world: str = "babyai"
    """Registered world adapter (``envs.registry.registered_worlds()``)."""
    level: str = "BabyAI-GoToRedBallGrey-v0"
    """The world's level or task id (BabyAI: a registered id or a short name like ``GoToLocal``)."""
    max_episode_steps: int | None = None
    """Cap on episode length; None uses the level's own limit."""
    obs_encoding: str = "grid"
    """How observations are written as text (BabyAI: ``grid`` or ``compact``, see ``envs.babyai``)."""
    split: str = "train"
    """Which games episode seeds draw from, in worlds that generate games (TextWorld: ``train``, ``heldout``,
    ``test``)."""
    num_games: int | None = None
    """Games per split in worlds that generate games: seed ``s`` plays game ``s % num_games`` (None: each seed its
    own game)."""
    game_dir: str | None = None
    """Where generated games are cached (None: the world's default under the user's cache folder)."""

    def __post_init__(self) -> None:
        problems = []
        if self.world not in registered_worlds():
            problems.append(f"world {self.world!r} is unknown; allowed: {', '.join(registered_worlds())}")
        if self.max_episode_steps is not None and self.max_episode_steps <= 0:
            problems.append("max_episode_steps must be > 0")
        if self.num_games is not None and self.num_games <= 0:
            problems.append("num_games must be > 0")
        if problems:
            raise ValueError("invalid env config: " + "; ".join(problems))


def register_world(name: str, module: str) -> None:
    """Register the adapter module ``module`` (a dotted import path) under ``name``."""
    if name in _WORLDS and _WORLDS[name] != module:
        raise ValueError(f"world {name!r} is already registered to {_WORLDS[name]}")
    _WORLDS[name] = module


def _adapter(cfg: EnvConfig) -> ModuleType:
    try:
        module = _WORLDS[cfg.world]
    except KeyError:
        raise ValueError(f"world {cfg.world!r} is unknown; allowed: {', '.join(_WORLDS)}") from None
    return importlib.import_module(module)


def make_world(cfg: EnvConfig, *, expert: bool = True) -> World:
    """A fresh world for ``cfg`` (one episode at a time)."""
    return _adapter(cfg).make_world(cfg, expert=expert)


def world_vocabulary(cfg: EnvConfig) -> list[str]:
    """Every word the world of ``cfg`` can produce (missions, observations of every encoding, actions)."""
    return _adapter(cfg).vocabulary(cfg)


def evaluation_env(cfg: EnvConfig) -> EnvConfig:
    """The ``EnvConfig`` evaluation (live episodes and held-out trajectories) plays for a run trained on ``cfg``."""
    return _adapter(cfg).evaluation_config(cfg)


def prepare_env(cfg: EnvConfig) -> list[Path]:
    """Build what episodes of ``cfg`` and of its evaluation world will load, once, in this process (with progress
    output): the files built or found. Worlds that build nothing ahead (BabyAI) return an empty list."""
    adapter = _adapter(cfg)
    prepare = getattr(adapter, "prepare", None)
    if prepare is None:
        return []
    paths: list[Path] = []
    for env in dict.fromkeys((cfg, evaluation_env(cfg))):  # the evaluation world may be the same
        paths += prepare(env)
    return paths


def env_problems(cfg: EnvConfig) -> list[str]:
    """Every problem the world's adapter finds with ``cfg`` (each names its key); empty when there is none."""
    return list(_adapter(cfg).problems(cfg))
