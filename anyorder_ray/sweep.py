"""``python -m anyorder_ray.sweep``: run a Ray Tune sweep of training arms and tabulate the results.

    python -m anyorder_ray.sweep                                  # tune_configs/sweep.yaml
    python -m anyorder_ray.sweep --config tune_configs/smoke.yaml train.max_steps=50
    python -m anyorder_ray.sweep --resume runs/anyorder-20261125-101500
    ray job submit --working-dir . -- python -m anyorder_ray.sweep --config tune_configs/smoke.yaml

With ``RAY_ADDRESS`` set it connects to that cluster; otherwise it starts a local Ray with bounded CPUs
and object store. The run directory (printed at start and end) holds Tune's per-trial logs (TensorBoard
events, progress.csv), the trainers' checkpoints, ``results.csv``, ``results.md`` and the plots.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from anyorder_ray.config import (
    P_MODES,
    ConfigError,
    ExperimentConfig,
    default_config_path,
    load_config,
    read_yaml,
)
from anyorder_ray.results import results_rows, write_plots, write_tables

RUN_CONFIG_FILE = "experiment.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m anyorder_ray.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config", type=Path, default=None, help="YAML experiment config (default: tune_configs/sweep.yaml)"
    )
    p.add_argument("--resume", type=Path, default=None, help="run directory of an interrupted sweep to finish")
    p.add_argument("--name", default=None, help="run directory name (default: <sweep.name>-<timestamp>)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=100")
    return p.parse_args(argv)


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` if set, else start a bounded local Ray."""
    import ray

    from anyorder_ray.trial import local_env_vars

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": local_env_vars()})
        return
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        object_store_memory=512 * 1024 * 1024,
        runtime_env={"env_vars": local_env_vars()},
        log_to_driver=True,
    )


def check_resources(cfg: ExperimentConfig) -> None:
    """Fail fast when one trial asks for more than the cluster has (instead of a silent pending hang)."""
    import ray

    from anyorder_ray.trial import trial_cpus

    have = ray.cluster_resources()
    need_cpu = trial_cpus(cfg)
    need_gpu = cfg.train.num_workers if cfg.train.use_gpu else 0
    problems = []
    if need_cpu > have.get("CPU", 0) + 1e-9:
        problems.append(
            f"one trial needs {need_cpu:g} CPUs (sweep.trial_cpus + train.num_workers x train.cpus_per_worker + "
            f"rollout.num_actors x rollout.num_cpus_per_actor + eval.num_actors x eval.num_cpus_per_actor) "
            f"but the cluster has {have.get('CPU', 0):g}"
        )
    if need_gpu > have.get("GPU", 0):
        problems.append(
            f"train.use_gpu with {need_gpu} workers needs {need_gpu} GPUs, the cluster has {have.get('GPU', 0):g}"
        )
    if problems:
        autoscaling = bool(os.environ.get("RAY_ADDRESS"))
        msg = "; ".join(problems) + ". Lower the requests in the config or add resources."
        if not autoscaling:
            raise ConfigError(msg)
        print(f"[sweep] warning: {msg} Waiting for the autoscaler.", flush=True)


def build_tuner(cfg: ExperimentConfig, run_dir: Path):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from anyorder_ray.trial import run_trial

    param_space: dict[str, Any] = {
        "arm": tune.grid_search([dict(a) for a in cfg.sweep.arms]),
        "seed": tune.grid_search(list(cfg.sweep.seeds)),
    }
    if cfg.sweep.search == "random":
        param_space["mask_prob"] = tune.uniform(*cfg.sweep.mask_prob_range)
    scheduler = None
    if cfg.sweep.scheduler == "asha":
        scheduler = ASHAScheduler(
            metric="eval/success_rate", mode="max", grace_period=cfg.sweep.asha_grace_period, max_t=10**9
        )
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg, run_dir=str(run_dir)), {"cpu": cfg.sweep.trial_cpus}
    )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            num_samples=cfg.sweep.num_samples,
            max_concurrent_trials=cfg.sweep.max_concurrent_trials,
            scheduler=scheduler,
        ),
        run_config=tune.RunConfig(name="tune", storage_path=str(run_dir)),
    )


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    args = parse_args(argv)
    try:
        if args.resume is not None:
            run_dir = args.resume.resolve()
            if not (run_dir / RUN_CONFIG_FILE).is_file():
                raise ConfigError(f"--resume {args.resume}: no {RUN_CONFIG_FILE} there; is it a sweep run directory?")
            cfg = load_config(run_dir / RUN_CONFIG_FILE, args.overrides)
        else:
            cfg = load_config(args.config or default_config_path(), args.overrides)
            root = Path(cfg.sweep.storage_path or cfg.train.output_dir).resolve()
            run_dir = root / (args.name or f"{cfg.sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            run_dir.mkdir(parents=True, exist_ok=False)
            _write_config(cfg, run_dir / RUN_CONFIG_FILE)
    except (ConfigError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from ray import tune

    from anyorder_ray.trial import run_trial

    init_ray(args.num_cpus)
    try:
        check_resources(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    arms = ", ".join(_arm_label(a) for a in cfg.sweep.arms)
    print(f"[sweep] run directory: {run_dir}", flush=True)
    print(f"[sweep] level {cfg.env.level}; arms: {arms}; seeds {list(cfg.sweep.seeds)}", flush=True)
    print(f"[sweep] TensorBoard: tensorboard --logdir {run_dir / 'tune'}", flush=True)
    start = time.time()
    if args.resume is not None:
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=cfg, run_dir=str(run_dir)), {"cpu": cfg.sweep.trial_cpus}
        )
        tuner = tune.Tuner.restore(str(run_dir / "tune"), trainable=trainable, resume_errored=True)
    else:
        tuner = build_tuner(cfg, run_dir)
    grid = tuner.fit()
    rows = results_rows(grid)
    table_md = write_tables(rows, run_dir)
    write_plots(grid, rows, run_dir)
    print(table_md, flush=True)
    print(f"[sweep] finished {len(rows)} trial(s) in {time.time() - start:.0f} s; results in {run_dir}", flush=True)
    errors = sum(1 for r in rows if r["status"] != "ok")
    return 1 if errors else 0


def _arm_label(arm: dict) -> str:
    mode = arm.get("mode", "any_order")
    return f"{mode}@{arm.get('mask_prob', 0.5):g}" if mode in P_MODES else mode


def _write_config(cfg: ExperimentConfig, path: Path) -> None:
    import yaml

    raw = cfg.to_dict()
    raw["sweep"]["arms"] = [dict(a) for a in raw["sweep"]["arms"]]
    for section in raw.values():
        for k, v in section.items():
            if isinstance(v, tuple):
                section[k] = list(v)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    read_yaml(path)  # what we wrote must load back


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_tuner", "check_resources", "init_ray", "main"]
