"""Training throughput: tokens/s, model-FLOPs utilisation (MFU) and padding waste of the trainer's own loop.

What is timed is exactly what ``anyorder_ray.roles.train_loop.train_loop_per_worker`` runs per step, minus Ray:
``BatchMaker.bucketed`` (crop a window, draw a fresh mask, encode, bucket a pool of 8 micro-batches by length, collate)
and ``train_step`` (forward, masked CE, backward, gradient clipping, AdamW + LR schedule). Model, tokenizer, data and
optimizer settings come from the imitation sweep (``tune_configs/imitation.yaml``, the default sweep's model and data)
through ``anyorder_ray.models.factory`` and ``anyorder_ray.training.optim``; the data are real bot trajectories sampled
uniformly with replacement, as ``BufferSource.sample`` does over a cached buffer. Measured for the ``causal`` and
``any_order`` modes (the masked fraction changes the loss and labels, not the forward/backward cost).

Model FLOPs of a training step (``_common.model_flops_per_token``, the same count as ``bench/model_throughput.py``):
    3 x forward (one forward, two for backward) x [2 x active matmul params per token  +  4 x L x n_q x d per layer]
i.e. 6 x active params per token plus the attention scores/weighted sum over the sequence's own length L. Active
params: attention (fused QKV, output), the dense MLP of layer 0, per MoE layer the router, the k routed experts a
token uses and the shared expert (not all E experts), and the LM head; the embedding lookup is no matmul. Only real
tokens count: padded positions are work the machine does but no model FLOPs, so padding lowers MFU.

MFU = model FLOP/s / the fp32 matmul FLOP/s of large square matmuls measured in the same run (the higher of a
measurement before and after, so a momentarily slow ceiling cannot inflate MFU). Padding waste = padded tokens / all
tokens of the micro-batches, with the trainer's bucketing and, for contrast, for random batches of the same size.

Run: ``python bench/train_throughput.py`` (full, ~1 minute) or ``--quick`` (< 1 minute).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from _common import Result, expert_data, load_average, measure_matmul_flops, model_flops_per_token, print_results

from anyorder_ray.config import ExperimentConfig, MaskingConfig, load_config
from anyorder_ray.data.batching import BatchMaker, LocalSource
from anyorder_ray.data.encoding import UnitEncoder, padding_waste
from anyorder_ray.models.factory import build_model, build_model_config, build_tokenizer
from anyorder_ray.models.llada2_moe import LLaDA2MoeConfig
from anyorder_ray.training.optim import make_optimizer
from anyorder_ray.training.recipe import train_step
from envs import Trajectory


@dataclass(frozen=True)
class ModeResult:
    """Throughput of one masking mode over the measured steps."""

    mode: str
    steps: int
    batch_s: float  # mean time in BatchMaker.bucketed per step
    step_s: float  # mean time in train_step per step
    tokens: int  # real tokens
    padded: int  # all positions of the micro-batches
    model_flops: float
    waste_random: float  # padding waste of random (unbucketed) batches of the same size

    @property
    def seconds(self) -> float:
        return self.steps * (self.batch_s + self.step_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def waste(self) -> float:
        return 1.0 - self.tokens / self.padded


def step_model_flops(config: LLaDA2MoeConfig, micro_batches: list[dict[str, torch.Tensor]]) -> float:
    """Training-step model FLOPs of the real tokens (each sequence's attention over its own length)."""
    total = 0.0
    for mb in micro_batches:
        for length in mb["attention_mask"].sum(dim=1).tolist():
            total += 3 * length * model_flops_per_token(config, int(length))
    return total


def measure_mode(cfg: ExperimentConfig, mode: str, data: list[Trajectory], steps: int, warmup: int) -> ModeResult:
    masking = MaskingConfig(**{**dataclasses.asdict(cfg.masking), "mode": mode})
    tokenizer = build_tokenizer(cfg.model, cfg.env)
    encoder = UnitEncoder(tokenizer)
    model = build_model(cfg.model, tokenizer, seed=cfg.train.seed)
    optimizer, scheduler = make_optimizer(model, cfg.train)
    device = torch.device("cpu")
    source = LocalSource(data, np.random.default_rng(cfg.train.seed))
    batches = BatchMaker(cfg.data, masking, encoder, tokenizer.pad_token_id, seed=cfg.train.seed)
    mbs, accum = cfg.train.micro_batch_size, cfg.train.grad_accum_steps()

    batch_times, step_times, tokens, padded, flops = [], [], 0, 0, 0.0
    for step in range(warmup + steps):
        start = time.perf_counter()
        micro = [batches.bucketed(source, mbs) for _ in range(accum)]
        made = time.perf_counter()
        stats = train_step(model, optimizer, scheduler, micro, cfg.train.max_grad_norm, device)
        done = time.perf_counter()
        if step >= warmup:
            batch_times.append(made - start)
            step_times.append(done - made)
            tokens += stats.tokens
            padded += stats.padded_tokens
            flops += step_model_flops(model.config, micro)
    # Contrast: the same examples batched in random order (what micro_batch would give without bucketing).
    pool = [batches.example(t) for t in source.sample(mbs * 32)]
    waste_random = padding_waste([pool[s : s + mbs] for s in range(0, len(pool), mbs)])
    # What the pool size buys (data.bucket_pool_batches, default 32): a larger pool leaves fewer buckets that
    # straddle two length clusters (encoding only, no training).
    wastes = {}
    for pool_batches in (8, 32):
        data_cfg = dataclasses.replace(cfg.data, bucket_pool_batches=pool_batches)
        probe = BatchMaker(data_cfg, masking, encoder, tokenizer.pad_token_id, seed=cfg.train.seed + 1)
        micro = [probe.bucketed(source, mbs) for _ in range(64)]
        wastes[pool_batches] = 1.0 - sum(int(m["attention_mask"].sum()) for m in micro) / sum(
            m["attention_mask"].numel() for m in micro
        )
    print(
        f"[{mode}] bucketing pool of 8 vs 32 micro-batches (64 batches each): padding waste "
        f"{wastes[8]:.3f} vs {wastes[32]:.3f}",
        flush=True,
    )
    result = ModeResult(
        mode, steps, statistics.mean(batch_times), statistics.mean(step_times), tokens, padded, flops, waste_random
    )
    print(
        f"[{mode}] {steps} steps: batch making {result.batch_s * 1e3:.1f} ms + train_step {result.step_s * 1e3:.1f} ms "
        f"per step, {result.tokens_per_s:,.0f} real tokens/s, {tokens / steps / (mbs * accum):.0f} tokens/sequence, "
        f"padding waste {result.waste:.3f} bucketed vs {waste_random:.3f} random ({load_average()})",
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer demos and steps (< 1 minute)")
    parser.add_argument("--config", default="tune_configs/imitation.yaml")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per mode (default 96, quick 16)")
    parser.add_argument("--modes", nargs="+", default=["causal", "any_order"])
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    steps = args.steps or (16 if args.quick else 96)
    warmup = 8  # one bucketed pool, the allocator and the optimizer state warm up
    torch.set_num_threads(cfg.train.torch_threads)
    demos = 200 if args.quick else cfg.data.num_demos
    print(
        f"config {args.config}: level {cfg.env.level}, window {cfg.data.window_steps} steps, batch "
        f"{cfg.train.global_batch_size} (micro {cfg.train.micro_batch_size}), torch threads {torch.get_num_threads()}",
        flush=True,
    )
    data, stats = expert_data(cfg.env, range(demos))
    print(f"{len(data)} bot trajectories in {stats.seconds:.1f} s", flush=True)

    peak_before = measure_matmul_flops(1.0 if args.quick else 2.0)
    results = [measure_mode(cfg, mode, data, steps, warmup) for mode in args.modes]
    peak = max(peak_before, measure_matmul_flops(1.0 if args.quick else 2.0))
    print(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s (before: {peak_before / 1e9:.1f})")

    config = build_model_config(cfg.model, build_tokenizer(cfg.model, cfg.env))
    mean_len = statistics.mean(r.tokens / r.steps / cfg.train.global_batch_size for r in results)
    print(
        f"model: {config.hidden_size} wide, {config.num_hidden_layers} layers, {config.num_experts} experts top-"
        f"{config.num_experts_per_tok} + {config.num_shared} shared, vocab {config.vocab_size}; "
        f"{3 * model_flops_per_token(config, round(mean_len)) / 1e6:.2f} MFLOP per trained token "
        f"at {mean_len:.0f} tokens"
    )
    mfus = []
    for r in results:
        mfu = r.model_flops / r.seconds / peak
        mfu_step = r.model_flops / (r.steps * r.step_s) / peak
        mfus.append(mfu)
        print(
            f"[{r.mode}] MFU {mfu:.3f} of the whole loop ({r.model_flops / r.seconds / 1e9:.1f} GFLOP/s); "
            f"train_step alone {mfu_step:.3f}; batch making is {r.batch_s / (r.batch_s + r.step_s):.0%} of the time"
        )
    out = [Result("train_mfu", statistics.mean(mfus), ">=", 0.5)]
    out += [Result(f"train_tokens_per_s_{r.mode}", r.tokens_per_s) for r in results]
    out.append(Result("padding_waste", max(r.waste for r in results), "<=", 0.05))
    out.append(Result("padding_waste_unbucketed", max(r.waste_random for r in results)))
    print_results(out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
