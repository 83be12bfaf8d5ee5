"""Masked-diffusion training objective: cross-entropy over the masked (target) positions only.

``loss = sum_{targets} w_i * CE(logits_i, label_i) / normaliser``. Labels are at the *same* position as the
logits (no shift; dFactory's ``same_token_labels: true``); ``-100`` marks a non-target.

Exactness across micro-batches and data-parallel workers: a token-mean over a step's targets is only exact if
every piece divides by the *step's* target count, not by its own. So:

- gradient accumulation: compute ``n = sum of target counts over all micro-batches of the step`` first, pass
  ``num_targets=n`` to every micro-batch loss and do **not** divide by the number of micro-batches;
- data parallelism: ``n = global_target_count(labels)`` (an all-reduce over the group). DDP/FSDP *average*
  gradients over the ``world_size`` ranks, so each rank must pass ``num_targets=n / world_size`` (the helper
  ``data_parallel_normaliser`` does both) for the averaged gradient to equal the global token-mean's gradient.
  A rank that happens to hold no target then contributes an exact zero (still connected to the graph, so
  DDP's gradient hooks fire).

A batch whose normaliser is zero (no target anywhere) raises ``ValueError``: it means the masking produced an
empty example, and a silent zero loss would hide that bug. ``AnyOrderMaskSampler`` guarantees >= 1 target.

``token_weights`` (same shape as ``labels``) reweights individual targets, e.g. per-unit normalisation
(``w = 1 / tokens_in_unit`` with ``num_targets = number of target units``). Weights at non-target positions are
ignored. Without ``num_targets`` the normaliser stays the local *target count*, not the sum of weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100


def masked_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_targets: int | float | torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of (weighted) CE over positions with ``labels != -100``, divided by ``num_targets``.

    Args:
        logits: ``[..., V]`` scores at every position (any float dtype; CE is computed in fp32).
        labels: ``[...]`` target ids, ``-100`` where there is no target.
        num_targets: the normaliser; defaults to the number of targets in ``labels``. Pass the step's global
            count (see the module docstring) when a batch is split over micro-batches or workers.
        token_weights: optional ``[...]`` per-position weights (same shape as ``labels``).

    Returns:
        A scalar fp32 tensor.

    Raises:
        ValueError: on shape mismatch, or when the normaliser is zero / negative (no targets).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {list(logits.shape)} and labels {list(labels.shape)} disagree before the vocab dim")
    if token_weights is not None and token_weights.shape != labels.shape:
        raise ValueError(f"token_weights {list(token_weights.shape)} must have the labels' shape {list(labels.shape)}")
    flat_labels = labels.reshape(-1)
    is_target = flat_labels != IGNORE_INDEX
    if num_targets is None:
        num_targets = is_target.sum()
    normaliser = torch.as_tensor(num_targets, dtype=torch.float32, device=logits.device)
    if not bool(normaliser > 0):  # one host sync: an empty step is a data bug worth stopping for
        raise ValueError(
            f"masked_cross_entropy: normaliser num_targets={float(normaliser)} must be > 0; the batch has no "
            "target positions (labels are all -100). Every example needs at least one masked target."
        )
    # Only target rows go through log-softmax: with a 157k vocabulary the full [B*L, V] fp32 tensor would
    # dominate memory, and non-targets contribute nothing.
    target_rows = is_target.nonzero().squeeze(-1)
    flat_logits = logits.reshape(-1, logits.shape[-1]).index_select(0, target_rows)
    ce = F.cross_entropy(flat_logits.float(), flat_labels.index_select(0, target_rows), reduction="none")
    if token_weights is not None:
        ce = ce * token_weights.reshape(-1).index_select(0, target_rows).to(ce.dtype)
    # `ce.sum()` of an empty selection is an exact 0 that is still attached to the graph through `logits`.
    return ce.sum() / normaliser


def global_target_count(
    labels: torch.Tensor | Sequence[torch.Tensor], group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Number of targets in ``labels`` (one tensor, or the list of a step's micro-batches) summed over ``group``;
    the plain local count when torch.distributed is not initialised."""
    pieces = [labels] if isinstance(labels, torch.Tensor) else list(labels)
    if not pieces:
        raise ValueError("global_target_count needs at least one labels tensor")
    count = sum((piece != IGNORE_INDEX).sum() for piece in pieces).to(torch.float32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return count


def data_parallel_normaliser(
    labels: torch.Tensor | Sequence[torch.Tensor], group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """``num_targets`` to use on each rank when the DP wrapper *averages* gradients (DDP, FSDP):
    the global target count divided by the world size. Equals the local count without torch.distributed."""
    count = global_target_count(labels, group)
    if dist.is_available() and dist.is_initialized():
        count = count / dist.get_world_size(group)
    return count


__all__ = ["IGNORE_INDEX", "data_parallel_normaliser", "global_target_count", "masked_cross_entropy"]
