"""One Tune trial: start the buffer, rollout and eval actors, then run the TorchTrainer (Train V2 pattern).

Ray Tune cannot wrap a V2 ``TorchTrainer`` directly; the documented pattern is a function trainable that
builds the trainer and forwards its reports with ``TuneReportCallback``. The function itself holds a tiny
CPU share; the trainer's workers and the actors request their own resources from the config.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from anyorder_ray.buffer import TrajectoryBuffer
from anyorder_ray.config import P_MODES, ExperimentConfig, MaskingConfig, config_from_dict
from anyorder_ray.factory import build_model_config, build_tokenizer
from anyorder_ray.rollout import RolloutWorker
from anyorder_ray.train import train_loop_per_worker


def trial_config(base: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """The base config with this trial's arm (masking section) and seed applied; validated again."""
    arm = dict(params.get("arm") or {})
    if "mask_prob" in params and arm.get("mode", base.masking.mode) in P_MODES:
        arm["mask_prob"] = params["mask_prob"]
    masking = dataclasses.replace(base.masking, **arm) if arm else base.masking
    MaskingConfig(**dataclasses.asdict(masking))  # re-validate the merged arm
    train = dataclasses.replace(base.train, seed=int(params.get("seed", base.train.seed)))
    raw = base.to_dict()
    raw["masking"] = dataclasses.asdict(masking)
    raw["train"] = dataclasses.asdict(train)
    return config_from_dict(raw, source="trial")


def trial_cpus(cfg: ExperimentConfig) -> float:
    """CPUs one trial holds at once (driver share + train workers + rollout + eval actors)."""
    return (
        cfg.sweep.trial_cpus
        + cfg.train.num_workers * cfg.train.cpus_per_worker
        + cfg.rollout.num_actors * cfg.rollout.num_cpus_per_actor
        + cfg.eval.num_actors * cfg.eval.num_cpus_per_actor
    )


# Actors of a trial are scheduled outside the trial's placement group (which only holds the driver's
# tiny CPU share): they ask the cluster for their own resources, like the TorchTrainer's workers do.
_OUTSIDE_TRIAL_PG = PlacementGroupSchedulingStrategy(placement_group=None)


def start_actors(cfg: ExperimentConfig) -> tuple[Any, list[Any], list[Any], Any | None]:
    """The buffer, the rollout actors, their running ``run`` references and the eval actor of one trial."""
    from anyorder_ray.evaluation import EvalWorker

    target = cfg.data.num_demos if cfg.data.regime == "fixed" else None
    buffer = (
        ray.remote(TrajectoryBuffer)
        .options(num_cpus=0, max_restarts=0, scheduling_strategy=_OUTSIDE_TRIAL_PG)
        .remote(cfg.data.buffer_capacity, seed=cfg.train.seed, target=target)
    )
    workers, runs = [], []
    for i in range(cfg.rollout.num_actors):
        actor = (
            ray.remote(RolloutWorker)
            .options(
                num_cpus=cfg.rollout.num_cpus_per_actor,
                max_restarts=cfg.rollout.max_restarts,
                max_task_retries=-1,
                scheduling_strategy=_OUTSIDE_TRIAL_PG,
            )
            .remote(cfg.env, cfg.rollout, i, buffer)
        )
        runs.append(actor.run.remote())  # runs until the buffer says stop
        workers.append(actor)
    evaluator = None
    if cfg.eval.num_actors > 0:
        tokenizer = build_tokenizer(cfg.model)
        evaluator = (
            ray.remote(EvalWorker)
            .options(
                num_cpus=cfg.eval.num_cpus_per_actor,
                max_restarts=cfg.eval.max_restarts,
                max_task_retries=-1,
                scheduling_strategy=_OUTSIDE_TRIAL_PG,
            )
            .remote(
                cfg.env,
                cfg.eval,
                build_model_config(cfg.model, tokenizer).to_dict(),
                tokenizer,
                cfg.history_steps(),
                cfg.data.max_seq_len,
                torch_threads=max(1, round(cfg.eval.num_cpus_per_actor)),
            )
        )
    return buffer, workers, runs, evaluator


def run_trial(params: dict[str, Any], base: ExperimentConfig, run_dir: str) -> None:
    """The Tune function trainable."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(base, params)
    trial_id = tune.get_context().get_trial_id()
    buffer, workers, runs, evaluator = start_actors(cfg)
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            # `producers` is nested in a dict, so the references reach the workers unresolved.
            train_loop_config={"cfg": cfg, "buffer": buffer, "evaluator": evaluator, "producers": runs},
            scaling_config=ScalingConfig(
                num_workers=cfg.train.num_workers,
                use_gpu=cfg.train.use_gpu,
                resources_per_worker={"CPU": cfg.train.cpus_per_worker},
            ),
            run_config=RunConfig(
                name=f"train-{trial_id}",
                storage_path=str(Path(run_dir) / "train"),
                callbacks=[TuneReportCallback()],
                failure_config=FailureConfig(max_failures=2),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        trainer.fit()
    finally:
        ray.get(buffer.stop.remote())
        for actor in [*workers, evaluator]:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        ray.kill(buffer, no_restart=True)


def local_env_vars() -> dict[str, str]:
    """Environment passed to every Ray worker of a local run."""
    return {
        "RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0"),
        "TOKENIZERS_PARALLELISM": "false",
    }
