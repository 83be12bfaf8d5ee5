"""Typed trajectory records: the one data type that crosses process, actor and package boundaries.

A trajectory is the serialized episode ``obs_0, act_0, obs_1, act_1, ...`` plus its goal text
(the mission). Units are whole observations or whole actions; masking never splits a unit.

Each trajectory carries its ``Provenance``: who chose the actions that were executed (the expert alone, or a policy
of some training step mixed with the expert, DAgger-style) and with what probability the expert's action was executed.
The stored actions are the expert's labels and the observations the states actually visited, with one exception: an
early-experience *branch* (``envs.branches``) ends with an alternative action that is not the expert's and the
observation it led to (``Trajectory.labelled_actions`` says which actions are labels).

The record lives in ``envs`` (the lower layer: worlds produce it) and the library imports it from here, so the
two packages share it without an import cycle (``envs`` never imports ``anyorder_ray``). Files of trajectories
are read and written by ``anyorder_ray.data.jsonl``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Literal

UnitKind = Literal["obs", "act"]
UNIT_KINDS: tuple[str, ...] = ("obs", "act")
SOURCES: tuple[str, ...] = ("expert", "on_policy", "branch")


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
class Provenance:
    """Where a trajectory's visited states came from (its action labels are always the expert's).

    ``expert``: the expert chose every executed action (a demonstration). ``on_policy``: a rollout under policy
    weights of training step ``policy_version``, executing the expert's action with probability ``beta`` at each step
    and the policy's otherwise (DAgger); ``policy_actions`` of its steps executed the policy's choice (which may equal
    the label). ``branch``: an expert prefix, then one alternative action (not the expert's) and the observation it
    led to (early experience); ``policy_version`` is the weights that proposed the alternative (0: drawn uniformly),
    and ``policy_actions`` is 1 when a policy proposed it.
    """

    source: str = "expert"
    policy_version: int = 0
    """Training step of the weights that acted (0: no policy)."""
    beta: float = 1.0
    """Probability of executing the expert's action at each step."""
    policy_actions: int = 0
    """Steps whose executed action was the policy's."""

    def __post_init__(self) -> None:
        problems = []
        if self.source not in SOURCES:
            problems.append(f"source must be one of {SOURCES}, got {self.source!r}")
        if not 0.0 <= self.beta <= 1.0:
            problems.append(f"beta must be in [0, 1], got {self.beta}")
        if self.policy_version < 0 or self.policy_actions < 0:
            problems.append("policy_version and policy_actions must be >= 0")
        if self.source == "expert" and (self.policy_version or self.policy_actions or self.beta != 1.0):
            problems.append("an expert trajectory has no policy: policy_version 0, policy_actions 0, beta 1")
        if self.source == "on_policy" and self.policy_version < 1:
            problems.append("an on_policy trajectory needs the policy_version (training step >= 1) that acted")
        if self.source == "branch" and (self.beta != 1.0 or self.policy_actions != int(self.policy_version > 0)):
            problems.append(
                "a branch follows the expert up to its last action (beta 1) and has policy_actions 1 "
                "exactly when a policy (policy_version >= 1) proposed that action"
            )
        if problems:
            raise ValueError("invalid provenance: " + "; ".join(problems))

    @property
    def on_policy(self) -> bool:
        return self.source == "on_policy"

    def to_dict(self) -> dict:
        return {"source": self.source, "policy_version": self.policy_version, "beta": self.beta,
                "policy_actions": self.policy_actions}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> Provenance:
        return cls(str(d.get("source", "expert")), int(d.get("policy_version", 0)), float(d.get("beta", 1.0)),
                   int(d.get("policy_actions", 0)))  # fmt: skip


EXPERT = Provenance()
"""The provenance of a demonstration."""


@dataclass(frozen=True, slots=True)
class Trajectory:
    """An episode as text: ``units`` alternate obs, act, obs, act, ... starting with an observation."""

    mission: str
    level: str
    seed: int
    units: tuple[Unit, ...]
    success: bool
    meta: dict = field(default_factory=dict, compare=False)
    provenance: Provenance = EXPERT

    def __post_init__(self) -> None:
        if not isinstance(self.provenance, Provenance):
            raise TypeError(f"provenance must be a Provenance, got {type(self.provenance).__name__}")
        if not isinstance(self.units, tuple):
            object.__setattr__(self, "units", tuple(self.units))
        for i, unit in enumerate(self.units):
            expected = "obs" if i % 2 == 0 else "act"
            if unit.kind != expected or unit.step != i // 2:
                raise ValueError(
                    f"trajectory {self.level}/{self.seed}: unit {i} is ({unit.kind}, step {unit.step}), "
                    f"expected ({expected}, step {i // 2}); units must alternate obs_0, act_0, obs_1, ..."
                )

    def __setstate__(self, state: list) -> None:
        """Unpickle; records pickled before ``provenance`` existed (old buffer journals) hold one value less and get
        the demonstration's provenance (they were all expert demos)."""
        values = dict(zip([f.name for f in fields(self)], state))  # noqa: B905 (older records are shorter)
        values.setdefault("provenance", EXPERT)
        for f in fields(self):
            object.__setattr__(self, f.name, values[f.name])

    def with_provenance(self, provenance: Provenance) -> Trajectory:
        return replace(self, provenance=provenance)

    @property
    def labelled_actions(self) -> tuple[bool, ...]:
        """Per action: whether it is the expert's label for its state (every action but a branch's last one)."""
        n = self.num_actions
        return tuple(not (self.provenance.source == "branch" and i == n - 1) for i in range(n))

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
            "provenance": self.provenance.to_dict(),
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
            provenance=Provenance.from_dict(d["provenance"]) if "provenance" in d else EXPERT,
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
        provenance: Provenance = EXPERT,
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
        return cls(mission, level, seed, tuple(units), success, dict(meta or {}), provenance)
