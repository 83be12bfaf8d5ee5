"""``torch.compile`` on the training step: compile time and steady-state speed against eager, same run.

Both sides run the trainer's own step (``BatchMaker.bucketed`` + ``train_step``) on the default sweep's model and
data (``tune_configs/imitation.yaml``: its encoding, window, batch and loss weighting), from the same seed. The compiled
side wraps the model as the trainer does for ``model.compile: true`` (``torch.compile(model, dynamic=True)``:
bucketed batches change length every step, so static shapes would recompile for each new length).

Reported: the seconds the first ``--warm`` compiled steps take beyond the eager ones (compile time), and the
median step time over the steps after them for each side. The ratio eager / compiled is the speed-up (> 1: compile
helps); ``model.compile`` defaults to whatever this measures.

Run: ``python bench/compile_speed.py`` (full, ~2 minutes) or ``--quick``: a path check of the same code on
``tune_configs/smoke.yaml`` (its 2-layer model and short windows) with a few steps per side, so that its time is the
compile itself (each step of the default sweep's model costs seconds on a loaded 2-core machine; the test suite runs
``--quick``). Its figures are not the default's: quote the full run, or the figures of docs/BENCHMARKS.md with
``--quick --config tune_configs/imitation.yaml --warm 20 --steps 20`` (the former ``--quick``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch
from _common import Result, expert_data, load_average, print_results

from anyorder_ray.config import ExperimentConfig, load_config
from anyorder_ray.data.batching import BatchMaker, LocalSource
from anyorder_ray.data.encoding import UnitEncoder
from anyorder_ray.models.factory import build_model, build_tokenizer
from anyorder_ray.models.llada2_moe.modeling_llada2_moe import compile_regions
from anyorder_ray.training.optim import make_optimizer
from anyorder_ray.training.recipe import train_step


def step_times(cfg: ExperimentConfig, data: list, steps: int, compiled: str | None) -> list[float]:
    """Seconds of each of ``steps`` training steps (batch making excluded), eager (``compiled`` None), the whole model
    compiled (``"model"``) or its regions (``"regional"``)."""
    tokenizer = build_tokenizer(cfg.model, cfg.env)
    model = build_model(cfg.model, tokenizer, seed=0)
    if compiled == "model":
        model = torch.compile(model, dynamic=True)
    elif compiled == "regional":
        compile_regions(model)
    optimizer, scheduler = make_optimizer(model, cfg.train)
    batches = BatchMaker(cfg.data, cfg.masking, UnitEncoder(tokenizer), tokenizer.pad_token_id, seed=0)
    source = LocalSource(data, np.random.default_rng(0))
    times = []
    for _ in range(steps):
        micro = [batches.bucketed(source, cfg.train.micro_batch_size) for _ in range(cfg.train.grad_accum_steps())]
        start = time.perf_counter()
        train_step(model, optimizer, scheduler, micro, cfg.train.max_grad_norm, torch.device("cpu"), cfg.masking)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str]) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke model, few steps: a path check")
    parser.add_argument("--config", default=None, help="default tune_configs/imitation.yaml (quick: smoke.yaml)")
    parser.add_argument("--warm", type=int, default=None, help="steps counted as compile/warm-up (default 20, quick 4)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps after them (default 80, quick 4)")
    parser.add_argument("--regional", action="store_true", help="compile the layers' regions (model.compile: "
                        "regional), not the whole model")  # fmt: skip
    args = parser.parse_args(argv)
    config = args.config or f"tune_configs/{'smoke' if args.quick else 'sweep'}.yaml"
    cfg = load_config(config)
    warm = args.warm or (4 if args.quick else 20)
    measured = args.steps or (4 if args.quick else 80)
    torch.set_num_threads(cfg.train.torch_threads)
    data, _ = expert_data(cfg.env, range(200 if args.quick else 1000))
    print(f"config {config}: encoding {cfg.env.obs_encoding}, masking {cfg.masking.label()}, "
          f"torch threads {torch.get_num_threads()}, {load_average()}", flush=True)  # fmt: skip
    eager = step_times(cfg, data, warm + measured, compiled=None)
    eager_ms = statistics.median(eager[warm:]) * 1e3
    print(f"[eager] first {warm} steps {sum(eager[:warm]):.1f} s, then median {eager_ms:.1f} ms/step", flush=True)
    compiled = step_times(cfg, data, warm + measured, compiled="regional" if args.regional else "model")
    print(f"[compiled] first {warm} steps {sum(compiled[:warm]):.1f} s, then median "
          f"{statistics.median(compiled[warm:]) * 1e3:.1f} ms/step ({load_average()})", flush=True)  # fmt: skip
    speedup = statistics.median(eager[warm:]) / statistics.median(compiled[warm:])
    compile_s = sum(compiled[:warm]) - sum(eager[:warm])
    results = [Result("compile_speedup", speedup), Result("compile_time_s", compile_s)]
    print_results(results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
