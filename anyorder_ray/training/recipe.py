"""The training recipe: one worker's whole training run as an object, ``setup`` / ``train`` / ``save_checkpoint`` /
``cleanup`` (torchtune's recipe shape). No Ray here.

The recipe holds the model, optimizer, LR schedule, step budget, batch maker and data source, and every random
stream. What connects it to the outside world is passed in:

- a ``Session`` (the worker's process group and its reports: ``roles.train_loop.RaySession`` inside a TorchTrainer,
  ``LocalSession`` in this process),
- a data source (``roles.train_loop.BufferSource`` over the buffer actor, ``data.batching.LocalSource`` over a list),
- optionally an ``Evaluator`` (``roles.train_loop.EvalClient`` talks to the eval actor) and a metrics log.

Resuming is exact: a checkpoint holds the weights, optimizer, LR schedule, step and one ``RankState`` per rank (RNG
streams, pending pre-bucketed batches, buffer view, token count), so a restarted worker group reports the same
metrics from the restore point on as a run that never failed (same seed, fixed data, deterministic kernels).
"""

from __future__ import annotations

import contextlib
import json
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from anyorder_ray.config import ExperimentConfig, MaskingConfig
from anyorder_ray.data.batching import BatchMaker, TrajectoryView
from anyorder_ray.data.encoding import IGNORE_INDEX, UnitEncoder, target_logits
from anyorder_ray.models.factory import build_model, build_tokenizer
from anyorder_ray.models.llada2_moe.modeling_llada2_moe import compile_regions
from anyorder_ray.storage import Location, as_location
from anyorder_ray.training.budget import (
    StepBudget,
    broadcast_int,
    plan_compute_steps,
    probe_steps,
    replan_compute_steps,
    step_cost,
)
from anyorder_ray.training.checkpoint import (
    RankState,
    RngState,
    TrainingState,
    load_training_state,
    load_weights_into,
    save_checkpoint,
    unwrap,
)
from anyorder_ray.training.objective import data_parallel_normaliser, masked_cross_entropy, target_token_weights
from anyorder_ray.training.optim import lr_schedule, make_optimizer, set_horizon
from anyorder_ray.training.sharding import (
    build_sharded_model,
    gradient_sync,
    is_sharded,
    load_sharded_checkpoint,
    run_idle_experts,
    save_sharded_checkpoint,
)
from envs.trajectory import Trajectory

__all__ = [
    "TIMING_METRICS",
    "Evaluator",
    "LocalSession",
    "Publisher",
    "Session",
    "StepStats",
    "TrainingRecipe",
    "TrajectorySource",
    "train_step",
]


# Wall-clock metrics in every ``train/...`` report: they vary with machine load, everything else a report says is
# a function of the config and seed (an interrupted and resumed trial reports the same values).
TIMING_METRICS = frozenset({"train/tokens_per_s", "train/elapsed_s", "train/eval_wait_s", "train/batch_time_s",
                            "train/step_time_s", "train/report_time_s", "train/sync_wait_s"})  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# What the recipe is given.


class Session(Protocol):
    """A worker's link to its process group and to whoever collects its reports and checkpoints."""

    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Wrap a replicated model for data parallelism (DDP) and move it to ``device``."""
        ...

    def restore_dir(self) -> contextlib.AbstractContextManager[Path | None]:
        """The folder of the checkpoint to resume from while the context is open (None: a fresh start)."""
        ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str | None) -> None:
        """Report ``metrics`` (every rank, every time), with this rank's part of checkpoint ``name`` when given."""
        ...

    def latest_checkpoint(self) -> Any:
        """The last reported checkpoint, as the eval actor can load it (rank 0)."""
        ...


class TrajectorySource(Protocol):
    """Where a worker's training trajectories come from. The recipe seeds ``rng`` (its draws) and checkpoints it;
    ``view`` holds what it samples from (the compute-budget probe forks it)."""

    rng: np.random.Generator
    view: TrajectoryView

    @property
    def size(self) -> int: ...

    def refresh(self, limit: int | None = None) -> int: ...

    def wait_until(self, min_demos: int) -> int: ...

    def sample(self, n: int, branch_share: float = 0.0) -> list[Trajectory]: ...


class Evaluator(Protocol):
    """Rank 0's asynchronous evaluation (every rank calls ``submit`` / ``final``: a sharded model gathers)."""

    def submit(self, model: torch.nn.Module, step: int) -> bool: ...

    def submit_checkpoint(self, checkpoint: Any, step: int) -> bool: ...

    def poll(self) -> dict[str, float]: ...

    def wait(self) -> dict[str, float]: ...

    def final(self, model: torch.nn.Module, step: int, episodes: int, checkpoint: Any = None) -> dict[str, float]: ...


class Publisher(Protocol):
    """Where the dagger regime's rollout actors get the latest weights (every rank calls: a sharded model gathers)."""

    def publish(self, model: torch.nn.Module, step: int, planned_steps: int | None = None) -> None: ...


class LocalSession:
    """The recipe in this process, without Ray: rank 0 of 1, reports kept in ``reports`` and checkpoints copied
    into ``checkpoint_root/<name>`` (resumed from ``resume_from`` when given)."""

    rank = 0
    world_size = 1

    def __init__(self, checkpoint_root: str | Path | None = None, resume_from: str | Path | None = None) -> None:
        self.device = torch.device("cpu")
        self.checkpoint_root = Path(checkpoint_root) if checkpoint_root is not None else None
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: list[Path] = []

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    @contextlib.contextmanager
    def restore_dir(self) -> Iterator[Path | None]:
        yield self.resume_from

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None and self.checkpoint_root is not None:
            import shutil

            target = self.checkpoint_root / (name or f"checkpoint_{len(self.checkpoints):06d}")
            shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)
            self.checkpoints.append(target)

    def latest_checkpoint(self) -> Path | None:
        return self.checkpoints[-1] if self.checkpoints else None


# ---------------------------------------------------------------------------------------------------------
# One optimizer step.


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
        labels = mb["labels"].to(device)
        targets = labels != IGNORE_INDEX
        w = weights[i].to(device)[targets] if weights is not None else None
        with gradient_sync(model, enabled=i == len(micro_batches) - 1):  # reduce once, after the last
            logits = target_logits(model, mb, device)  # [targets, V]: the LM head at the targets only
            loss = masked_cross_entropy(logits, labels[targets], num_targets=normaliser.to(device), token_weights=w)
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


@dataclass
class _Window:
    """Sums over the steps since the last report."""

    tokens: int = 0
    padded: int = 0
    targets: int = 0
    loss: float = 0.0
    steps: int = 0
    t0: float = 0.0

    def add(self, stats: StepStats) -> None:
        self.tokens += stats.tokens
        self.padded += stats.padded_tokens
        self.targets += stats.target_tokens
        self.loss += stats.loss
        self.steps += 1


# ---------------------------------------------------------------------------------------------------------
# The recipe.


class TrainingRecipe:
    """One worker's training run. ``setup()`` builds everything (and resumes), ``train()`` runs the steps with
    reports, evaluations and checkpoints, ``cleanup()`` releases what ``setup`` took.

    Args:
        cfg: the trial's config (its ``masking`` section is the arm).
        session: the worker's process group and report sink.
        source: the training trajectories.
        evaluator: rank 0's eval client (other ranks get one too when a sharded model must join a gather of the
            weights, None otherwise); evaluation happens when ``cfg.eval.enabled``.
        buffer_stats: rank 0 adds these ``rollout/...`` metrics to every report (with ``rollout/inference_flops``,
            also ``compute/total_flops``: training plus the rollout actors' policy forwards).
        metrics_log: JSONL file (a path or storage URI) rank 0 appends every report to (with a
            ``resumed_from_step`` line after a restart).
        after_step: called with ``(step, rank)`` after every step (tests inject faults with it).
        publisher: the dagger regime's weight channel to the rollout actors: the weights go there every
            ``publish_every`` steps (``rollout.weights_every_steps``, or the planned steps over
            ``rollout.weights_versions``), never waited for.

    Data: the fixed regime's view is its whole data set from the first step; the streaming and dagger regimes refresh
    the view every 20 steps with whatever the actors added. Dagger with ``rollout.sync`` refreshes only at a
    publication, right after the source's ``wait_for_version`` saw every actor's batch of the previous version (the
    trial's ``BufferSource`` has it), so each step's data is a function of the config and seed.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        session: Session,
        source: TrajectorySource,
        evaluator: Evaluator | None = None,
        buffer_stats: Callable[[], dict[str, float]] | None = None,
        metrics_log: Location | str | None = None,
        after_step: Callable[[int, int], None] | None = None,
        publisher: Publisher | None = None,
    ) -> None:
        self.cfg = cfg
        self.publisher = publisher
        self.session = session
        self.source = source
        self.evaluator = evaluator
        self.buffer_stats = buffer_stats
        self.metrics_log = as_location(metrics_log) if metrics_log is not None else None
        self.after_step = after_step
        self.step = 0
        self.total_tokens = 0
        self.total_flops = 0.0
        # Where a worker's training time goes (reported, never checkpointed: wall clock, see TIMING_METRICS).
        self.eval_wait_s = 0.0
        self.batch_time_s = 0.0
        self.step_time_s = 0.0
        self.report_time_s = 0.0
        self.sync_wait_s = 0.0
        self.published = 0  # the step of the last publication (its version) since this worker started; 0: none
        self.sync = cfg.data.regime == "dagger" and cfg.rollout.sync
        if self.sync and not hasattr(source, "wait_for_version"):
            raise ValueError(f"rollout.sync needs a source that waits for the rollout actors' batches (the trial's "
                             f"BufferSource), got {type(source).__name__}")  # fmt: skip

    # -- setup -------------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, rank = self.cfg, self.session.rank
        if not cfg.train.use_gpu:
            torch.set_num_threads(cfg.train.torch_threads)
        seed = cfg.train.seed * 1000 + rank
        torch.manual_seed(cfg.train.seed)  # same init on every rank (DDP also broadcasts it)
        np.random.seed(seed)
        random.seed(seed)  # captured in checkpoints too: seeded, so a run is reproducible from its seed alone

        self.tokenizer = build_tokenizer(cfg.model, cfg.env)
        self.model = self._build_model()
        if cfg.model.compile == "regional":
            compile_regions(unwrap(self.model))
        elif cfg.model.compile:
            self.model = torch.compile(self.model)
        self.model_config = unwrap(self.model).config
        self.optimizer, self.scheduler = make_optimizer(self.model, cfg.train)
        self.encoder = UnitEncoder(self.tokenizer)
        self.batches = BatchMaker(cfg.data, cfg.masking, self.encoder, self.tokenizer.pad_token_id, seed)
        self.source.rng = np.random.default_rng([seed, 0])
        self.generators = {"source": self.source.rng, **self.batches.generators()}

        view_size = None
        with self.session.restore_dir() as directory:
            if directory is not None:
                view_size = self._resume(directory)
        # The fixed regime's buffer only appends, so the checkpointed view is a prefix of it: restore exactly that
        # view (later refreshes then see what the uninterrupted run saw). A streaming view may be evicted by now.
        # The fixed data set is complete once its demos are there (their branches arrive with them).
        if cfg.data.regime != "fixed":
            view_size = None
        self.source.wait_until(cfg.data.start_size())
        if view_size:
            self.source.refresh(limit=view_size)
        schedule = lr_schedule(self.scheduler)
        if cfg.train.compute_budget() is not None and not schedule.planned:
            set_horizon(self.scheduler, self._plan_compute(seed))
            schedule.planned = True
        self.budget = StepBudget(cfg.train.max_steps, cfg.train.time_budget_s, schedule, start_step=self.step)
        # The dagger regime plans its compute budget again at every weights publication (training.budget).
        self._replans = cfg.data.regime == "dagger" and cfg.train.compute_budget() is not None
        if self._replans:
            self._replan_mark = (self.step, self._spent())
        versions = cfg.rollout.weights_versions
        self.publish_every = cfg.rollout.weights_every_steps
        if versions is not None:  # the plan before the first step (checkpointed with the schedule), one on all ranks
            self.publish_every = max(1, round(schedule.planned_total / versions))

    def _stage(self, step: int) -> str | None:
        """Mode ``iwm``'s stage at ``step`` (None for other modes): a function of the step and the planned total, which
        the LR schedule carries through checkpoints, so a resumed run switches at the same step."""
        return self.cfg.masking.iwm_stage(step, lr_schedule(self.scheduler).total)

    def _plan_compute(self, seed: int) -> int:
        """The step count of the compute budget (rank 0's plan, broadcast), from probes with their own streams: one,
        or one per stage of a two-stage ``iwm`` arm (weighed by the stage's share of the steps)."""
        cfg = self.cfg
        kind, amount = cfg.train.compute_budget()
        accum, mbs = cfg.train.grad_accum_steps(), cfg.train.micro_batch_size

        def drawer(stage: str | None, stream: int) -> Callable[[], list[dict[str, torch.Tensor]]]:
            probe = BatchMaker(cfg.data, cfg.masking, self.encoder, self.tokenizer.pad_token_id, seed + 2**40 * stream)
            probe.set_stage(stage)
            view = self.source.view.fork(np.random.default_rng([seed, 1 + stream]))
            return lambda: [probe.bucketed(view, mbs) for _ in range(accum)]

        masking = cfg.masking
        if masking.mode == "iwm" and masking.iwm_schedule == "two_stage":
            f = masking.iwm_world_model_fraction
            stages = [(f, drawer("world_model", 1)), (1.0 - f, drawer("imitation", 2))]
        else:
            stages = [(1.0, drawer(masking.iwm_stage(0, 1), 1))]
        total = plan_compute_steps(kind, amount, cfg.train.max_steps, self.session.world_size, stages,
                                   self.model_config, probe_steps(cfg.data.bucket_pool_batches, accum))  # fmt: skip
        total = broadcast_int(total)
        print(f"[train] budget {cfg.train.budget_label()}: {total} steps", flush=True)
        return total

    def _spent(self) -> float:
        """What the run has spent of its compute budget so far, summed over the ranks (a collective)."""
        kind, _ = self.cfg.train.compute_budget()
        tokens, flops = self._global_sums(self.total_tokens, self.total_flops)
        return flops if kind == "flops" else tokens

    def _replan(self) -> None:
        """Plan the compute budget again from what the steps since the last plan cost (dagger: the on-policy data
        that came in since makes a step cheaper than the probe measured); rank 0's plan, broadcast."""
        _, amount = self.cfg.train.compute_budget()
        spent = self._spent()
        since, spent_then = self._replan_mark
        self._replan_mark = (self.step, spent)
        if self.step == since:
            return
        cost = (spent - spent_then) / (self.step - since)
        total = broadcast_int(replan_compute_steps(self.step, spent, amount, cost, self.cfg.train.max_steps))
        if total != self.budget.total:
            if self.session.rank == 0:
                print(f"[train] budget {self.cfg.train.budget_label()} planned again at step {self.step}: {total} "
                      f"steps (was {self.budget.total}; the last {self.step - since} steps cost {cost:.3g} each)",
                      flush=True)  # fmt: skip
            lr_schedule(self.scheduler).extend(total)

    def _take_in_previous_version(self) -> None:
        """``rollout.sync``, at a publication (every rank): wait for every actor's batches of the version this worker
        published last, if any (a worker that resumed from a checkpoint waits from its first publication on), and
        bring the view up to date with them. Nothing newer can be in the buffer: the next version is published after
        this."""
        previous = self.published
        if previous < 1:
            return
        rollout = self.cfg.rollout
        self.sync_wait_s += self.source.wait_for_version(previous, rollout.num_actors, rollout.sync_batches,
                                                         rollout.sync_timeout_s)  # fmt: skip
        self.source.refresh()

    def _build_model(self) -> torch.nn.Module:
        cfg = self.cfg
        if cfg.train.data_parallel_mode == "fsdp2":  # sharded from the start: no rank builds the full model
            return build_sharded_model(cfg.model, self.tokenizer, self.session.device, cfg.train.seed,
                                       mixed_precision=cfg.train.enable_mixed_precision,
                                       activation_checkpointing=cfg.train.enable_gradient_checkpointing)  # fmt: skip
        model = build_model(cfg.model, self.tokenizer, seed=cfg.train.seed)
        if cfg.train.enable_gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if self.session.world_size > 1:
            run_idle_experts(model)  # DDP's all-reduce needs every expert's gradient from every rank
        return self.session.prepare_model(model)

    def _resume(self, directory: Path) -> int | None:
        """Load the checkpoint in ``directory``; returns this rank's checkpointed buffer view size."""
        if is_sharded(self.model):
            state = load_sharded_checkpoint(directory, self.model, self.optimizer)  # DCP, collective
        else:
            load_weights_into(self.model, directory)
            state = load_training_state(directory)
            self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        self.step = state.step
        mine = state.rank(self.session.rank)
        view_size = None
        if mine is not None:
            mine.rng.restore(self.generators)
            # The pending examples were drawn for the stage of the last step trained (iwm; None otherwise).
            self.batches.restore_pending(mine.pending, self._stage(self.step - 1) if self.step else None)
            self.total_tokens = mine.tokens
            self.total_flops = mine.flops
            view_size = mine.view_size
        print(f"[train] rank {self.session.rank}: resumed from step {self.step}", flush=True)
        if self.session.rank == 0 and self.metrics_log:
            _append_jsonl(self.metrics_log, {"resumed_from_step": self.step})
        return view_size

    # -- train -------------------------------------------------------------------------------------------

    def train(self) -> None:
        cfg, session = self.cfg, self.session
        full = cfg.data.regime == "fixed" and self.source.view.demos >= cfg.data.num_demos
        accum, mbs = cfg.train.grad_accum_steps(), cfg.train.micro_batch_size
        # Decided from the config alone, so every rank takes the same branches (and reports as often).
        by_checkpoint = cfg.eval.enabled and cfg.eval.weights == "checkpoint"
        window = _Window(t0=time.perf_counter())
        self._t_start = window.t0
        self.budget.start()
        while self.step < self.budget.total:
            if not full and not self.sync and self.step % 20 == 0:
                self.source.refresh()
                full = cfg.data.regime == "fixed" and self.source.view.demos >= cfg.data.num_demos
            self.batches.set_stage(self._stage(self.step))
            t0 = time.perf_counter()
            micro = [self.batches.bucketed(self.source, mbs) for _ in range(accum)]
            t1 = time.perf_counter()
            stats = train_step(self.model, self.optimizer, self.scheduler, micro, cfg.train.max_grad_norm,
                               session.device, cfg.masking)  # fmt: skip
            self.batch_time_s += t1 - t0
            self.step_time_s += time.perf_counter() - t1
            self.step += 1
            self.budget.after_step(self.step)
            self.total_tokens += stats.tokens
            self.total_flops += step_cost(self.model_config, micro)[1]
            window.add(stats)
            if self._replans and self.step % self.publish_every == 0:
                self._replan()  # before the publication below, which carries the plan (DAgger's beta anneals on it)
            last = self.step == self.budget.total  # every rank agrees: the budget's total is rank 0's, broadcast
            publication = self.step % self.publish_every == 0 and not last
            if self.sync and publication:
                self._take_in_previous_version()
            if publication:
                if self.publisher is not None:
                    self.publisher.publish(self.model, self.step, self.budget.total)
                self.published = self.step
            eval_now = cfg.eval.enabled and self.step % cfg.eval.every_steps == 0 and not last
            if eval_now and not by_checkpoint and self.evaluator is not None:
                self.evaluator.submit(self.model, self.step)  # every rank: a sharded model gathers first
                window.t0 += self._wait_for_eval()
            checkpoint = bool(cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0)
            checkpoint |= eval_now and by_checkpoint
            if last:
                self._finish(self._metrics(window, stats))
            elif self.step % cfg.train.report_every == 0 or checkpoint:
                metrics = self._metrics(window, stats)
                if session.rank == 0 and self.evaluator is not None:
                    metrics.update(self.evaluator.poll())
                self._report(metrics, checkpoint)
                if eval_now and by_checkpoint and session.rank == 0 and self.evaluator is not None:
                    self.evaluator.submit_checkpoint(session.latest_checkpoint(), self.step)
                    self._wait_for_eval()
            if last or self.step % cfg.train.report_every == 0 or checkpoint:
                window = _Window(t0=time.perf_counter())
            if self.after_step is not None:
                self.after_step(self.step, session.rank)

    def _wait_for_eval(self) -> float:
        """With ``eval.concurrent: false``, rank 0 waits for the evaluation just submitted (the other ranks wait at
        their next collective); returns the seconds waited."""
        if self.cfg.eval.concurrent or self.session.rank != 0 or self.evaluator is None:
            return 0.0
        start = time.perf_counter()
        self.evaluator.wait()
        waited = time.perf_counter() - start
        self.eval_wait_s += waited
        return waited

    def _metrics(self, window: _Window, stats: StepStats) -> dict[str, Any]:
        """The ``train/...`` metrics of the steps since the last report (and ``rollout/...`` on rank 0)."""
        world = self.session.world_size
        elapsed = time.perf_counter() - window.t0
        total_tokens, total_flops = self._global_sums(self.total_tokens, self.total_flops)
        metrics: dict[str, Any] = {
            "train/step": self.step,
            "train/loss": window.loss / window.steps,
            "train/grad_norm": stats.grad_norm,
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/tokens_per_s": window.tokens * world / max(elapsed, 1e-9),
            "train/elapsed_s": time.perf_counter() - self._t_start,
            "train/eval_wait_s": self.eval_wait_s,
            "train/batch_time_s": self.batch_time_s,
            "train/step_time_s": self.step_time_s,
            "train/report_time_s": self.report_time_s,
            "train/sync_wait_s": self.sync_wait_s,
            "train/target_tokens": window.targets / window.steps,
            "train/padding_waste": 1.0 - window.tokens / max(window.padded, 1),
            "train/total_tokens": int(total_tokens),
            "train/total_flops": total_flops,
            "train/planned_steps": self.budget.total,
        }
        if self.batches.stage is not None:  # iwm: which objective the last step trained
            metrics["train/iwm_world_model"] = float(self.batches.stage == "world_model")
        if self.session.rank == 0 and self.buffer_stats is not None:
            metrics.update(self.buffer_stats())
            if "rollout/inference_flops" in metrics:
                # Training plus the rollout actors' policy forwards (dagger): what an arm cost in all, for comparing
                # arms by success per unit of total compute. The eval actor's forwards are not counted (every arm
                # evaluates the same episodes). Reporting only: the step budget never depends on actor timing.
                metrics["compute/total_flops"] = total_flops + metrics["rollout/inference_flops"]
        return metrics

    def _global_sums(self, *values: float) -> list[float]:
        """``values`` summed over the ranks (a collective: every rank calls it at every report)."""
        if self.session.world_size == 1:
            return list(values)
        device = self.session.device if self.session.device.type == "cuda" else torch.device("cpu")
        box = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(box)
        return box.tolist()

    def _report(self, metrics: dict[str, Any], checkpoint: bool, final: bool = False) -> None:
        """Report ``metrics`` on every rank (with a checkpoint when asked) and log them on rank 0."""
        name = f"checkpoint_{self.step:06d}" if checkpoint else None
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="aoray-ckpt-") as tmp:
            folder = self.save_checkpoint(Path(tmp) / "checkpoint", metrics, final=final) if checkpoint else None
            self.session.report(metrics, folder, name)
        self.report_time_s += time.perf_counter() - start
        self._log(metrics)

    def _finish(self, metrics: dict[str, Any]) -> None:
        """The last step: the final checkpoint and the final evaluation (the trial's reported result)."""
        episodes = self.cfg.eval.final_episodes
        if self.cfg.eval.enabled and self.cfg.eval.weights == "checkpoint":
            # The actor reads the checkpoint this report persists: report it first, then evaluate it and report the
            # result as the trial's last word (every rank reports twice).
            self._report(metrics, checkpoint=True, final=True)
            final = {}
            if self.session.rank == 0 and self.evaluator is not None:
                final = self.evaluator.final(None, self.step, episodes, checkpoint=self.session.latest_checkpoint())
            self._report({**metrics, **final, "eval/final": 1} if self.session.rank == 0 else metrics, False)
            return
        final = self.evaluator.final(self.model, self.step, episodes) if self.evaluator is not None else {}
        if self.session.rank == 0:
            metrics.update(final)
            metrics["eval/final"] = 1
        self._report(metrics, checkpoint=True, final=True)

    def _log(self, metrics: dict[str, Any]) -> None:
        if self.session.rank == 0 and self.metrics_log:
            _append_jsonl(self.metrics_log, metrics)

    # -- checkpoints -------------------------------------------------------------------------------------

    def rank_state(self) -> RankState:
        return RankState(
            rng=RngState.capture(self.generators),
            pending=self.batches.pending(),
            view_size=self.source.size,
            tokens=self.total_tokens,
            flops=self.total_flops,
        )

    def save_checkpoint(self, folder: Path, metrics: dict[str, Any], final: bool = False) -> Path | None:
        """Write this rank's part of a checkpoint into ``folder``; returns it, or None where this rank writes nothing.

        Every rank's ``RankState`` is gathered to rank 0, which writes the HF weights and ``training_state.pt``; a
        sharded model writes one DCP shard per rank (and the consolidated HF export when ``final``, or when the eval
        actor reads its weights from checkpoints). Collective.
        """
        mine = self.rank_state()
        ranks: list[RankState | None] = [None] * self.session.world_size
        if self.session.world_size > 1:
            torch.distributed.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        sharded = is_sharded(self.model)
        state = None
        if self.session.rank == 0:
            state = TrainingState(
                step=self.step,
                optimizer={} if sharded else self.optimizer.state_dict(),  # sharded: in the DCP files instead
                scheduler=self.scheduler.state_dict(),
                ranks=tuple(ranks),
                metrics={k: v for k, v in metrics.items() if isinstance(v, int | float)},
            )
        if sharded:  # every rank writes its shard into its own folder; Ray merges them into one checkpoint
            export = final or self.cfg.eval.weights == "checkpoint"
            save_sharded_checkpoint(folder, self.model, self.optimizer, self.tokenizer, state, export=export)
            return folder
        if self.session.rank == 0:
            save_checkpoint(folder, self.model, self.tokenizer, state)
            return folder
        return None

    # -- cleanup -----------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Release the model and optimizer (a worker group restarted in the same process starts clean)."""
        for name in ("model", "optimizer", "scheduler", "batches"):
            if hasattr(self, name):
                delattr(self, name)


def _append_jsonl(where: Location, record: dict[str, Any]) -> None:
    where.append_text(json.dumps(record, default=float) + "\n")
