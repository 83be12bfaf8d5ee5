"""The training recipe in this process (``LocalSession``, ``LocalSource``): setup, train, checkpoints, exact resume."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from helpers import expert_trajectories

from anyorder_ray.config import config_from_dict
from anyorder_ray.data.batching import LocalSource
from anyorder_ray.training.checkpoint import load_training_state
from anyorder_ray.training.recipe import LocalSession, TrainingRecipe

SMALL = {"hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}  # fmt: skip


def _cfg(**train):
    return config_from_dict({
        "data": {"num_demos": 24, "min_buffer_size": 24, "window_steps": 2, "bucket_pool_batches": 3},
        "model": {"overrides": SMALL},
        "masking": {"mode": "cut_focus", "mask_prob": 0.3, "loss_norm": "unit"},
        "train": {"global_batch_size": 8, "micro_batch_size": 4, "max_steps": 10, "report_every": 2,
                  "checkpoint_every": 4, "torch_threads": 1, **train},
        "eval": {"enabled": False},
    })  # fmt: skip


@pytest.fixture(scope="module")
def demos():
    return expert_trajectories("GoToRedBallGrey", range(24))


def _run(cfg, demos, session, source=None):
    recipe = TrainingRecipe(cfg, session, source if source is not None else LocalSource(demos))
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    return session.reports


def test_the_recipe_trains_reports_and_checkpoints(demos, tmp_path):
    threads = torch.get_num_threads()
    session = LocalSession(checkpoint_root=tmp_path)
    reports = _run(_cfg(), demos, session)
    torch.set_num_threads(threads)
    assert [r["train/step"] for r in reports] == [2, 4, 6, 8, 10]
    assert reports[-1]["eval/final"] == 1 and reports[-1]["train/planned_steps"] == 10
    assert reports[-1]["train/loss"] < reports[0]["train/loss"]
    assert [p.name for p in session.checkpoints] == ["checkpoint_000004", "checkpoint_000008", "checkpoint_000010"]
    state = load_training_state(session.checkpoints[0])
    assert state.step == 4 and len(state.ranks) == 1 and state.ranks[0].view_size == 24
    assert state.ranks[0].tokens == sum(r["train/total_tokens"] for r in reports[1:2])
    # 4 steps x 2 micro-batches drew 8 of the pool's 3-batch refills: 1 pre-bucketed micro-batch left pending.
    assert len(state.ranks[0].pending) == 1 and len(state.ranks[0].pending[0]) == 4


def test_a_resumed_recipe_reports_what_the_uninterrupted_one_did(demos, tmp_path):
    threads = torch.get_num_threads()
    whole = LocalSession(checkpoint_root=tmp_path / "whole")
    reference = _run(_cfg(), demos, whole)
    resumed = LocalSession(resume_from=whole.checkpoints[0])  # from step 4
    again = _run(_cfg(), demos, resumed)
    torch.set_num_threads(threads)
    assert [r["train/step"] for r in again] == [6, 8, 10]
    for a, b in zip(again, reference[2:], strict=True):
        assert a["train/loss"] == b["train/loss"]  # bit-identical: weights, optimizer, RNG and pending batches
        assert a["train/total_tokens"] == b["train/total_tokens"]


def test_the_source_is_seeded_by_the_recipe(demos):
    source = LocalSource(demos, np.random.default_rng(123))
    recipe = TrainingRecipe(_cfg(max_steps=1), LocalSession(), source)
    recipe.setup()
    assert source.rng.bit_generator.state == np.random.default_rng([0, 0]).bit_generator.state  # seed 0, rank 0
    recipe.cleanup()


def test_a_compute_budget_plans_its_steps_from_the_data_alone_and_spends_about_that_much(demos):
    threads = torch.get_num_threads()
    fixed = _run(_cfg(max_steps=7, checkpoint_every=0), demos, LocalSession())
    per_step = fixed[-1]["train/total_flops"] / 7
    budget = 6.5 * per_step
    runs = [_run(_cfg(max_steps=1000, flop_budget=budget, checkpoint_every=0), demos, LocalSession()) for _ in "ab"]
    torch.set_num_threads(threads)
    a, b = runs
    assert a[-1]["train/planned_steps"] == b[-1]["train/planned_steps"] == a[-1]["train/step"]  # deterministic
    assert 6 <= a[-1]["train/step"] <= 8  # the probe's estimate of a step's cost is close to the real one
    assert [r["train/loss"] for r in a] == [r["train/loss"] for r in b]
    used = a[-1]["train/total_flops"]
    assert 0.85 * budget < used < 1.25 * budget
    # The probe draws with its own streams and the plan sets the LR horizon before step 0: a 7-step plan trains
    # exactly what a plain 7-step run trains.
    assert a[-1]["train/step"] != 7 or [r["train/loss"] for r in a] == [r["train/loss"] for r in fixed]


def test_a_token_budget_and_a_resumed_plan(demos, tmp_path):
    threads = torch.get_num_threads()
    session = LocalSession(checkpoint_root=tmp_path)
    whole = _run(_cfg(max_steps=1000, token_budget=6000, checkpoint_every=2), demos, session)
    planned = whole[-1]["train/planned_steps"]
    again = _run(_cfg(max_steps=1000, token_budget=6000, checkpoint_every=2), demos,
                 LocalSession(resume_from=session.checkpoints[0]))  # fmt: skip
    torch.set_num_threads(threads)
    assert 2 < planned < 1000 and whole[-1]["train/step"] == planned
    assert 0.8 * 6000 < whole[-1]["train/total_tokens"] < 1.25 * 6000  # a 16-step probe's estimate of ~7 steps
    assert again[-1]["train/planned_steps"] == planned  # the plan travels in the checkpoint, it is not redone
    assert [r["train/loss"] for r in again] == [r["train/loss"] for r in whole[1:]]


def test_budgets_are_exclusive_and_labelled():
    from anyorder_ray.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="at most one of flop_budget, token_budget, time_budget_s"):
        TrainConfig(flop_budget=1e12, time_budget_s=60)
    assert TrainConfig(flop_budget=2e14).compute_budget() == ("flops", 2e14)
    assert TrainConfig(token_budget=5_000_000).budget_label() == "5e+06 tokens"
    assert TrainConfig(max_steps=600).budget_label() == "600 steps" and TrainConfig().compute_budget() is None


class _ShorteningSource(LocalSource):
    """The demos until the recipe's second refresh (step 20), then only their first transition (obs, act, obs): the
    data of a dagger run gets cheaper per step once short on-policy segments come in (here about half the cost)."""

    def __init__(self, trajectories):
        super().__init__(trajectories)
        self.short = [dataclasses.replace(t, units=t.units[:3]) for t in trajectories]
        self.refreshes = 0

    def refresh(self, limit=None):
        self.refreshes += 1
        if self.refreshes == 2:
            self.view.update([(self.short, 0, len(self.short))])
        return super().refresh(limit)


def test_a_dagger_run_plans_its_budget_again_as_its_steps_get_cheaper_and_spends_it(demos, capsys):
    threads = torch.get_num_threads()
    cfg = _cfg(max_steps=7, checkpoint_every=0)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, window_steps=4))  # demo windows > 1 step
    per_step = _run(cfg, demos, LocalSession())[-1]["train/total_flops"] / 7
    budget = 30 * per_step
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=1000, flop_budget=budget),
                              data=dataclasses.replace(cfg.data, regime="dagger", buffer_capacity=100),
                              rollout=dataclasses.replace(cfg.rollout, weights_every_steps=4))  # fmt: skip
    capsys.readouterr()
    reports = _run(cfg, demos=None, session=LocalSession(), source=_ShorteningSource(demos))
    torch.set_num_threads(threads)
    out = capsys.readouterr().out
    first_plan = int(re.search(r"\[train\] budget \S+ FLOPs: (\d+) steps", out).group(1))
    assert 20 < first_plan < 45  # the probe's plan, on the demos
    final = reports[-1]
    # From step 24 on, the plan counts the cheaper steps since step 20: the run trains more of them and spends its
    # budget (to within a step), where the probe's plan would have stopped near step first_plan with most of it unspent.
    assert final["train/step"] == final["train/planned_steps"] > first_plan + 4
    assert budget <= final["train/total_flops"] < budget + per_step
    assert "planned again at step 24" in out


def test_a_plan_made_again_spends_what_is_left_and_keeps_the_warmup():
    from anyorder_ray.training.budget import replan_compute_steps
    from anyorder_ray.training.optim import LRSchedule

    assert replan_compute_steps(step=50, spent=40.0, amount=100.0, recent_cost=0.5, max_steps=1000) == 170
    assert replan_compute_steps(step=50, spent=40.0, amount=100.0, recent_cost=0.7, max_steps=1000) == 136  # rounded up
    assert replan_compute_steps(step=50, spent=120.0, amount=100.0, recent_cost=1.0, max_steps=1000) == 50  # stop now
    assert replan_compute_steps(step=50, spent=40.0, amount=100.0, recent_cost=0.01, max_steps=400) == 400
    with pytest.raises(ValueError, match="positive"):
        replan_compute_steps(step=50, spent=40.0, amount=100.0, recent_cost=0.0, max_steps=1000)
    schedule = LRSchedule(0.1, 100, "cosine")
    schedule.extend(400)
    assert (schedule.warmup, schedule.total) == (10, 400) and schedule(10) == 1.0


def test_the_probe_draws_whole_length_bucketed_pools():
    from anyorder_ray.training.budget import PROBE_STEPS, probe_steps

    for pool, accum in [(32, 1), (32, 4), (3, 2), (1, 1), (5, 3), (64, 1)]:
        steps = probe_steps(pool, accum)
        assert steps >= PROBE_STEPS and (steps * accum) % pool == 0, (pool, accum)
        assert not any((fewer * accum) % pool == 0 for fewer in range(PROBE_STEPS, steps)), (pool, accum)  # fewest
    assert probe_steps(32, 1) == 32 and probe_steps(32, 4) == 16 and probe_steps(3, 2) == 18
    with pytest.raises(ValueError):
        probe_steps(0, 1)


@pytest.mark.slow
def test_a_regionally_compiled_recipe_trains_as_the_eager_one_and_writes_the_same_checkpoint(demos, tmp_path):
    """``model.compile: regional`` compiles the layers' attention, norms and SwiGLUs (the MoE dispatch stays eager):
    the same steps and losses as eager up to float rounding, and checkpoints with the eager parameter names."""
    from safetensors import safe_open

    threads = torch.get_num_threads()
    eager = LocalSession(checkpoint_root=tmp_path / "eager")
    reference = _run(_cfg(), demos, eager)
    cfg = _cfg()
    cfg = cfg.replace(model=dataclasses.replace(cfg.model, compile="regional"))
    session = LocalSession(checkpoint_root=tmp_path / "regional")
    recipe = TrainingRecipe(cfg, session, LocalSource(demos))
    recipe.setup()
    layer = recipe.model.model.layers[1]
    assert layer.attention._compiled_call_impl is not None and layer.mlp.experts[0]._compiled_call_impl is not None
    assert layer.mlp._compiled_call_impl is None  # the MoE block itself (routing, dispatch) stays eager
    recipe.train()
    recipe.cleanup()
    torch.set_num_threads(threads)
    got = session.reports
    assert [r["train/step"] for r in got] == [r["train/step"] for r in reference]
    for a, b in zip(got, reference, strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4)
        assert a["train/total_tokens"] == b["train/total_tokens"]

    def names(checkpoint):
        (weights,) = checkpoint.glob("*.safetensors")
        with safe_open(str(weights), "pt") as f:
            return set(f.keys())

    assert names(session.checkpoints[-1]) == names(eager.checkpoints[-1])
