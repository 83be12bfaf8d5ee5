"""``python -m anyorder_ray.evaluate``: play a finished sweep's final checkpoints again, in its world or another one.

    python -m anyorder_ray.evaluate runs/textworld_cooking                 # reproduces the sweep's final evaluation
    python -m anyorder_ray.evaluate runs/textworld_cooking env.split=test  # TextWorld's out-of-distribution games
    python -m anyorder_ray.evaluate runs/gotolocal env.level=GoTo eval.final_episodes=500

Every trial's last checkpoint is played by the evaluator the trials use (``EvalWorker``: the arm's scorer and layout,
episodes in lockstep (greedy, or sampled with ``eval.temperature``), world-model and action NLL on the expert's
held-out trajectories, world-model NLL and exact match there, on off-expert branches of them and on the episodes' own
transitions), on ``eval.final_episodes`` episodes from ``eval.seed_start`` of the world the ``env.*`` overrides
describe. Without ``env.*`` overrides that is the run's own evaluation world (``envs.evaluation_env``); with them it is
exactly the ``env`` section they give (``env.split=train`` plays the training games). Only ``env.*`` and ``eval.*``
keys can be overridden: the model, tokenizer and arm of each trial are the run's.

The tables land in ``<run>/evaluations/<name>/`` (``--name``; default from the overrides): ``results.csv`` /
``results.md`` with one row per trial (the sweep's columns; steps, budget and FLOPs are the training run's),
``summary.*`` per arm over seeds with the difference to causal, ``episodes.csv`` with every episode (trial, arm,
seed, episode seed, success, length, reward, the commands taken), and ``evaluation.yaml`` (the world and evaluation
settings played, and the command). Runs in this process on this machine's cores (``--threads``); with storage URIs
the checkpoints are downloaded one at a time. Worlds that generate games generate the missing ones of the pool as
the episodes reach them (with a line each).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from anyorder_ray.config import ConfigError, ExperimentConfig, apply_overrides, config_from_dict, validate_env
from anyorder_ray.results.tables import make_row, sort_rows, write_summary, write_tables
from anyorder_ray.storage import Location, StorageError
from anyorder_ray.sweep import find_run

OVERRIDABLE = ("env", "eval")
EPISODE_COLUMNS = ("trial", "arm", "seed", "episode_seed", "success", "length", "reward", "actions")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m anyorder_ray.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run directory (a path or storage URI) of a finished sweep")
    p.add_argument("--name", default=None, help="folder under <run>/evaluations/ (default: from the overrides)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("overrides", nargs="*", help="env.key=value / eval.key=value, e.g. env.split=test")
    return p.parse_intermixed_args(argv)  # options may come after the run folder and between overrides


def evaluation_name(overrides: list[str]) -> str:
    """A folder name for the overrides: ``split-test_final_episodes-200``; ``own-world`` without any."""
    if not overrides:
        return "own-world"
    parts = [re.sub(r"[^A-Za-z0-9.=_-]+", "-", o.split(".", 1)[-1]).replace("=", "-") for o in overrides]
    parts = [re.sub(r"-{2,}", "-", part).strip("-") for part in parts]
    return "_".join(parts)[:120]


def resolve(args: argparse.Namespace) -> tuple[ExperimentConfig, ExperimentConfig, Location]:
    """The run's saved config, the config with the overrides (what is played), and the run folder. Raises
    ``ConfigError`` naming the problem."""
    bad = [o for o in args.overrides if o.split(".", 1)[0] not in OVERRIDABLE or "=" not in o]
    if bad:
        raise ConfigError(
            f"{', '.join(bad)}: only env.<key>=<value> and eval.<key>=<value> can be overridden here (each trial's "
            "model and arm are the run's own)"
        )
    try:
        run, saved = find_run(args.run, args.run)
        import yaml

        raw = yaml.safe_load(saved.read_text())
    except (StorageError, OSError) as e:
        raise ConfigError(f"{args.run}: cannot read the run's storage: {e}") from e
    cfg = config_from_dict(raw, saved.uri)
    played = config_from_dict(apply_overrides(raw, args.overrides), f"{saved.uri} + overrides")
    validate_env(played.env, "the overrides")
    return cfg, played, run


def finished_trials(run: Location) -> list[Any]:
    """Tune's results of the run's trials (config, last metrics, last checkpoint), in trial order."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    tune_path, fs = run.child("tune").ray_storage()
    try:
        grid = ResultGrid(ExperimentAnalysis(tune_path, storage_filesystem=fs))
    except Exception as e:  # Tune raises ValueError/FileNotFoundError/RuntimeError depending on what is missing
        raise ConfigError(f"{run}: cannot read Tune's experiment state under {run.child('tune')}: {e}") from e
    return sorted(grid, key=lambda r: str(r.metrics.get("trial_id") if r.metrics else r.path))


def last_checkpoint(result: Any, run: Location) -> Any:
    """The trial's last checkpoint: Ray Train saves them under ``<run>/train/``, and each trial reports the folder
    of the last one as ``checkpoint_path`` (on the run's storage filesystem). None when it has none."""
    if result.checkpoint is not None:
        return result.checkpoint
    path = (result.metrics or {}).get("checkpoint_path")
    if not path:
        return None
    from ray.train import Checkpoint

    _, fs = run.ray_storage()
    return Checkpoint(str(path), filesystem=fs)


def evaluate_trial(
    result: Any, cfg: ExperimentConfig, played: ExperimentConfig, own_world: bool, threads: int, run: Location
) -> dict[str, Any]:
    """One table row: the trial's last checkpoint played in ``played``'s world (or the run's evaluation world)."""
    from anyorder_ray.roles.evaluator import EvalWorker

    metrics = dict(result.metrics or {})
    trial_id = str(metrics.get("trial_id") or Path(result.path).name)
    trial = cfg.trial(dict(result.config or {}))
    base = {k: v for k, v in metrics.items() if not k.startswith("eval/")}  # training's steps, budget, FLOPs, time
    checkpoint = last_checkpoint(result, run)
    if checkpoint is None:
        print(f"[evaluate] {trial_id} ({trial.masking.label()}): no checkpoint, skipped", flush=True)
        return make_row(trial_id, trial, base, "error")
    worker = EvalWorker(
        trial.env, played.eval, trial.model, trial.history_steps(), trial.data.max_seq_len, torch_threads=threads,
        layout=trial.masking.layout, play=None if own_world else played.env,
    )  # fmt: skip
    start = time.perf_counter()
    step = int(metrics.get("train/step", -1))
    out = worker.evaluate(checkpoint, step, played.eval.final_episodes)
    row = make_row(trial_id, trial, {**base, **out, "checkpoint_path": checkpoint.path}, "ok")
    row["_episodes"] = [
        {"trial": trial_id, "arm": row["arm"], "seed": row["seed"], "episode_seed": e.seed, "success": int(e.success),
         "length": e.length, "reward": e.reward, "actions": " | ".join(e.actions)}
        for e in worker.last_episodes().results
    ]  # fmt: skip
    print(
        f"[evaluate] {trial_id} {trial.masking.label()} s{trial.train.seed}: success {out['eval/success_rate']:.3f} "
        f"[{out['eval/success_low']:.3f}, {out['eval/success_high']:.3f}] of {int(out['eval/episodes'])} "
        f"(the sweep's, in its own world: {_fmt_rate(metrics.get('eval/success_rate'))}), world-model NLL "
        f"{out['eval/world_model_nll']:.3f} (exact {out['eval/world_model_exact']:.3f}; off-expert "
        f"{out['eval/offexpert_world_model_nll']:.3f}, on-policy {out['eval/onpolicy_world_model_nll']:.3f}), "
        f"{time.perf_counter() - start:.0f} s",
        flush=True,
    )
    return row


def _fmt_rate(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, int | float) and not math.isnan(v) else "–"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, played, run = resolve(args)
        trials = finished_trials(run)
        # The final checkpoints are what is played: the eval actor loads them itself.
        played = dataclasses.replace(played, eval=dataclasses.replace(played.eval, weights="checkpoint"))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not trials:
        print(f"error: {run} has no trials", file=sys.stderr)
        return 2
    own_world = not any(o.startswith("env.") for o in args.overrides)
    from envs import evaluation_env

    world = evaluation_env(cfg.env) if own_world else played.env
    name = args.name or evaluation_name(args.overrides)
    out = run.child("evaluations").child(name)
    threads = args.threads or os.cpu_count() or 1
    print(
        f"[evaluate] {len(trials)} trial(s) of {run}; playing {world.world} {world.level!r} split {world.split!r}, "
        f"{played.eval.final_episodes} episodes from seed {played.eval.seed_start}; tables: {out}",
        flush=True,
    )
    import torch

    torch.manual_seed(0)
    rows = sort_rows([evaluate_trial(r, cfg, played, own_world, threads, run) for r in trials])
    import yaml

    settings = {"run": str(run), "command": "python -m anyorder_ray.evaluate " + " ".join(sys.argv[1:] or [args.run]),
                "env": dataclasses.asdict(world),
                "eval": dataclasses.asdict(played.eval)}  # fmt: skip
    episodes = [e for r in rows for e in r.pop("_episodes", [])]
    with out.staged() as folder:
        with (Path(folder) / "episodes.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=EPISODE_COLUMNS)
            writer.writeheader()
            writer.writerows(episodes)
        table = write_tables(rows, folder)
        summary = write_summary(rows, folder)
        (Path(folder) / "evaluation.yaml").write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    print(table + "\n\nPer arm over seeds:\n" + summary, flush=True)
    beside = "results.csv, summary.*, episodes.csv, evaluation.yaml beside"
    print(f"[evaluate] tables: {out.child('results.md')} ({beside})", flush=True)
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
