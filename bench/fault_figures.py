"""Faults survived: runs the fault-injection tests (real SIGKILLs, a node removed from a real multi-raylet cluster,
a killed sweep driver) and tabulates what each measured: trajectories the buffer had acknowledged before the fault,
how many of those were available after the recovery, and the training steps done again after the restart.

    python bench/fault_figures.py              # every fault test (~10-15 minutes on 2 cores)
    python bench/fault_figures.py --quick      # the two buffer-actor tests only (~1-2 minutes)

Each test asserts its own invariants (no acknowledged trajectory lost, exact resumption); this script only collects
the numbers they recorded (``tests/helpers.record_fault``) and prints them as a table and RESULT lines.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import Result, print_results

ROOT = Path(__file__).resolve().parents[1]
QUICK = [
    "tests/test_fault_tolerance.py::test_killed_buffer_actor_restarts_with_every_acknowledged_trajectory",
    "tests/test_fault_tolerance.py::test_training_goes_on_when_the_buffer_actor_dies_mid_trial",
]
ALL = [
    "tests/test_fault_tolerance.py::test_killed_rollout_actor_restarts_resumes_and_loses_no_acknowledged_batch",
    *QUICK,
    "tests/test_fault_tolerance.py::test_killed_training_worker_resumes_exactly_from_its_last_checkpoint",
    "tests/test_sweep_cli.py::test_resume_after_the_driver_is_killed_finishes_only_the_unfinished_trials",
    "tests/test_multinode.py",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the buffer-actor tests only")
    args = parser.parse_args()
    tests = QUICK if args.quick else ALL
    with tempfile.TemporaryDirectory() as tmp:
        figures = Path(tmp) / "faults.jsonl"
        env = {**os.environ, "AORAY_FAULT_FIGURES": str(figures)}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
        print(f"[faults] {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, check=False)
        print(proc.stdout[-1500:], flush=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            print(f"[faults] the fault tests failed (exit {proc.returncode}): no figures", file=sys.stderr)
            return 1
        records = [json.loads(line) for line in figures.read_text().splitlines()] if figures.exists() else []
    if not records:
        print("[faults] the tests recorded nothing (a skipped test?)", file=sys.stderr)
        return 1
    print("\n| fault | trajectories acknowledged before | of those available after | steps repeated |")
    print("|---|---|---|---|")
    results = []
    for r in records:
        repeated = "-" if r["steps_repeated"] is None else str(r["steps_repeated"])
        print(f"| {r['fault']} | {r['acknowledged']} | {r['available']} | {repeated} |")
        slug = re.sub(r"[^a-z0-9]+", "_", r["fault"].lower()).strip("_")
        results.append(Result(f"lost_trajectories_{slug}", r["acknowledged"] - r["available"], "==", 0))
        if r["steps_repeated"] is not None:
            results.append(Result(f"steps_repeated_{slug}", r["steps_repeated"]))
    print()
    print_results(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
