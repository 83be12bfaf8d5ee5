"""One Tune trial: start the buffer, rollout and eval actors, then run the TorchTrainer (Train V2 pattern).

Ray Tune cannot wrap a V2 ``TorchTrainer`` directly; the documented pattern is a function trainable that
builds the trainer and forwards its reports with ``TuneReportCallback``. The function itself holds a tiny
CPU share; the trainer's workers and the actors request their own resources from the config.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, NamedTuple

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from anyorder_ray.config import ExperimentConfig
from anyorder_ray.roles.buffer import TrajectoryBuffer
from anyorder_ray.roles.evaluator import make_eval_actor
from anyorder_ray.roles.process_setup import SETUP_HOOK
from anyorder_ray.roles.rollout import BranchPlan, PolicySource, RolloutWorker
from anyorder_ray.roles.train_loop import METRICS_LOG, RolloutFailureIsFinal, train_loop_per_worker
from anyorder_ray.roles.weights import PolicyBoard
from anyorder_ray.storage import Location


def trial_cpus(cfg: ExperimentConfig) -> float:
    """CPUs one trial holds at once (driver share + train workers + rollout + eval actors)."""
    return (
        cfg.sweep.trial_cpus
        + cfg.train.num_workers * cfg.train.cpus_per_worker
        + cfg.rollout.num_actors * cfg.rollout.num_cpus_per_actor
        + cfg.eval.actors() * cfg.eval.num_cpus_per_actor
    )


BUFFER_JOURNAL = "trajectories"
"""Folder of the trial's buffer journal, beside its checkpoints and metrics log."""

# Actors of a trial are scheduled outside the trial's placement group (which only holds the driver's
# tiny CPU share): they ask the cluster for their own resources, like the TorchTrainer's workers do.
_OUTSIDE_TRIAL_PG = PlacementGroupSchedulingStrategy(placement_group=None)


def make_buffer(cfg: ExperimentConfig, journal: Location | None = None) -> tuple[Any, str]:
    """The trial's ``TrajectoryBuffer`` actor and its name, unique in the cluster (actors that restart find it by name).

    With a ``journal`` (a folder or URI on the run's storage) every acknowledged batch is persisted there first, so
    the buffer restarts (up to ``rollout.max_restarts`` times, calls in flight retried) with everything it had
    acknowledged; without one it cannot restart (it would start empty) and its death fails the trial."""
    target = cfg.data.num_demos if cfg.data.regime == "fixed" else None
    quota = cfg.data.num_demos if cfg.data.regime == "dagger" else None  # the demo budget; on-policy data on top
    name = f"trajectory-buffer-{uuid.uuid4().hex[:16]}"
    restarts = {"max_restarts": cfg.rollout.max_restarts, "max_task_retries": -1} if journal is not None else {}
    buffer = (
        ray.remote(TrajectoryBuffer)
        .options(name=name, num_cpus=0, scheduling_strategy=_OUTSIDE_TRIAL_PG, **restarts)
        .remote(
            cfg.data.buffer_capacity, target=target, journal=journal, eviction=cfg.data.eviction, expert_quota=quota
        )
    )
    return buffer, name


def make_board(cfg: ExperimentConfig) -> tuple[Any, str]:
    """The trial's ``PolicyBoard`` (dagger: the latest weights for the rollout actors) and its unique name. Restarted
    up to ``rollout.max_restarts`` times; a restarted board is empty until the trainer's next publication (actors keep
    the weights they hold meanwhile)."""
    name = f"policy-board-{uuid.uuid4().hex[:16]}"
    board = (
        ray.remote(PolicyBoard)
        .options(
            name=name,
            num_cpus=0,
            max_restarts=cfg.rollout.max_restarts,
            max_task_retries=-1,
            scheduling_strategy=_OUTSIDE_TRIAL_PG,
        )
        .remote()
    )
    return board, name


def make_rollout_actor(cfg: ExperimentConfig, worker: int, buffer_name: str, board_name: str | None = None) -> Any:
    """Rollout actor ``worker`` feeding the buffer named ``buffer_name``: restarted up to ``rollout.max_restarts``
    times, its ``run`` retried on the new process (which resumes at the buffer's acknowledged seed, so a retry
    repeats no data, and with the board's latest weights). Its constructor arguments are plain values, so a restart
    cannot fail for want of them. ``board_name``: act with the weights of that ``PolicyBoard`` (dagger). Early-
    experience branches are made when the trial's arm trains on them (``ExperimentConfig.collects_branches``)."""
    policy = None
    if board_name is not None:
        policy = PolicySource(board_name, cfg.model, cfg.history_steps(), cfg.data.max_seq_len, cfg.masking.layout)
    branches = None
    if cfg.collects_branches():
        branches = BranchPlan(cfg.data.branches_per_state, cfg.data.branch_every, cfg.data.branch_history_steps(),
                              cfg.data.branch_proposer, cfg.data.branch_temperature)  # fmt: skip
    return (
        ray.remote(RolloutWorker)
        .options(
            num_cpus=cfg.rollout.num_cpus_per_actor,
            max_restarts=cfg.rollout.max_restarts,
            max_task_retries=-1,
            scheduling_strategy=_OUTSIDE_TRIAL_PG,
        )
        .remote(cfg.env, cfg.rollout, worker, buffer_name, policy, branches)
    )


def make_evaluator(cfg: ExperimentConfig) -> Any:
    """The eval actor: restarted up to ``eval.max_restarts`` times; an interrupted ``evaluate`` is retried on
    the new process (it is idempotent: same seeds, same weights)."""
    return make_eval_actor(
        cfg.env,
        cfg.eval,
        cfg.model,
        cfg.history_steps(),
        cfg.data.max_seq_len,
        # Waited for, the actor borrows the trainer's threads; concurrent, it has its own reservation only.
        torch_threads=max(1, round(cfg.eval.num_cpus_per_actor)) if cfg.eval.concurrent else cfg.train.torch_threads,
        layout=cfg.masking.layout,
        scheduling_strategy=_OUTSIDE_TRIAL_PG,
    )


class TrialActors(NamedTuple):
    """The actors of one trial."""

    buffer: Any
    workers: list[Any]
    runs: list[Any]
    """The rollout actors' running ``run`` references."""
    evaluator: Any | None
    board: Any | None
    """The ``PolicyBoard`` (dagger regime only)."""

    def loop_config(self, cfg: ExperimentConfig, metrics_log: Location | None = None) -> dict[str, Any]:
        """The TorchTrainer's ``train_loop_config`` (``roles.train_loop.LoopSettings``) for these actors."""
        # `producers` is nested in a dict, so the references reach the workers unresolved.
        return {"cfg": cfg, "buffer": self.buffer, "evaluator": self.evaluator, "producers": self.runs,
                "board": self.board, "metrics_log": metrics_log}  # fmt: skip

    def stop(self) -> None:
        """Stop the producers and end every actor (no restarts), the others too when the buffer is already gone."""
        try:
            ray.get(self.buffer.stop.remote())
        finally:
            for actor in [*self.workers, self.evaluator, self.board, self.buffer]:
                if actor is not None:
                    ray.kill(actor, no_restart=True)


def start_actors(cfg: ExperimentConfig, journal: Location | None = None) -> TrialActors:
    """The buffer (journaled to ``journal``), the policy board (dagger), the rollout actors with their running ``run``
    references and the eval actor of one trial."""
    buffer, buffer_name = make_buffer(cfg, journal)
    board, board_name = make_board(cfg) if cfg.data.regime == "dagger" else (None, None)
    workers = [make_rollout_actor(cfg, i, buffer_name, board_name) for i in range(cfg.rollout.num_actors)]
    runs = [actor.run.remote() for actor in workers]  # each runs until the buffer says stop
    evaluator = make_evaluator(cfg) if cfg.eval.enabled else None
    return TrialActors(buffer, workers, runs, evaluator, board)


def run_trial(params: dict[str, Any], base: ExperimentConfig, run: Location) -> None:
    """The Tune function trainable; ``run`` is the sweep's run folder (a path or storage URI)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = base.trial(params)
    trial_id = tune.get_context().get_trial_id()
    storage, name = run.child("train"), f"train-{trial_id}"
    # The trial's own folder: a trial that --resume runs again finds its journal there.
    actors = start_actors(cfg, journal=storage.child(name, BUFFER_JOURNAL))
    storage_path, storage_filesystem = storage.ray_storage()
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=actors.loop_config(cfg, storage.child(name, METRICS_LOG)),
            scaling_config=ScalingConfig(
                num_workers=cfg.train.num_workers,
                use_gpu=cfg.train.use_gpu,
                resources_per_worker={"CPU": cfg.train.cpus_per_worker},
            ),
            run_config=RunConfig(
                name=name,
                storage_path=storage_path,
                storage_filesystem=storage_filesystem,
                callbacks=[TuneReportCallback(), RolloutFailureIsFinal()],
                failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        trainer.fit()
    finally:
        actors.stop()


def job_runtime_env() -> dict[str, Any]:
    """The runtime environment of a sweep's Ray job: ``local_env_vars`` in every worker, and the setup hook that pins
    each worker to its own cluster's address (``roles.process_setup``)."""
    return {"env_vars": local_env_vars(), "worker_process_setup_hook": SETUP_HOOK}


def local_env_vars() -> dict[str, str]:
    """Environment passed to every Ray worker of a sweep.

    ``OMP_WAIT_POLICY=PASSIVE``: torch's OpenMP threads sleep at a barrier instead of spinning. With the default
    (spinning) a 2-thread training step on a 2-core machine shared with any other busy process was measured 40-100x
    slower (16 s instead of ~0.15 s: a spinning thread holds the core its partner needs); passive waiting keeps it
    within about 2x. Set it in the environment to override.

    ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0``: Ray Train's preemption watcher is off. It is a restartable actor
    holding the training workers' handles as constructor arguments, so Ray logs an ERROR line ("the actor restart
    will fail") on every trial start of a healthy run. What it adds is drain awareness (a node the autoscaler or a
    spot notice is about to take away): without it such a node's loss is an ordinary worker failure, which
    ``train.max_failures`` restarts from the last checkpoint (tested with a node removed mid-trial). Set it to 1 in
    the environment of the sweep to get the watcher back (and its ERROR line).

    ``RAY_TRAIN_ENABLE_PRINT_PATCH=0``: Ray Train's print redirection is off. It replaces ``print`` in the training
    workers with a call to the root logger (whose console handler writes the line to stderr) and, because a Ray
    worker's ``sys.stdout`` is Ray's own stream rather than ``sys.__stdout__``, also prints the line as before, so
    every ``[train]`` progress line reached the driver twice (measured with Ray 2.60: a one-line ``print`` in a bare
    ``TorchTrainer`` arrives twice with the patch, once without). Without it a worker's prints reach the driver and the
    worker's ``.out`` log once, but not Ray Train's structured ``ray-train-app-worker-*.log``; set it to 1 in the
    environment of the sweep to get them there.
    """
    return {
        "RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0"),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0"),
        "RAY_TRAIN_ENABLE_PRINT_PATCH": os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0"),
    }
