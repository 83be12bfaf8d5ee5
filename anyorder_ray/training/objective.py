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

``token_weights`` (same shape as ``labels``) reweights individual targets; ``target_token_weights`` builds the
per-unit and per-kind ones (``w = kind_weight / tokens_in_unit`` for a per-unit mean). The weighted loss is a
weighted *mean*: pass ``num_targets = sum of the step's weights`` (``data_parallel_normaliser(labels, weights=...)``
does it across micro-batches and ranks, exactly as for counts). Weights at non-target positions are ignored.
Without ``num_targets`` the normaliser stays the local *target count*, not the sum of weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from anyorder_ray.data.encoding import IGNORE_INDEX, KIND_IDS


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


def target_token_weights(
    labels: torch.Tensor,
    unit_ids: torch.Tensor,
    unit_kinds: torch.Tensor,
    loss_norm: str = "token",
    obs_weight: float = 1.0,
    act_weight: float = 1.0,
) -> torch.Tensor:
    """Per-position loss weights of a collated batch (0 at non-targets).

    ``loss_norm="token"``: every target token weighs its kind's weight. ``"unit"``: a target unit's tokens share
    its kind's weight equally (``weight / tokens_in_unit``), so with a weighted-mean normaliser every unit counts
    once whatever its length. ``unit_ids`` / ``unit_kinds`` are ``collate``'s (unit index per row, 0 obs / 1 act).
    """
    if loss_norm not in ("token", "unit"):
        raise ValueError(f"loss_norm must be 'token' or 'unit', got {loss_norm!r}")
    if not labels.shape == unit_ids.shape == unit_kinds.shape:
        raise ValueError(f"labels {list(labels.shape)}, unit_ids and unit_kinds must have one shape")
    is_target = labels != IGNORE_INDEX
    if bool((is_target & (unit_ids < 0)).any()):
        raise ValueError("a target position has no unit (unit_ids == -1): targets must be whole units")
    weights = torch.where(unit_kinds == KIND_IDS["act"], float(act_weight), float(obs_weight))
    weights = weights.to(torch.float32) * is_target
    if loss_norm == "unit":
        units_per_row = int(unit_ids.max().clamp(min=0)) + 1
        rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(-1).expand_as(unit_ids)
        key = rows * units_per_row + unit_ids.clamp(min=0)
        tokens_in_unit = torch.bincount(key[is_target], minlength=labels.shape[0] * units_per_row)
        weights = weights / tokens_in_unit[key].clamp(min=1)
    return weights


def global_target_count(
    labels: torch.Tensor | Sequence[torch.Tensor],
    group: dist.ProcessGroup | None = None,
    weights: torch.Tensor | Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Number of targets in ``labels`` (one tensor, or the list of a step's micro-batches) summed over ``group``;
    the plain local count when torch.distributed is not initialised. With ``weights`` (same structure as
    ``labels``) it is the sum of the targets' weights instead."""
    pieces = [labels] if isinstance(labels, torch.Tensor) else list(labels)
    if not pieces:
        raise ValueError("global_target_count needs at least one labels tensor")
    if weights is None:
        count = sum((piece != IGNORE_INDEX).sum() for piece in pieces).to(torch.float32)
    else:
        w_pieces = [weights] if isinstance(weights, torch.Tensor) else list(weights)
        if len(w_pieces) != len(pieces):
            raise ValueError(f"got {len(w_pieces)} weight tensors for {len(pieces)} labels tensors")
        count = sum(
            (w.to(torch.float32) * (piece != IGNORE_INDEX)).sum() for piece, w in zip(pieces, w_pieces, strict=True)
        ).to(torch.float32)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend(group) == "nccl" and count.device.type != "cuda":
            count = count.to(torch.device("cuda", torch.cuda.current_device()))  # NCCL reduces CUDA tensors only
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return count


def data_parallel_normaliser(
    labels: torch.Tensor | Sequence[torch.Tensor],
    group: dist.ProcessGroup | None = None,
    weights: torch.Tensor | Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``num_targets`` to use on each rank when the DP wrapper *averages* gradients (DDP, FSDP):
    the global target count (or weight sum) divided by the world size. Equals the local count without
    torch.distributed."""
    count = global_target_count(labels, group, weights)
    if dist.is_available() and dist.is_initialized():
        count = count / dist.get_world_size(group)
    return count


__all__ = [
    "IGNORE_INDEX",
    "data_parallel_normaliser",
    "global_target_count",
    "masked_cross_entropy",
    "target_token_weights",
]
