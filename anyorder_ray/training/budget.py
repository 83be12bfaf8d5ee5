"""How much a run trains: a step count, a compute budget (model FLOPs or real tokens), or wall time.

- Compute budgets (``train.flop_budget`` / ``train.token_budget``, the default for comparisons): before the first
  step, a probe draws at least ``PROBE_STEPS`` steps' worth of micro-batches, in whole length-bucketed pools
  (``probe_steps``), from the trial's own data with its own seeded stream (the training streams are untouched),
  measures the mean cost of a step and plans ``ceil(budget / cost)``
  steps (a two-stage ``iwm`` arm probes each stage and weighs it by its share of the steps, so the planned steps
  spend the budget with the targets each stage really trains). The plan depends only on the data, the masks and the
  seed, so the same config trains the same steps on a quiet or a loaded machine; arms of one sweep get equal compute
  (each reports what it used).
- The dagger regime's data changes under the plan: the rollout actors' on-policy segments (cut where the executed
  action left the expert's) are shorter than the demos the probe draws, so a step costs less as they come in. Its plan
  is made again at every weights publication from what the steps since the last one really cost
  (``replan_compute_steps``), so the run spends its budget, not the probe's guess of it. Which batches are on-policy
  depends on when the actors deliver, so a dagger run's steps (like its data) depend on timing; the other regimes'
  plans are fixed before the first step.
- Wall time (``train.time_budget_s``): the step rate is measured early in the run and the plan fixed from it, so
  the step count depends on the machine and its load.

Model FLOPs count the matmuls of a training step (forward + backward = 3 forwards) over the real tokens, with the
LM head at the target positions only (a masked diffusion LM needs logits there alone, and the trainer computes no
others): ``model_flops_per_token``, ``forward_flops`` and ``step_cost`` are the one definition, used by the budget, the
reported ``train/total_flops``, the benches' MFU and the inference FLOPs of DAgger's rollout actors
(``rollout/inference_flops``: one forward, the LM head at the scored positions only, as ``evaluation.scoring`` runs it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from anyorder_ray.training.optim import LRSchedule

if TYPE_CHECKING:
    from anyorder_ray.models.llada2_moe import LLaDA2MoeConfig

__all__ = ["PROBE_STEPS", "StepBudget", "broadcast_int", "forward_flops", "model_flops_per_token", "plan_compute_steps",
           "probe_steps", "replan_compute_steps", "step_cost"]  # fmt: skip

PROBE_STEPS = 16
"""The fewest steps' worth of micro-batches the compute-budget probe draws to measure the mean cost of a step."""


def probe_steps(pool_batches: int, accum: int) -> int:
    """Steps the probe draws: the fewest whole pools of ``pool_batches`` length-bucketed micro-batches (``accum`` per
    step) that make at least ``PROBE_STEPS`` steps. A pool is cut into micro-batches sorted by length, so part of one is
    a few short and a few long batches: with 16 of a 32-batch pool the plan was off by up to 15%
    (docs/results/budget_probe/); a whole pool is the mean of all its windows."""
    if pool_batches < 1 or accum < 1:
        raise ValueError(f"pool_batches and accum must be >= 1, got {pool_batches} and {accum}")
    per_pool = pool_batches // math.gcd(pool_batches, accum)  # steps that use up a whole number of pools
    return per_pool * math.ceil(PROBE_STEPS / per_pool)


def model_flops_per_token(config: LLaDA2MoeConfig, length: int, lm_head: bool = True) -> float:
    """Forward matmul FLOPs per token at sequence length ``length`` (multiply by 3 for a training step).

    ``2 x`` the active matmul parameters per token, plus the attention scores and weighted sum
    (``4 * length * n_q * d`` per layer: bidirectional, every query sees all ``length`` keys). For MoE layers
    only the router, the ``k`` routed experts a token uses and the shared experts count (active params);
    the embedding lookup is not a matmul and is not counted, the LM head is unless ``lm_head=False``.
    """
    h, d = config.hidden_size, config.head_dim
    n_q, n_kv = config.num_attention_heads, config.num_key_value_heads
    attention = 2 * h * (n_q + 2 * n_kv) * d + 2 * n_q * d * h + 4 * length * n_q * d
    total = 0.0
    for layer in range(config.num_hidden_layers):
        total += attention
        if config.is_moe_layer(layer):
            i_moe = config.moe_intermediate_size
            total += 2 * h * config.num_experts
            total += (config.num_experts_per_tok + config.num_shared) * 6 * h * i_moe
        else:
            total += 6 * h * config.intermediate_size
    return total + (2 * h * config.vocab_size if lm_head else 0)


def forward_flops(config: LLaDA2MoeConfig, lengths: Sequence[int], targets: int) -> float:
    """Matmul FLOPs of one forward over sequences of ``lengths`` real tokens (padding excluded) with the LM head at
    ``targets`` positions: the body at every real token (``model_flops_per_token`` at that sequence's length, without
    the head), the head at the targets. A training step costs 3 of these (forward + backward)."""
    body = sum(length * model_flops_per_token(config, length, lm_head=False) for length in lengths)
    return body + targets * 2.0 * config.hidden_size * config.vocab_size


def step_cost(config: LLaDA2MoeConfig, micro_batches: Sequence[dict[str, torch.Tensor]]) -> tuple[int, float]:
    """Real tokens and training FLOPs (forward + backward: 3 ``forward_flops``) of one rank's micro-batches of a step:
    the body at every real token, the LM head at the targets."""
    tokens, flops = 0, 0.0
    for mb in micro_batches:
        lengths = mb["attention_mask"].sum(-1).tolist()
        tokens += sum(lengths)
        flops += 3.0 * forward_flops(config, lengths, int((mb["labels"] != -100).sum()))
    return tokens, flops


def plan_compute_steps(
    kind: str,
    amount: float,
    max_steps: int,
    world_size: int,
    stages: Sequence[tuple[float, Callable[[], Sequence[dict]]]],
    config,
    steps: int = PROBE_STEPS,
) -> int:
    """The step count of a compute budget: ``amount`` (``kind`` "flops" or "tokens", summed over ``world_size``
    ranks) over the mean cost of a step, rounded up, capped by ``max_steps``. ``stages``: ``(share of the steps,
    draw)`` per training stage (``[(1.0, draw)]`` for one; two-stage ``iwm`` has two), each stage's cost the mean of
    ``steps`` steps drawn by its ``draw`` (one rank's micro-batches; ``probe_steps`` says how many)."""
    if kind not in ("flops", "tokens"):
        raise ValueError(f"a compute budget is 'flops' or 'tokens', got {kind!r}")
    if not stages or abs(sum(share for share, _ in stages) - 1.0) > 1e-9:
        raise ValueError(f"the stages' shares of the steps must sum to 1, got {[share for share, _ in stages]}")
    per_step = 0.0
    for share, draw_step in stages:
        costs = [step_cost(config, draw_step()) for _ in range(steps)]
        per_step += share * world_size * sum(c[0] if kind == "tokens" else c[1] for c in costs) / steps
    return max(1, min(max_steps, math.ceil(amount / per_step)))


def replan_compute_steps(step: int, spent: float, amount: float, recent_cost: float, max_steps: int) -> int:
    """The step count of a compute budget made again after ``step`` steps that spent ``spent`` of ``amount``: the
    remaining budget over ``recent_cost`` (the mean cost of the latest steps), rounded up; ``step`` itself (stop now)
    once the budget is spent; never past ``max_steps``."""
    if recent_cost <= 0:
        raise ValueError(f"a step's cost must be positive, got {recent_cost}")
    remaining = amount - spent
    more = math.ceil(remaining / recent_cost) if remaining > 0 else 0
    return max(step, min(max_steps, step + more))


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
