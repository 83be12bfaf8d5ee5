"""Unit-level mask sampling for any-order training.

A sampler looks only at the kinds of a trajectory's units (``"obs"`` / ``"act"``, in order) and assigns
each unit a role: ``VISIBLE`` (in the input as is), ``TARGET`` (in the input as mask tokens, predicted)
or ``DROPPED`` (removed from the input). Whole units are the granularity: a unit is never half masked.

Every mode returns at least one target. Bernoulli modes condition on "at least one target" exactly
(first target drawn from the truncated geometric law, the rest independently), which has the same
distribution as resampling until a target appears but needs no retry loop, so a tiny ``mask_prob`` on a
short trajectory cannot stall a data loader.

Unlabelled actions: an early-experience branch (``envs.branches``) ends with an alternative action that is not the
expert's label, then the observation it led to. ``sample`` and ``block_targets`` take the unit indices of such actions
(``unlabelled_units``) and never make one a target, in every mode: it stays visible as context (the world-model query
"state, alternative action -> next observation" needs it) unless the mode drops everything after an earlier cut. On a
branch, ``causal`` / ``act_only`` / ``action_focus`` can target only the expert prefix's actions (the config refuses
them with branches: the demos hold those already), ``prefix`` / ``obs_only`` / ``any_order`` / ``mixture`` /
``cut_focus`` train world-model targets including the branch's last observation, and ``iwm`` targets exactly that
last observation.

New modes are one method plus one ``_DISPATCH`` entry (see ``AnyOrderMaskSampler``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from enum import StrEnum

import numpy as np

from envs.trajectory import UNIT_KINDS

__all__ = ["BLOCK_MODES", "BRANCH_MODES", "IWM_SCHEDULES", "IWM_STAGES", "AnyOrderMaskSampler", "MaskMode", "UnitRole",
           "block_targets", "unlabelled_units"]  # fmt: skip


class UnitRole(StrEnum):
    """What happens to one unit in the model input."""

    VISIBLE = "visible"
    TARGET = "target"
    DROPPED = "dropped"


class MaskMode(StrEnum):
    """Training objectives, as unit-level masking schedules."""

    CAUSAL = "causal"
    PREFIX = "prefix"
    ANY_ORDER = "any_order"
    OBS_ONLY = "obs_only"
    ACT_ONLY = "act_only"
    MIXTURE = "mixture"
    ACTION_FOCUS = "action_focus"
    CUT_FOCUS = "cut_focus"
    IWM = "iwm"

    @property
    def uses_mask_prob(self) -> bool:
        """Whether ``mask_prob`` shapes this mode's masks (``mixture`` draws its own from ``mixture_range``)."""
        return self in _P_MODES

    @classmethod
    def parse(cls, value: str | MaskMode) -> MaskMode:
        """Like ``MaskMode(value)`` but the error names the allowed values."""
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown masking mode {value!r}; allowed: {allowed}") from None


BLOCK_MODES = ("causal", "prefix", "cut_focus", "iwm")
"""Modes the block layout serves, each as the set of every query of its kind in a window (``block_targets``)."""
BRANCH_MODES = ("prefix", "any_order", "obs_only", "mixture", "cut_focus", "iwm")
"""Modes that train a world-model target on a branch (the others would train only its demo's actions again)."""
IWM_SCHEDULES = ("two_stage", "mixture")
"""How mode ``iwm`` orders its two objectives (``config.MaskingConfig.iwm_schedule``)."""
IWM_STAGES = ("world_model", "imitation", "mixture")
"""What mode ``iwm`` trains at a step: next observations (a demo's and a branch's), the causal objective, or a branch's
next observation and a demo's causal target (``config.MaskingConfig.iwm_stage``)."""

_P_MODES = frozenset({MaskMode.ANY_ORDER, MaskMode.OBS_ONLY, MaskMode.ACT_ONLY, MaskMode.ACTION_FOCUS,
                      MaskMode.CUT_FOCUS})  # fmt: skip


class AnyOrderMaskSampler:
    """Draws a fresh unit-role assignment on every ``sample`` call (multi-epoch resampling).

    Args:
        mode: one of ``MaskMode`` (plain strings accepted).
        mask_prob: per-unit target probability for ``any_order`` / ``obs_only`` / ``act_only``, in (0, 1].
        seed: seeds a ``numpy.random.Generator``; same seed and call sequence ⇒ same masks.
        mixture_range: ``(low, high)`` with ``0 < low <= high <= 1``; ``mixture`` draws ``mask_prob``
            uniformly from it on every call.
        causal_prob: ``q`` in ``[0, 1]``: each call uses the ``causal`` mask with probability ``q`` and
            ``mode``'s mask otherwise (a causal/any-order mixture). ``0`` draws no extra random number, so
            the masks of a sampler without it are unchanged.

    Modes: ``causal`` (a random action is the target, everything before it visible, everything after it
    dropped), ``prefix`` (every observation after a random action is a target), ``any_order`` (every unit
    a target with ``mask_prob``), ``obs_only`` / ``act_only`` (the same over one kind), ``mixture``
    (``any_order`` with ``mask_prob`` drawn per call), ``action_focus`` (a random action is always a target
    and everything after it dropped, as in ``causal``, but each earlier unit is a target with ``mask_prob``:
    the policy query is trained on every call, with any-order world-model queries around it), ``cut_focus``
    (the same with the cut at any unit after the first: the last kept unit, an action or an observation, is
    always a target, so both evaluation queries, policy and world model, are trained in their exact shape), ``iwm``
    (one next-observation or policy query, following ``iwm_stage``: a branch's last observation, everything before it
    visible; on a demo, in the ``world_model`` stage the observation after a random action, everything before visible
    and everything after dropped, otherwise the ``causal`` mask).
    """

    def __init__(
        self,
        mode: str | MaskMode,
        mask_prob: float = 0.5,
        seed: int | None = None,
        mixture_range: tuple[float, float] = (0.05, 1.0),
        causal_prob: float = 0.0,
        iwm_stage: str = "world_model",
    ) -> None:
        self.mode = MaskMode.parse(mode)
        self.iwm_stage = iwm_stage
        """Mode ``iwm``: what a demo trains (``IWM_STAGES``); the training recipe sets it at every step."""
        causal_prob = float(causal_prob)
        if not 0.0 <= causal_prob <= 1.0:
            raise ValueError(f"causal_prob must be in [0, 1], got {causal_prob}")
        self.causal_prob = causal_prob
        mask_prob = float(mask_prob)
        if not 0.0 < mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in (0, 1], got {mask_prob}")
        low, high = (float(x) for x in mixture_range)
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"mixture_range must satisfy 0 < low <= high <= 1, got {mixture_range}")
        self.mask_prob = mask_prob
        self.mixture_range = (low, high)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self._unlabelled: frozenset[int] = frozenset()  # of the trajectory being sampled

    def __repr__(self) -> str:
        return (
            f"AnyOrderMaskSampler(mode={self.mode.value!r}, mask_prob={self.mask_prob}, seed={self.seed}, "
            f"mixture_range={self.mixture_range}, causal_prob={self.causal_prob})"
        )

    def sample(self, kinds: Sequence[str], unlabelled: Collection[int] = ()) -> tuple[UnitRole, ...]:
        """One role per unit of ``kinds`` (``"obs"`` / ``"act"`` in trajectory order); ≥1 ``TARGET``, never one of the
        ``unlabelled`` action units (``unlabelled_units``: a branch's alternative action)."""
        kinds = tuple(kinds)
        if not kinds:
            raise ValueError("cannot sample a mask for an empty trajectory (no units)")
        bad = sorted({k for k in kinds if k not in UNIT_KINDS})
        if bad:
            raise ValueError(f"unit kinds must be one of {UNIT_KINDS}, got {bad}")
        self._unlabelled = frozenset(unlabelled)
        if any(not 0 <= i < len(kinds) or kinds[i] != "act" for i in self._unlabelled):
            raise ValueError(f"unlabelled units must be action units, got {sorted(self._unlabelled)} for {kinds}")
        if self.causal_prob > 0.0 and self._labelled_acts(kinds) and self.rng.random() < self.causal_prob:
            return self._sample_causal(kinds)
        return self._DISPATCH[self.mode](self, kinds)

    def _labelled_acts(self, kinds: tuple[str, ...]) -> list[int]:
        return [i for i, k in enumerate(kinds) if k == "act" and i not in self._unlabelled]

    # --- one method per mode -------------------------------------------------------------------

    def _sample_causal(self, kinds: tuple[str, ...]) -> tuple[UnitRole, ...]:
        acts = self._labelled_acts(kinds)
        if not acts:
            raise ValueError("causal masking needs at least one action unit (a labelled one), got none")
        target = acts[self.rng.integers(len(acts))]
        return tuple(
            UnitRole.VISIBLE if i < target else UnitRole.TARGET if i == target else UnitRole.DROPPED
            for i in range(len(kinds))
        )

    def _sample_prefix(self, kinds: tuple[str, ...]) -> tuple[UnitRole, ...]:
        # Only cuts with an observation after them can yield a target; drawing uniformly among those is
        # exactly "draw any cut, resample while it has no target".
        cuts = [i for i, k in enumerate(kinds) if k == "act" and "obs" in kinds[i + 1 :]]
        if not cuts:
            raise ValueError("prefix masking needs an observation after some action, got none")
        cut = cuts[self.rng.integers(len(cuts))]
        return tuple(UnitRole.TARGET if i > cut and k == "obs" else UnitRole.VISIBLE for i, k in enumerate(kinds))

    def _sample_any_order(self, kinds: tuple[str, ...]) -> tuple[UnitRole, ...]:
        return self._bernoulli(kinds, self._targetable(kinds), self.mask_prob)

    def _sample_obs_only(self, kinds: tuple[str, ...]) -> tuple[UnitRole, ...]:
        eligible = [i for i, k in enumerate(kinds) if k == "obs"]
        if not eligible:
            raise ValueError("obs_only masking needs at least one observation unit, got none")
        return self._bernoulli(kinds, eligible, self.mask_prob)

    def _sample_act_only(self, kinds: tuple[str, ...]) -> tuple[UnitRole, ...]:
        eligible = self._labelled_acts(kinds)
        if not eligible:
            raise ValueError("act_only masking needs at least one action unit (a labelled one), got none")
        return self._bernoulli(kinds, eligible, self.mask_prob)

    def _sample_mixture(self, kinds: tuple[str, ...]) -> tuple[UnitRole, ...]:
        low, high = self.mixture_range
        p = float(self.rng.uniform(low, high)) if high > low else low
        # uniform() can return exactly `low` only when low > 0 (validated), so p stays in (0, 1].
        return self._bernoulli(kinds, self._targetable(kinds), p)

    def _sample_action_focus(self, kinds: tuple[str, ...]) -> tuple[UnitRole, ...]:
        acts = self._labelled_acts(kinds)
        if not acts:
            raise ValueError("action_focus masking needs at least one action unit (a labelled one), got none")
        return self._focus(kinds, acts[self.rng.integers(len(acts))])

    def _sample_cut_focus(self, kinds: tuple[str, ...]) -> tuple[UnitRole, ...]:
        cuts = [i for i in range(1, len(kinds)) if i not in self._unlabelled]
        if not cuts:
            raise ValueError("cut_focus masking needs at least two units (context before the cut), got one")
        return self._focus(kinds, cuts[int(self.rng.integers(len(cuts)))])

    def _sample_iwm(self, kinds: tuple[str, ...]) -> tuple[UnitRole, ...]:
        if self._unlabelled:  # a branch: the observation its alternative action led to
            return self._next_observation(kinds, max(self._unlabelled) + 1)
        if self.iwm_stage == "world_model":  # a demo's next observation, after a random action
            cuts = [i for i in range(2, len(kinds)) if kinds[i] == "obs" and kinds[i - 1] == "act"]
            if not cuts:
                raise ValueError("iwm world-model masking needs an observation after an action, got none")
            return self._next_observation(kinds, cuts[int(self.rng.integers(len(cuts)))])
        return self._sample_causal(kinds)

    def _next_observation(self, kinds: tuple[str, ...], target: int) -> tuple[UnitRole, ...]:
        """``target`` (an observation) is the one target, everything before it visible, everything after dropped."""
        if target >= len(kinds) or kinds[target] != "obs":
            raise ValueError("iwm masking needs the observation a branch's alternative action led to, got none")
        return tuple(
            UnitRole.VISIBLE if i < target else UnitRole.TARGET if i == target else UnitRole.DROPPED
            for i in range(len(kinds))
        )

    def _focus(self, kinds: tuple[str, ...], cut: int) -> tuple[UnitRole, ...]:
        """``cut`` is a target, each earlier unit (but an unlabelled action) a target with ``mask_prob``, every later
        unit dropped."""
        earlier = self.rng.random(cut) < self.mask_prob
        for i in self._unlabelled:
            if i < cut:
                earlier[i] = False
        return tuple(
            (UnitRole.TARGET if earlier[i] else UnitRole.VISIBLE) if i < cut
            else UnitRole.TARGET if i == cut else UnitRole.DROPPED
            for i in range(len(kinds))
        )  # fmt: skip

    _DISPATCH: dict[MaskMode, Callable[[AnyOrderMaskSampler, tuple[str, ...]], tuple[UnitRole, ...]]] = {
        MaskMode.CAUSAL: _sample_causal,
        MaskMode.PREFIX: _sample_prefix,
        MaskMode.ANY_ORDER: _sample_any_order,
        MaskMode.OBS_ONLY: _sample_obs_only,
        MaskMode.ACT_ONLY: _sample_act_only,
        MaskMode.MIXTURE: _sample_mixture,
        MaskMode.ACTION_FOCUS: _sample_action_focus,
        MaskMode.CUT_FOCUS: _sample_cut_focus,
        MaskMode.IWM: _sample_iwm,
    }

    # --- shared primitives -----------------------------------------------------------------------

    def _targetable(self, kinds: tuple[str, ...]) -> list[int]:
        return [i for i in range(len(kinds)) if i not in self._unlabelled]

    def _bernoulli(self, kinds: tuple[str, ...], eligible: Sequence[int], p: float) -> tuple[UnitRole, ...]:
        """Independent Bernoulli(p) targets over ``eligible`` units, conditioned on at least one target."""
        eligible = list(eligible)
        n = len(eligible)
        # P(first target is eligible[j] | >=1 target) = p (1-p)^j / (1 - (1-p)^n): truncated geometric.
        weights = p * (1.0 - p) ** np.arange(n)
        first = int(self.rng.choice(n, p=weights / weights.sum()))
        rest = self.rng.random(n - first - 1) < p
        targets = {eligible[first]} | {eligible[first + 1 + j] for j in np.flatnonzero(rest)}
        return tuple(UnitRole.TARGET if i in targets else UnitRole.VISIBLE for i in range(len(kinds)))


def block_targets(
    mode: str | MaskMode, kinds: Sequence[str], unlabelled: Collection[int] = (), iwm_stage: str = "world_model"
) -> list[int]:
    """The units that get a query block in the block layout: every labelled action (``causal``: each policy query),
    every observation after the first action (``prefix``: each world-model query), every unit after the first but an
    unlabelled action (``cut_focus``: both kinds, each in its exact evaluation shape); ``iwm``: a branch's last
    observation alone, else ``prefix``'s set in the ``world_model`` stage and ``causal``'s otherwise. An ``unlabelled``
    action (``unlabelled_units``) is never a target. Raises ``ValueError`` when there is none."""
    mode = MaskMode.parse(mode)
    unlabelled = frozenset(unlabelled)
    if mode is MaskMode.IWM:
        if unlabelled:
            targets = [max(unlabelled) + 1] if max(unlabelled) + 1 < len(kinds) else []
            return _checked(mode, kinds, targets)
        mode = MaskMode.PREFIX if iwm_stage == "world_model" else MaskMode.CAUSAL
    if mode is MaskMode.CAUSAL:
        targets = [i for i, k in enumerate(kinds) if k == "act" and i not in unlabelled]
    elif mode is MaskMode.PREFIX:
        first_act = next((i for i, k in enumerate(kinds) if k == "act"), len(kinds))
        targets = [i for i, k in enumerate(kinds) if k == "obs" and i > first_act]
    elif mode is MaskMode.CUT_FOCUS:
        targets = [i for i in range(1, len(kinds)) if i not in unlabelled]
    else:
        raise ValueError(f"the block layout serves the modes {BLOCK_MODES}, not {mode.value!r}")
    return _checked(mode, kinds, targets)


def _checked(mode: MaskMode, kinds: Sequence[str], targets: list[int]) -> list[int]:
    if not targets:
        raise ValueError(f"{mode.value} block masking needs a target unit in {list(kinds)}, got none")
    return targets


def unlabelled_units(labelled_actions: Sequence[bool]) -> frozenset[int]:
    """Unit indices (obs_0 act_0 obs_1 ... order) of the actions that are not labels, from a trajectory's
    ``labelled_actions``: context only, never a target."""
    return frozenset(2 * j + 1 for j, labelled in enumerate(labelled_actions) if not labelled)
