"""Typed trajectory records: the one data type that crosses process, actor and package boundaries.

A trajectory is the serialized episode ``obs_0, act_0, obs_1, act_1, ...`` plus its goal text
(the mission). Units are whole observations or whole actions; masking never splits a unit.

The record lives in ``envs`` (the lower layer: worlds produce it) and the library imports it from here, so the
two packages share it without an import cycle (``envs`` never imports ``anyorder_ray``). Files of trajectories
are read and written by ``anyorder_ray.data.jsonl``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

UnitKind = Literal["obs", "act"]
UNIT_KINDS: tuple[str, ...] = ("obs", "act")


@dataclass(frozen=True, slots=True)
class Unit:
    """One whole observation or action of an episode, already rendered as text."""

    kind: UnitKind
    text: str
    step: int

    def __post_init__(self) -> None:
        if self.kind not in UNIT_KINDS:
            raise ValueError(f"Unit.kind must be one of {UNIT_KINDS}, got {self.kind!r}")
        if self.step < 0:
            raise ValueError(f"Unit.step must be >= 0, got {self.step}")


@dataclass(frozen=True, slots=True)
class Trajectory:
    """An episode as text: ``units`` alternate obs, act, obs, act, ... starting with an observation."""

    mission: str
    level: str
    seed: int
    units: tuple[Unit, ...]
    success: bool
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.units, tuple):
            object.__setattr__(self, "units", tuple(self.units))
        for i, unit in enumerate(self.units):
            expected = "obs" if i % 2 == 0 else "act"
            if unit.kind != expected or unit.step != i // 2:
                raise ValueError(
                    f"trajectory {self.level}/{self.seed}: unit {i} is ({unit.kind}, step {unit.step}), "
                    f"expected ({expected}, step {i // 2}); units must alternate obs_0, act_0, obs_1, ..."
                )

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(u.kind for u in self.units)

    @property
    def num_actions(self) -> int:
        return sum(1 for u in self.units if u.kind == "act")

    @property
    def actions(self) -> tuple[str, ...]:
        return tuple(u.text for u in self.units if u.kind == "act")

    @property
    def observations(self) -> tuple[str, ...]:
        return tuple(u.text for u in self.units if u.kind == "obs")

    def to_dict(self) -> dict:
        return {
            "mission": self.mission,
            "level": self.level,
            "seed": self.seed,
            "success": self.success,
            "units": [[u.kind, u.text] for u in self.units],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Trajectory:
        missing = {"mission", "level", "seed", "success", "units"} - set(d)
        if missing:
            raise ValueError(f"trajectory record is missing keys {sorted(missing)}")
        units = tuple(Unit(kind=k, text=t, step=i // 2) for i, (k, t) in enumerate(d["units"]))
        return cls(
            mission=str(d["mission"]),
            level=str(d["level"]),
            seed=int(d["seed"]),
            units=units,
            success=bool(d["success"]),
            meta=dict(d.get("meta") or {}),
        )

    @classmethod
    def from_steps(
        cls,
        mission: str,
        level: str,
        seed: int,
        observations: Sequence[str],
        actions: Sequence[str],
        success: bool,
        meta: dict | None = None,
    ) -> Trajectory:
        """Interleave observation and action texts; ``len(observations)`` is ``len(actions)`` or one more."""
        if len(observations) not in (len(actions), len(actions) + 1):
            raise ValueError(
                f"need len(observations) in (len(actions), len(actions)+1), got {len(observations)} and {len(actions)}"
            )
        units: list[Unit] = []
        for t, obs in enumerate(observations):
            units.append(Unit("obs", obs, t))
            if t < len(actions):
                units.append(Unit("act", actions[t], t))
        return cls(mission, level, seed, tuple(units), success, dict(meta or {}))
