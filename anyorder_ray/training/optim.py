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


class LRSchedule:
    """``lr_factor`` as a picklable callable whose horizon can be fixed after the run starts.

    ``LambdaLR`` saves a callable object's ``__dict__`` in its state dict, so ``total`` (and ``warmup``) set by a
    budget (``set_total``), and the budget's own progress (``planned`` for a compute budget, ``budget_fixes`` and
    ``elapsed_s`` for a time budget, kept by ``training.budget.StepBudget``), survive a checkpoint and resume exactly.
    """

    def __init__(self, warmup_ratio: float, total: int, style: str) -> None:
        self.warmup_ratio = float(warmup_ratio)
        self.style = style
        self.planned = False
        self.budget_fixes = 0
        self.elapsed_s = 0.0
        self.set_total(total)

    def set_total(self, total: int) -> None:
        """Plan ``total`` steps (``planned_total`` keeps it through later ``extend`` calls and checkpoints)."""
        self.total = self.planned_total = int(total)
        self.warmup = int(self.warmup_ratio * self.total)

    def extend(self, total: int) -> None:
        """Move the horizon to ``total`` steps with the warmup and ``planned_total`` as they are (a plan made again
        mid-run must not send a run that finished its warmup back into it)."""
        self.total = int(total)

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup, self.total, self.style)


FUSED_DEVICES = ("cpu", "cuda")


def fused_adamw(params: list[torch.Tensor]) -> bool | None:
    """Whether ``make_optimizer`` uses torch's fused AdamW kernel: yes for plain fp32/bf16 tensors on CPU or CUDA;
    otherwise None, torch's own choice (e.g. for fsdp2's DTensor parameters).

    The fused kernel updates every parameter in one pass. Without it torch's AdamW on CPU loops over the parameters
    one at a time (its foreach kernels are GPU-only). The Hugging Face ``Trainer`` uses the fused kernel by default.
    ``bench/step_variants.py`` measures the difference on the default sweep's model (``unfused_adamw``).
    """
    plain = all(type(p) is torch.nn.Parameter or type(p) is torch.Tensor for p in params)
    ok = plain and all(p.device.type in FUSED_DEVICES and p.dtype in (torch.float32, torch.bfloat16) for p in params)
    return True if ok and params else None


def make_optimizer(
    model: torch.nn.Module, cfg: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused_adamw(decay + no_decay))
    schedule = LRSchedule(cfg.lr_warmup_ratio, cfg.max_steps, cfg.lr_decay_style)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return optimizer, scheduler


def set_horizon(scheduler: torch.optim.lr_scheduler.LambdaLR, total: int) -> None:
    """Move the schedule's horizon to ``total`` steps and apply it to the optimizer's current LR at once (a plan made
    before the first step must not leave step 0 at the old horizon's warmup LR)."""
    schedule = lr_schedule(scheduler)
    schedule.set_total(total)
    lrs = [base * schedule(scheduler.last_epoch) for base in scheduler.base_lrs]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs


def lr_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> LRSchedule:
    """The ``LRSchedule`` inside a scheduler made by ``make_optimizer``."""
    schedule = scheduler.lr_lambdas[0]  # one per parameter group, all the same object
    if not isinstance(schedule, LRSchedule) or any(fn is not schedule for fn in scheduler.lr_lambdas):
        raise TypeError(f"expected a scheduler from make_optimizer, got lr_lambdas {scheduler.lr_lambdas}")
    return schedule
