"""Load reproducibility: one arm of a sweep config, run on a quiet machine and again next to a process that keeps a
core busy, must train the same steps and score the same success, to the episode.

Both runs go through ``python -m anyorder_ray.sweep`` with the config as shipped (its compute budget, data, model,
evaluation), restricted to one arm and one seed. From each trial's ``metrics.jsonl`` it compares the planned and
trained step count, every reported training loss and the final evaluation (successes of the final episodes and the
held-out NLLs), and prints how long each run took (the only thing the load should change). The default sweep is DAgger
with ``rollout.sync``: its rollout actor plays a fixed number of batches under each weight version, which the trainer
takes in at fixed steps, so its on-policy data does not depend on the load either.

    python bench/load_reproducibility.py                      # the default sweep's causal arm (~2 x 11 minutes)
    python bench/load_reproducibility.py --quick              # tune_configs/smoke.yaml (~2 x 1 minute)
    python bench/load_reproducibility.py --compare QUIET OTHER...   # finished trials (or one-trial sweep directories)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _common import Result, load_average, print_results, trial_reports

from anyorder_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def run(config: str, arm: str, out: Path, name: str, loaded: bool) -> tuple[list[dict], float]:
    """One sweep of ``arm`` (a label of the config's arms); its trial's reports and the wall time."""
    cfg = load_config(config)
    arm_yaml = yaml.safe_dump([dataclasses.asdict(cfg.arm(arm))], default_flow_style=True).strip()
    cmd = [sys.executable, "-m", "anyorder_ray.sweep", "--config", config, "--name", name,
           f"train.output_dir={out}", f"sweep.arms={arm_yaml}", f"sweep.seeds=[{cfg.train.seed}]"]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if loaded else None
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"the {name} run failed (exit {proc.returncode})")
    return trial_reports(out / name), seconds


def main(argv: list[str]) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tune_configs/smoke.yaml instead of the default sweep")
    parser.add_argument("--config", default=None, help="default: tune_configs/sweep.yaml (quick: smoke.yaml)")
    parser.add_argument("--arm", default="causal")
    parser.add_argument("--compare", nargs="+", metavar="RUN_DIR",
                        help="instead of running: compare finished trials with the first")  # fmt: skip
    args = parser.parse_args(argv)
    config = args.config or str(ROOT / "tune_configs" / ("smoke.yaml" if args.quick else "sweep.yaml"))
    if args.compare:
        return compare_runs([Path(d) for d in args.compare])
    with tempfile.TemporaryDirectory(prefix="aoray-load-") as tmp:
        quiet, quiet_s = run(config, args.arm, Path(tmp), "quiet", loaded=False)
        print(f"[quiet] {len(quiet)} reports in {quiet_s:.0f} s ({load_average()})", flush=True)
        loaded, loaded_s = run(config, args.arm, Path(tmp), "loaded", loaded=True)
        print(f"[loaded] {len(loaded)} reports in {loaded_s:.0f} s ({load_average()})", flush=True)
    return [*compare(quiet, loaded, "quiet", "loaded"), Result("load_slowdown_wall", loaded_s / quiet_s)]


TRAIN_KEYS = ("train/step", "train/loss", "train/planned_steps", "train/total_tokens", "train/total_flops")
FINAL_KEYS = ("eval/success_rate", "eval/episodes", "eval/world_model_nll", "eval/action_nll")


def compare(first: list[dict], second: list[dict], a: str, b: str, suffix: str = "") -> list[Result]:
    """RESULT lines (names ending in ``suffix``) saying whether two trials' reports trained and scored the same."""
    same_training = [[r.get(k) for k in TRAIN_KEYS] for r in first if "train/step" in r] == [
        [r.get(k) for k in TRAIN_KEYS] for r in second if "train/step" in r
    ]
    q, lo = first[-1], second[-1]
    same_final = all(q.get(k) == lo.get(k) for k in FINAL_KEYS)
    print(f"steps {q['train/step']} ({a}) vs {lo['train/step']} ({b}); success {q.get('eval/success_rate')} "
          f"of {q.get('eval/episodes')} vs {lo.get('eval/success_rate')} of {lo.get('eval/episodes')}")  # fmt: skip
    return [
        Result("load_same_steps" + suffix, float(q["train/step"] == lo["train/step"]), "==", 1),
        Result("load_same_training_curve" + suffix, float(same_training), "==", 1),
        Result("load_same_final_success" + suffix, float(same_final), "==", 1),
        Result("load_steps" + suffix, q["train/step"]),
        Result("load_success" + suffix, float(q.get("eval/success_rate", float("nan")))),
    ]


def compare_runs(dirs: list[Path]) -> list[Result]:
    """Compare finished trials (``--compare``, each as ``trial_reports`` reads it) with the first, and print their
    training times."""
    logs = [trial_reports(d) for d in dirs]
    results = []
    for d, log in zip(dirs[1:], logs[1:], strict=True):
        results += compare(logs[0], log, dirs[0].name, d.name, suffix=f"_{d.name}")
    for d, log in zip(dirs, logs, strict=True):
        seconds = log[-1].get("train/elapsed_s", float("nan"))
        print(f"{d.name}: {log[-1]['train/step']} steps, training time {seconds:.0f} s")
    return results


if __name__ == "__main__":
    print_results(main(sys.argv[1:]))
