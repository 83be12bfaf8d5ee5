"""What hosting in Ray and idle Ray processes cost the training step on a small machine (issue 12).

A trial of the sweep runs the trainer beside about a dozen other Ray processes (Tune's trial actor, Ray Train's
controller and helper actors, the buffer, the rollout and eval actors, Ray's own agents), most of them idle while the
trainer trains; every Ray worker's main thread still wakes every 10 ms to check for signals (a fixed period in Ray's
core worker). On 2 cores such wake-ups could take a core one of the trainer's two OpenMP threads needs. This bench
measures whether they do (docs/BENCHMARKS.md: 12% in two runs, 2% or nothing in two later ones). The same
``train_step`` loop (the project's step, the config's model and expert demos, bucketed as rank 0 draws them) runs:

- ``in_process``: in this process, no Ray;
- ``ray_worker``: in a Ray Train ``TorchTrainer`` worker (one worker, its controller alive beside it);
- ``ray_worker_idle``: the same, with ``--idle`` idle Ray actors alive (``num_cpus=0``, never called while it trains);
- with ``--idle-nice N``, ``ray_worker_idle_niceN``: the same, the idle actors at niceness N (Ray starts its workers
  at 15): whether the trainer suffers less from processes of a lower priority.

Each round runs the in-process loop and one ``TorchTrainer`` run hosting the other loops one after another (the worker
starts the idle actors before a loop and kills them after it); every other round reverses the order, so a drifting
load shifts every loop alike. A loop's figures are the sums over the rounds. Printed: real tokens/s
of each loop, the cores its process used while it trained (CPU time / wall time; 2 threads on 2 cores can use at most
2), the ratios ``ray_worker / in_process`` and ``ray_worker_idle / ray_worker`` from this one run, and the CPU each idle
actor used meanwhile. The step and data are the same in every loop, so the ratios are the hosting's cost alone.

    python bench/idle_actors.py            # ~5 minutes on 2 cores
    python bench/idle_actors.py --quick    # ~1 minute: a few steps on the smoke model, checks it runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# The trainer's workers wait passively at OpenMP barriers (anyorder_ray.roles.trial.local_env_vars): so does the
# in-process loop here (it must be set before torch loads OpenMP).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import psutil  # noqa: E402
import torch  # noqa: E402
from _common import Result, init_local_ray, load_average, print_results  # noqa: E402

BENCH = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Loop:
    """What one loop measured: real tokens, wall seconds and the CPU seconds of its process."""

    tokens: float
    seconds: float
    cpu_seconds: float

    def __add__(self, other: Loop) -> Loop:
        return Loop(self.tokens + other.tokens, self.seconds + other.seconds, self.cpu_seconds + other.cpu_seconds)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def cores(self) -> float:
        return self.cpu_seconds / self.seconds


def step_loop(config: str, overrides: list[str], steps: int, warm: int) -> Loop:
    """``steps`` training steps of the config's causal arm; the last ``steps - warm`` are measured."""
    sys.path.insert(0, str(BENCH))  # in a Ray worker too: it imports _common
    from _common import fixed_demos, recipe_batches

    from anyorder_ray.config import load_config
    from anyorder_ray.data.encoding import UnitEncoder
    from anyorder_ray.models.factory import build_model, build_tokenizer
    from anyorder_ray.training.optim import make_optimizer
    from anyorder_ray.training.recipe import train_step

    base = load_config(config, overrides)
    cfg = base.trial({"arm": "causal", "seed": base.train.seed})
    torch.set_num_threads(cfg.train.torch_threads)
    tokenizer = build_tokenizer(cfg.model, cfg.env)
    data = fixed_demos(cfg, cfg.data.num_demos)
    model = build_model(cfg.model, tokenizer, seed=cfg.train.seed).train()
    optimizer, scheduler = make_optimizer(model, dataclasses.replace(cfg.train, max_steps=steps + 8))
    draw = recipe_batches(cfg, data, UnitEncoder(tokenizer), tokenizer.pad_token_id)
    batches = [draw() for _ in range(steps)]  # made before the clock starts: the step alone is measured
    process, device = psutil.Process(), torch.device("cpu")
    tokens, start, cpu = 0, 0.0, 0.0
    for i, micro in enumerate(batches):
        if i == warm:
            start, cpu = time.perf_counter(), sum(process.cpu_times()[:2])
        train_step(model, optimizer, scheduler, micro, cfg.train.max_grad_norm, device, weighting=cfg.masking)
        if i >= warm:
            tokens += sum(int(mb["attention_mask"].sum()) for mb in micro)
    return Loop(tokens, time.perf_counter() - start, sum(process.cpu_times()[:2]) - cpu)


def idle_actors(count: int, nice: int | None) -> tuple[list, list[int]]:
    """``count`` idle actors (``num_cpus=0``, at niceness ``nice`` or Ray's) and their pids, past their start-up."""
    import ray

    @ray.remote(num_cpus=0)
    class Idle:
        def __init__(self, nice: int | None) -> None:
            if nice is not None:  # this thread: the one Ray's 10 ms signal check runs on
                os.nice(nice - os.nice(0))

        def pid(self) -> int:
            return os.getpid()

    actors = [Idle.remote(nice) for _ in range(count)]
    pids = ray.get([a.pid.remote() for a in actors])
    time.sleep(2.0)
    return actors, pids


def in_ray_worker(loops: list[tuple[str, int, int | None]], config: str, overrides: list[str], steps: int,
                  warm: int) -> dict[str, tuple[Loop, float, float]]:  # fmt: skip
    """``step_loop`` once per ``(name, idle actors, their niceness)`` inside one one-worker ``TorchTrainer``, the
    worker starting the idle actors before a loop and killing them after it; per name the loop and the idle actors'
    CPU and wall seconds meanwhile (this machine: the worker writes its figures to a file)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    root = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="aoray-idle-") as storage:
        out = Path(storage, "loops.json")

        def train_fn(_: dict) -> None:
            import ray

            os.chdir(root)  # the config path is relative to the repository
            figures = {}
            for name, count, nice in loops:
                actors, pids = idle_actors(count, nice) if count else ([], [])
                cpu, start = process_cpu(pids), time.perf_counter()
                loop = step_loop(config, overrides, steps, warm)
                figures[name] = (dataclasses.asdict(loop), process_cpu(pids) - cpu, time.perf_counter() - start)
                for a in actors:
                    ray.kill(a)
            out.write_text(json.dumps(figures))

        trainer = TorchTrainer(
            train_fn,
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name="idle_actors", storage_path=storage),
        )
        result = trainer.fit()
        if result.error is not None or not out.is_file():
            raise SystemExit(f"the Ray Train run failed: {result.error}")
        return {
            name: (Loop(**loop), cpu, seconds) for name, (loop, cpu, seconds) in json.loads(out.read_text()).items()
        }


def process_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def main(argv: list[str]) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps on the smoke model: checks it runs")
    parser.add_argument("--config", default=None, help="default: tune_configs/imitation.yaml (smoke.yaml with --quick)")
    parser.add_argument("--idle", type=int, default=10, help="idle Ray actors beside the third loop")
    parser.add_argument(
        "--idle-nice",
        type=int,
        default=None,
        help="a fourth loop: the idle actors raise their "
        "main thread's niceness to this (Ray starts workers at 15; 19 is the lowest priority)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the loops (default 2, quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="steps per loop (default 160, quick 6)")
    args = parser.parse_args(argv)
    config = args.config or ("tune_configs/smoke.yaml" if args.quick else "tune_configs/imitation.yaml")
    overrides = ["data.num_demos=32"] if args.quick else []
    steps = args.steps or (6 if args.quick else 160)
    warm = max(1, steps // 4)  # the first steps (allocator, optimizer state) are not measured
    rounds = args.rounds or (1 if args.quick else 2)
    if args.idle < 1 or steps <= warm:
        parser.error("--idle must be >= 1 and --steps > its first quarter")
    os.chdir(BENCH.parent)
    print(f"{config}: {steps} steps per loop ({warm} warm-up), {rounds} round(s), {args.idle} idle actors, "
          f"{load_average()}", flush=True)  # fmt: skip

    import ray

    init_local_ray(num_cpus=2)
    hosted = [("ray_worker", 0, None), ("ray_worker_idle", args.idle, None)]
    if args.idle_nice is not None:
        hosted.append((f"ray_worker_idle_nice{args.idle_nice}", args.idle, args.idle_nice))
    totals: dict[str, Loop] = {}
    idle_cpu = idle_seconds = 0.0
    try:
        for r in range(rounds):  # the in-process loop and the Ray-hosted ones alternate first and last
            figures = {"in_process": (step_loop(config, overrides, steps, warm), 0.0, 0.0)} if r % 2 == 0 else {}
            figures |= in_ray_worker(hosted if r % 2 == 0 else hosted[::-1], config, overrides, steps, warm)
            if r % 2:
                figures["in_process"] = (step_loop(config, overrides, steps, warm), 0.0, 0.0)
            for name, (loop, cpu, seconds) in figures.items():
                print(f"[round {r}] {name}: {loop.tokens_per_s:,.0f} real tokens/s, {loop.cores:.2f} cores "
                      f"({loop.seconds:.1f} s measured)", flush=True)  # fmt: skip
                totals[name] = totals[name] + loop if name in totals else loop
                if name.startswith("ray_worker_idle"):
                    idle_cpu, idle_seconds = idle_cpu + cpu, idle_seconds + seconds
    finally:
        ray.shutdown()
    per_actor = idle_cpu / idle_seconds / args.idle
    print(f"each idle actor used {100 * per_actor:.2f}% of a core while it was beside the trainer ({load_average()})")
    t = totals
    niced = [
        Result(f"idle_actors_nice{args.idle_nice}_vs_none_tokens",
               t[f"ray_worker_idle_nice{args.idle_nice}"].tokens_per_s / t["ray_worker"].tokens_per_s)
    ] if args.idle_nice is not None else []  # fmt: skip
    return [
        Result("ray_worker_vs_in_process_tokens", t["ray_worker"].tokens_per_s / t["in_process"].tokens_per_s),
        Result("idle_actors_vs_none_tokens", t["ray_worker_idle"].tokens_per_s / t["ray_worker"].tokens_per_s),
        *niced,
        *[Result(f"{name}_tokens_per_s", loop.tokens_per_s) for name, loop in t.items()],
        *[Result(f"{name}_cores", loop.cores) for name, loop in t.items()],
        Result("idle_actor_core_share", per_actor),
        Result("idle_actors", float(args.idle)),
    ]


if __name__ == "__main__":
    print_results(main(sys.argv[1:]))
