"""The shared trajectory buffer: an actor that holds object-store references to trajectory batches.

Ownership: an object belongs to the process that ``ray.put`` it and is lost when that process dies (Ray
2.56 removed ``ray.put(..., _owner=...)``). So rollout actors hand each batch to ``add`` by value and the
buffer puts it into the object store itself: the buffer owns every acknowledged batch, and a rollout actor
that dies takes nothing acknowledged with it. The buffer then holds only references, evicts the oldest
trajectories past its capacity, and answers ``snapshot()`` with the references of every batch it holds; each
train worker resolves them from the object store once, caches them and samples locally
(``roles.train_loop.BufferSource``).

Durability: given a ``journal`` location (the trial's storage: a folder or a URI), the buffer writes every batch
it accepts there *before* acknowledging it, one file per batch. A restarted buffer actor (or the buffer of a trial
that ``--resume`` runs again) replays the journal in order and so holds exactly what was acknowledged, with the
producers' resume seeds; its batches get new object references, which train workers pick up at their next refresh.
The journal keeps every acknowledged batch, evicted ones included: it is also the run's dataset of trajectories.

``BufferState`` is the pure bookkeeping (unit-tested without Ray), ``BufferJournal`` the files; ``TrajectoryBuffer``
wraps both as an actor class (resources are set by the caller with ``.options()``).
"""

from __future__ import annotations

import dataclasses
import pickle
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from anyorder_ray.storage import Location


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

    def as_metrics(self) -> dict[str, float]:
        return {
            "rollout/buffer_size": self.size,
            "rollout/produced": self.produced,
            "rollout/evicted": self.evicted,
            "rollout/restored": self.restored,
        }


@dataclass
class _Entry:
    ref: Any  # an ObjectRef to a list[Trajectory] (any object in tests)
    count: int  # trajectories of the batch still held (eviction trims from the front)
    start: int  # index of the first held trajectory in the batch


class BufferState:
    """FIFO bookkeeping over batches of trajectories: capacity, eviction, producers' progress."""

    def __init__(self, capacity: int, target: int | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if target is not None and target > capacity:
            raise ValueError(f"target ({target}) must not exceed capacity ({capacity})")
        self.capacity = capacity
        self.target = target  # fixed-budget regime: accept exactly this many, then ask producers to stop
        self._entries: deque[_Entry] = deque()
        self._size = 0
        self._produced = 0
        self._evicted = 0
        self._batches = 0
        self._repeated = 0
        self._per_worker: dict[int, int] = {}
        self._next_seed: dict[int, int] = {}
        self._stopped = False

    # -- producers ---------------------------------------------------------------------------------
    def add(self, ref: Any, count: int, worker: int = 0, next_seed: int | None = None) -> bool:
        """Register a batch of ``count`` trajectories; returns True while producers should go on.

        In the fixed-budget regime a batch that would overshoot the target is trimmed, so the buffer
        holds exactly ``target`` trajectories (the surplus at the end of that batch is never sampled).

        A batch whose ``next_seed`` does not go past the worker's acknowledged progress repeats seeds the
        buffer already holds and is dropped. That happens when a producer dies with an ``add`` in flight:
        its restarted self may read the resume seed before that ``add`` lands and redo the same seeds.
        """
        if count < 0:
            raise ValueError("count must be >= 0")
        if self.is_repeat(worker, next_seed):
            self._repeated += 1
            return self.wants_more()
        if self.target is not None:
            count = min(count, self.target - self._produced)
        if count > 0:
            self._entries.append(_Entry(ref, count, 0))
            self._size += count
            self._produced += count
            self._batches += 1
            self._per_worker[worker] = self._per_worker.get(worker, 0) + count
        if next_seed is not None:
            self._next_seed[worker] = max(next_seed, self._next_seed.get(worker, 0))
        self._evict()
        return self.wants_more()

    def is_repeat(self, worker: int, next_seed: int | None) -> bool:
        """Whether a batch ending at ``next_seed`` repeats seeds already acknowledged for ``worker``."""
        return next_seed is not None and next_seed <= self._next_seed.get(worker, -1)

    def wants_more(self) -> bool:
        if self._stopped:
            return False
        return self.target is None or self._produced < self.target

    def stop(self) -> None:
        """Ask producers to stop at their next ``add``."""
        self._stopped = True

    def resume_seed(self, worker: int) -> int | None:
        """Next seed a restarted producer should use (acknowledged progress survives its crash)."""
        return self._next_seed.get(worker)

    def _evict(self) -> None:
        while self._size > self.capacity:
            head = self._entries[0]
            drop = min(head.count, self._size - self.capacity)
            head.count -= drop
            head.start += drop
            self._size -= drop
            self._evicted += drop
            if head.count == 0:
                self._entries.popleft()

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
        )


@dataclass(frozen=True)
class JournalRecord:
    """One ``add`` as the journal stores it (``trajectories`` empty when the buffer dropped the batch)."""

    worker: int
    next_seed: int | None
    trajectories: list


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

    def __init__(self, capacity: int, target: int | None = None, journal: Location | None = None) -> None:
        import ray

        self._state = BufferState(capacity, target=target)
        self._journal = BufferJournal(journal) if journal is not None else None
        self._restored = 0
        if self._journal is not None:
            for record in self._journal.records():
                self._state.add(ray.put(record.trajectories), len(record.trajectories), record.worker,
                                record.next_seed)  # fmt: skip
                self._restored += len(record.trajectories)
            if self._restored:
                print(f"[buffer] restored {self._restored} acknowledged trajectories from {journal}", flush=True)

    def add(self, batch: list, worker: int = 0, next_seed: int | None = None) -> bool:
        """Take ownership of ``batch`` (a list of trajectories); True while producers should go on."""
        import ray

        if self._journal is not None:  # durable before it is acknowledged
            # A batch the state will drop (a repeat, or past the fixed target) is journaled without its trajectories:
            # replaying it moves the counters and resume seeds exactly as it did here.
            accepting = self._state.wants_more() and not self._state.is_repeat(worker, next_seed)
            self._journal.append(JournalRecord(worker, next_seed, batch if accepting else []))
        ref = ray.put(batch)  # owned by this actor: survives the producer's death
        return self._state.add(ref, len(batch), worker=worker, next_seed=next_seed)

    def wants_more(self) -> bool:
        return self._state.wants_more()

    def stop(self) -> None:
        self._state.stop()

    def resume_seed(self, worker: int) -> int | None:
        return self._state.resume_seed(worker)

    # References nested in return values reach the caller as references, not resolved batches.
    def snapshot(self) -> list[tuple[Any, int, int]]:
        return self._state.snapshot()

    def size(self) -> int:
        return self._state.stats().size

    def stats(self) -> BufferStats:
        return dataclasses.replace(self._state.stats(), restored=self._restored)
