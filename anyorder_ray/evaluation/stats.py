"""Interval statistics for success rates, and the ``eval/...`` metric dict of one evaluation."""

from __future__ import annotations

import math

from anyorder_ray.evaluation.episodes import EpisodeStats
from anyorder_ray.evaluation.nll import NLLStats

__all__ = ["eval_metrics", "two_proportion_test", "wilson_interval"]


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


def two_proportion_test(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """``p1 - p2`` and the two-sided p-value of the pooled two-proportion z-test (NaN when a side is empty)."""
    if n1 == 0 or n2 == 0:
        return math.nan, math.nan
    p1, p2 = k1 / n1, k2 / n2
    pool = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pool * (1 - pool) * (1 / n1 + 1 / n2))
    if se == 0:
        return p1 - p2, 1.0
    return p1 - p2, math.erfc(abs(p1 - p2) / se / math.sqrt(2))


def eval_metrics(
    episodes: EpisodeStats,
    nll: NLLStats | None,
    step: int,
    seconds: float,
    offexpert: NLLStats | None = None,
    onpolicy: NLLStats | None = None,
) -> dict[str, float]:
    """The ``eval/...`` metrics of one evaluation; an NLL set that is None reports NaN.

    ``nll``: the held-out expert trajectories (``world_model_*``, ``action_nll``); ``offexpert``: the branches' last
    transitions (``offexpert_*``, the same set for every arm); ``onpolicy``: transitions of this evaluation's own
    episodes (``onpolicy_*``, each arm's own states). ``*_transitions`` count the queries of the last two.
    """
    low, high = wilson_interval(episodes.successes, episodes.episodes)
    out = {
        "eval/success_rate": episodes.success_rate,
        "eval/success_low": low,
        "eval/success_high": high,
        "eval/episodes": episodes.episodes,
        "eval/mean_episode_length": episodes.mean_length,
        "eval/episodes_per_s": episodes.episodes_per_s,
        "eval/temperature": episodes.temperature,
        "eval/world_model_nll": _get(nll, "world_model_nll"),
        "eval/world_model_nll_per_obs": _get(nll, "world_model_nll_per_obs"),
        "eval/world_model_exact": _get(nll, "world_model_exact"),
        "eval/action_nll": _get(nll, "action_nll"),
    }
    for name, stats in (("offexpert", offexpert), ("onpolicy", onpolicy)):
        for key in ("world_model_nll", "world_model_nll_per_obs", "world_model_exact"):
            out[f"eval/{name}_{key}"] = _get(stats, key)
        out[f"eval/{name}_transitions"] = stats.queries if stats is not None else 0
    return {**out, "eval/seconds": float(seconds), "eval/step": int(step)}


def _get(stats: NLLStats | None, key: str) -> float:
    return getattr(stats, key) if stats is not None else float("nan")
