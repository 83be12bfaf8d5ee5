"""Every benchmark script runs with ``--quick`` and ends with parseable RESULT lines (``test_every_bench_is_listed``
keeps the list complete).

Only the format is checked (name, float value, optional ``target <op><number>``), never the values: timings depend
on the machine and its load, and the figures are tabulated in docs/BENCHMARKS.md instead.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [
    "model_throughput",
    "rollout_scaling",
    "train_throughput",
    "eval_throughput",
    "memory",
    "fsdp2_gpu",
    "compile_speed",
    "behaviour_parity",
    "peer_loops",
    "step_variants",
    "textworld_expert",
    "dagger_throughput",
    "mfu_ceiling",
    "idle_actors",
]
NEEDS_EXTRA = {"textworld_expert": "textworld"}  # scripts that need an optional extra (skipped without it)


# Scripts whose --quick run would repeat a test that runs anyway (the reason says which).
NOT_RUN_HERE = {
    "load_reproducibility": "its --quick run is the check of tests/test_sweep_e2e.py::"
    "test_a_compute_budget_trains_and_scores_the_same_on_a_quiet_and_a_loaded_machine",
    "fault_figures": "it runs fault tests of the suite (tests/test_fault_tolerance.py, test_sweep_cli.py, "
    "test_multinode.py) and tabulates what they recorded",
}


def test_every_bench_is_listed() -> None:
    scripts = {p.stem for p in (ROOT / "bench").glob("*.py") if not p.stem.startswith("_")}
    assert scripts == set(SCRIPTS) | set(NOT_RUN_HERE) and not set(SCRIPTS) & set(NOT_RUN_HERE)


# The format of docs/BENCHMARKS.md and the issue: `RESULT <name> <value> target <op><number>`, target optional.
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
RESULT_RE = re.compile(rf"^RESULT (\S+) ({_NUMBER}|nan|inf)(?: target (>=|<=|>|<|==)({_NUMBER}))?$")


def parse_results(stdout: str) -> list[tuple[str, float, str | None, float | None]]:
    """The RESULT lines at the end of ``stdout`` (they must be the last lines), parsed."""
    lines = [line for line in stdout.strip().splitlines() if line.strip()]
    tail = []
    for line in reversed(lines):
        if not line.startswith("RESULT "):
            break
        tail.append(line)
    parsed = []
    for line in reversed(tail):
        match = RESULT_RE.match(line)
        assert match, f"malformed RESULT line: {line!r}"
        name, value, op, target = match.groups()
        parsed.append((name, float(value), op, float(target) if target is not None else None))
    return parsed


def test_parse_results_format() -> None:
    out = "progress\nRESULT rollout_speedup_2_actors 1.83 target >=1.7\nRESULT padding_waste 0.03 target <=0.05\n"
    out += "RESULT buffer_bytes_per_trajectory 2345.0\n"
    assert parse_results(out) == [
        ("rollout_speedup_2_actors", 1.83, ">=", 1.7),
        ("padding_waste", 0.03, "<=", 0.05),
        ("buffer_bytes_per_trajectory", 2345.0, None, None),
    ]
    with pytest.raises(AssertionError):
        parse_results("RESULT name value-not-a-number target >=1\n")
    assert parse_results("RESULT a 1.0\nnot a result line\n") == []  # RESULT lines must come last


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_quick_prints_results(script: str) -> None:
    if script in NEEDS_EXTRA:
        pytest.importorskip(NEEDS_EXTRA[script], reason=f"{script} needs the {NEEDS_EXTRA[script]} extra")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{script}.py"), "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,  # a hang guard only: --quick takes about a minute, far more on a loaded machine
        check=False,
    )
    assert proc.returncode == 0, f"{script} --quick failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    results = parse_results(proc.stdout)
    assert results, f"{script} printed no RESULT lines at the end:\n{proc.stdout[-2000:]}"
    for name, value, op, target in results:
        assert not math.isnan(value), f"{script}: {name} is NaN"
        assert (op is None) == (target is None)
    assert len({name for name, *_ in results}) == len(results), "duplicate RESULT names"


def test_load_reproducibility_compare_tells_identical_trials_from_different_ones(tmp_path: Path) -> None:
    """``--compare`` (how the committed quiet/loaded runs of docs/results/default_sweep_loaded are checked) reads
    finished trials: the same reports at another speed compare equal, one changed loss or success does not."""

    def trial(name: str, seconds: float, loss_at_2: float, success: float) -> Path:
        reports = [
            {"train/step": s, "train/loss": loss_at_2 if s == 2 else 1.0 / s, "train/planned_steps": 3,
             "train/total_tokens": 100 * s, "train/total_flops": 1e9 * s, "train/elapsed_s": seconds * s / 3}
            for s in (1, 2, 3)
        ]  # fmt: skip
        reports[-1].update({"eval/success_rate": success, "eval/episodes": 200, "eval/world_model_nll": 2.5,
                            "eval/action_nll": 0.4})  # fmt: skip
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reports))
        return d

    quiet, loaded = trial("quiet", 60.0, 0.5, 0.555), trial("loaded", 3600.0, 0.5, 0.555)
    other_loss, other_success = trial("loss", 60.0, 0.51, 0.555), trial("success", 60.0, 0.5, 0.56)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load_reproducibility.py"), "--compare", quiet, loaded, other_loss,
         other_success],
        cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {name: value for name, value, *_ in parse_results(proc.stdout)}
    assert got["load_same_training_curve_loaded"] == got["load_same_final_success_loaded"] == 1
    assert got["load_same_training_curve_loss"] == 0 and got["load_same_final_success_loss"] == 1
    assert got["load_same_training_curve_success"] == 1 and got["load_same_final_success_success"] == 0
    assert got["load_steps_loaded"] == 3 and got["load_success_loaded"] == 0.555
