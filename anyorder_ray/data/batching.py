"""From held trajectories to padded micro-batches: uniform draws, fresh masks on every draw, length bucketing.

``TrajectoryView`` is the one sampler of training data: uniform with replacement over the batches a trainer holds
(the buffer's batches in a Ray run, a fixed list in ``LocalSource``), early-experience branches drawn with the arm's
share (``masking.branches``) and everything else uniformly. ``BatchMaker`` crops each drawn trajectory to a window,
samples its unit roles afresh (a branch's alternative action never a target: ``data.masking``) and encodes it, then
groups a pool of examples by length so micro-batches carry little padding. No Ray here:
``roles.train_loop.BufferSource`` feeds a ``TrajectoryView`` from the buffer actor.
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
from anyorder_ray.data.masking import AnyOrderMaskSampler, block_targets, unlabelled_units
from envs.trajectory import EXPERT, Trajectory

__all__ = ["BatchMaker", "LocalSource", "TrajectoryView"]


def _source(batch: Sequence[Trajectory]) -> str:
    """The provenance source of a batch's trajectories (a batch has one: ``roles.buffer.batch_provenance``)."""
    return getattr(batch[0], "provenance", EXPERT).source if len(batch) else "expert"


class _Pool:
    """Entries ``(batch, first, count)`` and the cumulative counts a uniform draw searches."""

    def __init__(self, entries: Sequence[tuple[Sequence[Trajectory], int, int]]) -> None:
        self.entries = list(entries)
        self.cum = np.cumsum([count for _, _, count in self.entries], dtype=np.int64)

    @property
    def size(self) -> int:
        return int(self.cum[-1]) if len(self.cum) else 0

    def take(self, picks: np.ndarray) -> list[Trajectory]:
        which = np.searchsorted(self.cum, picks, side="right")
        out = []
        for pick, w in zip(picks, which, strict=True):
            batch, first, count = self.entries[int(w)]
            out.append(batch[first + int(pick - (self.cum[w] - count))])
        return out


class TrajectoryView:
    """Sampling with replacement over batches of trajectories, each held as ``(batch, first, count)``:
    ``batch[first : first + count]`` are the trajectories of that batch in view (the buffer evicts from the front).
    Early-experience branches are drawn with a given share, every other trajectory uniformly."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self._entries: list[tuple[Sequence[Trajectory], int, int]] = []
        self._others = self._branches = _Pool([])
        self.counts: dict[str, int] = {}
        """Trajectories in view per provenance source (``expert``, ``on_policy``, ``branch``)."""

    @property
    def size(self) -> int:
        return self._others.size + self._branches.size

    @property
    def demos(self) -> int:
        """Expert demos in view (what the regimes' start sizes count)."""
        return self.counts.get("expert", 0)

    def update(self, entries: Sequence[tuple[Sequence[Trajectory], int, int]]) -> int:
        """Hold exactly ``entries``; returns the trajectories in view."""
        for batch, first, count in entries:
            if not (first >= 0 and count >= 0 and first + count <= len(batch)):
                raise ValueError(f"entry (first={first}, count={count}) does not fit a batch of {len(batch)}")
        self._entries = list(entries)
        sources = [_source(batch) for batch, _, _ in self._entries]
        self._others = _Pool([e for e, src in zip(self._entries, sources, strict=True) if src != "branch"])
        self._branches = _Pool([e for e, src in zip(self._entries, sources, strict=True) if src == "branch"])
        self.counts = {}
        for (_, _, count), src in zip(self._entries, sources, strict=True):
            self.counts[src] = self.counts.get(src, 0) + count
        return self.size

    def fork(self, rng: np.random.Generator) -> TrajectoryView:
        """A view of the same trajectories drawing with its own generator (this view's draws are untouched)."""
        other = TrajectoryView(rng)
        other.update(self._entries)
        return other

    def sample(self, n: int, branch_share: float = 0.0) -> list[Trajectory]:
        """``n`` trajectories drawn with replacement: each a branch with probability ``branch_share`` (uniform over
        the branches in view), else uniform over every other trajectory in view (0: branches are never drawn)."""
        if self.size == 0:
            raise RuntimeError("no trajectory in view yet: wait for data before sampling")
        if not 0.0 <= branch_share <= 1.0:
            raise ValueError(f"branch_share must be in [0, 1], got {branch_share}")
        if branch_share == 0.0:  # one draw per trajectory, as before branches existed
            if self._others.size == 0:
                raise RuntimeError("only branches in view: nothing to draw with branch_share 0")
            return self._others.take(self.rng.integers(0, self._others.size, size=n))
        is_branch = self.rng.random(n) < branch_share
        for pool, wanted, what in ((self._branches, is_branch.any(), "branch"),
                                   (self._others, not is_branch.all(), "demo (or on-policy trajectory)")):  # fmt: skip
            if wanted and pool.size == 0:
                raise RuntimeError(f"no {what} in view to draw with branch_share {branch_share}")
        branches = self._branches.take(self.rng.integers(0, max(self._branches.size, 1), size=int(is_branch.sum())))
        others = self._others.take(self.rng.integers(0, max(self._others.size, 1), size=int((~is_branch).sum())))
        branch_iter, other_iter = iter(branches), iter(others)
        return [next(branch_iter) if b else next(other_iter) for b in is_branch]


class LocalSource:
    """A fixed list of trajectories as a training data source (no buffer, no Ray): benches, tests and in-process
    runs of the training recipe. It has the interface of ``roles.train_loop.BufferSource``."""

    def __init__(self, trajectories: Sequence[Trajectory], rng: np.random.Generator | None = None) -> None:
        if not trajectories:
            raise ValueError("LocalSource needs at least one trajectory")
        self.view = TrajectoryView(rng if rng is not None else np.random.default_rng(0))
        by_source: dict[str, list[Trajectory]] = {}  # one batch per source, as the buffer holds them
        for t in trajectories:
            by_source.setdefault(t.provenance.source, []).append(t)
        self.view.update([(batch, 0, len(batch)) for batch in by_source.values()])

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

    def wait_until(self, min_demos: int) -> int:
        if self.view.demos < min_demos:
            raise RuntimeError(f"LocalSource holds {self.view.demos} expert demos, fewer than the {min_demos} training "
                               "needs")  # fmt: skip
        return self.size

    def sample(self, n: int, branch_share: float = 0.0) -> list[Trajectory]:
        return self.view.sample(n, branch_share)


class BatchMaker:
    """Crop, mask (fresh roles on every draw) and encode trajectories into padded micro-batches.

    Mode ``iwm`` trains in stages (``MaskingConfig.iwm_stage``): the recipe calls ``set_stage`` before every step; a
    new stage drops the pre-bucketed examples of the old one, and the imitation stage draws no branch."""

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
        self.onpolicy_sampler = None
        """``masking.onpolicy_mode``'s sampler for the on-policy segments (sequence layout; None: ``sampler``'s)."""
        self.onpolicy_mode = masking.onpolicy_override()
        if self.onpolicy_mode is not None and masking.layout == "sequence":
            self.onpolicy_sampler = AnyOrderMaskSampler(self.onpolicy_mode, masking.mask_prob,
                                                        seed=int(self.rng.integers(2**31)),
                                                        mixture_range=masking.mixture_range)  # fmt: skip
        self._queue: list[list[EncodedExample]] = []
        self.stage: str | None = None
        """Mode ``iwm``: the stage the queued examples were drawn for (None: not set yet, or another mode)."""

    def set_stage(self, stage: str | None) -> None:
        """Draw the next examples for ``stage`` (``MaskingConfig.iwm_stage``); a change drops the queued examples."""
        if stage != self.stage:
            self._queue = []
        self.stage = stage
        if stage is not None:
            self.sampler.iwm_stage = stage

    def branch_share(self) -> float:
        """Share of draws taken from the branches now: the arm's, none in ``iwm``'s imitation stage."""
        return 0.0 if self.stage == "imitation" else self.masking.branches

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
        # The one place the masking rule of unlabelled actions meets the data: a branch's alternative action is
        # never a target, in either layout (``data.masking``).
        unlabelled = unlabelled_units(window.labelled_actions)
        on_policy = self.onpolicy_mode is not None and window.provenance.on_policy
        if self.masking.layout == "block":
            mode = self.onpolicy_mode if on_policy else self.masking.mode
            targets = block_targets(mode, window.kinds, unlabelled, self.sampler.iwm_stage)
            return encode_blocks(window.mission, window.units, targets, self.encoder, self.data.max_seq_len)
        sampler = self.onpolicy_sampler if on_policy else self.sampler
        return process_any_order_sft_example(window, sampler, self.encoder, self.data.max_seq_len)

    def micro_batch(self, trajectories: Sequence[Trajectory]) -> dict[str, torch.Tensor]:
        return collate([self.example(t) for t in trajectories], self.pad_id)

    def bucketed(self, source: LocalSource | TrajectoryView, batch_size: int) -> dict[str, torch.Tensor]:
        """Next micro-batch from a pool of ``data.bucket_pool_batches`` batches grouped by length (low padding);
        ``source`` is anything with ``sample(n)``."""
        if not self._queue:
            drawn = source.sample(batch_size * self.data.bucket_pool_batches, self.branch_share())
            pool = [self.example(t) for t in drawn]
            self._queue = bucket_by_length(pool, batch_size, self.rng)
        return collate(self._queue.pop(), self.pad_id)

    def generators(self) -> dict[str, np.random.Generator]:
        out = {"batch": self.rng, "sampler": self.sampler.rng}
        if self.onpolicy_sampler is not None:
            out["onpolicy_sampler"] = self.onpolicy_sampler.rng
        return out

    def pending(self) -> tuple[tuple[EncodedExample, ...], ...]:
        """The pre-bucketed micro-batches not yet used (part of the checkpoint: their masks are drawn)."""
        return tuple(tuple(batch) for batch in self._queue)

    def restore_pending(self, queue: Sequence[Sequence[EncodedExample]], stage: str | None = None) -> None:
        """Queue checkpointed micro-batches, drawn for ``stage`` (``iwm``: the stage of the step before the
        checkpoint, a function of the step: nothing more to store)."""
        self._queue = [list(batch) for batch in queue]
        self.stage = stage
        if stage is not None:
            self.sampler.iwm_stage = stage
