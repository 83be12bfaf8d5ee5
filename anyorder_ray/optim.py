"""AdamW with warmup + decay, as dFactory's SFT recipe: decoupled weight decay off for norms and biases."""

from __future__ import annotations

import math

import torch

from anyorder_ray.config import TrainConfig


def lr_factor(step: int, warmup: int, total: int, style: str) -> float:
    """Multiplier of the peak LR at ``step``: linear warmup, then cosine / linear decay to 0, or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if style == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if style == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if style == "linear":
        return 1.0 - progress
    raise ValueError(f"lr_decay_style must be cosine, linear or constant, got {style!r}")


def make_optimizer(
    model: torch.nn.Module, cfg: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    warmup, total, style = cfg.warmup_steps(), cfg.max_steps, cfg.lr_decay_style
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total, style))
    return optimizer, scheduler
