"""The Ray Train role: every TorchTrainer worker runs the training recipe, connected to Ray by three small pieces.

- ``RaySession``: the worker's rank, device and DDP wrapping, the checkpoint to resume from, and reports
  (``ray.train.report``) with checkpoints persisted by Ray Train.
- ``BufferSource``: a worker-local view of the trial's ``TrajectoryBuffer`` actor (batches fetched once, then
  sampled locally by ``data.batching.TrajectoryView``).
- ``EvalClient``: rank 0's side of the eval actor (submit weights or a checkpoint without waiting, collect results).
- ``WeightPublisher``: rank 0's side of the dagger regime's ``PolicyBoard`` (publish weights without waiting).

``train_loop_per_worker`` builds them and runs ``training.recipe.TrainingRecipe``; every rank reports metrics (Ray
Train V2 expects a report from every worker), only rank 0 writes checkpoints and talks to the eval actor.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch

from anyorder_ray.config import ExperimentConfig
from anyorder_ray.data.batching import TrajectoryView
from anyorder_ray.storage import Location
from anyorder_ray.training.checkpoint import unwrap
from anyorder_ray.training.recipe import TrainingRecipe
from anyorder_ray.training.sharding import full_state_dict, is_sharded
from envs.trajectory import Trajectory

logger = logging.getLogger(__name__)

_REFRESH_ATTEMPTS = 5
"""A refresh racing a buffer restart asks the restarted buffer again, this many times in all."""

METRICS_LOG = "metrics.jsonl"
"""File name of the metrics log a trial keeps next to its checkpoints (see ``LoopSettings.metrics_log``)."""


@dataclass(frozen=True)
class LoopSettings:
    """What ``train_loop_per_worker`` receives (TorchTrainer passes a dict: ``LoopSettings.from_dict``)."""

    cfg: ExperimentConfig
    buffer: Any
    """The trial's ``TrajectoryBuffer`` actor."""
    evaluator: Any | None = None
    """The eval actor (None: no evaluation)."""
    producers: Sequence[Any] = ()
    """The rollout actors' ``run`` references, in actor order: a failed one fails the wait for data and, in the
    streaming and dagger regimes, the next refresh (``RolloutFailed``, see ``BufferSource``)."""
    board: Any | None = None
    """The trial's ``PolicyBoard`` (dagger regime): rank 0 publishes weights there for the rollout actors."""
    metrics_log: Location | str | None = None
    """JSONL file (a path or storage location) rank 0 appends every report's metrics to (Train V2 keeps no metrics
    history). A restart appends a ``{"resumed_from_step": N}`` line and then the reports from step N on, again."""
    after_step: Callable[[int, int], None] | None = None
    """Called with ``(step, rank)`` after every step; tests inject faults with it (``tests/helpers.KillOnce``)."""

    @classmethod
    def from_dict(cls, loop_config: Mapping[str, Any]) -> LoopSettings:
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(loop_config) - allowed)
        if unknown:
            raise ValueError(f"unknown train_loop_config keys {unknown}; allowed: {sorted(allowed)}")
        return cls(**loop_config)


class RaySession:
    """``training.recipe.Session`` inside a Ray Train worker."""

    def __init__(self) -> None:
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model)

    @contextlib.contextmanager
    def restore_dir(self) -> Iterator[Path | None]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str | None) -> None:
        exists = checkpoint_dir is not None and checkpoint_dir.exists()
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if exists else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def latest_checkpoint(self) -> ray.train.Checkpoint:
        """The last checkpoint Ray Train persisted (a path on the run's storage, which the eval actor reads)."""
        reported = ray.train.get_all_reported_checkpoints()
        if not reported:
            raise RuntimeError("no checkpoint has been reported yet")
        return reported[-1].checkpoint


class RolloutFailed(RuntimeError):
    """What feeds the buffer stopped being what the config says: a rollout actor died for good, or the rollout actors
    rejected every recent weight version (dagger acting as the expert alone)."""


class RolloutFailureIsFinal(ray.train.UserCallback):
    """Ray Train callback: a worker's ``RolloutFailed`` ends the run instead of restarting the worker group.

    Ray Train restarts a failed worker group (``train.max_failures``) whatever the worker raised, but no restart brings
    a dead rollout actor back (its ``run`` reference stays failed; a rejection count stays until a version loads): each
    restarted group failed again at its first refresh, so the restarts were spent for nothing and with
    ``max_failures: -1`` went on for ever. This callback raises the worker's ``RolloutFailed`` in the controller. Ray
    Train (2.60's default failure policy) takes an error in its controller's loop for a ``ControllerError``, which it
    does not retry: ``fit`` raises at once, the ``RolloutFailed`` as the error's ``controller_failure``. Other worker
    errors keep their restarts."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for error in worker_exceptions.values():
            if isinstance(error, RolloutFailed):
                raise error


class BufferSource:
    """A worker-local view of the ``TrajectoryBuffer``: batches are fetched once, then sampled locally.

    ``refresh`` picks up new batches and forgets evicted ones; between refreshes sampling never waits on
    the expert or on the buffer actor. ``producers`` are the rollout actors' ``run`` references (in actor order): one
    that failed is raised while waiting for data instead of leaving training waiting for data that never comes.

    ``streaming`` (the streaming and dagger regimes: training samples while the actors keep adding): every ``refresh``
    also looks, without waiting, at the producers and at the dagger regime's ``board``, and raises ``RolloutFailed``

    - when a producer's ``run`` failed: the actor died for good (its ``rollout.max_restarts`` used up, or killed), so
      training would go on sampling a buffer that no longer grows, or grows from the other actors' seeds only, with
      nothing in the metrics to say so. Failing the trial is what Ray itself does with a task whose retries are
      exhausted, and what the trial's other dependencies do (the buffer without a journal); the restarts are the
      tolerance the config asked for. (Continuing with a warning and a ``rollout/dead_actors`` metric would keep the
      trial's result, but a sweep's arms would then have trained on different data streams, silently in their tables.)
    - when the rollout actors rejected the last ``max_rejected_versions`` weight versions of ``board`` in a row: they
      act with the expert alone, and a dagger arm would be imitation under the dagger name. The error quotes the last
      rejection's reason.

    Every rank checks at the same steps (the recipe's refresh schedule); a rank may see the failure a check earlier
    than another, and Ray Train stops the worker group when any worker raises. With ``RolloutFailureIsFinal`` among
    the run's callbacks (a sweep's trials have it) the run then fails without a restart, which could not bring the
    actor back. The fixed regime checks nothing after its wait: its whole demo set is in the buffer before training
    starts.
    """

    def __init__(
        self,
        buffer: Any,
        producers: Sequence[Any] = (),
        rng: np.random.Generator | None = None,
        streaming: bool = False,
        board: Any | None = None,
        max_rejected_versions: int = 3,
    ) -> None:
        self._buffer = buffer
        self._producers = list(producers)
        self._streaming = streaming
        self._board = board
        self._max_rejected = max_rejected_versions
        self._cache: dict[Any, list[Trajectory]] = {}
        self.view = TrajectoryView(rng if rng is not None else np.random.default_rng(0))

    @property
    def rng(self) -> np.random.Generator:
        return self.view.rng

    @rng.setter
    def rng(self, rng: np.random.Generator) -> None:
        self.view.rng = rng

    @property
    def size(self) -> int:
        return self.view.size

    def refresh(self, limit: int | None = None, *, check: bool = True) -> int:
        """Sync the view with the buffer; returns the trajectories in view.

        ``limit`` keeps only the oldest ``limit`` trajectories: it restores a checkpointed view in the fixed
        regime, where the buffer only appends, so an earlier view is always a prefix of the current one.

        A buffer that restarted (it replays its journal) holds the same trajectories under new references: they are
        fetched again, and references that died with the old buffer are dropped.

        ``streaming`` (and ``check``): raises ``RolloutFailed`` first if a rollout actor died for good or the actors
        rejected too many weight versions in a row (see the class).
        """
        if self._streaming and check:
            self.check_producers()
        for _ in range(_REFRESH_ATTEMPTS - 1):
            try:
                return self._refresh(limit)
            except ray.exceptions.ObjectLostError as e:  # OwnerDiedError: the buffer died after answering
                logger.warning("buffer batches lost with their owner (%s); asking the restarted buffer again", e)
                time.sleep(1.0)
        return self._refresh(limit)  # the last attempt raises what it meets

    def _refresh(self, limit: int | None) -> int:
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
        return self.view.update([(self._cache[ref], start, count) for ref, start, count in snapshot])

    def check_producers(self) -> int:
        """Raise ``RolloutFailed`` if a producer's ``run`` failed (naming the actor and the cause) or the board's
        actors rejected ``max_rejected_versions`` versions in a row; returns how many producers finished. Never
        waits (a ``ray.wait`` with timeout 0, one small call to the board)."""
        producers = self._producers
        done, _ = ray.wait(producers, num_returns=len(producers), timeout=0) if producers else ([], [])
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:
                worker = next(i for i, p in enumerate(producers) if p == ref)
                cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise RolloutFailed(
                    f"rollout actor {worker} died for good ({type(e).__name__}: {cause}): the buffer no longer "
                    "gets its data (its rollout.max_restarts restarts used up, or the actor was killed), so training "
                    "stops rather than go on sampling stale data"
                ) from e
        if self._board is not None:
            count, reason = ray.get(self._board.rejected_in_a_row.remote())
            if count >= self._max_rejected:
                raise RolloutFailed(
                    f"the rollout actors rejected the last {count} weight versions the trainer published "
                    f"(rollout.max_rejected_versions: {self._max_rejected}), so they act with the expert alone and "
                    f"this dagger trial would be imitation. Last rejection: {reason}"
                )
        return len(done)

    def wait_until(self, min_demos: int, timeout_s: float = 600.0, poll_s: float = 0.5) -> int:
        """Block until the buffer holds ``min_demos`` expert demos (their branches come in the same acknowledged
        batches); progress logged every ~10 s; a producer that failed raises ``RolloutFailed``. Returns the
        trajectories in view."""
        producers = self._producers
        clock = _Patience(timeout_s)
        while True:
            self.refresh(check=False)
            if self.view.demos >= min_demos:
                return self.size
            # One producer check per poll (a refresh in the streaming regimes would make its own first).
            finished = self.check_producers()
            if producers and finished == len(producers):
                self.refresh(check=False)  # their last batches may have landed after the refresh above
                if self.view.demos >= min_demos:
                    return self.size
                raise RuntimeError(
                    f"all rollout actors finished but the buffer holds only {self.view.demos} of the {min_demos} "
                    "expert demos training needs (seed range exhausted, or the expert fails on this level?)"
                )
            clock.check(f"buffer holds {self.view.demos} expert demos after {timeout_s:.0f} s, training needs "
                        f"{min_demos}; are the rollout actors running (enough CPUs for them)?",
                        f"waiting for data: {self.view.demos}/{min_demos} expert demos in the buffer")  # fmt: skip
            time.sleep(poll_s)

    def wait_for_version(
        self, version: int, actors: int, batches: int = 1, timeout_s: float = 1800.0, poll_s: float = 0.05
    ) -> float:
        """``rollout.sync``: block until each of the ``actors`` rollout actors has ``batches`` on-policy batches of
        policy ``version`` acknowledged by the buffer, or rejected that version (the board says so: a version that
        cannot be loaded is skipped, not waited for); returns the seconds waited. A producer that failed raises
        ``RolloutFailed``; progress is logged every ~10 s. The caller refreshes afterwards."""
        everyone = set(range(actors))
        clock = _Patience(timeout_s)
        while True:
            played = ray.get(self._buffer.played.remote(version))
            done = {worker for worker, count in played.items() if count >= batches}
            if self._board is not None:
                done |= ray.get(self._board.rejecters.remote(version))
            if everyone <= done:
                return clock.elapsed()
            self.check_producers()
            missing = sorted(everyone - done)
            clock.check(f"rollout.sync: not all {batches} batch(es) of policy version {version} from rollout actor(s) "
                        f"{missing} after {timeout_s:.0f} s (rollout.sync_timeout_s); are they running, with enough "
                        "CPUs?", f"rollout.sync: waiting for policy version {version}'s batches from actor(s) "
                        f"{missing}")  # fmt: skip
            time.sleep(poll_s)

    def sample(self, n: int, branch_share: float = 0.0) -> list[Trajectory]:
        return self.view.sample(n, branch_share)


class _Patience:
    """The clock of a polling wait: ``check`` raises ``TimeoutError`` once ``timeout_s`` have passed and prints its
    progress line every ~10 s."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.start = self.last_log = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def check(self, timeout_message: str, progress: str) -> None:
        now = time.monotonic()
        if now - self.start > self.timeout_s:
            raise TimeoutError(timeout_message)
        if now - self.last_log > 10:
            print(f"[train] {progress}", flush=True)
            self.last_log = now


def _first_trajectories(snapshot: list[tuple[Any, int, int]], limit: int) -> list[tuple[Any, int, int]]:
    """The oldest ``limit`` trajectories of a buffer snapshot of (reference, first index, count) entries."""
    out, left = [], limit
    for ref, start, count in snapshot:
        if left <= 0:
            break
        out.append((ref, start, min(count, left)))
        left -= count
    return out


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
        """Send the current weights (an fp32 state dict through the object store)."""
        gathered = full_state_dict(model) if self.gather else None  # before any early return: a collective
        if not self._free():
            return False
        weights = gathered
        if weights is None:
            weights = {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}
        # The ref goes nested in a list so the actor receives the reference and fetches it itself.
        return self._send([ray.put(weights)], step, episodes)

    def submit_checkpoint(self, checkpoint: ray.train.Checkpoint, step: int, episodes: int | None = None) -> bool:
        """Send a persisted checkpoint for the actor to load its Hugging Face weights from."""
        return self._free() and self._send(checkpoint, step, episodes)

    def _free(self) -> bool:
        if self.actor is None:
            return False
        self.poll()
        if self.pending is not None:
            self.skipped += 1
            return False
        return True

    def _send(self, weights: Any, step: int, episodes: int | None) -> bool:
        self.pending = self.actor.evaluate.remote(weights, step, episodes or self.episodes)
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

    def wait(self, timeout: float = 1800.0) -> dict[str, float]:
        """Block until the evaluation in flight (if any) is done; its metrics."""
        return self.poll(timeout=timeout)

    def final(
        self, model: torch.nn.Module | None, step: int, episodes: int, checkpoint: Any = None, timeout: float = 1800.0
    ) -> dict[str, float]:
        """Blocking evaluation of the final weights (the trial's reported result): ``model``'s, or ``checkpoint``'s."""
        if self.actor is None:
            if self.gather and checkpoint is None:
                full_state_dict(model)  # take part in the gather of rank 0's submit below
            return {}
        self.poll(timeout=timeout)
        self.pending = None
        self.latest = {}  # an earlier evaluation's metrics must never stand in for the final one
        if checkpoint is not None:
            self.submit_checkpoint(checkpoint, step, episodes)
        else:
            self.submit(model, step, episodes)
        final = self.poll(timeout=timeout)
        # A failed final evaluation (the actor died for good, or it rejected the weights: non-finite values after a
        # divergence) is reported as such: the tables mark the trial's row as an error.
        return final if final else {"eval/failed": 1.0}


class WeightPublisher:
    """Rank 0's side of the ``PolicyBoard``: ``publish`` puts an fp32 state dict into the object store (the eval actor's
    channel) and posts it as the latest version without waiting for anything.

    ``gather`` (a sharded model): the full weights are gathered first, a collective, so every rank calls ``publish``
    (ranks other than 0 with ``board=None``)."""

    def __init__(self, board: Any | None, gather: bool = False) -> None:
        self.board = board
        self.gather = gather
        self.published = 0

    def publish(self, model: torch.nn.Module, step: int, planned_steps: int | None = None) -> None:
        weights = full_state_dict(model) if self.gather else None  # every rank: a collective
        if self.board is None:
            return
        if weights is None:
            weights = {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}
        # Nested in a list: the board keeps the reference (rank 0 owns the object) and actors fetch it themselves.
        self.board.publish.remote([ray.put(weights)], int(step), planned_steps)
        self.published += 1


def _quiet_report_logging() -> None:
    """Ray Train logs every ``ray.train.report`` of every worker at INFO, the whole metrics dict on one line (a sweep's
    console got one such line per report, ~2 kB each), the only INFO line of its logger (warnings still show). The
    numbers are in Tune's table, the trial's metrics log and TensorBoard."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)  # Ray names this logger by its file


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point of every TorchTrainer worker; ``loop_config`` holds the fields of ``LoopSettings``."""
    _quiet_report_logging()
    settings = LoopSettings.from_dict(loop_config)
    cfg = settings.cfg
    session = RaySession()
    evaluator = None
    if settings.evaluator is not None:
        # A sharded model gathers its weights for the actor: every rank joins (others with no actor).
        gather = cfg.train.data_parallel_mode == "fsdp2" and cfg.eval.weights == "object_store"
        actor = settings.evaluator if session.rank == 0 else None
        evaluator = EvalClient(actor, cfg.eval.episodes, gather=gather) if actor is not None or gather else None
    buffer, board = settings.buffer, settings.board
    publisher = None
    if board is not None:
        gather = cfg.train.data_parallel_mode == "fsdp2"
        if session.rank == 0 or gather:
            publisher = WeightPublisher(board if session.rank == 0 else None, gather=gather)

    def rollout_stats() -> dict[str, float]:
        stats = ray.get(buffer.stats.remote()).as_metrics()
        if board is not None:
            stats.update(ray.get(board.stats.remote()))
        return stats

    streaming = cfg.data.regime != "fixed"  # training samples while the actors add: watch them at every refresh
    source = BufferSource(buffer, settings.producers, streaming=streaming, board=board,
                          max_rejected_versions=cfg.rollout.max_rejected_versions)  # fmt: skip
    recipe = TrainingRecipe(
        cfg,
        session,
        source,
        evaluator=evaluator,
        buffer_stats=rollout_stats,
        metrics_log=settings.metrics_log,
        after_step=settings.after_step,
        publisher=publisher,
    )
    recipe.setup()
    try:
        recipe.train()
    finally:
        recipe.cleanup()


__all__ = ["METRICS_LOG", "BufferSource", "EvalClient", "LoopSettings", "RaySession", "RolloutFailed",
           "RolloutFailureIsFinal", "WeightPublisher", "is_sharded", "train_loop_per_worker"]  # fmt: skip
