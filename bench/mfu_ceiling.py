"""How close the trainer's step can get to the fp32 matmul peak: its matmuls' share and speed (issue 12's MFU).

The trainer's own step (``training.recipe.train_step``: the LM head at the targets only, fused AdamW, clipping) on the
config's model and expert demos, drawn and bucketed as rank 0 of a trial draws them, in this process (no Ray: the
in-Ray figure is ``bench/peer_loops.py``'s). ``--steps`` steps are timed; the same steps run once more under
``torch.profiler`` to record every matmul kernel call (``aten::mm`` / ``addmm`` / ``bmm``: the linear layers, the
experts, the LM head, forward and backward) with its shapes and its time in the step (a matmul lasts about a
millisecond here, so the profiler's few microseconds per operator hardly count for them). The calls are also
**replayed** outside the profiler: each recorded shape, as many times as the steps called it, on fresh contiguous
tensors (the step's transposed operands and cache state are not reproduced), timed.

Printed, each a ratio measured in this one run:

- ``step_mfu``: model FLOPs (``training.budget.step_cost``, the budget's count) / step time / peak;
- ``matmul_kernel_efficiency``: the replayed matmuls' FLOPs / their time / peak: how fast this CPU runs matmuls of
  the model's own shapes (inner dimensions of 64-512) against large square ones;
- ``mfu_without_other``: model FLOPs / the replayed matmuls' time / peak: the step's MFU if every other operator
  (attention, norms, RoPE, SiLU, softmax, the MoE's routing and dispatch copies, the loss, the optimizer) took no
  time at all. No work on overheads can lift MFU above it; only faster or larger matmuls can;
- ``time_share_matmul``: the replayed matmuls' time / the step time;
- ``matmul_in_step_efficiency``, ``mfu_without_other_in_step``, ``time_share_matmul_in_step``: the same three with the
  matmuls' time as the profiled step spent it (their own operands: transposed in backward, in or out of cache).

Config overrides as in the sweep (``model.overrides=...``) try other shapes; the default is the default sweep's causal
arm (``tune_configs/sweep.yaml``).

    python bench/mfu_ceiling.py                      # ~2 minutes on 2 cores
    python bench/mfu_ceiling.py --quick              # seconds: a few steps on the smoke model, checks it runs
    python bench/mfu_ceiling.py "model.overrides={hidden_size: 256}"   # another width
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the trainer's workers (set before torch loads OpenMP)

import torch  # noqa: E402
from _common import Result, fixed_demos, load_average, measure_matmul_flops, print_results, recipe_batches

from anyorder_ray.config import load_config
from anyorder_ray.data.encoding import UnitEncoder
from anyorder_ray.models.factory import build_model, build_tokenizer
from anyorder_ray.training.budget import step_cost
from anyorder_ray.training.optim import make_optimizer
from anyorder_ray.training.recipe import train_step

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


@dataclasses.dataclass(frozen=True)
class MatmulCall:
    """One matmul shape the step calls, and how often: ``(batch, m, k, n)``, batch 0 for a plain 2-D matmul."""

    op: str
    batch: int
    m: int
    k: int
    n: int
    calls: int

    @property
    def flops(self) -> float:
        return 2.0 * max(self.batch, 1) * self.m * self.k * self.n * self.calls

    def replay_s(self, repeats: int = 3) -> float:
        """Seconds for ``calls`` of this matmul on fresh contiguous fp32 tensors (the best of ``repeats`` rounds)."""
        lead = (self.batch,) if self.batch else ()
        a, b = torch.randn(*lead, self.m, self.k), torch.randn(*lead, self.k, self.n)
        bias = torch.randn(self.n)
        run = {"aten::mm": lambda: torch.mm(a, b), "aten::addmm": lambda: torch.addmm(bias, a, b),
               "aten::bmm": lambda: torch.bmm(a, b)}[self.op]  # fmt: skip
        run()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(self.calls):
                run()
            best = min(best, time.perf_counter() - start)
        return best


def matmul_calls(events) -> list[MatmulCall]:
    """The matmul calls of ``torch.profiler``'s ``key_averages(group_by_input_shape=True)``, by op and shape."""
    calls = []
    for e in events:
        if e.key not in MATMUL_OPS:
            continue
        shapes = [s for s in e.input_shapes if s]
        x, y = (shapes[1], shapes[2]) if e.key == "aten::addmm" else (shapes[0], shapes[1])
        if e.key == "aten::bmm":
            calls.append(MatmulCall(e.key, x[0], x[1], x[2], y[2], e.count))
        else:
            calls.append(MatmulCall(e.key, 0, x[0], x[1], y[1], e.count))
    return calls


def main(argv: list[str]) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smoke model, a few steps: checks that it runs")
    parser.add_argument("--config", default=None, help="default: tune_configs/sweep.yaml (smoke.yaml with --quick)")
    parser.add_argument("--arm", default="causal", help="the sweep arm (label) whose masks the batches carry")
    parser.add_argument("--steps", type=int, default=None, help="steps timed, then as many profiled (default 40)")
    parser.add_argument("overrides", nargs="*", help="config overrides, as the sweep takes them")
    args = parser.parse_args(argv)
    config = args.config or ("tune_configs/smoke.yaml" if args.quick else "tune_configs/sweep.yaml")
    steps = args.steps or (4 if args.quick else 40)
    base = load_config(config, args.overrides)
    cfg = base.trial({"arm": args.arm, "seed": base.train.seed})
    torch.set_num_threads(cfg.train.torch_threads)
    data = fixed_demos(cfg, min(cfg.data.num_demos, 64 if args.quick else 1000))

    torch.manual_seed(cfg.train.seed)
    tokenizer = build_tokenizer(cfg.model, cfg.env)
    model = build_model(cfg.model, tokenizer, seed=cfg.train.seed).train()
    optimizer, scheduler = make_optimizer(model, dataclasses.replace(cfg.train, max_steps=3 * steps + 8))
    draw = recipe_batches(cfg, data, UnitEncoder(tokenizer), tokenizer.pad_token_id)
    # Drawn up front: the timed and the profiled steps train on the same batches, and no batch making is timed.
    batches = [draw() for _ in range(steps + 8)]
    device = torch.device("cpu")
    print(f"{config} arm {args.arm} {' '.join(args.overrides)}: width {model.config.hidden_size}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, batch {cfg.train.global_batch_size}, "
          f"{steps} steps timed + {steps} profiled, torch threads {torch.get_num_threads()}, {load_average()}",
          flush=True)  # fmt: skip

    peak_before = measure_matmul_flops(0.5 if args.quick else 2.0)
    for micro in batches[steps:]:  # warm-up: allocator, optimizer state
        train_step(model, optimizer, scheduler, micro, cfg.train.max_grad_norm, device, weighting=cfg.masking)
    work = [step_cost(model.config, micro) for micro in batches[:steps]]
    model_flops = sum(f for _, f in work)
    tokens = sum(t for t, _ in work)
    start = time.perf_counter()
    for micro in batches[:steps]:
        train_step(model, optimizer, scheduler, micro, cfg.train.max_grad_norm, device, weighting=cfg.masking)
    step_s = time.perf_counter() - start

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for micro in batches[:steps]:
            train_step(model, optimizer, scheduler, micro, cfg.train.max_grad_norm, device, weighting=cfg.masking)
    events = prof.key_averages(group_by_input_shape=True)
    calls = matmul_calls(events)
    # The same calls as the step ran them (their own operands, transposed in backward, in or out of cache): a matmul
    # kernel lasts ~1 ms here, so the profiler's few microseconds per call hardly count. Grouping by shape only
    # partitions the events, so their sum is the step's whole matmul time.
    in_step_s = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1e6
    matmul_flops = sum(c.flops for c in calls)
    replayed = {c: c.replay_s(repeats=1 if args.quick else 3) for c in calls}
    matmul_s = sum(replayed.values())
    peak = max(peak_before, measure_matmul_flops(0.5 if args.quick else 2.0))

    print(f"{steps} steps: {step_s:.2f} s ({tokens / step_s:,.0f} real tokens/s); model FLOPs {model_flops:.3g}; "
          f"{sum(c.calls for c in calls)} matmul calls of {len(calls)} shapes, {matmul_flops:.3g} FLOPs, replayed in "
          f"{matmul_s:.2f} s ({matmul_s / step_s:.0%} of the step time); in the profiled step they took "
          f"{in_step_s:.2f} s", flush=True)  # fmt: skip
    print(f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s; matmuls at the model's shapes "
          f"{matmul_flops / matmul_s / 1e9:.1f} GFLOP/s ({load_average()})", flush=True)  # fmt: skip
    print("\nThe largest matmul shapes by FLOPs (op, batch, m, k, n, calls, GFLOP/s replayed):")
    for c in sorted(calls, key=lambda c: -c.flops)[:8]:
        print(f"  {c.op:12s} {c.batch:4d} {c.m:6d} {c.k:5d} {c.n:5d} {c.calls:5d}  {c.flops / replayed[c] / 1e9:6.1f}")
    return [
        Result("step_mfu", model_flops / step_s / peak, ">=", 0.5),
        Result("matmul_kernel_efficiency", matmul_flops / matmul_s / peak),
        Result("mfu_without_other", model_flops / matmul_s / peak),
        Result("time_share_matmul", matmul_s / step_s),
        Result("matmul_in_step_efficiency", matmul_flops / in_step_s / peak),
        Result("mfu_without_other_in_step", model_flops / in_step_s / peak),
        Result("time_share_matmul_in_step", in_step_s / step_s),
        Result("step_tokens_per_s", tokens / step_s),
        Result("matmul_peak_gflops", peak / 1e9),
    ]


if __name__ == "__main__":
    print_results(main(sys.argv[1:]))
