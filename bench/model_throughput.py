"""Training throughput and model-FLOPs utilisation (MFU) of the LLaDA 2.0 MoE ``tiny`` preset on this CPU.

For each sequence length (BabyAI trajectories encode to ~100-300 tokens) it times forward + backward of the
masked-CE loss on a full batch, converts tokens/s into model FLOP/s with an analytic count, and divides by the
fp32 matmul FLOP/s measured in the same run (best of several large square matmuls: the practical ceiling).

Model FLOPs per token (training = 3x forward: one forward, two for backward), counting matmuls only:
  attention   2*H*(n_q + 2*n_kv)*d  (fused QKV)  + 2*n_q*d*H (output) + 4*L*n_q*d (scores and weighted sum,
              bidirectional: every query sees all L keys)
  dense MLP   6*H*I
  MoE layer   2*H*E (router) + k * 6*H*I_moe (routed, active experts only) + s * 6*H*I_moe (shared)
  LM head     2*H*V
Elementwise work (norms, RoPE, SiLU, softmax, routing, dispatch copies) is real time but not model FLOPs, which
is exactly why it lowers MFU.

Run: ``python bench/model_throughput.py`` (full) or ``--quick`` (< 1 minute). Last line:
``RESULT model_mfu <value> target >=0.5``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from _common import measure_matmul_flops, model_flops_per_token

from anyorder_ray.models.llada2_moe import LLaDA2MoeModelLM, llada2_config
from anyorder_ray.training.objective import masked_cross_entropy

__all__ = ["Measurement", "measure_matmul_flops", "measure_training", "model_flops_per_token"]


@dataclass(frozen=True)
class Measurement:
    """One (batch, length) timing."""

    batch: int
    length: int
    step_s: float
    tokens_per_s: float
    model_flops_per_s: float
    mfu: float


def measure_training(
    model: LLaDA2MoeModelLM, batch: int, length: int, steps: int, warmup: int, peak: float, seed: int = 0
) -> Measurement:
    """Median forward+backward time of ``steps`` steps on random tokens with ~30% masked targets."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=generator)
    targets = torch.rand(batch, length, generator=generator) < 0.3
    inputs = torch.where(targets, torch.full_like(ids, config.mask_token_id), ids)
    labels = torch.where(targets, ids, torch.full_like(ids, -100))
    mask = torch.ones(batch, length, dtype=torch.long)
    model.train()
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        logits = model(inputs, attention_mask=mask).logits
        masked_cross_entropy(logits, labels).backward()
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(elapsed)
    step_s = statistics.median(times)
    tokens_per_s = batch * length / step_s
    flops_per_s = 3 * model_flops_per_token(config, length) * tokens_per_s
    return Measurement(batch, length, step_s, tokens_per_s, flops_per_s, flops_per_s / peak)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one length, few steps (< 1 minute)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=400, help="the project's word-level vocabulary is ~400")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = args.lengths[:1] if args.quick else args.lengths
    steps, warmup = (3, 1) if args.quick else (args.steps, 2)

    torch.manual_seed(0)
    config = llada2_config("tiny", vocab_size=args.vocab_size)
    model = LLaDA2MoeModelLM(config)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"tiny preset: {params / 1e6:.2f}M parameters, hidden {config.hidden_size}, {config.num_hidden_layers} layers "
        f"({config.first_k_dense_replace} dense), {config.num_experts} experts top-{config.num_experts_per_tok} "
        f"+ {config.num_shared} shared, vocab {config.vocab_size}; torch threads {torch.get_num_threads()}"
    )
    peak_before = measure_matmul_flops(1.0 if args.quick else 2.0)
    raw = [measure_training(model, args.batch, length, steps, warmup, peak_before) for length in lengths]
    # The ceiling is measured before and after the runs and the higher value is used: on a shared machine a
    # momentarily slow peak measurement would otherwise inflate MFU.
    peak = max(peak_before, measure_matmul_flops(1.0 if args.quick else 2.0))
    print(
        f"measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s (higher of before/after: {peak_before / 1e9:.1f} before)"
    )
    results = [
        Measurement(m.batch, m.length, m.step_s, m.tokens_per_s, m.model_flops_per_s, m.model_flops_per_s / peak)
        for m in raw
    ]
    for m in results:
        print(
            f"batch {m.batch} x {m.length} tokens: fwd+bwd {m.step_s * 1e3:.0f} ms/step, "
            f"{m.tokens_per_s:,.0f} tokens/s, {m.model_flops_per_s / 1e9:.1f} model GFLOP/s, MFU {m.mfu:.3f}"
        )
    if not args.quick:
        print(f"with AdamW: {optimizer_step_s(model, args.batch, lengths[0]) * 1e3:.0f} ms/step at {lengths[0]} tokens")
    mfu = statistics.mean(m.mfu for m in results)
    print(f"RESULT model_mfu {mfu:.3f} target >=0.5")
    return mfu


def optimizer_step_s(model: LLaDA2MoeModelLM, batch: int, length: int, steps: int = 4) -> float:
    """Median time of a full training step (forward, backward, AdamW update) for reference."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, length))
    labels = torch.where(torch.rand(batch, length) < 0.3, ids, torch.full_like(ids, -100))
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        masked_cross_entropy(model(ids).logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    main(sys.argv[1:])
