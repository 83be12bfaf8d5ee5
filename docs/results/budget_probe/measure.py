"""How far the compute-budget probe's estimate of a step's cost is from the cost of the steps a run then trains.

    python docs/results/budget_probe/measure.py [--probes 20] [--pools 40] [config overrides...]

Data: the first ``data.num_demos`` bot demos of rollout actor 0's seeds (as the fixed regime collects them) of the
config (default ``tune_configs/dagger_gotolocal.yaml`` with ``data.regime=fixed``), then the overrides. For each arm
(causal, and cut_focus in the block layout with the per-unit loss) it measures the mean FLOPs of a training step
over ``--pools`` whole length-bucketed pools drawn by the trainer's ``BatchMaker`` (the reference: the runs train
hundreds of steps), and for ``--probes`` probe seeds the probe's estimate the way it was planned before (16 steps: half
of a 32-batch pool) and the way it is now (``training.budget.probe_steps``: whole pools). Prints each arm's RMS and
largest relative error of both, then ``RESULT`` lines (the ratio of the RMS errors is measured in this one run).
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np

from anyorder_ray.config import load_config
from anyorder_ray.data.batching import BatchMaker, LocalSource
from anyorder_ray.data.encoding import UnitEncoder
from anyorder_ray.data.seeds import rollout_seed_range
from anyorder_ray.models.factory import build_model_config, build_tokenizer
from anyorder_ray.training.budget import probe_steps, step_cost
from envs import collect_expert_trajectories, make_world

ARMS = {"causal": {"mode": "causal"}, "cut_focus+block+unit": {"mode": "cut_focus", "layout": "block",
                                                                 "loss_norm": "unit"}}  # fmt: skip
OLD_PROBE_STEPS = 16


def mean_step_cost(maker: BatchMaker, source: LocalSource, model_config, steps: int, mbs: int, accum: int) -> float:
    """Mean FLOPs of ``steps`` steps of ``accum`` micro-batches each, as the trainer and its probe draw them."""
    costs = [step_cost(model_config, [maker.bucketed(source, mbs) for _ in range(accum)])[1] for _ in range(steps)]
    return float(np.mean(costs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tune_configs/dagger_gotolocal.yaml")
    p.add_argument("--probes", type=int, default=20, help="probe seeds per arm")
    p.add_argument("--pools", type=int, default=40, help="whole pools in the reference mean")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    base = load_config(args.config, ["data.regime=fixed", *args.overrides])
    seeds = list(rollout_seed_range(base.rollout, 0))[: base.data.num_demos]
    demos, _ = collect_expert_trajectories(make_world(base.env), seeds)
    print(f"{len(demos)} demos of {base.env.level}; pool {base.data.bucket_pool_batches} micro-batches of "
          f"{base.train.micro_batch_size}", flush=True)  # fmt: skip
    tokenizer = build_tokenizer(base.model, base.env)
    model_config = build_model_config(base.model, tokenizer)
    encoder, mbs, pool = UnitEncoder(tokenizer), base.train.micro_batch_size, base.data.bucket_pool_batches
    accum = base.train.grad_accum_steps()
    now_steps = probe_steps(pool, accum)
    results = {}
    for label, arm in ARMS.items():
        masking = dataclasses.replace(base.masking, **arm)
        source = LocalSource(demos, np.random.default_rng(10**6))
        reference = mean_step_cost(BatchMaker(base.data, masking, encoder, tokenizer.pad_token_id, 10**6), source,
                                   model_config, -(-args.pools * pool // accum), mbs, accum)  # fmt: skip
        errors = {"before": [], "now": []}
        for seed in range(args.probes):
            for name, steps in (("before", OLD_PROBE_STEPS), ("now", now_steps)):
                probe = BatchMaker(base.data, masking, encoder, tokenizer.pad_token_id, seed)
                view = LocalSource(demos, np.random.default_rng([seed, 1]))
                errors[name].append(mean_step_cost(probe, view, model_config, steps, mbs, accum) / reference - 1.0)
        for name, errs in errors.items():
            rms, worst = math.sqrt(float(np.mean(np.square(errs)))), float(np.max(np.abs(errs)))
            steps = OLD_PROBE_STEPS if name == "before" else now_steps
            print(f"{label:22s} probe {name:6s} ({steps} steps): RMS error {rms:.3f}, largest {worst:.3f} "
                  f"(reference {reference:.4g} FLOPs/step over {args.pools} pools)", flush=True)  # fmt: skip
            results[(label, name)] = (rms, worst)
    for label in ARMS:
        key = label.replace("+", "_")
        print(f"RESULT probe_rms_error_before_{key} {results[(label, 'before')][0]:.4f}")
        print(f"RESULT probe_rms_error_now_{key} {results[(label, 'now')][0]:.4f}")
        print(f"RESULT probe_rms_error_ratio_now_over_before_{key} "
              f"{results[(label, 'now')][0] / results[(label, 'before')][0]:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
