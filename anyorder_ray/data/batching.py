"""From held trajectories to padded micro-batches: uniform draws, fresh masks on every draw, length bucketing.

``TrajectoryView`` is the one sampler of training data: uniform with replacement over the batches a trainer holds
(the buffer's batches in a Ray run, a fixed list in ``LocalSource``). ``BatchMaker`` crops each drawn trajectory to a
window, samples its unit roles afresh and encodes it, then groups a pool of examples by length so micro-batches carry
little padding. No Ray here: ``roles.train_loop.BufferSource`` feeds a ``TrajectoryView`` from the buffer actor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from anyorder_ray.config import DataConfig, MaskingConfig
from anyorder_ray.data.encoding import (
    EncodedExample,
    UnitEncoder,
    bucket_by_length,
    collate,
    crop_window,
    encode_blocks,
    process_any_order_sft_example,
)
from anyorder_ray.data.masking import AnyOrderMaskSampler, block_targets
from envs.trajectory import Trajectory

__all__ = ["BatchMaker", "LocalSource", "TrajectoryView"]


class TrajectoryView:
    """Uniform sampling with replacement over batches of trajectories, each held as ``(batch, first, count)``:
    ``batch[first : first + count]`` are the trajectories of that batch in view (the buffer evicts from the front)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self._entries: list[tuple[Sequence[Trajectory], int, int]] = []
        self._cum = np.zeros(0, dtype=np.int64)

    @property
    def size(self) -> int:
        return int(self._cum[-1]) if len(self._cum) else 0

    def update(self, entries: Sequence[tuple[Sequence[Trajectory], int, int]]) -> int:
        """Hold exactly ``entries``; returns the trajectories in view."""
        for batch, first, count in entries:
            if not (first >= 0 and count >= 0 and first + count <= len(batch)):
                raise ValueError(f"entry (first={first}, count={count}) does not fit a batch of {len(batch)}")
        self._entries = list(entries)
        self._cum = np.cumsum([count for _, _, count in self._entries], dtype=np.int64)
        return self.size

    def fork(self, rng: np.random.Generator) -> TrajectoryView:
        """A view of the same trajectories drawing with its own generator (this view's draws are untouched)."""
        other = TrajectoryView(rng)
        other.update(self._entries)
        return other

    def sample(self, n: int) -> list[Trajectory]:
        """``n`` trajectories drawn uniformly with replacement."""
        if self.size == 0:
            raise RuntimeError("no trajectory in view yet: wait for data before sampling")
        picks = self.rng.integers(0, self.size, size=n)
        which = np.searchsorted(self._cum, picks, side="right")
        out = []
        for pick, w in zip(picks, which, strict=True):
            batch, first, count = self._entries[int(w)]
            out.append(batch[first + int(pick - (self._cum[w] - count))])
        return out


class LocalSource:
    """A fixed list of trajectories as a training data source (no buffer, no Ray): benches, tests and in-process
    runs of the training recipe. It has the interface of ``roles.train_loop.BufferSource``."""

    def __init__(self, trajectories: Sequence[Trajectory], rng: np.random.Generator | None = None) -> None:
        if not trajectories:
            raise ValueError("LocalSource needs at least one trajectory")
        self.view = TrajectoryView(rng if rng is not None else np.random.default_rng(0))
        self.view.update([(list(trajectories), 0, len(trajectories))])

    @property
    def rng(self) -> np.random.Generator:
        """The generator of the draws (the training recipe seeds it and checkpoints it)."""
        return self.view.rng

    @rng.setter
    def rng(self, rng: np.random.Generator) -> None:
        self.view.rng = rng

    @property
    def size(self) -> int:
        return self.view.size

    def refresh(self, limit: int | None = None) -> int:
        return self.size if limit is None else min(self.size, limit)

    def wait_until(self, min_size: int) -> int:
        if self.size < min_size:
            raise RuntimeError(f"LocalSource holds {self.size} trajectories, fewer than the {min_size} training needs")
        return self.size

    def sample(self, n: int) -> list[Trajectory]:
        return self.view.sample(n)


class BatchMaker:
    """Crop, mask (fresh roles on every draw) and encode trajectories into padded micro-batches."""

    def __init__(self, data: DataConfig, masking: MaskingConfig, encoder: UnitEncoder, pad_id: int, seed: int) -> None:
        self.data = data
        self.masking = masking
        self.encoder = encoder
        self.pad_id = pad_id
        self.rng = np.random.default_rng([seed, 1])
        self.sampler = AnyOrderMaskSampler(
            masking.mode,
            masking.mask_prob,
            seed=int(self.rng.integers(2**31)),
            mixture_range=masking.mixture_range,
            causal_prob=masking.causal_prob,
        )
        self._queue: list[list[EncodedExample]] = []

    def example(self, trajectory: Trajectory) -> EncodedExample:
        # A crop can lack what a mode needs (prefix: an observation after an action); draw another crop
        # a few times, then fall back to the whole episode, which always has one.
        for _ in range(8):
            window = crop_window(trajectory, self.data.window_steps, self.rng)
            try:
                return self._encode(window)
            except ValueError as e:
                if "masking needs" not in str(e):
                    raise
        return self._encode(trajectory)

    def _encode(self, window: Trajectory) -> EncodedExample:
        if self.masking.layout == "block":
            targets = block_targets(self.masking.mode, window.kinds)
            return encode_blocks(window.mission, window.units, targets, self.encoder, self.data.max_seq_len)
        return process_any_order_sft_example(window, self.sampler, self.encoder, self.data.max_seq_len)

    def micro_batch(self, trajectories: Sequence[Trajectory]) -> dict[str, torch.Tensor]:
        return collate([self.example(t) for t in trajectories], self.pad_id)

    def bucketed(self, source: LocalSource | TrajectoryView, batch_size: int) -> dict[str, torch.Tensor]:
        """Next micro-batch from a pool of ``data.bucket_pool_batches`` batches grouped by length (low padding);
        ``source`` is anything with ``sample(n)``."""
        if not self._queue:
            pool = [self.example(t) for t in source.sample(batch_size * self.data.bucket_pool_batches)]
            self._queue = bucket_by_length(pool, batch_size, self.rng)
        return collate(self._queue.pop(), self.pad_id)

    def generators(self) -> dict[str, np.random.Generator]:
        return {"batch": self.rng, "sampler": self.sampler.rng}

    def pending(self) -> tuple[tuple[EncodedExample, ...], ...]:
        """The pre-bucketed micro-batches not yet used (part of the checkpoint: their masks are drawn)."""
        return tuple(tuple(batch) for batch in self._queue)

    def restore_pending(self, queue: Sequence[Sequence[EncodedExample]]) -> None:
        self._queue = [list(batch) for batch in queue]
