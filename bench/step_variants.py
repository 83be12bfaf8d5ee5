"""Training-step variants: what a process-level setting does to the plain training loop's speed, each against the
project's default in the same run.

The loop is ``bench/peer_loops.py``'s plain loop (the default sweep's model and causal batches: ``BatchMaker.bucketed``,
batch 32, 2 torch threads). Every measurement runs in its own fresh process (OpenMP reads its environment when torch
loads it), the variants interleaved round by round so a drift in machine load touches them alike; each variant's
figure is its median over the rounds, in real tokens/s after 10 warm-up steps. Variants:

- ``default``: what the project's workers run: ``OMP_WAIT_POLICY=PASSIVE`` (``roles.trial.local_env_vars``), fused
  AdamW (``training.optim.make_optimizer``), fp32;
- ``unfused_adamw``: AdamW as torch builds it by default on CPU (its per-parameter loop: no foreach kernels there),
  which ``make_optimizer`` used before it chose the fused kernel;
- ``spin_1000``: OpenMP threads spin 1000 iterations at a barrier before sleeping (``GOMP_SPINCOUNT=1000``, no
  ``OMP_WAIT_POLICY``), instead of sleeping at once;
- ``bf16_autocast``: forward and backward under ``torch.autocast("cpu", torch.bfloat16)``.

With ``--loaded`` the two OpenMP policies are measured again beside one CPU-burning process at nice 0, the loop at
nice 15 (a Ray worker's niceness): a spinning thread can hold the core its partner needs.

    python bench/step_variants.py             # ~5 minutes on 2 cores
    python bench/step_variants.py --loaded    # + ~2 minutes under load
    python bench/step_variants.py --quick     # ~1 minute: one short round, checks the variants run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from _common import Result, load_average, print_results

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "default": {"env": {"OMP_WAIT_POLICY": "PASSIVE"}},
    "unfused_adamw": {"env": {"OMP_WAIT_POLICY": "PASSIVE"}, "unfused": True},
    "spin_1000": {"env": {"GOMP_SPINCOUNT": "1000"}, "unset": ["OMP_WAIT_POLICY"]},
    "bf16_autocast": {"env": {"OMP_WAIT_POLICY": "PASSIVE"}, "bf16": True},
}
LOADED = ("default", "spin_1000")
WARM = 10


def child(variant: str, steps: int, demos: int) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    import contextlib

    import torch
    from _common import expert_data
    from peer_loops import plain_loop

    import anyorder_ray.training.optim as optim
    from anyorder_ray.config import load_config
    from anyorder_ray.data.seeds import rollout_seed_range

    spec = VARIANTS[variant]
    if spec.get("unfused"):
        optim.fused_adamw = lambda params: None  # make_optimizer passes fused=None: torch's default
    cfg = load_config(str(HERE.parent / "tune_configs/imitation.yaml"), []).trial({"arm": "causal", "seed": 0})
    torch.set_num_threads(cfg.train.torch_threads)
    seeds = rollout_seed_range(cfg.rollout, 0)
    data, _ = expert_data(cfg.env, range(seeds.start, seeds.start + demos))
    context = torch.autocast("cpu", dtype=torch.bfloat16) if spec.get("bf16") else contextlib.nullcontext()
    with context:
        speed = plain_loop(cfg, data, steps, WARM)
    print(json.dumps({"variant": variant, "tokens_per_s": speed.tokens_per_s}), flush=True)


def measure(variant: str, steps: int, demos: int, nice: int = 0) -> float:
    spec = VARIANTS[variant]
    env = {k: v for k, v in os.environ.items() if k not in spec.get("unset", [])}
    env.update(spec["env"])
    cmd = [sys.executable, str(Path(__file__)), "--child", variant, "--steps", str(steps), "--demos", str(demos)]
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-3000:])
        raise SystemExit(f"variant {variant} failed (exit {proc.returncode})")
    tokens_per_s = json.loads(proc.stdout.strip().splitlines()[-1])["tokens_per_s"]
    print(f"  {variant}{' (loaded)' if nice else ''}: {tokens_per_s:,.0f} real tokens/s", flush=True)
    return tokens_per_s


def main(argv: list[str]) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short round: checks the variants run")
    parser.add_argument("--loaded", action="store_true", help="also the OpenMP policies beside a busy process")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of all variants (default 3, quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="steps per measurement (default 80, quick 14)")
    parser.add_argument("--demos", type=int, default=None, help="bot demos (default 400, quick 60)")
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps = args.steps or (WARM + 4 if args.quick else 80)
    demos = args.demos or (60 if args.quick else 400)
    if args.child:
        child(args.child, steps, demos)
        raise SystemExit(0)
    rounds = args.rounds or (1 if args.quick else 3)
    print(f"{rounds} round(s) of {len(VARIANTS)} variants, {steps} steps each ({WARM} warm-up), {load_average()}",
          flush=True)  # fmt: skip
    speeds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(rounds):
        print(f"round {r + 1}:", flush=True)
        for name in VARIANTS:
            speeds[name].append(measure(name, steps, demos))
    median = {name: statistics.median(v) for name, v in speeds.items()}
    results = [Result(f"step_{name}_vs_default", median[name] / median["default"]) for name in VARIANTS
               if name != "default"]  # fmt: skip
    results.append(Result("step_default_tokens_per_s", median["default"]))
    if args.loaded:
        burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            loaded = {name: measure(name, steps, demos, nice=15) for name in LOADED}
        finally:
            burner.kill()
        results.append(Result("step_loaded_spin_1000_vs_default", loaded["spin_1000"] / loaded["default"]))
        results.append(Result("step_loaded_default_vs_quiet", loaded["default"] / median["default"]))
    print(f"done ({load_average()})", flush=True)
    return results


if __name__ == "__main__":
    print_results(main(sys.argv[1:]))
