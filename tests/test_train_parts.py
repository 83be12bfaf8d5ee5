"""The training loop's parts without Ray: LR schedule, fresh masks, exact gradient accumulation, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import babyai, expert_trajectories

from anyorder_ray.config import DataConfig, MaskingConfig, ModelConfig, TrainConfig
from anyorder_ray.data.batching import BatchMaker
from anyorder_ray.data.encoding import UnitEncoder
from anyorder_ray.models.factory import build_model, build_tokenizer
from anyorder_ray.training.budget import StepBudget
from anyorder_ray.training.checkpoint import (
    RankState,
    RngState,
    TrainingState,
    is_complete_checkpoint,
    load_training_state,
    load_weights_into,
    save_checkpoint,
)
from anyorder_ray.training.optim import lr_factor, lr_schedule, make_optimizer
from anyorder_ray.training.recipe import train_step

SMALL = {"hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}  # fmt: skip


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    tokenizer = build_tokenizer(ModelConfig(), babyai())
    trajectories = expert_trajectories("GoToRedBallGrey", range(16))
    return tokenizer, trajectories


def test_lr_schedule_warms_up_then_decays_to_zero():
    assert lr_factor(0, 10, 100, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 10, 100, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(55, 10, 100, "linear") == pytest.approx(0.5)
    assert lr_factor(99, 10, 100, "constant") == 1.0
    with pytest.raises(ValueError, match="lr_decay_style"):
        lr_factor(50, 10, 100, "step")


def test_every_draw_gets_a_fresh_mask(world):
    tokenizer, trajectories = world
    maker = BatchMaker(DataConfig(window_steps=3), MaskingConfig("any_order", 0.5), UnitEncoder(tokenizer),
                       tokenizer.pad_token_id, seed=0)  # fmt: skip
    traj = max(trajectories, key=lambda t: len(t.units))
    masks = {tuple(maker.example(traj).labels) for _ in range(30)}
    assert len(masks) > 5  # the same trajectory is masked differently on every draw


def test_batch_maker_is_reproducible_for_a_seed(world):
    tokenizer, trajectories = world

    def draw(seed):
        m = BatchMaker(DataConfig(), MaskingConfig("causal"), UnitEncoder(tokenizer), tokenizer.pad_token_id, seed)
        return [m.example(t).input_ids for t in trajectories]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_prefix_mode_always_finds_a_target_in_short_crops(world):
    tokenizer, trajectories = world
    maker = BatchMaker(DataConfig(window_steps=1), MaskingConfig("prefix"), UnitEncoder(tokenizer),
                       tokenizer.pad_token_id, seed=0)  # fmt: skip
    for t in trajectories * 5:
        assert maker.example(t).num_targets > 0


def _model(tokenizer, seed=0):
    return build_model(ModelConfig(overrides=SMALL), tokenizer, seed=seed)


def test_gradient_accumulation_equals_one_big_batch(world):
    tokenizer, trajectories = world
    maker = BatchMaker(DataConfig(), MaskingConfig("any_order", 0.5), UnitEncoder(tokenizer),
                       tokenizer.pad_token_id, seed=0)  # fmt: skip
    examples = [maker.example(t) for t in trajectories[:8]]
    from anyorder_ray.data.encoding import collate

    whole = [collate(examples, tokenizer.pad_token_id)]
    split = [collate(examples[:3], tokenizer.pad_token_id), collate(examples[3:], tokenizer.pad_token_id)]
    grads = []
    for batches in (whole, split):
        model = _model(tokenizer)
        opt, sched = make_optimizer(model, TrainConfig(lr=1e-3, max_steps=10))
        # Capture gradients just before the optimizer step by clipping at a huge norm.
        stats = train_step(model, opt, sched, batches, max_grad_norm=1e9, device=torch.device("cpu"))
        grads.append((stats, [p.detach().clone() for p in model.parameters()]))
    (s1, p1), (s2, p2) = grads
    assert s1.loss == pytest.approx(s2.loss, rel=1e-5)
    assert s1.target_tokens == s2.target_tokens
    for a, b in zip(p1, p2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_weighted_loss_with_accumulation_equals_one_big_batch_and_differs_from_token_mean(world):
    """Per-unit normalisation with action weight: exact under micro-batching, and a different objective."""
    tokenizer, trajectories = world
    from anyorder_ray.data.encoding import collate

    weighting = MaskingConfig("any_order", 0.5, loss_norm="unit", act_weight=4.0)
    maker = BatchMaker(DataConfig(), weighting, UnitEncoder(tokenizer), tokenizer.pad_token_id, seed=0)
    examples = [maker.example(t) for t in trajectories[:8]]
    whole = [collate(examples, tokenizer.pad_token_id)]
    split = [collate(examples[:5], tokenizer.pad_token_id), collate(examples[5:], tokenizer.pad_token_id)]
    results = []
    for batches, how in ((whole, weighting), (split, weighting), (whole, None)):
        model = _model(tokenizer)
        opt, sched = make_optimizer(model, TrainConfig(lr=1e-3, max_steps=10))
        stats = train_step(model, opt, sched, batches, 1e9, torch.device("cpu"), weighting=how)
        results.append((stats.loss, [p.detach().clone() for p in model.parameters()]))
    (l1, p1), (l2, p2), (l3, _) = results
    assert l1 == pytest.approx(l2, rel=1e-5)
    for a, b in zip(p1, p2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert abs(l1 - l3) > 1e-3  # the weighting really changes the objective


def test_time_budget_fixes_the_step_count_and_lr_horizon(world, monkeypatch):
    """A fake clock at 0.1 s/step and a 10 s budget: 100 steps, the cosine horizon moved there, and the plan
    carried by the scheduler's state dict."""
    import anyorder_ray.training.budget as budget_module

    tokenizer, _ = world
    clock = [0.0]
    monkeypatch.setattr(budget_module.time, "perf_counter", lambda: clock[0])
    opt, sched = make_optimizer(_model(tokenizer), TrainConfig(max_steps=100_000, lr_warmup_ratio=0.1))
    budget = StepBudget(100_000, 10.0, lr_schedule(sched))
    budget.start()
    step = 0
    while step < budget.total:
        clock[0] += 0.1
        step += 1
        budget.after_step(step)
    assert step == budget.total == 100
    schedule = lr_schedule(sched)
    assert schedule.warmup == 10 and schedule.budget_fixes == 2
    assert schedule.elapsed_s == pytest.approx(10.0)
    restored_opt, restored = make_optimizer(_model(tokenizer), TrainConfig(max_steps=100_000))
    restored.load_state_dict(sched.state_dict())
    assert lr_schedule(restored).total == 100 and lr_schedule(restored).budget_fixes == 2
    # Without a budget the plan is max_steps and nothing moves.
    plain = StepBudget(50, None, lr_schedule(make_optimizer(_model(tokenizer), TrainConfig(max_steps=50))[1]))
    plain.start()
    plain.after_step(30)
    assert plain.total == 50


def test_training_reduces_the_loss(world):
    tokenizer, trajectories = world
    maker = BatchMaker(DataConfig(), MaskingConfig("causal"), UnitEncoder(tokenizer), tokenizer.pad_token_id, 0)
    batch = [maker.micro_batch(trajectories[:8])]
    model = _model(tokenizer)
    opt, sched = make_optimizer(
        model, TrainConfig(lr=3e-3, lr_warmup_ratio=0.0, max_steps=200, lr_decay_style="constant")
    )
    first = train_step(model, opt, sched, batch, 1.0, torch.device("cpu")).loss
    for _ in range(40):
        last = train_step(model, opt, sched, batch, 1.0, torch.device("cpu")).loss
    assert last < 0.5 * first


def test_checkpoint_round_trip_restores_weights_optimizer_schedule_and_rng(world, tmp_path):
    tokenizer, trajectories = world
    maker = BatchMaker(DataConfig(), MaskingConfig("causal"), UnitEncoder(tokenizer), tokenizer.pad_token_id, 0)
    model = _model(tokenizer)
    opt, sched = make_optimizer(model, TrainConfig(max_steps=50))
    for _ in range(3):
        train_step(model, opt, sched, [maker.micro_batch(trajectories[:4])], 1.0, torch.device("cpu"))
    gens = maker.generators()
    pending = ((maker.example(trajectories[1]),),)
    state = TrainingState(
        3, opt.state_dict(), sched.state_dict(), (RankState(RngState.capture(gens), pending, 16, 99),)
    )
    path = save_checkpoint(tmp_path / "ckpt", model, tokenizer, state)
    assert is_complete_checkpoint(path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    expected_next = maker.example(trajectories[0]).input_ids

    fresh = _model(tokenizer, seed=123)
    load_weights_into(fresh, path)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    restored = load_training_state(path)
    opt2, sched2 = make_optimizer(fresh, TrainConfig(max_steps=50))
    opt2.load_state_dict(restored.optimizer)
    sched2.load_state_dict(restored.scheduler)
    assert restored.step == 3 and sched2.last_epoch == sched.last_epoch
    mine = restored.rank(0)
    assert (mine.view_size, mine.tokens) == (16, 99) and mine.pending == pending
    assert restored.rank(1) is None  # a rank the checkpoint does not know starts fresh
    assert sched2.get_last_lr() == sched.get_last_lr()
    maker2 = BatchMaker(DataConfig(), MaskingConfig("causal"), UnitEncoder(tokenizer), tokenizer.pad_token_id, 99)
    mine.rng.restore(maker2.generators())
    assert maker2.example(trajectories[0]).input_ids == expected_next
    state_a = opt.state_dict()["state"]
    state_b = opt2.state_dict()["state"]
    for k in state_a:
        torch.testing.assert_close(state_a[k]["exp_avg"], state_b[k]["exp_avg"])


def test_incomplete_checkpoint_is_not_loadable(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    assert not is_complete_checkpoint(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_training_state(tmp_path / "half")


def test_no_decay_on_norms_and_biases(world):
    tokenizer, _ = world
    model = _model(tokenizer)
    opt, _ = make_optimizer(model, TrainConfig(weight_decay=0.1))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim >= 2 and "norm" not in name), name
    assert math.isclose(opt.param_groups[1]["weight_decay"], 0.0)


def test_fused_adamw_on_cpu_matches_the_foreach_update(world):
    """make_optimizer uses torch's fused AdamW for plain CPU parameters; its update is AdamW's, to float rounding."""
    tokenizer, _ = world
    fused_model, foreach_model = _model(tokenizer), _model(tokenizer)
    foreach_model.load_state_dict(fused_model.state_dict())
    start = {k: v.clone() for k, v in fused_model.state_dict().items()}
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1, max_steps=10, lr_warmup_ratio=0.0)
    fused, _ = make_optimizer(fused_model, cfg)
    assert all(group["fused"] for group in fused.param_groups)
    foreach, _ = make_optimizer(foreach_model, cfg)
    for group in foreach.param_groups:
        group["fused"], group["foreach"] = None, True
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for model, opt in ((fused_model, fused), (foreach_model, foreach)):
            model(input_ids=ids).logits.float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    moved = 0.0
    for (name, a), b in zip(fused_model.named_parameters(), foreach_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
        moved = max(moved, float((a - start[name]).abs().max()))
    assert moved > 1e-3  # the three steps changed the weights: the comparison is not of two untouched models
