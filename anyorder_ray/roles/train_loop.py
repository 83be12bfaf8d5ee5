"""The Ray Train role: each TorchTrainer worker draws trajectories from the buffer, masks them afresh on
every draw, and trains the LLaDA2 model with the masked objective.

``train_loop_per_worker`` is short orchestration; the pieces it calls (``BufferSource``, ``BatchMaker``,
``train_step``, ``EvalClient``) are small and each does one thing. Only rank 0 writes checkpoints and talks
to the eval actor; every rank reports metrics (Ray Train V2 expects a report from every worker).

Resuming is exact: a checkpoint holds the weights, optimizer, LR schedule, step, every rank's RNG states and
each rank's data-pipeline position (pending pre-bucketed batches, buffer view, token count), so a worker
group restarted by ``FailureConfig`` reports the same metrics from the restore point on as a run that never
failed (same seed, fixed data, deterministic kernels).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch

from anyorder_ray.checkpointing import (
    TrainingState,
    capture_rng,
    load_training_state,
    load_weights_into,
    restore_rng,
    save_checkpoint,
    unwrap,
)
from anyorder_ray.config import DataConfig, ExperimentConfig, MaskingConfig
from anyorder_ray.factory import build_model, build_tokenizer
from anyorder_ray.masking import AnyOrderMaskSampler
from anyorder_ray.objective import data_parallel_normaliser, masked_cross_entropy, target_token_weights
from anyorder_ray.optim import LRSchedule, lr_schedule, make_optimizer
from anyorder_ray.sharding import (
    build_sharded_model,
    full_state_dict,
    gradient_sync,
    is_sharded,
    load_sharded_checkpoint,
    run_idle_experts,
    save_sharded_checkpoint,
)
from anyorder_ray.trajectory import Trajectory
from anyorder_ray.transform import (
    EncodedExample,
    UnitEncoder,
    bucket_by_length,
    collate,
    crop_window,
    process_any_order_sft_example,
)

logger = logging.getLogger(__name__)

METRICS_LOG = "metrics.jsonl"
"""File name of the metrics log a trial keeps next to its checkpoints (see ``LoopSettings.metrics_log``)."""


@dataclass(frozen=True)
class KillOnce:
    """Fault injection for tests: SIGKILL the worker process of ``rank`` once, right after step ``step``.

    ``marker`` is a file created just before the kill; the restarted worker group finds it and goes on. It
    simulates a crashed training worker from inside, at a chosen step. Production runs never set it.
    """

    step: int
    marker: str
    rank: int = 0

    def __call__(self, step: int, rank: int) -> None:
        if step != self.step or rank != self.rank or os.path.exists(self.marker):
            return
        Path(self.marker).write_text(f"killed pid {os.getpid()} after step {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class LoopSettings:
    """What ``train_loop_per_worker`` receives (TorchTrainer passes a dict: ``LoopSettings.from_dict``)."""

    cfg: ExperimentConfig
    buffer: Any
    """The trial's ``TrajectoryBuffer`` actor."""
    evaluator: Any | None = None
    """The eval actor (None: no evaluation)."""
    producers: Sequence[Any] = ()
    """The rollout actors' ``run`` references: a failed one stops the wait for data with its error."""
    metrics_log: str | None = None
    """JSONL file rank 0 appends every report's metrics to (Train V2 keeps no metrics history). A restart
    appends a ``{"resumed_from_step": N}`` line and then the reports from step N on, again."""
    fault_injection: KillOnce | None = None
    """Test hook only (see ``KillOnce``)."""

    @classmethod
    def from_dict(cls, loop_config: Mapping[str, Any]) -> LoopSettings:
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(loop_config) - allowed)
        if unknown:
            raise ValueError(f"unknown train_loop_config keys {unknown}; allowed: {sorted(allowed)}")
        return cls(**loop_config)


class BufferSource:
    """A worker-local view of the ``TrajectoryBuffer``: batches are fetched once, then sampled locally.

    ``refresh`` picks up new batches and forgets evicted ones; between refreshes sampling never waits on
    the bot or on the buffer actor.
    """

    def __init__(self, buffer: Any, rng: np.random.Generator) -> None:
        self._buffer = buffer
        self._rng = rng
        self._cache: dict[Any, list[Trajectory]] = {}
        self._entries: list[tuple[list[Trajectory], int, int]] = []
        self._cum = np.zeros(0, dtype=np.int64)

    @property
    def size(self) -> int:
        return int(self._cum[-1]) if len(self._cum) else 0

    def refresh(self, limit: int | None = None) -> int:
        """Sync the view with the buffer; returns the trajectories in view.

        ``limit`` keeps only the oldest ``limit`` trajectories: it restores a checkpointed view in the fixed
        regime, where the buffer only appends, so an earlier view is always a prefix of the current one.
        """
        snapshot = ray.get(self._buffer.snapshot.remote())
        if limit is not None:
            snapshot = _first_trajectories(snapshot, limit)
        new = [ref for ref, _, _ in snapshot if ref not in self._cache]
        if new:
            for ref, batch in zip(new, ray.get(new), strict=True):
                self._cache[ref] = batch
        live = {ref for ref, _, _ in snapshot}
        for ref in [r for r in self._cache if r not in live]:
            del self._cache[ref]
        self._entries = [(self._cache[ref], start, count) for ref, start, count in snapshot]
        self._cum = np.cumsum([count for _, _, count in self._entries], dtype=np.int64)
        return self.size

    def wait_until(
        self, min_size: int, producers: Sequence[Any] = (), timeout_s: float = 600.0, poll_s: float = 0.5
    ) -> int:
        """Block until the buffer holds ``min_size`` trajectories (progress logged every ~10 s).

        ``producers`` are the rollout actors' ``run`` references: one that failed is raised here at once
        instead of leaving training waiting for data that will never come.
        """
        start = last_log = time.monotonic()
        while self.refresh() < min_size:
            done, _ = ray.wait(list(producers), num_returns=len(producers), timeout=0) if producers else ([], [])
            for ref in done:
                ray.get(ref)  # raises the rollout actor's error
            if producers and len(done) == len(producers) and self.refresh() < min_size:
                raise RuntimeError(
                    f"all rollout actors finished but the buffer holds only {self.size} of the {min_size} "
                    "trajectories training needs (seed range exhausted, or the bot fails on this level?)"
                )
            now = time.monotonic()
            if now - start > timeout_s:
                raise TimeoutError(
                    f"buffer holds {self.size} trajectories after {timeout_s:.0f} s, training needs {min_size}; "
                    "are the rollout actors running (enough CPUs for them)?"
                )
            if now - last_log > 10:
                print(f"[train] waiting for data: {self.size}/{min_size} trajectories in the buffer", flush=True)
                last_log = now
            time.sleep(poll_s)
        return self.size

    def sample(self, n: int) -> list[Trajectory]:
        if self.size == 0:
            raise RuntimeError("BufferSource.sample before any data arrived; call wait_until first")
        picks = self._rng.integers(0, self.size, size=n)
        which = np.searchsorted(self._cum, picks, side="right")
        out = []
        for pick, w in zip(picks, which, strict=True):
            batch, start, count = self._entries[int(w)]
            out.append(batch[start + int(pick - (self._cum[w] - count))])
        return out


class BatchMaker:
    """Crop, mask (fresh roles on every draw) and encode trajectories into padded micro-batches."""

    def __init__(self, data: DataConfig, masking: MaskingConfig, encoder: UnitEncoder, pad_id: int, seed: int) -> None:
        self.data = data
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
                return process_any_order_sft_example(window, self.sampler, self.encoder, self.data.max_seq_len)
            except ValueError as e:
                if "masking needs" not in str(e):
                    raise
        return process_any_order_sft_example(trajectory, self.sampler, self.encoder, self.data.max_seq_len)

    def micro_batch(self, trajectories: Sequence[Trajectory]) -> dict[str, torch.Tensor]:
        return collate([self.example(t) for t in trajectories], self.pad_id)

    def bucketed(
        self, source: BufferSource, batch_size: int, pool_batches: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Next micro-batch from a pool of ``pool_batches`` (default ``data.bucket_pool_batches``) batches grouped
        by length (low padding)."""
        pool_batches = pool_batches or self.data.bucket_pool_batches
        if not self._queue:
            pool = [self.example(t) for t in source.sample(batch_size * pool_batches)]
            self._queue = bucket_by_length(pool, batch_size, self.rng)
        return collate(self._queue.pop(), self.pad_id)

    def generators(self) -> dict[str, np.random.Generator]:
        return {"batch": self.rng, "sampler": self.sampler._rng}

    def pending(self) -> list[list[EncodedExample]]:
        """The pre-bucketed micro-batches not yet used (part of the checkpoint: their masks are drawn)."""
        return [list(batch) for batch in self._queue]

    def restore_pending(self, queue: Sequence[Sequence[EncodedExample]]) -> None:
        self._queue = [list(batch) for batch in queue]


def _first_trajectories(snapshot: list[tuple[Any, int, int]], limit: int) -> list[tuple[Any, int, int]]:
    """The oldest ``limit`` trajectories of a buffer snapshot of (reference, first index, count) entries."""
    out, left = [], limit
    for ref, start, count in snapshot:
        if left <= 0:
            break
        out.append((ref, start, min(count, left)))
        left -= count
    return out


class StepBudget:
    """How many steps a worker trains: ``train.max_steps``, or as many as fit in ``train.time_budget_s``.

    With a time budget the step rate is measured over steps ``WARM..FIRST_FIX`` of this process and the total
    fixed at ``FIRST_FIX``; it is measured again at a quarter of that plan (now including eval pushes and
    reports) and then fixed for good. The total, and the wall time spent, live in the ``LRSchedule`` (so the
    cosine horizon follows the plan and a checkpoint carries it). Rank 0 decides and broadcasts, so all ranks
    stop together. Time before the first step (model build, waiting for data) is not counted; the final
    evaluation runs after the budget.
    """

    WARM = 10
    FIRST_FIX = 30

    def __init__(self, max_steps: int, budget_s: float | None, schedule: LRSchedule, start_step: int = 0) -> None:
        self.max_steps = max_steps
        self.budget_s = budget_s
        self.schedule = schedule
        self._start_step = start_step
        self._next_fix = start_step + self.FIRST_FIX
        self._t_last: float | None = None
        self._t_warm: float | None = None

    @property
    def total(self) -> int:
        return self.schedule.total

    def after_step(self, step: int) -> None:
        if self.budget_s is None:
            return
        now = time.perf_counter()
        if self._t_last is not None:
            self.schedule.elapsed_s += now - self._t_last
        self._t_last = now
        if self.schedule.budget_fixes >= 2:
            return
        if step == self._start_step + self.WARM:
            self._t_warm = now
        if step == self._next_fix and self._t_warm is not None:
            rate = (now - self._t_warm) / (step - self._start_step - self.WARM)
            remaining = self.budget_s - self.schedule.elapsed_s
            total = min(self.max_steps, max(step + 1, step + round(remaining / rate)))
            total = _broadcast_int(total)
            self.schedule.set_total(total)
            self.schedule.budget_fixes += 1
            self._next_fix = max(step + 1, total // 4)
            print(f"[train] time budget {self.budget_s:.0f} s: {rate * 1e3:.0f} ms/step, training {total} steps "
                  f"(fix {self.schedule.budget_fixes}/2)", flush=True)  # fmt: skip

    def start(self) -> None:
        """Call right before the first step: the clock starts here."""
        self._t_last = time.perf_counter()


def _broadcast_int(value: int) -> int:
    """Rank 0's ``value`` on every rank (no-op without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)  # works on gloo and NCCL alike
    return int(box[0])


@dataclass(frozen=True)
class StepStats:
    loss: float
    grad_norm: float
    tokens: int
    padded_tokens: int
    target_tokens: int


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: Sequence[dict[str, torch.Tensor]],
    max_grad_norm: float,
    device: torch.device,
    weighting: MaskingConfig | None = None,
) -> StepStats:
    """One optimizer step over ``micro_batches``: the exact (weighted) mean over the step's global targets.

    ``weighting`` (the arm's ``MaskingConfig``) sets per-unit normalisation and per-kind weights; None, or
    uniform weights, is the plain token mean.
    """
    model.train()
    labels_all = [mb["labels"] for mb in micro_batches]
    weights = None
    if weighting is not None and not weighting.weights_are_uniform():
        m = weighting
        weights = [
            target_token_weights(
                mb["labels"], mb["unit_ids"], mb["unit_kinds"], m.loss_norm, m.obs_weight, m.act_weight
            )
            for mb in micro_batches
        ]
    normaliser = data_parallel_normaliser(labels_all, weights=weights)
    total = 0.0
    for i, mb in enumerate(micro_batches):
        ids = mb["input_ids"].to(device)
        mask = mb["attention_mask"].to(device)
        labels = mb["labels"].to(device)
        w = weights[i].to(device) if weights is not None else None
        with gradient_sync(model, enabled=i == len(micro_batches) - 1):  # reduce once, after the last
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = masked_cross_entropy(logits, labels, num_targets=normaliser.to(device), token_weights=w)
            loss.backward()
        total += float(loss.detach())
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
    padded = sum(mb["attention_mask"].numel() for mb in micro_batches)
    targets = sum(int((mb["labels"] != -100).sum()) for mb in micro_batches)
    return StepStats(total, float(grad_norm), tokens, padded, targets)


class EvalClient:
    """Rank 0's side of the eval actor: submit weights without waiting, collect results when ready.

    At most one evaluation is in flight; a request made while one runs is skipped (the actor would only
    evaluate stale weights), so training never blocks on evaluation until the final one.

    ``gather`` (a sharded model): ``submit`` and ``final`` first gather the full weights, a collective, so every
    rank calls them (ranks other than 0 with ``actor=None``).
    """

    def __init__(self, actor: Any | None, episodes: int, gather: bool = False) -> None:
        self.actor = actor
        self.episodes = episodes
        self.gather = gather
        self.pending: Any | None = None
        self.latest: dict[str, float] = {}
        self.submitted = 0
        self.skipped = 0
        self.failures = 0

    def submit(self, model: torch.nn.Module, step: int, episodes: int | None = None) -> bool:
        gathered = full_state_dict(model) if self.gather else None  # before any early return: a collective
        if self.actor is None:
            return False
        self.poll()
        if self.pending is not None:
            self.skipped += 1
            return False
        weights = gathered
        if weights is None:
            weights = {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}
        ref = ray.put(weights)
        # The ref goes nested in a list so the actor receives the reference and fetches it itself.
        self.pending = self.actor.evaluate.remote([ref], step, episodes or self.episodes)
        self.submitted += 1
        return True

    def poll(self, timeout: float = 0.0) -> dict[str, float]:
        if self.pending is not None:
            ready, _ = ray.wait([self.pending], timeout=timeout)
            if ready:
                try:
                    self.latest = ray.get(ready[0])
                except ray.exceptions.RayError as e:  # the actor died for good; training goes on
                    self.failures += 1
                    logger.warning("evaluation failed: %s", e)
                self.pending = None
        return self.latest

    def final(self, model: torch.nn.Module, step: int, episodes: int, timeout: float = 1800.0) -> dict[str, float]:
        """Blocking evaluation of the final weights (the trial's reported result)."""
        if self.actor is None:
            if self.gather:
                full_state_dict(model)  # take part in the gather of rank 0's submit below
            return {}
        self.poll(timeout=timeout)
        self.pending = None
        self.submit(model, step, episodes)
        return self.poll(timeout=timeout)


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point of every TorchTrainer worker; ``loop_config`` holds the fields of ``LoopSettings``."""
    settings = LoopSettings.from_dict(loop_config)
    cfg, buffer = settings.cfg, settings.buffer
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not cfg.train.use_gpu:
        torch.set_num_threads(cfg.train.torch_threads)
    seed = cfg.train.seed * 1000 + rank
    torch.manual_seed(cfg.train.seed)  # same init on every rank (DDP also broadcasts it)
    np.random.seed(seed)
    random.seed(seed)  # captured in checkpoints too: seeded, so a run is reproducible from its seed alone
    device = ray.train.torch.get_device()

    tokenizer = build_tokenizer(cfg.model)
    encoder = UnitEncoder(tokenizer)
    if cfg.train.data_parallel_mode == "fsdp2":  # sharded from the start: no rank builds the full model
        model = build_sharded_model(cfg.model, tokenizer, device, cfg.train.seed,
                                    mixed_precision=cfg.train.enable_mixed_precision,
                                    activation_checkpointing=cfg.train.enable_gradient_checkpointing)  # fmt: skip
    else:
        model = build_model(cfg.model, tokenizer, seed=cfg.train.seed)
        if cfg.train.enable_gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if world > 1:
            run_idle_experts(model)  # DDP's all-reduce needs every expert's gradient from every rank
        model = ray.train.torch.prepare_model(model)
    if cfg.model.compile:
        model = torch.compile(model)
    optimizer, scheduler = make_optimizer(model, cfg.train)
    source = BufferSource(buffer, np.random.default_rng([seed, 0]))
    batches = BatchMaker(cfg.data, cfg.masking, encoder, tokenizer.pad_token_id, seed)
    generators = {"source": source._rng, **batches.generators()}

    step, restored = 0, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        step, restored = _resume(checkpoint, model, optimizer, scheduler, batches, generators, rank)
        print(f"[train] rank {rank}: resumed from step {step}", flush=True)
        if rank == 0 and settings.metrics_log:
            _append_jsonl(settings.metrics_log, {"resumed_from_step": step})

    # The fixed regime's buffer only appends, so the checkpointed view is a prefix of it: restore exactly that
    # view (later refreshes then see what the uninterrupted run saw). A streaming view may be evicted by now.
    view_size = restored.get("view_size") if cfg.data.regime == "fixed" else None
    source.wait_until(max(cfg.data.start_size(), view_size or 0), settings.producers)
    if view_size:
        source.refresh(limit=view_size)
    full = cfg.data.regime == "fixed" and source.size >= cfg.data.num_demos
    gather = is_sharded(model) and settings.evaluator is not None  # every rank joins the gather of the weights
    eval_client = EvalClient(settings.evaluator if rank == 0 else None, cfg.eval.episodes, gather=gather)
    accum = cfg.train.grad_accum_steps()
    mbs = cfg.train.micro_batch_size
    window = {"tokens": 0, "padded": 0, "targets": 0, "loss": 0.0, "steps": 0, "t0": time.perf_counter()}
    total_tokens = int(restored.get("tokens", 0))

    budget = StepBudget(cfg.train.max_steps, cfg.train.time_budget_s, lr_schedule(scheduler), start_step=step)
    budget.start()
    while step < budget.total:
        if not full and step % 20 == 0:
            source.refresh()
            full = cfg.data.regime == "fixed" and source.size >= cfg.data.num_demos
        micro = [batches.bucketed(source, mbs) for _ in range(accum)]
        stats = train_step(model, optimizer, scheduler, micro, cfg.train.max_grad_norm, device, cfg.masking)
        step += 1
        budget.after_step(step)
        total_tokens += stats.tokens
        window["tokens"] += stats.tokens
        window["padded"] += stats.padded_tokens
        window["targets"] += stats.target_tokens
        window["loss"] += stats.loss
        window["steps"] += 1
        if step % cfg.eval.every_steps == 0 and step < budget.total:
            eval_client.submit(model, step)  # a no-op without an actor (ranks > 0), except for joining a gather
        last = step == budget.total  # every rank agrees: the budget's total is rank 0's, broadcast
        if step % cfg.train.report_every == 0 or last:
            elapsed = time.perf_counter() - window["t0"]
            metrics: dict[str, Any] = {
                "train/step": step,
                "train/loss": window["loss"] / window["steps"],
                "train/grad_norm": stats.grad_norm,
                "train/lr": scheduler.get_last_lr()[0],
                "train/tokens_per_s": window["tokens"] * world / max(elapsed, 1e-9),
                "train/target_tokens": window["targets"] / window["steps"],
                "train/padding_waste": 1.0 - window["tokens"] / max(window["padded"], 1),
                "train/total_tokens": total_tokens * world,
                "train/planned_steps": budget.total,
            }
            final_eval = eval_client.final(model, step, cfg.eval.final_episodes) if last else {}  # every rank
            if rank == 0:
                metrics.update(ray.get(buffer.stats.remote()).as_metrics())
                if last:
                    metrics.update(final_eval)
                    metrics["eval/final"] = 1
                else:
                    metrics.update(eval_client.poll())
            want_ckpt = last or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0)
            position = {"queue": batches.pending(), "view_size": source.size, "tokens": total_tokens}
            _report(metrics, model, tokenizer, optimizer, scheduler, step, generators, position, rank, world,
                    bool(want_ckpt), final=last)  # fmt: skip
            if rank == 0 and settings.metrics_log:
                _append_jsonl(settings.metrics_log, metrics)
            window.update(tokens=0, padded=0, targets=0, loss=0.0, steps=0, t0=time.perf_counter())
        if settings.fault_injection is not None:
            settings.fault_injection(step, rank)


def _resume(
    checkpoint: ray.train.Checkpoint,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batches: BatchMaker,
    generators: dict[str, np.random.Generator],
    rank: int,
) -> tuple[int, dict[str, Any]]:
    """Load everything the checkpoint holds into this worker; returns the step and this rank's data position."""
    with checkpoint.as_directory() as d:
        if is_sharded(model):
            state = load_sharded_checkpoint(d, model, optimizer)  # weights and optimizer: DCP, collective
        else:
            load_weights_into(model, d)
            state = load_training_state(d)
            optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    rngs = state.rng["per_rank"]
    restore_rng(rngs.get(rank, rngs[0]), generators)
    # A rank the checkpoint does not know (a larger worker group) starts with no pending batches.
    position = state.pipeline.get("per_rank", {}).get(rank, {})
    batches.restore_pending(position.get("queue", []))
    return state.step, position


def _append_jsonl(path: str, record: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=float) + "\n")


def _report(
    metrics: dict,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    generators: dict[str, np.random.Generator],
    position: dict[str, Any],
    rank: int,
    world: int,
    with_checkpoint: bool,
    final: bool = False,
) -> None:
    """Report ``metrics``, with a checkpoint if asked; a sharded model's ``final`` checkpoint also holds the
    consolidated Hugging Face export."""
    if not with_checkpoint:
        ray.train.report(metrics)
        return
    # Every rank's RNG states and data position go into the checkpoint so a restored run continues each
    # rank's streams and batches exactly.
    mine = {"rng": capture_rng(generators), "position": position}
    gathered = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    sharded = is_sharded(model)
    state = None
    if rank == 0:
        state = TrainingState(
            step=step,
            optimizer={} if sharded else optimizer.state_dict(),  # sharded: in the DCP files instead
            scheduler=scheduler.state_dict(),
            rng={"per_rank": {r: g["rng"] for r, g in enumerate(gathered)}},
            extra={"metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)}},
            pipeline={"per_rank": {r: g["position"] for r, g in enumerate(gathered)}},
        )
    with tempfile.TemporaryDirectory(prefix="aoray-ckpt-") as tmp:
        path = Path(tmp) / "checkpoint"
        if sharded:  # every rank writes its shard into its own folder; Ray merges them into one checkpoint
            save_sharded_checkpoint(path, model, optimizer, tokenizer, state, export=final)
        elif rank == 0:
            save_checkpoint(path, model, tokenizer, state)
        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if path.exists() else None
        ray.train.report(metrics, checkpoint=checkpoint)
