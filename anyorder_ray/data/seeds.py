"""Seed ranges: rollout actors, live evaluation and held-out NLL trajectories never share a seed.

Training seeds live in ``[0, 1e9)``; evaluation seeds start at ``eval.seed_start`` (>= 1e9, validated by
the config). Within evaluation, episode seeds and held-out trajectory seeds are separate halves.
"""

from __future__ import annotations

from anyorder_ray.config import EvalConfig, RolloutConfig

ROLLOUT_SPAN = 10**8  # seeds available to all rollout actors together
HELDOUT_OFFSET = 5 * 10**8  # held-out NLL trajectories sit this far above the eval episode seeds


def rollout_seed_range(cfg: RolloutConfig, worker: int) -> range:
    """The seeds rollout actor ``worker`` draws episodes from (disjoint across actors)."""
    if not 0 <= worker < cfg.num_actors:
        raise ValueError(f"worker must be in [0, {cfg.num_actors}), got {worker}")
    per = ROLLOUT_SPAN // cfg.num_actors
    start = cfg.seed_start + worker * per
    return range(start, start + per)


def eval_episode_seeds(cfg: EvalConfig, n: int, offset: int = 0) -> range:
    """Seeds of ``n`` live evaluation episodes (the same ones for every trial and every evaluation)."""
    return range(cfg.seed_start + offset, cfg.seed_start + offset + n)


def heldout_trajectory_seeds(cfg: EvalConfig, n: int) -> range:
    """Seeds of the fixed held-out bot trajectories used for world-model and action NLL."""
    start = cfg.seed_start + HELDOUT_OFFSET
    return range(start, start + n)
