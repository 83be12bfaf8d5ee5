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
import json
import os
import pickle
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from anyorder_ray.config import ConfigError, ExperimentConfig, default_config_path, load_config, read_yaml, validate_env
from anyorder_ray.fileio import atomic_write
from anyorder_ray.results.plots import write_plots
from anyorder_ray.results.tables import results_rows, write_summary, write_tables

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

    from anyorder_ray.roles.trial import local_env_vars

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": local_env_vars()})
        return
    ray.init(
        # "local" always starts a new instance; None would join a cluster left by an earlier `ray start`.
        address="local",
        num_cpus=num_cpus or os.cpu_count(),
        object_store_memory=512 * 1024 * 1024,
        runtime_env={"env_vars": local_env_vars()},
        log_to_driver=True,
    )


def resource_problems(cfg: ExperimentConfig, have_cpus: float, have_gpus: float) -> list[str]:
    """What one trial asks for beyond ``have_cpus`` / ``have_gpus``, each naming the keys to lower."""
    from anyorder_ray.roles.trial import trial_cpus

    problems = []
    need_cpu = trial_cpus(cfg)
    if need_cpu > have_cpus + 1e-9:
        terms = [
            ("train.num_workers x train.cpus_per_worker", cfg.train.num_workers, cfg.train.cpus_per_worker),
            ("rollout.num_actors x rollout.num_cpus_per_actor", cfg.rollout.num_actors, cfg.rollout.num_cpus_per_actor),
            ("eval.enabled x eval.num_cpus_per_actor", cfg.eval.actors(), cfg.eval.num_cpus_per_actor),
        ]
        parts = [f"{keys} = {n} x {c:g} = {n * c:g}" for keys, n, c in terms if n * c > 0]
        parts.append(f"sweep.trial_cpus = {cfg.sweep.trial_cpus:g}")
        problems.append(
            f"one trial needs {need_cpu:g} CPUs but the cluster has {have_cpus:g} ({'; '.join(parts)}): lower "
            "these keys so they fit, or use a bigger cluster (a local Ray gets --num-cpus, default all cores)"
        )
    need_train_gpu = cfg.train.num_workers if cfg.train.use_gpu else 0
    need_eval_gpu = cfg.eval.actors() * cfg.eval.num_gpus_per_actor
    if need_train_gpu + need_eval_gpu > have_gpus + 1e-9:
        problems.append(
            f"one trial needs {need_train_gpu + need_eval_gpu:g} GPU(s) (train.use_gpu={cfg.train.use_gpu} with "
            f"train.num_workers={cfg.train.num_workers}; eval.enabled x eval.num_gpus_per_actor = "
            f"{need_eval_gpu:g}) but the cluster has {have_gpus:g}: set train.use_gpu=false, lower "
            "train.num_workers or eval.num_gpus_per_actor"
        )
    return problems


def check_resources(cfg: ExperimentConfig) -> None:
    """Fail fast when one trial asks for more than the cluster has (instead of a silent pending hang).

    On a cluster reached through ``RAY_ADDRESS`` an autoscaler may add nodes, so there it only warns.
    """
    import ray

    have = ray.cluster_resources()
    problems = resource_problems(cfg, have.get("CPU", 0.0), have.get("GPU", 0.0))
    if not problems:
        return
    if not os.environ.get("RAY_ADDRESS"):
        raise ConfigError("; ".join(problems))
    print(f"[sweep] warning: {'; '.join(problems)}. Waiting for the autoscaler.", flush=True)


def _trainable(cfg: ExperimentConfig, run_dir: Path):
    """The trial function with its config and resources: one definition, so a restored sweep runs what the
    original ran."""
    from ray import tune

    from anyorder_ray.roles.trial import run_trial

    return tune.with_resources(
        tune.with_parameters(run_trial, base=cfg, run_dir=str(run_dir)), {"cpu": cfg.sweep.trial_cpus}
    )


def build_tuner(cfg: ExperimentConfig, run_dir: Path):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    param_space: dict[str, Any] = {
        "arm": tune.grid_search([arm.label() for arm in cfg.arms()]),
        "seed": tune.grid_search(list(cfg.sweep.seeds)),
    }
    if cfg.sweep.search == "random":
        param_space["mask_prob"] = tune.uniform(*cfg.sweep.mask_prob_range)
    scheduler = None
    if cfg.sweep.scheduler == "asha":
        scheduler = ASHAScheduler(
            metric="eval/success_rate", mode="max", grace_period=cfg.sweep.asha_grace_period, max_t=10**9
        )
    trainable = _trainable(cfg, run_dir)
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


def restore_tuner(cfg: ExperimentConfig, run_dir: Path):
    """The Tuner of an interrupted sweep: finished trials are kept as they are (never rerun); unfinished
    (RUNNING/PENDING when the driver died) and errored ones run again under their old trial ids, so each
    trial's TorchTrainer finds its own run folder and continues from its latest checkpoint."""
    from ray import tune

    trainable = _trainable(cfg, run_dir)
    return tune.Tuner.restore(
        str(run_dir / "tune"), trainable=trainable, resume_unfinished=True, resume_errored=True, restart_errored=False
    )


# Tune keeps its experiment state (JSON) and its search algorithm's state (a pickle) in these files, and restores the
# newest of each. It writes them atomically in its staging folder but copies them into the run directory, so a
# driver killed during the copy leaves an empty or truncated file there.
_TUNE_STATE_FILES = (("experiment_state-*.json", json.loads), ("basic-variant-state-*.json", pickle.loads))


def damaged_tune_state(tune_dir: Path) -> list[str]:
    """Names of the newest Tune state files under ``tune_dir`` that are empty or do not load."""
    damaged = []
    for pattern, load in _TUNE_STATE_FILES:
        files = sorted(tune_dir.glob(pattern))  # timestamped names: the last is the newest, as Tune picks it
        if not files:
            continue
        try:
            load(files[-1].read_bytes())
        except Exception:  # empty, truncated or otherwise unreadable: any of them loses trials on restore
            damaged.append(files[-1].name)
    return damaged


def missing_trials(rows: list[dict[str, Any]], cfg: ExperimentConfig) -> list[str]:
    """``arm seed`` of every trial of the sweep's grid that has no row (a grid search sweep only)."""
    if cfg.sweep.search != "grid":
        return []
    have = {(r["arm"], int(r["seed"])) for r in rows}
    want = [(arm.label(), int(seed)) for arm in cfg.arms() for seed in cfg.sweep.seeds]
    return [f"{arm} seed {seed}" for arm, seed in want if (arm, seed) not in have]


def resolve_run(args: argparse.Namespace) -> tuple[ExperimentConfig, Path]:
    """The validated config and run directory of this invocation. Creates nothing; raises ``ConfigError``."""
    if args.resume is not None:
        extra = [flag for flag, given in (("--config", args.config), ("--name", args.name)) if given is not None]
        if extra or args.overrides:
            given = ", ".join(extra + list(args.overrides))
            raise ConfigError(
                f"--resume continues a sweep with the config saved in its {RUN_CONFIG_FILE}; it takes no {given}. "
                f"Start a new run with --config {args.resume / RUN_CONFIG_FILE} and the overrides instead."
            )
        run_dir = args.resume.resolve()
        if not (run_dir / RUN_CONFIG_FILE).is_file():
            raise ConfigError(
                f"--resume {args.resume}: no {RUN_CONFIG_FILE} there, so it is not a sweep run directory; "
                f"pass the directory printed as '[sweep] run directory: ...' by the run to continue"
            )
        cfg = load_config(run_dir / RUN_CONFIG_FILE)
        validate_env(cfg.env, str(run_dir / RUN_CONFIG_FILE))
        from ray import tune

        if not tune.Tuner.can_restore(str(run_dir / "tune")):
            raise ConfigError(
                f"--resume {args.resume}: no Tune experiment state under {run_dir / 'tune'} (the sweep stopped "
                f"before its first trial started); start it again with --config {run_dir / RUN_CONFIG_FILE}"
            )
        damaged = damaged_tune_state(run_dir / "tune")
        if damaged:
            raise ConfigError(
                f"--resume {args.resume}: Tune's state file(s) {', '.join(damaged)} under {run_dir / 'tune'} are empty "
                f"or unreadable (the driver was killed while they were being written), so Tune would restore a sweep "
                f"without its trials. Finished trials' checkpoints and metrics stay under {run_dir / 'train'}; start "
                f"the sweep again with --config {run_dir / RUN_CONFIG_FILE} --name <new name>"
            )
        return cfg, run_dir
    path = args.config or default_config_path()
    cfg = load_config(path, args.overrides)
    validate_env(cfg.env, str(path))
    root = Path(cfg.sweep.storage_path or cfg.train.output_dir).resolve()
    run_dir = root / (args.name or f"{cfg.sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if run_dir.exists():
        raise ConfigError(f"run directory {run_dir} already exists: pick another --name, or --resume it")
    return cfg, run_dir


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # Tune snapshots its experiment state (which trials finished) at most every 10 s by default; a driver
    # killed inside that window makes --resume rerun a trial that had finished. The state is a few KB.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    if not os.environ.get("RAY_ADDRESS"):
        # A local Ray is this machine's business only: with this Ray takes loopback as the node address, so every
        # process binds and talks on 127.0.0.1 (read when ray is first imported, which happens below).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    args = parse_args(argv)
    # Every check that can fail runs before anything is written: a bad config or a cluster too small for
    # one trial leaves no run directory behind.
    try:
        cfg, run_dir = resolve_run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import ray

    started_ray = not ray.is_initialized()
    init_ray(args.num_cpus)
    created = False
    try:
        check_resources(cfg)
        if args.resume is None:
            run_dir.mkdir(parents=True, exist_ok=False)
            created = True
            _write_config(cfg, run_dir / RUN_CONFIG_FILE)
    except (ConfigError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        if created:  # a run directory without its experiment.yaml could be neither resumed nor reused
            shutil.rmtree(run_dir, ignore_errors=True)
        if started_ray:
            ray.shutdown()
        return 2
    arms = ", ".join(arm.label() for arm in cfg.arms())
    print(f"[sweep] run directory: {run_dir}", flush=True)
    print(f"[sweep] level {cfg.env.level}; arms: {arms}; seeds {list(cfg.sweep.seeds)}", flush=True)
    print(f"[sweep] TensorBoard: tensorboard --logdir {run_dir / 'tune'}", flush=True)
    start = time.time()
    tuner = restore_tuner(cfg, run_dir) if args.resume is not None else build_tuner(cfg, run_dir)
    grid = tuner.fit()
    rows = results_rows(grid, cfg)
    table_md = write_tables(rows, run_dir)
    summary_md = write_summary(rows, run_dir)
    write_plots(grid, cfg, rows, run_dir)
    print(table_md, flush=True)
    if len(cfg.sweep.seeds) > 1:
        print("\nPer arm over seeds (summary.md):\n" + summary_md, flush=True)
    print(f"[sweep] finished {len(rows)} trial(s) in {time.time() - start:.0f} s; results in {run_dir}", flush=True)
    missing = missing_trials(rows, cfg)
    if missing:
        print(f"[sweep] ERROR: no result for {len(missing)} trial(s) of the sweep: {'; '.join(missing)}", flush=True)
    errors = sum(1 for r in rows if r["status"] != "ok")
    return 1 if errors or missing else 0


def _write_config(cfg: ExperimentConfig, path: Path) -> None:
    import yaml

    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)

    def write_checked(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")
        read_yaml(tmp)  # what we write must load back, or --resume could not use it

    atomic_write(path, write_checked)


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "build_tuner",
    "check_resources",
    "damaged_tune_state",
    "init_ray",
    "main",
    "missing_trials",
    "resolve_run",
    "resource_problems",
    "restore_tuner",
]
