"""Peer loops: the project's trainer inside Ray against a plain PyTorch loop and a Hugging Face ``Trainer``.

All three train the same model (the config's, seeded alike), on the same expert demos, with the same masks and
bucketed batches (one ``BatchMaker`` stream per loop, seeded alike: the first steps' batches are identical), the same
batch size and the same optimizer (torch's fused AdamW kernel, betas 0.9/0.95, weight decay, warmup + cosine, grad
clip; ``make_optimizer`` for the project's trainer and the plain loop, ``optim="adamw_torch_fused"`` for HF):

- ``ray``: a real trial, ``python -m anyorder_ray.sweep`` with the config (rollout actor, buffer, TorchTrainer worker,
  eval actor as the config sets it, reports, final checkpoint); tokens/s and FLOP/s over the trial's training time
  (between its first and last report, everything that happens meanwhile included except the evaluations the trainer
  waited for with ``eval.concurrent: false``), from its ``metrics.jsonl``, with where that time went and how many
  cores each kind of process on the machine used meanwhile (``CpuSampler``: the trainer, the eval and rollout actors,
  Ray's control plane, Ray Train/Tune's actors and the driver, anything else, and what stayed idle);
- ``plain``: the loop a user would write, in this process: ``BatchMaker.bucketed`` micro-batches, forward,
  cross-entropy at the targets, backward, clip, AdamW + schedule step;
- ``hf``: ``transformers.Trainer`` (with ``accelerate``) on an iterable dataset of the same micro-batches, the model
  computing its masked loss from ``labels``.

Throughput is real (non-padding) tokens per second over the measured steps (after the first report window); MFU is
model FLOP/s (``anyorder_ray.training.budget.step_cost``: forward + backward, the LM head at the targets, the same count
for all three loops) over the fp32 matmul peak measured in the same run (the higher of before and after). The plain
loop and the HF ``Trainer`` compute the logits at every position, as such loops do; the project's trainer only at the
targets. Ratios are from this one run, so load shifts all arms alike.

The config is the imitation sweep's (``tune_configs/imitation.yaml``): the default sweep's model, data and evaluation
on its 1000 demos, so the three loops see the same data. The default sweep's DAgger actor, which acts with the policy
on the same 2 cores, is measured by ``bench/dagger_throughput.py``.

    python bench/peer_loops.py            # ~5 minutes on 2 cores
    python bench/peer_loops.py --quick    # ~1 minute: 15 steps per loop on 200 demos, checks the three loops run
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The trainer's workers wait passively at OpenMP barriers (anyorder_ray.roles.trial.local_env_vars): so do the
# in-process loops here (it must be set before torch loads OpenMP).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import psutil
import torch
import torch.nn.functional as F
import yaml
from _common import (
    Result,
    fixed_demos,
    load_average,
    measure_matmul_flops,
    print_results,
    recipe_batches,
    trial_reports,
)

from anyorder_ray.config import ExperimentConfig, load_config
from anyorder_ray.data.encoding import IGNORE_INDEX, UnitEncoder
from anyorder_ray.models.factory import build_model, build_tokenizer
from anyorder_ray.training.budget import step_cost
from anyorder_ray.training.optim import make_optimizer

ROOT = Path(__file__).resolve().parents[1]
QUICK_REPORT = 5
"""--quick: steps per report window (3 windows per loop, the first one warm-up): enough to check that each loop
trains and is measured; each step of the default model costs seconds on a loaded 2-core machine."""
QUICK_DEMOS = 200


@dataclasses.dataclass
class Speed:
    name: str
    tokens: float
    flops: float
    seconds: float
    cores: dict[str, float] = dataclasses.field(default_factory=dict)
    """The Ray trial only: cores each role used while the trainer trained (``CpuSampler``)."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.seconds


def plain_loop(cfg: ExperimentConfig, data, steps: int, warm: int) -> Speed:
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed * 1000)
    tokenizer = build_tokenizer(cfg.model, cfg.env)
    model = build_model(cfg.model, tokenizer, seed=cfg.train.seed).train()
    optimizer, scheduler = make_optimizer(model, dataclasses.replace(cfg.train, max_steps=steps))
    draw = recipe_batches(cfg, data, UnitEncoder(tokenizer), tokenizer.pad_token_id)
    tokens = flops = 0.0
    for step in range(steps):
        if step == warm:
            start = time.perf_counter()
        micro = draw()
        targets = sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro)
        for mb in micro:
            logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
            loss = F.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum") / targets  # fmt: skip
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warm:
            t, f = step_cost(model.config, micro)
            tokens, flops = tokens + t, flops + f
    return Speed("plain", tokens, flops, time.perf_counter() - start)


def hf_trainer(cfg: ExperimentConfig, data, steps: int, warm: int) -> Speed:
    from torch.utils.data import DataLoader, IterableDataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(cfg.train.seed)
    tokenizer = build_tokenizer(cfg.model, cfg.env)
    model = build_model(cfg.model, tokenizer, seed=cfg.train.seed)
    draw = recipe_batches(cfg, data, UnitEncoder(tokenizer), tokenizer.pad_token_id)
    counted = {"tokens": 0.0, "flops": 0.0, "start": None, "end": None, "step": 0}

    class Micro(IterableDataset):
        def __iter__(self):
            while True:
                micro = draw()
                if counted["step"] >= warm:
                    t, f = step_cost(model.config, micro)
                    counted["tokens"] += t
                    counted["flops"] += f
                for mb in micro:
                    yield {k: mb[k] for k in ("input_ids", "attention_mask", "labels")}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            counted["step"] = state.global_step
            if state.global_step == warm:
                counted["start"] = time.perf_counter()
            counted["end"] = time.perf_counter()

    class MicroTrainer(Trainer):
        def get_train_dataloader(self):  # the micro-batches are collated already: no re-batching
            return DataLoader(Micro(), batch_size=None)

    with tempfile.TemporaryDirectory(prefix="aoray-hf-") as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps, gradient_accumulation_steps=cfg.train.grad_accum_steps(),
            learning_rate=cfg.train.lr, weight_decay=cfg.train.weight_decay, adam_beta1=0.9, adam_beta2=0.95,
            adam_epsilon=1e-8, optim="adamw_torch_fused", max_grad_norm=cfg.train.max_grad_norm,
            lr_scheduler_type=cfg.train.lr_decay_style,
            warmup_steps=int(cfg.train.lr_warmup_ratio * steps), logging_steps=cfg.train.report_every,
            save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=cfg.train.seed,
            disable_tqdm=True,
        )  # fmt: skip
        MicroTrainer(model=model, args=args, train_dataset=Micro(), callbacks=[Clock()]).train()
    # The dataset counts a step's micro-batches when it draws them; the last drawn step may be unused.
    per_step_tokens = counted["tokens"] / max(1, steps - warm)
    seconds = counted["end"] - counted["start"]
    return Speed("hf", per_step_tokens * (steps - warm), counted["flops"] / max(1, steps - warm) * (steps - warm),
                 seconds)  # fmt: skip


ROLES = (
    ("trainer", ("RayTrainWorker",)),
    ("eval actor", ("EvalWorker",)),
    ("rollout actor", ("RolloutWorker",)),
    ("Ray control plane", ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "DashboardAgent",
                           "runtime_env")),
    ("Ray Train/Tune actors and driver", ("ray::", "anyorder_ray.sweep")),
)  # fmt: skip


class CpuSampler:
    """CPU seconds of every process on the machine, once a second, grouped by role: the trial's processes (the
    driver's descendants) by their titles, every other process as "other processes"."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []

    @staticmethod
    def role(process: psutil.Process) -> str:
        try:
            line = " ".join(process.cmdline())
        except (psutil.Error, OSError):
            return "other processes"
        for role, keys in ROLES:
            if any(k in line for k in keys):
                return role
        return "other processes"

    def sample(self, root: int) -> None:
        try:  # a local Ray's processes descend from the driver; other processes (another run's) are not the trial's
            trial = {p.pid for p in psutil.Process(root).children(recursive=True)} | {root}
        except psutil.Error:
            return
        snap = {}
        for process in psutil.process_iter():
            try:
                times = process.cpu_times()
                role = self.role(process) if process.pid in trial else "other processes"
                snap[process.pid] = (role, times.user + times.system)
            except (psutil.Error, OSError):
                continue
        self.samples.append((time.perf_counter(), snap))

    def run_until(self, proc: subprocess.Popen) -> dict[str, float]:
        """Sample until ``proc`` exits; the cores each role used while the trainer trained (its CPU rising by more than
        half a core a second, less the first and last two seconds), plus what was left idle."""
        while proc.poll() is None:
            self.sample(proc.pid)
            time.sleep(self.interval_s)

        def trainer(snap: dict[int, tuple[str, float]]) -> float:
            return sum(cpu for role, cpu in snap.values() if role == "trainer")

        busy = [i for i in range(1, len(self.samples))
                if trainer(self.samples[i][1]) - trainer(self.samples[i - 1][1])
                > 0.5 * (self.samples[i][0] - self.samples[i - 1][0])]  # fmt: skip
        if len(busy) < 6:
            return {}
        (t0, first), (t1, last) = self.samples[busy[0] + 2], self.samples[busy[-1] - 2]
        used: dict[str, float] = {role: 0.0 for role, _ in ROLES} | {"other processes": 0.0}
        for pid, (role, cpu) in last.items():
            if pid in first:
                used[role] += (cpu - first[pid][1]) / (t1 - t0)
        used["idle"] = max(0.0, (os.cpu_count() or 1) - sum(used.values()))
        return used


def ray_trial(config: str, overrides: list[str], warm_reports: int) -> Speed:
    """A real trial through the sweep CLI; its speed from report ``warm_reports`` (0: the first) to the last."""
    with tempfile.TemporaryDirectory(prefix="aoray-peer-") as out:
        cmd = [sys.executable, "-m", "anyorder_ray.sweep", "--config", config, "--name", "peer",
               f"train.output_dir={out}", *overrides]  # fmt: skip
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
        with tempfile.TemporaryFile("w+") as stdout:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stdout, stderr=subprocess.STDOUT, text=True)
            cores = CpuSampler().run_until(proc)
            if proc.returncode != 0:
                stdout.seek(0)
                sys.stderr.write(stdout.read()[-6000:])
                raise SystemExit(f"the Ray trial failed (exit {proc.returncode})")
        if cores:
            print("[ray] cores in use while the trainer trained (of " + f"{os.cpu_count()}): "
                  + ", ".join(f"{role} {c:.2f}" for role, c in cores.items()), flush=True)  # fmt: skip
        reports = [r for r in trial_reports(Path(out, "peer")) if "train/step" in r]
    if len(reports) < warm_reports + 2:
        raise SystemExit(f"the Ray trial made {len(reports)} reports: nothing to measure after report {warm_reports}")
    first, last = reports[warm_reports], reports[-1]
    delta = {k: last[k] - first[k] for k in ("train/elapsed_s", "train/eval_wait_s", "train/batch_time_s",
                                             "train/step_time_s", "train/report_time_s")}  # fmt: skip
    other = delta["train/elapsed_s"] - sum(v for k, v in delta.items() if k != "train/elapsed_s")
    print("[ray] where the trainer's time went: " + ", ".join(f"{k.split('/')[1]} {v:.1f} s" for k, v in delta.items())
          + f", other {other:.1f} s (evaluations waited for are not training time)", flush=True)  # fmt: skip
    return Speed(
        "ray",
        last["train/total_tokens"] - first["train/total_tokens"],
        last["train/total_flops"] - first["train/total_flops"],
        delta["train/elapsed_s"] - delta["train/eval_wait_s"],
        cores,
    )


def main(argv: list[str]) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps: checks the three loops run")
    parser.add_argument("--config", default="tune_configs/imitation.yaml")
    parser.add_argument("--arm", default="causal", help="the sweep arm (label) all three train")
    parser.add_argument("--steps", type=int, default=None, help="steps per loop (default 300, quick 3 report windows)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("accelerate") is None:  # before minutes of the other two loops, not after
        parser.error("the Hugging Face Trainer loop needs accelerate (the dev extra): pip install -e '.[dev]'")
    # --quick checks that the three loops run and measure, on a small trial: short report windows, fewer demos and a
    # small final evaluation (its numbers are not the bench's; the full run's are).
    quick = [f"train.report_every={QUICK_REPORT}", f"data.num_demos={QUICK_DEMOS}", "eval.episodes=8",
             "eval.final_episodes=8", "eval.heldout_trajectories=8"] if args.quick else []  # fmt: skip
    base = load_config(args.config, quick)
    cfg = base.trial({"arm": args.arm, "seed": base.train.seed})
    report = cfg.train.report_every
    steps = args.steps or (3 * report if args.quick else 300)
    warm = report  # the first report window (allocator, optimizer state, first pool) is not measured
    if steps < 2 * report:
        parser.error(f"--steps {steps}: at least 2 report windows ({2 * report} steps), the first is warm-up")
    torch.set_num_threads(cfg.train.torch_threads)
    data = fixed_demos(cfg, cfg.data.num_demos)
    print(f"{args.config} arm {args.arm}: {len(data)} demos, {steps} steps each, batch {cfg.train.global_batch_size}, "
          f"torch threads {torch.get_num_threads()}, {load_average()}", flush=True)  # fmt: skip

    peak_before = measure_matmul_flops(1.0 if args.quick else 2.0)
    arm = yaml.safe_dump([dataclasses.asdict(cfg.masking)], default_flow_style=True).strip()
    overrides = [*quick, f"train.max_steps={steps}", "train.flop_budget=null", "train.token_budget=null",
                 "train.time_budget_s=null", f"sweep.arms={arm}", f"sweep.seeds=[{cfg.train.seed}]"]  # fmt: skip
    speeds = [ray_trial(args.config, overrides, warm_reports=0)]  # from step `warm`, as the other two
    speeds.append(plain_loop(cfg, data, steps, warm))
    speeds.append(hf_trainer(cfg, data, steps, warm))
    peak = max(peak_before, measure_matmul_flops(1.0 if args.quick else 2.0))
    for s in speeds:
        print(
            f"[{s.name}] {s.tokens_per_s:,.0f} real tokens/s, {s.flops_per_s / 1e9:.1f} GFLOP/s, MFU "
            f"{s.flops_per_s / peak:.3f} ({s.seconds:.1f} s measured)",
            flush=True,
        )
    print(f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s ({load_average()})", flush=True)
    by = {s.name: s for s in speeds}
    return [
        Result("peer_ray_vs_plain_tokens", by["ray"].tokens_per_s / by["plain"].tokens_per_s, ">=", 0.9),
        Result("peer_ray_vs_hf_tokens", by["ray"].tokens_per_s / by["hf"].tokens_per_s, ">=", 1.0),
        Result("peer_ray_mfu", by["ray"].flops_per_s / peak, ">=", 0.5),
        Result("peer_plain_mfu", by["plain"].flops_per_s / peak),
        Result("peer_hf_mfu", by["hf"].flops_per_s / peak),
        Result("peer_ray_tokens_per_s", by["ray"].tokens_per_s),
        Result("peer_plain_tokens_per_s", by["plain"].tokens_per_s),
        Result("peer_hf_tokens_per_s", by["hf"].tokens_per_s),
        Result("matmul_peak_gflops", peak / 1e9),
        *[Result(f"peer_ray_cores_{role.split()[0].lower()}", by["ray"].cores[role])
          for role in ("trainer", "idle") if role in by["ray"].cores],
    ]  # fmt: skip


if __name__ == "__main__":
    print_results(main(sys.argv[1:]))
