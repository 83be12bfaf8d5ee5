"""The FSDP2 training path on one accelerator: tokens/s and model-FLOPs utilisation of a ~1B LLaDA2-shaped model.

The model is built exactly as ``train.data_parallel_mode: fsdp2`` builds it (``sharding.build_sharded_model``: meta
init, ``fully_shard`` per decoder layer then the root, bf16 compute with fp32 master weights and fp32 reduction on
GPU, activation checkpointing), in a one-process group, and trained with the project's objective and optimizer
(``objective.masked_cross_entropy``, ``optim.make_optimizer``) on random token sequences with 15% masked targets:
throughput does not depend on what the tokens say.

Shape (default): LLaDA2.0-mini's width, heads, vocabulary and expert size (hidden 2048, 16 query / 4 KV heads of
128, vocabulary 157,184, experts of 512 with top-8 routing + 1 shared expert), with 8 layers and 16 experts instead
of 20 and 256: about 1.2B parameters, 0.4B active per token.

MFU = 3 x ``_common.model_flops_per_token`` x tokens/s / the bf16 matmul FLOP/s measured on the same device.

Run on a GPU machine: ``python bench/fsdp2_gpu.py`` (bf16, batch 8 x 1024 tokens). ``--quick`` runs the same code
path on CPU with the tiny preset in fp32 (gloo), a few steps: a check that the path works, not a measurement.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
from _common import Result, measure_matmul_flops, model_flops_per_token, print_results

from anyorder_ray.config import ModelConfig, TrainConfig
from anyorder_ray.models.factory import build_model_config, build_tokenizer
from anyorder_ray.training.objective import masked_cross_entropy
from anyorder_ray.training.optim import make_optimizer
from anyorder_ray.training.sharding import build_sharded_model
from envs import EnvConfig

ONE_B = {
    "hidden_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 4,
    "head_dim": 128, "num_experts": 16, "num_experts_per_tok": 8, "moe_intermediate_size": 512,
    "intermediate_size": 5120, "vocab_size": 157184, "mask_token_id": 156895, "pad_token_id": 156892,
    "eos_token_id": 156892,
}  # fmt: skip


def gpu_matmul_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16, seconds: float = 2.0) -> float:
    """Best FLOP/s of large square matmuls on ``device`` in ``dtype``."""
    best = 0.0
    for n in (4096, 8192):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize(device)
        deadline = time.perf_counter() + seconds / 2
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            for _ in range(10):
                a @ b
            torch.cuda.synchronize(device)
            best = max(best, 10 * 2 * n**3 / (time.perf_counter() - start))
    return best


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str]) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU, tiny preset, fp32, a few steps (a path check)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 8, quick 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 1024, quick 64)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 20, quick 3)")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.quick
    if not cuda and not args.quick:
        parser.error("no CUDA device: run with --quick for the CPU path check; the measurement needs a GPU")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    batch, length = args.batch or (8 if cuda else 4), args.seq_len or (1024 if cuda else 64)
    steps = args.steps or (20 if cuda else 3)

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    try:
        if cuda:
            torch.cuda.set_device(device)
        model_cfg = ModelConfig(preset="mini", overrides=ONE_B) if cuda else ModelConfig()
        tokenizer = build_tokenizer(ModelConfig(), EnvConfig())
        config = build_model_config(model_cfg, tokenizer)
        model = build_sharded_model(model_cfg, tokenizer, device, seed=0, mixed_precision=cuda,
                                    activation_checkpointing=cuda)  # fmt: skip
        params = sum(p.numel() for p in model.parameters())
        optimizer, scheduler = make_optimizer(model, TrainConfig(lr=1e-4, max_steps=args.warmup + steps))
        gen = torch.Generator(device="cpu").manual_seed(0)
        ids = torch.randint(0, config.mask_token_id, (batch, length), generator=gen)
        is_target = torch.rand(batch, length, generator=gen) < 0.15
        labels = torch.where(is_target, ids, torch.full_like(ids, -100)).to(device)
        inputs = torch.where(is_target, torch.full_like(ids, config.mask_token_id), ids).to(device)
        mask = torch.ones_like(inputs)
        print(f"device {device}, {params / 1e9:.2f}B parameters, batch {batch} x {length} tokens, "
              f"{'bf16 compute / fp32 master' if cuda else 'fp32'}", flush=True)  # fmt: skip
        times, losses = [], []
        for step in range(args.warmup + steps):
            start = time.perf_counter()
            loss = masked_cross_entropy(model(input_ids=inputs, attention_mask=mask).logits, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
            losses.append(float(loss))
        step_s = statistics.median(times)
        tokens_per_s = batch * length / step_s
        peak = gpu_matmul_flops(device) if cuda else measure_matmul_flops(1.0)
        mfu = 3 * model_flops_per_token(config, length) * tokens_per_s / peak
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
        print(f"median step {step_s * 1e3:.0f} ms, {tokens_per_s:.0f} tokens/s, peak {peak / 1e12:.1f} TFLOP/s "
              f"({'bf16' if cuda else 'fp32'}), MFU {mfu:.3f}, peak GPU memory {peak_mem:.1f} GiB; loss "
              f"{losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)  # fmt: skip
    finally:
        dist.destroy_process_group()
    results = [
        Result("fsdp2_tokens_per_s", tokens_per_s),
        Result("fsdp2_mfu", mfu),
        Result("fsdp2_params_billion", params / 1e9),
    ]
    print_results(results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
