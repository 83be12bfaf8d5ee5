"""Masked cross-entropy: definition, exactness under micro-batching and data parallelism, weights, guards."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from anyorder_ray.training.objective import (
    IGNORE_INDEX,
    data_parallel_normaliser,
    global_target_count,
    masked_cross_entropy,
    target_token_weights,
)

VOCAB = 11


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(seed: int, batch: int = 4, length: int = 9, target_prob: float = 0.4):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, VOCAB, generator=gen)
    ids = torch.randint(0, VOCAB, (batch, length), generator=gen)
    is_target = torch.rand(batch, length, generator=gen) < target_prob
    is_target[:, 0] = True  # every row has at least one target
    labels = torch.where(is_target, ids, torch.full_like(ids, IGNORE_INDEX))
    return logits, labels


def _reference(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Explicit per-position loop: -log softmax at the label, summed over targets, / number of targets."""
    total, count = torch.zeros(()), 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            label = int(labels[b, t])
            if label == IGNORE_INDEX:
                continue
            nll = -torch.log_softmax(logits[b, t].double(), dim=-1)[label]
            total = total + (nll if weights is None else weights[b, t].double() * nll)
            count += 1
    return (total / count).float()


def test_matches_per_position_definition_and_torch_mean() -> None:
    logits, labels = _batch(0)
    loss = masked_cross_entropy(logits, labels)
    torch.testing.assert_close(loss, _reference(logits, labels), rtol=1e-5, atol=1e-6)
    # Same as torch's own token-mean with ignore_index (the no-weights, local-count special case).
    torch_mean = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, torch_mean, rtol=1e-5, atol=1e-6)


def test_labels_at_same_position_no_shift() -> None:
    # A logit row that is one-hot on its own label gives ~0 loss only when position i is scored against label i.
    labels = torch.tensor([[3, 5, IGNORE_INDEX, 7]])
    logits = torch.full((1, 4, VOCAB), -30.0)
    for t, label in enumerate(labels[0].tolist()):
        if label != IGNORE_INDEX:
            logits[0, t, label] = 30.0
    assert masked_cross_entropy(logits, labels).item() < 1e-6


def test_non_target_positions_do_not_matter() -> None:
    logits, labels = _batch(1)
    changed = logits.clone()
    changed[labels == IGNORE_INDEX] = torch.randn_like(changed[labels == IGNORE_INDEX]) * 50
    torch.testing.assert_close(masked_cross_entropy(changed, labels), masked_cross_entropy(logits, labels))


def test_gradient_only_reaches_target_rows() -> None:
    logits, labels = _batch(2)
    logits.requires_grad_(True)
    masked_cross_entropy(logits, labels).backward()
    grad_norm_per_pos = logits.grad.abs().sum(-1)
    assert torch.all(grad_norm_per_pos[labels == IGNORE_INDEX] == 0)
    assert torch.all(grad_norm_per_pos[labels != IGNORE_INDEX] > 0)


def test_micro_batches_with_global_count_are_exact() -> None:
    """Unequal micro-batches: sum of micro losses (global normaliser) == full-batch loss, grads too;
    the naive mean of per-micro-batch means is *not* (so the test can fail)."""
    logits, labels = _batch(3, batch=6, target_prob=0.5)
    labels[4:, 1:] = IGNORE_INDEX  # make the last micro-batch much sparser than the others
    full_logits = logits.clone().requires_grad_(True)
    full = masked_cross_entropy(full_logits, labels)
    full.backward()

    pieces = [(0, 1), (1, 4), (4, 6)]
    micro_logits = logits.clone().requires_grad_(True)
    total = global_target_count([labels[a:b] for a, b in pieces])
    assert int(total) == int((labels != IGNORE_INDEX).sum())
    summed = sum(masked_cross_entropy(micro_logits[a:b], labels[a:b], num_targets=total) for a, b in pieces)
    summed.backward()
    torch.testing.assert_close(summed, full, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(micro_logits.grad, full_logits.grad, rtol=1e-6, atol=1e-8)

    mean_of_means = sum(masked_cross_entropy(logits[a:b], labels[a:b]) for a, b in pieces) / len(pieces)
    assert abs(mean_of_means.item() - full.detach().item()) > 1e-3


def test_data_parallel_scaling_matches_global_mean_gradient_single_process() -> None:
    """Simulated DDP (gradients averaged over ranks): normaliser = global count / world size is exact."""
    torch.manual_seed(0)
    weight = torch.randn(5, VOCAB, requires_grad=True)
    features = torch.randn(6, 7, 5)
    _, labels = _batch(4, batch=6, length=7)
    labels[3:, 1:] = IGNORE_INDEX  # ranks hold very different target counts

    (masked_cross_entropy(features @ weight, labels)).backward()
    reference = weight.grad.clone()
    weight.grad = None

    world = 2
    shards = [slice(0, 3), slice(3, 6)]
    normaliser = global_target_count([labels[s] for s in shards]) / world
    grads = []
    for s in shards:
        masked_cross_entropy(features[s] @ weight, labels[s], num_targets=normaliser).backward()
        grads.append(weight.grad.clone())
        weight.grad = None
    torch.testing.assert_close(sum(grads) / world, reference, rtol=1e-5, atol=1e-7)


def _dp_worker(rank: int, world: int, port: int, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        weight = torch.randn(5, VOCAB, requires_grad=True)
        features = torch.randn(6, 7, 5)
        _, labels = _batch(4, batch=6, length=7)
        labels[3:, 1:] = IGNORE_INDEX
        shard = slice(3 * rank, 3 * rank + 3)
        normaliser = data_parallel_normaliser(labels[shard])
        masked_cross_entropy(features[shard] @ weight, labels[shard], num_targets=normaliser).backward()
        dist.all_reduce(weight.grad)  # what DDP does: sum, then divide by world size
        weight.grad /= world
        count = global_target_count(labels[shard])  # a collective: every rank takes part
        if rank == 0:
            torch.save({"grad": weight.grad, "count": count}, result_path)
    finally:
        dist.destroy_process_group()


def test_data_parallel_normaliser_with_real_process_group(tmp_path) -> None:
    """Two gloo ranks: the all-reduced count is global and the averaged gradient equals the full-batch one."""
    from helpers import free_port

    result_path = str(tmp_path / "rank0.pt")
    mp.start_processes(_dp_worker, args=(2, free_port(), result_path), nprocs=2, start_method="spawn")
    result = torch.load(result_path)
    torch.manual_seed(0)
    weight = torch.randn(5, VOCAB, requires_grad=True)
    features = torch.randn(6, 7, 5)
    _, labels = _batch(4, batch=6, length=7)
    labels[3:, 1:] = IGNORE_INDEX
    masked_cross_entropy(features @ weight, labels).backward()
    assert int(result["count"]) == int((labels != IGNORE_INDEX).sum())
    torch.testing.assert_close(result["grad"], weight.grad, rtol=1e-5, atol=1e-7)


def test_token_weights_reweight_and_keep_count_normaliser() -> None:
    logits, labels = _batch(5)
    gen = torch.Generator().manual_seed(9)
    weights = torch.rand(labels.shape, generator=gen) + 0.5
    loss = masked_cross_entropy(logits, labels, token_weights=weights)
    torch.testing.assert_close(loss, _reference(logits, labels, weights), rtol=1e-5, atol=1e-6)
    # Unit weights reproduce the unweighted loss; weights on non-targets are ignored.
    ones = torch.ones_like(weights)
    ones[labels == IGNORE_INDEX] = 1e6
    torch.testing.assert_close(
        masked_cross_entropy(logits, labels, token_weights=ones), masked_cross_entropy(logits, labels)
    )


def test_token_weights_express_per_unit_normalisation() -> None:
    """Two target 'units' of 1 and 3 tokens: w = 1/len(unit), num_targets = 2 -> mean over units of token-means."""
    logits = torch.randn(1, 5, VOCAB, generator=torch.Generator().manual_seed(6))
    labels = torch.tensor([[2, IGNORE_INDEX, 4, 6, 8]])
    weights = torch.tensor([[1.0, 0.0, 1 / 3, 1 / 3, 1 / 3]])
    nll = -torch.log_softmax(logits[0], dim=-1)
    expected = (nll[0, 2] + (nll[2, 4] + nll[3, 6] + nll[4, 8]) / 3) / 2
    got = masked_cross_entropy(logits, labels, num_targets=2, token_weights=weights)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def _real_batch():
    """A collated batch of real encoded examples: mission, observations of 50 tokens, 1-token actions."""
    from helpers import expert_trajectories, world_tokenizer

    from anyorder_ray.data.encoding import collate, encode_units
    from anyorder_ray.data.masking import UnitRole

    tokenizer = world_tokenizer()
    T, V = UnitRole.TARGET, UnitRole.VISIBLE
    traj = expert_trajectories("BabyAI-GoToRedBallGrey-v0", [3])[0]
    units = traj.units[:5]  # obs act obs act obs
    roles = [[T, T, V, V, V], [V, T, T, T, V], [V, V, V, T, V]]
    examples = [encode_units(traj.mission, units, r, tokenizer, 512) for r in roles]
    return collate(examples, tokenizer.pad_token_id), roles


def test_target_token_weights_per_unit_and_per_kind() -> None:
    batch, roles = _real_batch()
    labels, unit_ids, kinds = batch["labels"], batch["unit_ids"], batch["unit_kinds"]
    is_target = labels != IGNORE_INDEX
    token = target_token_weights(labels, unit_ids, kinds)
    assert torch.equal(token, is_target.float())  # token mean: the plain count
    unit = target_token_weights(labels, unit_ids, kinds, "unit")
    # Every target unit's weights sum to 1, so the weight sum is the number of target units.
    for row, row_roles in enumerate(roles):
        for u, role in enumerate(row_roles):
            in_unit = (unit_ids[row] == u) & is_target[row]
            expected = 1.0 if role.value == "target" else 0.0
            assert float(unit[row][in_unit].sum()) == pytest.approx(expected)
    assert float(unit.sum()) == pytest.approx(sum(role.value == "target" for r in roles for role in r))
    weighted = target_token_weights(labels, unit_ids, kinds, "unit", obs_weight=0.5, act_weight=4.0)
    act = is_target & (kinds == 1)
    obs = is_target & (kinds == 0)
    torch.testing.assert_close(weighted[act], 4.0 * unit[act])
    torch.testing.assert_close(weighted[obs], 0.5 * unit[obs])
    assert float(weighted[~is_target].abs().sum()) == 0.0
    with pytest.raises(ValueError, match="loss_norm"):
        target_token_weights(labels, unit_ids, kinds, "sequence")


def test_weighted_normaliser_is_exact_over_micro_batches() -> None:
    """Per-unit weights, split into micro-batches with the step's weight sum: the same loss and gradient as
    the whole batch, and equal to the mean over target units of each unit's token-mean loss."""
    batch, _ = _real_batch()
    labels, unit_ids, kinds = batch["labels"], batch["unit_ids"], batch["unit_kinds"]
    logits = torch.randn(*labels.shape, 40, generator=torch.Generator().manual_seed(2))
    labels = torch.where(labels == IGNORE_INDEX, labels, labels % 40)
    weights = target_token_weights(labels, unit_ids, kinds, "unit")
    full_logits = logits.clone().requires_grad_(True)
    full = masked_cross_entropy(full_logits, labels, num_targets=weights.sum(), token_weights=weights)
    full.backward()
    nll = -torch.log_softmax(logits, dim=-1)
    per_unit = []
    for row in range(labels.shape[0]):
        for u in unit_ids[row].unique().tolist():
            sel = (unit_ids[row] == u) & (labels[row] != IGNORE_INDEX)
            if u >= 0 and sel.any():
                per_unit.append(nll[row][sel].gather(-1, labels[row][sel][:, None]).mean())
    torch.testing.assert_close(full.detach(), torch.stack(per_unit).mean(), rtol=1e-5, atol=1e-6)
    pieces = [slice(0, 1), slice(1, 3)]
    micro_w = [target_token_weights(labels[s], unit_ids[s], kinds[s], "unit") for s in pieces]
    normaliser = data_parallel_normaliser([labels[s] for s in pieces], weights=micro_w)
    micro_logits = logits.clone().requires_grad_(True)
    summed = sum(
        masked_cross_entropy(micro_logits[s], labels[s], num_targets=normaliser, token_weights=w)
        for s, w in zip(pieces, micro_w, strict=True)
    )
    summed.backward()
    torch.testing.assert_close(summed, full, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(micro_logits.grad, full_logits.grad, rtol=1e-6, atol=1e-8)


def test_zero_targets_is_a_clear_error() -> None:
    logits, labels = _batch(7)
    empty = torch.full_like(labels, IGNORE_INDEX)
    with pytest.raises(ValueError, match="no target"):
        masked_cross_entropy(logits, empty)
    with pytest.raises(ValueError, match="must be > 0"):
        masked_cross_entropy(logits, labels, num_targets=0)


def test_empty_micro_batch_with_global_count_is_exact_zero_with_graph() -> None:
    logits, labels = _batch(8)
    logits.requires_grad_(True)
    empty = torch.full_like(labels, IGNORE_INDEX)
    loss = masked_cross_entropy(logits, empty, num_targets=5)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_shape_errors() -> None:
    logits, labels = _batch(10)
    with pytest.raises(ValueError, match="disagree"):
        masked_cross_entropy(logits[:, :-1], labels)
    with pytest.raises(ValueError, match="token_weights"):
        masked_cross_entropy(logits, labels, token_weights=torch.ones(3))
    with pytest.raises(ValueError, match="at least one"):
        global_target_count([])
