"""The shared trajectory buffer: an actor that holds object-store references to trajectory batches.

Ownership: an object belongs to the process that ``ray.put`` it and is lost when that process dies (Ray
2.56 removed ``ray.put(..., _owner=...)``). So rollout actors hand each batch to ``add`` by value and the
buffer puts it into the object store itself: the buffer owns every acknowledged batch, and a rollout actor
that dies takes nothing acknowledged with it. The buffer then holds only references, evicts the oldest
trajectories past its capacity, and answers ``snapshot()`` with the references of every batch it holds; each
train worker resolves them from the object store once, caches them and samples locally
(``roles.train_loop.BufferSource``).

``BufferState`` is the pure bookkeeping (unit-tested without Ray); ``TrajectoryBuffer`` wraps it as an
actor class (resources are set by the caller with ``.options()``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any


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

    def as_metrics(self) -> dict[str, float]:
        return {
            "rollout/buffer_size": self.size,
            "rollout/produced": self.produced,
            "rollout/evicted": self.evicted,
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
        if next_seed is not None and next_seed <= self._next_seed.get(worker, -1):
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


class TrajectoryBuffer:
    """Actor class around ``BufferState``; create it with ``ray.remote(TrajectoryBuffer).options(...)``."""

    def __init__(self, capacity: int, target: int | None = None) -> None:
        self._state = BufferState(capacity, target=target)

    def add(self, batch: list, worker: int = 0, next_seed: int | None = None) -> bool:
        """Take ownership of ``batch`` (a list of trajectories); True while producers should go on."""
        import ray

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
        return self._state.stats()
