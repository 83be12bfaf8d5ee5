"""The shared trajectory buffer: an actor that holds object-store references to trajectory batches.

Ownership: an object belongs to the process that ``ray.put`` it and is lost when that process dies (Ray
2.56 removed ``ray.put(..., _owner=...)``). So rollout actors hand each batch to ``add`` by value and the
buffer puts it into the object store itself: the buffer owns every acknowledged batch, and a rollout actor
that dies takes nothing acknowledged with it. The buffer then holds only references, evicts the oldest
trajectories past its capacity, and answers ``snapshot()`` with the references of every batch it holds; each
train worker resolves them from the object store once, caches them and samples locally
(``roles.train_loop.BufferSource``).

Durability: given a ``journal`` location (the trial's storage: a folder or a URI), the buffer writes every batch
it accepts there *before* acknowledging it, one file per batch (its trajectories carry their ``Provenance``; journals
written before provenance existed load as expert demos). A restarted buffer actor (or the buffer of a trial
that ``--resume`` runs again) replays the journal in order and so holds exactly what was acknowledged, with the
producers' resume seeds; its batches get new object references, which train workers pick up at their next refresh.
The journal keeps every acknowledged batch, evicted ones included: it is also the run's dataset of trajectories.

Provenance: a batch is one producer's, under one policy version and one beta (``batch_provenance``). The buffer counts
what it holds by source, evicts following ``data.eviction`` (``fifo``, or ``onpolicy_first``: the demo set stays) and,
in the dagger regime, accepts exactly ``expert_quota`` expert demos (the demo budget) and any number of on-policy ones.

Compute: producers send with each batch the model FLOPs its policy forwards cost (dagger's rollout actors; 0 for the
expert), summed over every batch received, dropped ones included (the compute was spent), into
``rollout/inference_flops``; the journal keeps each batch's count.
Early-experience branches ride with their demos: ``add(demos, worker, next_seed, branches)`` is one acknowledged step
(one journal record) that holds the demos and, as a batch of their own, the branches of the demos it accepted (a demo
trimmed past the budget takes its branches with it). Branches never count toward ``target`` or ``expert_quota``, so
the fixed regime's data set is its ``num_demos`` demos and all their branches, complete the moment the last demo is
acknowledged; that data set is never evicted (an ``add`` it would not fit in is refused, naming
``data.buffer_capacity``). A restarted producer resumes after the last acknowledged ``add``, branches included.
The policy's branches of earlier demos (``data.branch_proposer: policy``, dagger) ride the same way with an on-policy
batch, kept whenever the batch is: ``demo_span(worker)`` tells a producer which of its seeds were accepted demos.

``BufferState`` is the pure bookkeeping (unit-tested without Ray), ``BufferJournal`` the files; ``TrajectoryBuffer``
wraps both as an actor class (resources are set by the caller with ``.options()``).
"""

from __future__ import annotations

import dataclasses
import pickle
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from anyorder_ray.storage import Location
from envs.trajectory import EXPERT, Provenance

EVICTIONS = ("fifo", "onpolicy_first")


def batch_provenance(batch: list) -> Provenance:
    """The provenance a batch's trajectories share (EXPERT for an empty batch); a mixed batch is refused (it could not
    be evicted or counted as one)."""
    found = {(p.source, p.policy_version, p.beta) for p in (getattr(t, "provenance", EXPERT) for t in batch)}
    if len(found) > 1:
        raise ValueError(f"a batch must come from one source, policy version and beta, got {sorted(found)}")
    if not found:
        return EXPERT
    source, version, beta = found.pop()
    if source == "expert":
        return EXPERT
    if source == "branch":  # a policy's branch (version >= 1) counts its one proposed action
        return Provenance(source, version, beta, int(version > 0))
    return Provenance(source, version, beta)


@dataclass(frozen=True)
class BufferStats:
    """Counters of the buffer, reported as ``rollout/…`` metrics."""

    size: int
    capacity: int
    produced: int
    evicted: int
    batches: int
    per_worker: dict[int, int] = field(default_factory=dict)
    repeated: int = 0
    """Batches dropped because they repeated seeds already acknowledged (a restarted producer's redo)."""
    restored: int = 0
    """Trajectories the buffer actor replayed from its journal when it (re)started."""
    onpolicy: int = 0
    """On-policy trajectories held (the rest are expert demos)."""
    policy_version: int = 0
    """Highest policy version (training step of the weights) among acknowledged trajectories; 0: none yet."""
    beta: float = 1.0
    """Beta of the latest acknowledged batch (1: an expert batch, or none yet)."""
    expert_dropped: int = 0
    """Expert trajectories refused past the dagger regime's demo budget, since this buffer actor started (a dropped
    batch is journaled without its trajectories, so a replay cannot count them again)."""
    inference_flops: float = 0.0
    """Model FLOPs the producers' policy forwards cost for the batches received (``training.budget.forward_flops``)."""
    branches: int = 0
    """Early-experience branch trajectories held (the rest: demos and on-policy data)."""

    def as_metrics(self) -> dict[str, float]:
        return {
            "rollout/buffer_size": self.size,
            "rollout/produced": self.produced,
            "rollout/evicted": self.evicted,
            "rollout/restored": self.restored,
            "rollout/onpolicy_fraction": self.onpolicy / self.size if self.size else 0.0,
            "rollout/policy_version": self.policy_version,
            "rollout/beta": self.beta,
            "rollout/inference_flops": self.inference_flops,
            "rollout/branches": self.branches,
        }


@dataclass(frozen=True)
class DemoSpan:
    """Where a producer's expert demos lie in its seed range: its accepted demos are the successful expert episodes of
    its seeds below ``stop``; ``next_seed`` is the seed its last expert batch ended at (dropped ones included), where
    its on-policy batches start. Fixed once the demo budget is full (before any weights exist)."""

    stop: int
    next_seed: int


@dataclass
class _Entry:
    ref: Any  # an ObjectRef to a list[Trajectory] (any object in tests)
    count: int  # trajectories of the batch still held (eviction trims from the front)
    start: int  # index of the first held trajectory in the batch
    source: str = "expert"  # the batch's provenance source


class BufferState:
    """Bookkeeping over batches of trajectories: capacity, eviction (``fifo`` or ``onpolicy_first``), the demo budget,
    producers' progress.

    ``target`` (fixed regime): accept exactly this many expert demos, then ask producers to stop; the data set (the
    demos and their branches) is never evicted. ``expert_quota`` (dagger regime): accept exactly this many expert
    trajectories (later expert ones are dropped and counted), and on-policy ones without limit. Branch batches
    (``provenance.source == "branch"``) count toward neither and are registered without seeds of their own (they come
    in the same ``add`` as their demos).
    """

    def __init__(
        self, capacity: int, target: int | None = None, eviction: str = "fifo", expert_quota: int | None = None
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if target is not None and target > capacity:
            raise ValueError(f"target ({target}) must not exceed capacity ({capacity})")
        if expert_quota is not None and not 1 <= expert_quota <= capacity:
            raise ValueError(f"expert_quota ({expert_quota}) must be in [1, capacity ({capacity})]")
        if eviction not in EVICTIONS:
            raise ValueError(f"eviction {eviction!r} is unknown; allowed: {', '.join(EVICTIONS)}")
        self.capacity = capacity
        self.target = target
        self.eviction = eviction
        self.expert_quota = expert_quota
        self._experts = 0  # expert trajectories accepted
        self._expert_dropped = 0
        self._inference_flops = 0.0
        self._onpolicy = 0  # on-policy trajectories held
        self._branches = 0  # branch trajectories held
        self._policy_version = 0
        self._beta = 1.0
        self._entries: deque[_Entry] = deque()
        self._size = 0
        self._produced = 0
        self._evicted = 0
        self._batches = 0
        self._repeated = 0
        self._per_worker: dict[int, int] = {}
        self._next_seed: dict[int, int] = {}
        self._demo_stop: dict[int, int] = {}  # per worker: 1 + its last accepted demo's seed
        self._demo_next_seed: dict[int, int] = {}  # per worker: next_seed of its last expert batch
        self._played: dict[int, dict[int, int]] = {}  # per policy version: on-policy batches of it per worker
        self._stopped = False

    # -- producers ---------------------------------------------------------------------------------
    def add(
        self,
        ref: Any,
        count: int,
        worker: int = 0,
        next_seed: int | None = None,
        provenance: Provenance = EXPERT,
        inference_flops: float = 0.0,
        seeds: Sequence[int] | None = None,
    ) -> bool:
        """Register a batch of ``count`` trajectories of ``provenance`` whose policy forwards cost ``inference_flops``;
        returns True while producers should go on. ``seeds``: the trajectories' episode seeds, in order (an expert
        batch's accepted ones move the producer's ``demo_span``).

        In the fixed-budget regime a batch of demos that would overshoot the target is trimmed, so the buffer
        holds exactly ``target`` demos (the surplus at the end of that batch is never sampled). The dagger
        regime trims expert batches to ``expert_quota`` the same way.

        A batch whose ``next_seed`` does not go past the worker's acknowledged progress repeats seeds the
        buffer already holds and is dropped. That happens when a producer dies with an ``add`` in flight:
        its restarted self may read the resume seed before that ``add`` lands and redo the same seeds.
        """
        if count < 0:
            raise ValueError("count must be >= 0")
        self._inference_flops += inference_flops  # spent whether or not the batch is kept
        branch = provenance.source == "branch"
        if branch and next_seed is not None:
            raise ValueError("a branch batch has no seeds of its own: it comes in its demos' add (next_seed None)")
        if self.is_repeat(worker, next_seed):
            self._repeated += 1
            return self.wants_more()
        kept = self._kept(count, provenance)
        if provenance.source == "expert" and self.expert_quota is not None:
            self._expert_dropped += min(count, self._room_for_demos(self.target)) - kept
        self.check_room(kept)
        count = kept
        if provenance.source == "expert" and next_seed is not None:
            self._demo_next_seed[worker] = max(next_seed, self._demo_next_seed.get(worker, 0))
            if kept and seeds is not None:
                self._demo_stop[worker] = max(int(seeds[kept - 1]) + 1, self._demo_stop.get(worker, 0))
        if provenance.on_policy:
            version = provenance.policy_version
            played = self._played.setdefault(version, {})
            played[worker] = played.get(worker, 0) + 1
        if count > 0:
            self._entries.append(_Entry(ref, count, 0, provenance.source))
            self._size += count
            self._produced += count
            self._batches += 1
            self._per_worker[worker] = self._per_worker.get(worker, 0) + count
            if provenance.on_policy:
                self._onpolicy += count
            elif branch:
                self._branches += count
            else:
                self._experts += count
            self._policy_version = max(self._policy_version, provenance.policy_version)
            self._beta = provenance.beta
        if next_seed is not None:
            self._next_seed[worker] = max(next_seed, self._next_seed.get(worker, 0))
        self._evict()
        return self.wants_more()

    def accepted(self, count: int, worker: int, next_seed: int | None, provenance: Provenance) -> int:
        """How many of a batch of ``count`` trajectories ``add`` would keep (the first ones: trimming cuts the end)."""
        return 0 if self.is_repeat(worker, next_seed) else self._kept(count, provenance)

    def _room_for_demos(self, limit: int | None) -> int:
        return self.capacity if limit is None else max(0, limit - self._experts)

    def _kept(self, count: int, provenance: Provenance) -> int:
        if provenance.source != "expert":  # on-policy data and branches: no budget
            return count
        return min(count, self._room_for_demos(self.target), self._room_for_demos(self.expert_quota))

    def check_room(self, count: int) -> None:
        """The fixed regime's data set is never evicted: refuse ``count`` more trajectories that would not fit."""
        if self.target is not None and self._size + count > self.capacity:
            raise ValueError(
                f"the fixed regime's data set does not fit in the buffer: {self._size} held + {count} new > "
                f"data.buffer_capacity ({self.capacity}); raise data.buffer_capacity (the demos and their branches are "
                "kept whole, never evicted)"
            )

    def is_repeat(self, worker: int, next_seed: int | None) -> bool:
        """Whether a batch ending at ``next_seed`` repeats seeds already acknowledged for ``worker``."""
        return next_seed is not None and next_seed <= self._next_seed.get(worker, -1)

    def wants_more(self) -> bool:
        if self._stopped:
            return False
        return self.target is None or self._experts < self.target

    def wants_expert(self) -> bool:
        """Whether an expert batch would still be accepted (the dagger regime's demo budget is not full)."""
        return self.wants_more() and (self.expert_quota is None or self._experts < self.expert_quota)

    def stop(self) -> None:
        """Ask producers to stop at their next ``add``."""
        self._stopped = True

    def resume_seed(self, worker: int) -> int | None:
        """Next seed a restarted producer should use (acknowledged progress survives its crash)."""
        return self._next_seed.get(worker)

    def demo_span(self, worker: int) -> DemoSpan | None:
        """Where ``worker``'s accepted expert demos lie (None: it had no expert batch acknowledged)."""
        if worker not in self._demo_next_seed:
            return None
        return DemoSpan(self._demo_stop.get(worker, 0), self._demo_next_seed[worker])

    def played(self, version: int) -> dict[int, int]:
        """On-policy batches of policy ``version`` acknowledged, per producer (``rollout.sync``)."""
        return dict(self._played.get(version, {}))

    def last_played(self, worker: int) -> tuple[int, int]:
        """``(the newest policy version of worker's acknowledged on-policy batches, how many of them)``, ``(0, 0)``
        for none: a restarted producer under ``rollout.sync`` goes on from there instead of playing them again."""
        version = max((v for v, by_worker in self._played.items() if worker in by_worker), default=0)
        return version, self._played.get(version, {}).get(worker, 0)

    def _victim(self) -> int:
        """Index of the entry to trim next: the oldest (fifo), or the oldest on-policy one (``onpolicy_first``)."""
        if self.eviction == "onpolicy_first" and self._onpolicy:
            return next(i for i, e in enumerate(self._entries) if e.source == "on_policy")
        return 0

    def _evict(self) -> None:
        while self._size > self.capacity:
            i = self._victim()
            entry = self._entries[i]
            drop = min(entry.count, self._size - self.capacity)
            entry.count -= drop
            entry.start += drop
            self._size -= drop
            self._evicted += drop
            if entry.source == "on_policy":
                self._onpolicy -= drop
            elif entry.source == "branch":
                self._branches -= drop
            if entry.count == 0:
                del self._entries[i]

    # -- consumers ---------------------------------------------------------------------------------
    def snapshot(self) -> list[tuple[Any, int, int]]:
        """Every held batch as (reference, first index, count): for trainers that cache the whole buffer."""
        return [(e.ref, e.start, e.count) for e in self._entries]

    def stats(self) -> BufferStats:
        return BufferStats(
            size=self._size,
            capacity=self.capacity,
            produced=self._produced,
            evicted=self._evicted,
            batches=self._batches,
            per_worker=dict(self._per_worker),
            repeated=self._repeated,
            onpolicy=self._onpolicy,
            policy_version=self._policy_version,
            beta=self._beta,
            expert_dropped=self._expert_dropped,
            inference_flops=self._inference_flops,
            branches=self._branches,
        )


@dataclass(frozen=True)
class JournalRecord:
    """One ``add`` as the journal stores it (``trajectories`` empty when the buffer dropped the batch).

    The trajectories carry their ``Provenance`` (records written before it existed unpickle as expert demos); the
    batch's provenance is stored as well, so a replayed dropped batch (no trajectories) moves the resume seeds and the
    batch counters as it did (not ``expert_dropped``: its trajectories are not stored); older records lack the
    provenance: the class default, an expert batch, which is what they were. ``branches``: the early-experience
    branches of the demos the buffer accepted, held as their own batch (older records: the class default, none)."""

    worker: int
    next_seed: int | None
    trajectories: list
    provenance: Provenance = EXPERT
    branches: tuple = ()
    inference_flops: float = 0.0
    """The batch's policy forwards (older records: the class default, 0)."""


class BufferJournal:
    """Acknowledged batches as numbered files under ``where`` (``00000000.pkl``, ...), written whole or not at all
    (``Location.write_bytes``), read back in order."""

    SUFFIX = ".pkl"

    def __init__(self, where: Location) -> None:
        self.where = where
        self._next = 1 + max((self._number(loc) for loc in self._files()), default=-1)

    def _files(self) -> list[Location]:
        return [loc for loc in self.where.list() if self._number(loc) >= 0]

    @classmethod
    def _number(cls, loc: Location) -> int:
        stem = loc.name.removesuffix(cls.SUFFIX)
        return int(stem) if loc.name.endswith(cls.SUFFIX) and stem.isdigit() else -1

    def append(self, record: JournalRecord) -> None:
        self.where.child(f"{self._next:08d}{self.SUFFIX}").write_bytes(pickle.dumps(record, protocol=5))
        self._next += 1

    def records(self) -> Iterator[JournalRecord]:
        for loc in sorted(self._files(), key=self._number):
            yield pickle.loads(loc.read_bytes())


class TrajectoryBuffer:
    """Actor class around ``BufferState``; create it with ``ray.remote(TrajectoryBuffer).options(...)``.

    With a ``journal`` location every accepted batch is persisted before ``add`` returns, and a new instance (an
    actor restart) starts from everything the journal holds."""

    def __init__(
        self,
        capacity: int,
        target: int | None = None,
        journal: Location | None = None,
        eviction: str = "fifo",
        expert_quota: int | None = None,
    ) -> None:
        self._state = BufferState(capacity, target=target, eviction=eviction, expert_quota=expert_quota)
        self._journal = BufferJournal(journal) if journal is not None else None
        self._restored = 0
        if self._journal is not None:
            for record in self._journal.records():
                self._apply(record)
                self._restored += len(record.trajectories) + len(record.branches)
            if self._restored:
                print(f"[buffer] restored {self._restored} acknowledged trajectories from {journal}", flush=True)

    def add(
        self,
        batch: list,
        worker: int = 0,
        next_seed: int | None = None,
        branches: list = (),
        inference_flops: float = 0.0,
    ) -> bool:
        """Take ownership of ``batch`` (a list of trajectories, whose policy forwards cost ``inference_flops``) and of
        ``branches``: those of its demos (an expert batch: kept for the demos accepted) or the policy's branches of
        earlier demos (an on-policy batch: kept with it); True while producers should go on."""
        provenance = batch_provenance(batch)
        branches = list(branches)
        if branches and (provenance.source == "branch" or batch_provenance(branches).source != "branch"):
            raise ValueError("branches come with their expert demos or an on-policy batch, as branch trajectories")
        accepted = {t.seed for t in batch[: self._state.accepted(len(batch), worker, next_seed, provenance)]}
        # A batch the state will drop (a repeat, or past the fixed target or the demo budget) is journaled without
        # its trajectories: replaying it moves the counters and resume seeds exactly as it did here.
        open_to = self._state.wants_more() if provenance.on_policy else self._state.wants_expert()
        accepting = open_to and not self._state.is_repeat(worker, next_seed)
        if provenance.source == "expert":
            branches = [b for b in branches if b.seed in accepted]
        elif not accepting:
            branches = []
        self._state.check_room(len(accepted) + len(branches))  # before the journal: a refused add leaves no trace
        record = JournalRecord(worker, next_seed, batch if accepting else [], provenance, tuple(branches),
                               float(inference_flops))  # fmt: skip
        if self._journal is not None:  # durable before it is acknowledged
            self._journal.append(record)
        return self._apply(dataclasses.replace(record, trajectories=batch))  # the state sees what was sent

    def _apply(self, record: JournalRecord) -> bool:
        """Hand an acknowledged ``add`` (or a replayed one) to the state: its batch, then its branches' batch."""
        import ray

        # Owned by this actor: survives the producer's death.
        more = self._state.add(ray.put(record.trajectories), len(record.trajectories), record.worker,
                               record.next_seed, record.provenance, record.inference_flops,
                               seeds=[t.seed for t in record.trajectories])  # fmt: skip
        if record.branches:
            more = self._state.add(ray.put(list(record.branches)), len(record.branches), record.worker, None,
                                   batch_provenance(list(record.branches)))  # fmt: skip
        return more

    def wants_more(self) -> bool:
        return self._state.wants_more()

    def wants_expert(self) -> bool:
        return self._state.wants_expert()

    def stop(self) -> None:
        self._state.stop()

    def resume_seed(self, worker: int) -> int | None:
        return self._state.resume_seed(worker)

    def demo_span(self, worker: int) -> DemoSpan | None:
        return self._state.demo_span(worker)

    def played(self, version: int) -> dict[int, int]:
        return self._state.played(version)

    def last_played(self, worker: int) -> tuple[int, int]:
        return self._state.last_played(worker)

    # References nested in return values reach the caller as references, not resolved batches.
    def snapshot(self) -> list[tuple[Any, int, int]]:
        return self._state.snapshot()

    def size(self) -> int:
        return self._state.stats().size

    def stats(self) -> BufferStats:
        return dataclasses.replace(self._state.stats(), restored=self._restored)
