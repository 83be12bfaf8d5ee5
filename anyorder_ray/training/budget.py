"""How many steps a run trains: ``train.max_steps``, or as many as fit in ``train.time_budget_s``."""

from __future__ import annotations

import time

import torch

from anyorder_ray.training.optim import LRSchedule

__all__ = ["StepBudget", "broadcast_int"]


class StepBudget:
    """The step count of a run, kept in its ``LRSchedule`` (so the cosine horizon follows it and a checkpoint
    carries it).

    With a time budget the step rate is measured over steps ``WARM..FIRST_FIX`` of this process and the total
    fixed at ``FIRST_FIX``; it is measured again at a quarter of that plan (now including eval pushes and
    reports) and then fixed for good. Rank 0 decides and broadcasts, so all ranks stop together. Time before the
    first step (model build, waiting for data) is not counted; the final evaluation runs after the budget.
    """

    WARM = 10
    FIRST_FIX = 30

    def __init__(self, max_steps: int, budget_s: float | None, schedule: LRSchedule, start_step: int = 0) -> None:
        self.max_steps = max_steps
        self.budget_s = budget_s
        self.schedule = schedule
        self._start_step = start_step
        self._next_fix = start_step + self.FIRST_FIX
        self._t_last: float | None = None
        self._t_warm: float | None = None

    @property
    def total(self) -> int:
        return self.schedule.total

    def start(self) -> None:
        """Call right before the first step: the clock starts here."""
        self._t_last = time.perf_counter()

    def after_step(self, step: int) -> None:
        if self.budget_s is None:
            return
        now = time.perf_counter()
        if self._t_last is not None:
            self.schedule.elapsed_s += now - self._t_last
        self._t_last = now
        if self.schedule.budget_fixes >= 2:
            return
        if step == self._start_step + self.WARM:
            self._t_warm = now
        if step == self._next_fix and self._t_warm is not None:
            rate = (now - self._t_warm) / (step - self._start_step - self.WARM)
            remaining = self.budget_s - self.schedule.elapsed_s
            total = min(self.max_steps, max(step + 1, step + round(remaining / rate)))
            total = broadcast_int(total)
            self.schedule.set_total(total)
            self.schedule.budget_fixes += 1
            self._next_fix = max(step + 1, total // 4)
            print(f"[train] time budget {self.budget_s:.0f} s: {rate * 1e3:.0f} ms/step, training {total} steps "
                  f"(fix {self.schedule.budget_fixes}/2)", flush=True)  # fmt: skip


def broadcast_int(value: int) -> int:
    """Rank 0's ``value`` on every rank (no-op without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)  # works on gloo and NCCL alike
    return int(box[0])
