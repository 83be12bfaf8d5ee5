"""Pieces shared by the benchmark scripts: the matmul ceiling, the analytic model-FLOPs count, RESULT lines and a
small isolated local Ray.

Every script is run as ``python bench/<name>.py`` (so this folder is on ``sys.path``) and ends with one line per
figure::

    RESULT <name> <value> [target <op><number>]

``parse_result_line`` is the machine-readable side of that format (used by ``tests/test_bench_quick.py``).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from anyorder_ray.roles.process_setup import SETUP_HOOK, WITHOUT_DASHBOARD
from anyorder_ray.training.budget import model_flops_per_token  # noqa: F401  (the benches' FLOP count: the budget's)

if TYPE_CHECKING:
    from anyorder_ray.config import ExperimentConfig
    from envs import CollectStats, EnvConfig, Trajectory

# ---------------------------------------------------------------------------------------------------------
# Compute.


def measure_matmul_flops(seconds: float = 2.0) -> float:
    """Best fp32 FLOP/s of large square matmuls (the practical peak of this CPU with the current threads)."""
    best = 0.0
    for n in (1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(3):
            a @ b
        deadline = time.perf_counter() + seconds / 2
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def expert_data(env: EnvConfig, seeds: Iterable[int]) -> tuple[list[Trajectory], CollectStats]:
    """Expert trajectories of the world ``env`` for ``seeds``, through the environment registry."""
    from envs import collect_expert_trajectories, make_world

    return collect_expert_trajectories(make_world(env), seeds)


def fixed_demos(cfg: ExperimentConfig, count: int) -> list[Trajectory]:
    """The fixed regime's demos of ``cfg``'s world: the first ``count`` successes from rank 0's rollout seeds, in
    seed order (5% spare seeds and 32 more, for the episodes the bot does not finish)."""
    from anyorder_ray.data.seeds import rollout_seed_range

    seeds = rollout_seed_range(cfg.rollout, 0)
    data, _ = expert_data(cfg.env, range(seeds.start, seeds.start + int(count * 1.05) + 32))
    return data[:count]


def recipe_batches(cfg: ExperimentConfig, data: list[Trajectory], encoder: Any, pad_id: int) -> Callable[[], list]:
    """The trainer's streams for rank 0 over ``data``, seeded as the recipe seeds them: each call draws one step's
    ``BatchMaker.bucketed`` micro-batches."""
    import numpy as np

    from anyorder_ray.data.batching import BatchMaker, LocalSource

    seed = cfg.train.seed * 1000
    source = LocalSource(data, np.random.default_rng([seed, 0]))
    maker = BatchMaker(cfg.data, cfg.masking, encoder, pad_id, seed)
    accum, mbs = cfg.train.grad_accum_steps(), cfg.train.micro_batch_size
    return lambda: [maker.bucketed(source, mbs) for _ in range(accum)]


def trial_reports(directory: Path) -> list[dict]:
    """The reports of a finished trial: ``directory`` is the trial's own (holding ``metrics.jsonl``) or a sweep's
    output directory with one trial."""
    if (directory / "metrics.jsonl").is_file():
        found = [directory / "metrics.jsonl"]
    else:
        found = sorted(directory.glob("train/train-*/metrics.jsonl"))
    if len(found) != 1:
        raise SystemExit(
            f"{directory}: expected a trial directory or a sweep directory with one trial, found {len(found)}"
        )
    return [json.loads(line) for line in found[0].read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------
# RESULT lines.

_RESULT_RE = re.compile(
    r"^RESULT (?P<name>[A-Za-z0-9_.\-]+) (?P<value>[-+0-9.eE]+|nan|inf)"
    r"(?: target (?P<op>>=|<=|>|<|==)(?P<target>[-+0-9.eE]+))?$"
)


@dataclass(frozen=True)
class Result:
    """One benchmark figure; ``op``/``target`` are None for a figure without a target."""

    name: str
    value: float
    op: str | None = None
    target: float | None = None

    def passed(self) -> bool | None:
        """Whether the value meets the target (None without a target)."""
        if self.op is None or self.target is None:
            return None
        return {
            ">=": self.value >= self.target,
            "<=": self.value <= self.target,
            ">": self.value > self.target,
            "<": self.value < self.target,
            "==": self.value == self.target,
        }[self.op]

    def line(self) -> str:
        value = f"{self.value:.1f}" if abs(self.value) >= 1000 else f"{self.value:.4g}"
        if self.op is None:
            return f"RESULT {self.name} {value}"
        return f"RESULT {self.name} {value} target {self.op}{self.target:g}"


def parse_result_line(line: str) -> Result | None:
    """The ``Result`` of a ``RESULT ...`` line, or None when the line is not one."""
    match = _RESULT_RE.match(line.strip())
    if match is None:
        return None
    target = match["target"]
    return Result(match["name"], float(match["value"]), match["op"], float(target) if target is not None else None)


def print_results(results: list[Result]) -> None:
    """Print a pass/miss summary, then the RESULT lines last (the machine-readable end of every script)."""
    for r in results:
        status = {True: "pass", False: "MISS", None: "(no target)"}[r.passed()]
        print(f"  {r.name}: {r.value:.4g} {status}")
    for r in results:
        print(r.line(), flush=True)


# ---------------------------------------------------------------------------------------------------------
# Ray.


def init_local_ray(num_cpus: int = 2, object_store_mb: int = 256) -> str:
    """Start a private local Ray (explicit CPUs, small object store, own temp dir) and return the temp dir.

    Its own ``_temp_dir`` keeps it apart from any other Ray on the machine; ``ray.shutdown`` stops only it.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback as the node address
    import ray

    temp_dir = tempfile.mkdtemp(prefix="aoray-bench-")
    ray.init(
        address="local",  # a new instance, never one an earlier `ray start` left running
        num_cpus=num_cpus,
        object_store_memory=object_store_mb * 1024 * 1024,
        **WITHOUT_DASHBOARD,  # its dashboard address is one nothing listens on, never another Ray's
        _temp_dir=temp_dir,
        log_to_driver=False,
        runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"},
                     "worker_process_setup_hook": SETUP_HOOK},  # each worker asks its own cluster, not the latest
    )  # fmt: skip
    return temp_dir


def load_average() -> str:
    """The 1/5/15-minute load averages, printed so a disturbed run can be recognised."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"
