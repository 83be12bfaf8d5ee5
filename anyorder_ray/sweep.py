"""``python -m anyorder_ray.sweep``: run a Ray Tune sweep of training arms and tabulate the results.

    python -m anyorder_ray.sweep                                  # tune_configs/sweep.yaml
    python -m anyorder_ray.sweep --config tune_configs/smoke.yaml train.max_steps=50
    python -m anyorder_ray.sweep --resume runs/anyorder-20261125-101500
    python -m anyorder_ray.sweep --tables runs/anyorder-20261125-101500  # tables of a running or interrupted sweep
    python -m anyorder_ray.sweep sweep.storage_path='s3://bucket/runs?region=eu-west-1'
    ray job submit --working-dir . -- python -m anyorder_ray.sweep --config tune_configs/smoke.yaml

With ``RAY_ADDRESS`` set it connects to that cluster; otherwise it starts a local Ray with bounded CPUs
and object store. The run directory (printed at start and end; a local folder or a storage URI, see
``anyorder_ray.storage``) holds Tune's per-trial logs (TensorBoard events, progress.csv), the trainers'
checkpoints and metrics logs, ``results.csv``, ``results.md``, the plots and ``environment.jsonl`` (the commit,
libraries and CPU of every start and resume: results reproduce to the episode where these match). The storage is
checked for writing before anything starts.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from anyorder_ray.config import ConfigError, ExperimentConfig, default_config_path, load_config, validate_env
from anyorder_ray.results import provenance
from anyorder_ray.results.plots import write_plots
from anyorder_ray.results.tables import results_rows, write_summary, write_tables
from anyorder_ray.storage import Location, StorageError, as_location, check_writable, default_job_root, in_ray_job
from envs import prepare_env

RUN_CONFIG_FILE = "experiment.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m anyorder_ray.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config", type=Path, default=None, help="YAML experiment config (default: tune_configs/sweep.yaml)"
    )
    p.add_argument(
        "--resume", default=None, help="run directory (a path or storage URI) of an interrupted sweep to finish"
    )
    p.add_argument(
        "--tables",
        default=None,
        help="run directory (a path or storage URI) of a running or interrupted sweep: write its tables from the "
        "trials' latest reports (unfinished ones marked partial), without starting Ray or any trial",
    )
    p.add_argument("--name", default=None, help="run directory name (default: <sweep.name>-<timestamp>)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=100")
    return p.parse_intermixed_args(argv)  # options may come between the overrides, as in `evaluate`


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` if set, else start a bounded local Ray."""
    import ray

    from anyorder_ray.roles.trial import job_runtime_env

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=job_runtime_env())
        return
    _start_local_ray(
        # "local" always starts a new instance; None would join a cluster left by an earlier `ray start`.
        address="local",
        num_cpus=num_cpus or os.cpu_count(),
        object_store_memory=512 * 1024 * 1024,
        runtime_env=job_runtime_env(),
        log_to_driver=True,
    )


LOCAL_RAY_STARTS = 3
"""How often ``init_ray`` starts a local Ray whose raylet did not register in time, before it gives up."""


def _start_local_ray(**init_args: Any) -> None:
    """``ray.init(**init_args)``, started again when Ray gives up waiting for its new raylet.

    Ray waits a fixed 30 s for the raylet it started to register with the GCS, then raises "The current node timed out
    during startup", leaving the processes it started running. On a busy 2-core machine (the tests two at a time beside
    a training run) that happened to a local sweep here. The processes this process gained during the failed start are
    stopped and Ray is started again, up to ``LOCAL_RAY_STARTS`` times; any other error is raised as it is.
    """
    import psutil
    import ray

    for attempt in range(1, LOCAL_RAY_STARTS + 1):
        before = {child.pid for child in psutil.Process().children(recursive=True)}
        try:
            ray.init(**init_args)
            return
        except Exception as error:  # Ray raises a plain Exception for this one
            if "timed out during startup" not in str(error) or attempt == LOCAL_RAY_STARTS:
                raise
            started = [child for child in psutil.Process().children(recursive=True) if child.pid not in before]
            for child in started:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            psutil.wait_procs(started, timeout=30)
            print(
                f"[sweep] the local Ray did not start ({error}); stopped the {len(started)} processes it had started "
                f"and starting it again ({attempt + 1} of {LOCAL_RAY_STARTS})",
                file=sys.stderr,
                flush=True,
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


def _trainable(cfg: ExperimentConfig, run: Location):
    """The trial function with its config and resources: one definition, so a restored sweep runs what the
    original ran."""
    from ray import tune

    from anyorder_ray.roles.trial import run_trial

    return tune.with_resources(tune.with_parameters(run_trial, base=cfg, run=run), {"cpu": cfg.sweep.trial_cpus})


def build_tuner(cfg: ExperimentConfig, run: Location):
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
    trainable = _trainable(cfg, run)
    storage_path, storage_filesystem = run.ray_storage()
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            num_samples=cfg.sweep.num_samples,
            max_concurrent_trials=cfg.sweep.max_concurrent_trials,
            scheduler=scheduler,
        ),
        run_config=tune.RunConfig(name="tune", storage_path=storage_path, storage_filesystem=storage_filesystem),
    )


def restore_tuner(cfg: ExperimentConfig, run: Location):
    """The Tuner of an interrupted sweep: finished trials are kept as they are (never rerun); unfinished
    (RUNNING/PENDING when the driver died) and errored ones run again under their old trial ids, so each
    trial's TorchTrainer finds its own run folder and continues from its latest checkpoint."""
    from ray import tune

    trainable = _trainable(cfg, run)
    tune_path, storage_filesystem = run.child("tune").ray_storage()
    return tune.Tuner.restore(
        tune_path,
        trainable=trainable,
        resume_unfinished=True,
        resume_errored=True,
        restart_errored=False,
        storage_filesystem=storage_filesystem,
    )


# Tune keeps its experiment state (JSON) and its search algorithm's state (a pickle) in these files, and restores the
# newest of each. It writes them atomically in its staging folder but copies them into the run directory, so a
# driver killed during the copy leaves an empty or truncated file there.
_TUNE_STATE_FILES = (("experiment_state-*.json", json.loads), ("basic-variant-state-*.json", pickle.loads))


def damaged_tune_state(tune_dir: Location | Path) -> list[str]:
    """Names of the newest Tune state files under ``tune_dir`` that are empty or do not load."""
    damaged = []
    entries = as_location(tune_dir).list()
    for pattern, load in _TUNE_STATE_FILES:
        # timestamped names: the last is the newest, as Tune picks it
        files = [loc for loc in entries if fnmatch.fnmatchcase(loc.name, pattern)]
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


def storage_root(cfg: ExperimentConfig) -> tuple[Location, str | None]:
    """Where new run folders go (``sweep.storage_path``, else ``train.output_dir``), and a note to print about it.

    Under ``ray job submit`` a relative ``train.output_dir`` would land in the job's unpacked working directory,
    which Ray deletes when the job ends: there it goes under ``~/anyorder_ray`` on the node running the driver.
    """
    if cfg.sweep.storage_path:
        try:
            return Location.parse(cfg.sweep.storage_path), None
        except StorageError as e:
            raise ConfigError(f"sweep.storage_path: {e}") from e
    out = Path(cfg.train.output_dir).expanduser()
    if out.is_absolute() or not in_ray_job():
        return Location.parse(out), None
    root = default_job_root() / out
    note = (
        f"running as a Ray job: the job's working directory is deleted when it ends, so the relative "
        f"train.output_dir {cfg.train.output_dir!r} goes to {root} on this node. On a multi-node cluster set "
        "sweep.storage_path to storage every node reaches (s3://..., gs://..., a shared mount)"
    )
    return Location.parse(root), note


def resolve_run(args: argparse.Namespace) -> tuple[ExperimentConfig, Location]:
    """The validated config and run folder of this invocation; a new run's storage is checked for writing first.
    Creates nothing (the write check removes its probe); raises ``ConfigError`` or ``StorageError``."""
    if args.resume is not None:
        extra = [flag for flag, given in (("--config", args.config), ("--name", args.name)) if given is not None]
        if extra or args.overrides:
            given = ", ".join(extra + list(args.overrides))
            raise ConfigError(
                f"--resume continues a sweep with the config saved in its {RUN_CONFIG_FILE}; it takes no {given}. "
                f"Start a new run with --config <its {RUN_CONFIG_FILE}> and the overrides instead."
            )
        try:
            run, saved = find_run(args.resume, f"--resume {args.resume}")
            cfg = _load_saved_config(saved)
        except (StorageError, OSError) as e:
            raise ConfigError(f"--resume {args.resume}: cannot read the run's storage: {e}") from e
        validate_env(cfg.env, saved.uri)
        from ray import tune

        tune_path, tune_fs = run.child("tune").ray_storage()
        if not tune.Tuner.can_restore(tune_path, storage_filesystem=tune_fs):
            raise ConfigError(
                f"--resume {args.resume}: no Tune experiment state under {run.child('tune')} (the sweep stopped "
                f"before its first trial started); start it again with --config {saved}"
            )
        damaged = damaged_tune_state(run.child("tune"))
        if damaged:
            raise ConfigError(
                f"--resume {args.resume}: Tune's state file(s) {', '.join(damaged)} under {run.child('tune')} are "
                f"empty or unreadable (the driver was killed while they were being written), so Tune would restore a "
                f"sweep without its trials. Finished trials' checkpoints and metrics stay under {run.child('train')}; "
                f"start the sweep again with --config {saved} --name <new name>"
            )
        return cfg, run
    path = args.config or default_config_path()
    cfg = load_config(path, args.overrides)
    validate_env(cfg.env, str(path))
    root, note = storage_root(cfg)
    if note:
        print(f"[sweep] note: {note}", flush=True)
    if not root.is_local:
        print(f"[sweep] checking storage {root} ...", flush=True)
    check_writable(root)  # raises StorageError naming the URI and the fix; leaves nothing behind
    run = root.child(args.name or f"{cfg.sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if run.exists():
        raise ConfigError(f"run directory {run} already exists: pick another --name, or --resume it")
    return cfg, run


def find_run(where: str, context: str) -> tuple[Location, Location]:
    """The run folder ``where`` (a path or URI) and its saved ``experiment.yaml``. Raises ``ConfigError`` (its message
    starts with ``context``) when the folder holds none; storage errors propagate."""
    run = Location.parse(where)
    saved = run.child(RUN_CONFIG_FILE)
    if not saved.is_file():
        raise ConfigError(
            f"{context}: no {RUN_CONFIG_FILE} there, so it is not a sweep run directory; pass the directory printed "
            "as '[sweep] run directory: ...' by the run"
        )
    return run, saved


def _load_saved_config(saved: Location) -> ExperimentConfig:
    """The config a run saved (``experiment.yaml``, which has no ``base:`` chain), from any storage."""
    if saved.is_local:
        return load_config(saved.local_path())
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / RUN_CONFIG_FILE
        local.write_bytes(saved.read_bytes())
        return load_config(local)


def trial_configs(analysis: Any) -> dict[str, dict]:
    """Each trial's folder to its config, from a Tune ``ExperimentAnalysis``. A ``ResultGrid`` read back from disk
    gives a trial that failed before its first report no config (``Result.config`` is read from the last report),
    so its row would otherwise carry the defaults' arm and seed."""
    return {str(trial.path): dict(trial.config) for trial in analysis.trials}


def write_results(
    grid: Any, cfg: ExperimentConfig, run: Location, configs: dict[str, dict] | None = None
) -> list[dict[str, Any]]:
    """The sweep's tables, summary and plots from ``grid`` (a Tune ``ResultGrid``; ``configs`` as ``trial_configs``,
    for a grid read back from disk) into ``run``; printed; its rows."""
    rows = results_rows(grid, cfg, configs)
    with run.staged() as out:  # a remote run folder gets the tables and plots uploaded when they are all written
        table_md = write_tables(rows, out)
        summary_md = write_summary(rows, out)
        write_plots(grid, cfg, rows, out)
    print(table_md, flush=True)
    if len(cfg.sweep.seeds) > 1:
        print("\nPer arm over seeds (summary.md):\n" + summary_md, flush=True)
    return rows


def tables_only(where: str) -> int:
    """``--tables RUN``: the tables of a running or interrupted sweep from what its trials reported so far (Tune's
    experiment state on disk; no Ray, no trial runs). A trial without its final evaluation is marked ``partial``; a
    trial that never started has no row and is named."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    try:
        run, saved = find_run(where, f"--tables {where}")
        cfg = _load_saved_config(saved)
        tune_path, tune_fs = run.child("tune").ray_storage()
        analysis = ExperimentAnalysis(tune_path, storage_filesystem=tune_fs)
    except (ConfigError, StorageError, OSError, ValueError) as e:  # ValueError: Tune found no experiment state
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = write_results(ResultGrid(analysis), cfg, run, trial_configs(analysis))
    partial = [f"{r['arm']} seed {r['seed']}" for r in rows if r["status"] == "partial"]
    if partial:
        print(f"[sweep] partial (no final evaluation yet; latest report shown): {'; '.join(partial)}", flush=True)
    missing = missing_trials(rows, cfg)
    if missing:
        print(f"[sweep] not started (or nothing reported yet): {'; '.join(missing)}", flush=True)
    print(f"[sweep] results: {run.child('results.md')} (and results.csv, summary.*, plots beside it)", flush=True)
    return 0


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
    if args.tables is not None:
        others = [flag for flag, given in (("--config", args.config), ("--name", args.name), ("--resume", args.resume),
                                           ("--num-cpus", args.num_cpus)) if given is not None]  # fmt: skip
        if others or args.overrides:
            print(f"error: --tables only reads a run; it takes no {', '.join(others + list(args.overrides))}",
                  file=sys.stderr)  # fmt: skip
            return 2
        return tables_only(args.tables)
    # Every check that can fail runs before anything is written: a bad config or a cluster too small for
    # one trial leaves no run directory behind.
    try:
        cfg, run = resolve_run(args)
    except (ConfigError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import ray

    started_ray = not ray.is_initialized()
    init_ray(args.num_cpus)
    created = False
    try:
        check_resources(cfg)
        if args.resume is None:
            created = True
            _write_config(cfg, run.child(RUN_CONFIG_FILE))
        record = provenance.environment_record("resume" if args.resume is not None else "start")
        run.child(provenance.FILE).append_text(json.dumps(record) + "\n")
    except (ConfigError, StorageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        if created:  # a run directory without its experiment.yaml could be neither resumed nor reused
            with contextlib.suppress(OSError):
                run.delete()
        if started_ray:
            ray.shutdown()
        return 2
    arms = ", ".join(arm.label() for arm in cfg.arms())
    print(f"[sweep] run directory: {run}", flush=True)
    print(f"[sweep] if interrupted, continue with: python -m anyorder_ray.sweep --resume '{run}'", flush=True)
    print(f"[sweep] level {cfg.env.level}; arms: {arms}; seeds {list(cfg.sweep.seeds)}", flush=True)
    print(f"[sweep] TensorBoard: tensorboard --logdir {run.child('tune')}", flush=True)
    print(
        f"[sweep] made with: {record['cpu']} ({record['torch_cpu_capability']}), torch "
        f"{record['packages']['torch']}, commit {record['commit'] or 'unknown'}; {provenance.FILE}",
        flush=True,
    )
    start = time.time()
    # Built once here, not by each trial's actors side by side (TextWorld's game pools; on a cluster this fills the
    # driver node's cache only).
    prepared = prepare_env(cfg.env)
    if prepared:
        print(f"[sweep] {len(prepared)} world files ready (training and evaluation pools)", flush=True)
    tuner = restore_tuner(cfg, run) if args.resume is not None else build_tuner(cfg, run)
    grid = tuner.fit()  # live, even a trial that failed before reporting has its config in its last result
    rows = write_results(grid, cfg, run)
    print(f"[sweep] finished {len(rows)} trial(s) in {time.time() - start:.0f} s", flush=True)
    print(f"[sweep] results: {run.child('results.md')} (and results.csv, summary.*, plots beside it)", flush=True)
    print(f"[sweep] checkpoints, metrics.jsonl: {run.child('train')}; Tune logs: {run.child('tune')}", flush=True)
    missing = missing_trials(rows, cfg)
    if missing:
        print(f"[sweep] ERROR: no result for {len(missing)} trial(s) of the sweep: {'; '.join(missing)}", flush=True)
    errors = sum(1 for r in rows if r["status"] != "ok")
    return 1 if errors or missing else 0


def _write_config(cfg: ExperimentConfig, where: Location) -> None:
    import yaml

    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    with tempfile.TemporaryDirectory() as tmp:  # what we write must load back, or --resume could not use it
        (Path(tmp) / RUN_CONFIG_FILE).write_text(text, encoding="utf-8")
        load_config(Path(tmp) / RUN_CONFIG_FILE)
    where.write_text(text)


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
    "storage_root",
]
