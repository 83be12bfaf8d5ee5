"""The one way into a world: a registry from ``EnvConfig.world`` to the module that adapts it.

An adapter module provides three functions, imported lazily (a world's packages are heavy and optional):

- ``make_world(cfg: EnvConfig, expert: bool) -> World``: a world for ``cfg``, with its expert or without it
  (evaluation needs only the environment, and an expert's planning can be most of a step's cost);
- ``vocabulary(cfg: EnvConfig) -> list[str]``: every word its missions, observations and actions can hold, in a
  fixed order (the local word-level tokenizer is built from it);
- ``problems(cfg: EnvConfig) -> list[str]``: what is wrong with ``cfg`` for this world (empty when nothing).

Nothing outside ``envs/`` imports an adapter module: the library calls ``make_world``, ``world_vocabulary`` and
``env_problems`` here, with the ``EnvConfig`` of the run.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from envs.base import World
    from envs.config import EnvConfig

_WORLDS: dict[str, str] = {"babyai": "envs.babyai"}


def registered_worlds() -> tuple[str, ...]:
    return tuple(_WORLDS)


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


def env_problems(cfg: EnvConfig) -> list[str]:
    """Every problem the world's adapter finds with ``cfg`` (each names its key); empty when there is none."""
    return list(_adapter(cfg).problems(cfg))
