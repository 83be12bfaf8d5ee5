"""Early-experience branches in training (issue 13): the masking rule on real branches through the trainer's batch
maker, the draw share, the iwm arm's stages in the training recipe (switch step, exact resume across it, the FLOP plan
of two stages), and on a real local Ray a restarted rollout actor and buffer, and a short iwm trial end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import babyai, expert_trajectories, fit_one_worker, held_trajectories, world_tokenizer

from anyorder_ray.config import DataConfig, MaskingConfig, config_from_dict
from anyorder_ray.data.batching import BatchMaker, LocalSource, TrajectoryView
from anyorder_ray.data.encoding import IGNORE_INDEX, UnitEncoder, crop_window
from anyorder_ray.data.masking import BLOCK_MODES, BRANCH_MODES, UnitRole, unlabelled_units
from anyorder_ray.training.recipe import LocalSession, TrainingRecipe
from envs import make_world
from envs.branches import branch_trajectories

LEVEL = "BabyAI-GoToLocal-v0"
ENV = babyai(LEVEL, obs_encoding="compact")
SMALL = {"hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}  # fmt: skip


def _branches(demos, k: int = 2, history_steps: int = 1, worker: int = 0) -> list:
    """The branches a rollout actor makes of ``demos`` (``RolloutWorker._branch``: one generator per demo)."""
    world = make_world(ENV, expert=False)
    out = []
    for demo in demos:
        out += branch_trajectories(world, demo, k, np.random.default_rng([worker, demo.seed]), history_steps)
    return out


@pytest.fixture(scope="module")
def data():
    demos = expert_trajectories(LEVEL, range(16), obs_encoding="compact")
    return demos, _branches(demos)


# -- the masking rule on real branches -----------------------------------------------------------------------------


SETTINGS = [(mode, "sequence", stage) for mode in BRANCH_MODES for stage in
            (("world_model", "mixture") if mode == "iwm" else ("world_model",))]  # fmt: skip
SETTINGS += [(mode, "block", stage) for mode, _, stage in SETTINGS if mode in BLOCK_MODES]


@pytest.mark.parametrize(("mode", "layout", "stage"), SETTINGS)
def test_the_batch_maker_never_targets_a_branch_alternative(data, mode, layout, stage):
    """Every mode that trains on branches, in both layouts: over every branch of 16 real GoToLocal demos (~160), the
    alternative action's tokens are never labels; world-model targets on the branch's last observation do occur."""
    demos, branches = data
    masking = MaskingConfig(mode, 0.5, layout=layout, branches=0.5)
    maker = BatchMaker(DataConfig(window_steps=2), masking, UnitEncoder(world_tokenizer(ENV)), 0, seed=0)
    maker.set_stage(stage if mode == "iwm" else None)
    last_obs_targets = 0
    for branch in branches:
        assert crop_window(branch, 2, np.random.default_rng(0)) is branch  # history = window - 1: never cropped
        (alt,) = unlabelled_units(branch.labelled_actions)
        ex = maker.example(branch)
        assert ex.roles[alt] is not UnitRole.TARGET
        labels = [label for label, unit in zip(ex.labels, ex.unit_ids, strict=True) if unit == alt]
        assert all(label == IGNORE_INDEX for label in labels)  # in the input (or dropped), never a label
        if ex.roles[alt + 1] is UnitRole.TARGET:
            last_obs_targets += 1
            assert labels  # the world-model query: the alternative is in the input, as context
    assert last_obs_targets == len(branches) if mode == "iwm" else last_obs_targets > 20


def test_the_view_draws_branches_with_the_arms_share_and_counts_the_demos(data):
    demos, branches = data
    source = LocalSource([*demos, *branches], np.random.default_rng(0))
    assert (source.view.demos, source.size) == (len(demos), len(demos) + len(branches))
    assert source.wait_until(len(demos)) == source.size
    with pytest.raises(RuntimeError, match="expert demos"):
        source.wait_until(len(demos) + 1)
    assert not any(t.provenance.source == "branch" for t in source.sample(500))  # share 0: the demos alone
    drawn = source.sample(4000, branch_share=0.3)
    share = sum(t.provenance.source == "branch" for t in drawn) / len(drawn)
    assert abs(share - 0.3) < 5 * math.sqrt(0.3 * 0.7 / len(drawn))
    assert all(t.provenance.source == "branch" for t in source.sample(50, branch_share=1.0))
    empty = TrajectoryView(np.random.default_rng(0))
    empty.update([(demos, 0, len(demos))])
    with pytest.raises(RuntimeError, match="no branch in view"):
        empty.sample(10, branch_share=0.5)
    maker = BatchMaker(DataConfig(), MaskingConfig("iwm", branches=0.4), UnitEncoder(world_tokenizer(ENV)), 0, 0)
    maker.set_stage("world_model")
    assert maker.branch_share() == 0.4
    maker.set_stage("imitation")
    assert maker.branch_share() == 0.0  # imitation: the demos alone


# -- the iwm arm in the training recipe ----------------------------------------------------------------------------


def _iwm_cfg(**train):
    return config_from_dict({
        "env": {"level": LEVEL, "obs_encoding": "compact"},
        "data": {"num_demos": 16, "window_steps": 2, "bucket_pool_batches": 3, "branches_per_state": 2},
        "model": {"overrides": SMALL},
        "masking": {"mode": "iwm", "branches": 0.5, "iwm_world_model_fraction": 0.5},
        "train": {"global_batch_size": 8, "micro_batch_size": 4, "max_steps": 8, "report_every": 1,
                  "checkpoint_every": 2, "torch_threads": 1, **train},
        "eval": {"enabled": False},
    })  # fmt: skip


def _run(cfg, data, session):
    demos, branches = data
    threads = torch.get_num_threads()
    recipe = TrainingRecipe(cfg, session, LocalSource([*demos, *branches]))
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    torch.set_num_threads(threads)
    return session.reports


def test_two_stage_iwm_switches_at_its_planned_step_and_resumes_exactly_across_it(data, tmp_path):
    whole = LocalSession(checkpoint_root=tmp_path)
    reference = _run(_iwm_cfg(), data, whole)
    assert [r["train/iwm_world_model"] for r in reference] == [1.0] * 4 + [0.0] * 4  # round(0.5 x 8) = 4
    assert all(math.isfinite(r["train/loss"]) for r in reference)
    # From step 2 (inside the world-model stage) and from step 4 (its pending examples are world-model ones, which
    # the switch drops): the same losses as the run that never stopped.
    for checkpoint, first in ((whole.checkpoints[0], 2), (whole.checkpoints[1], 4)):
        again = _run(_iwm_cfg(), data, LocalSession(resume_from=checkpoint))
        assert [r["train/loss"] for r in again] == [r["train/loss"] for r in reference[first:]]
        assert [r["train/iwm_world_model"] for r in again] == [r["train/iwm_world_model"] for r in reference[first:]]


def test_a_flop_budget_plans_both_stages_and_spends_about_that_much(data):
    fixed = _run(_iwm_cfg(max_steps=8, checkpoint_every=0), data, LocalSession())
    flops = [r["train/total_flops"] for r in fixed]
    world_model, imitation = flops[3] / 4, (flops[7] - flops[3]) / 4  # measured per-step cost of each stage
    assert world_model > 1.05 * imitation  # the stages train different targets: a one-stage probe would misplan
    budget = 7.0 * (world_model + imitation) / 2
    planned = _run(_iwm_cfg(max_steps=1000, flop_budget=budget, checkpoint_every=0), data, LocalSession())
    steps = planned[-1]["train/planned_steps"]
    assert planned[-1]["train/step"] == steps and 6 <= steps <= 8
    switch = MaskingConfig("iwm", branches=0.5).iwm_switch_step(steps)
    assert sum(r["train/iwm_world_model"] for r in planned) == switch
    assert 0.85 * budget < planned[-1]["train/total_flops"] < 1.2 * budget


# -- on a real local Ray -------------------------------------------------------------------------------------------


def _ray_cfg(*overrides: str):
    from pathlib import Path

    from anyorder_ray.config import load_config

    smoke = Path(__file__).resolve().parent.parent / "tune_configs" / "smoke.yaml"
    return load_config(smoke, ["sweep.arms=[]", f"env.level={LEVEL}", "env.obs_encoding=compact",
                               "data.branches_per_state=1", "masking.mode=iwm", "masking.branches=0.5",
                               "rollout.episodes_per_batch=4", "rollout.max_restarts=2", "eval.enabled=false",
                               *overrides])  # fmt: skip


@pytest.mark.slow
def test_a_restarted_rollout_actor_and_buffer_keep_every_demos_branches_exactly_once(ray_local, tmp_path):
    """Fixed regime, 12 demos in batches of 4 with their branches: the rollout actor is SIGKILLed after two batches
    and the buffer after the actor restarted; the restarted buffer replays its journal, the restarted actor resumes
    at its acknowledged seed, and the data set is exactly the 12 demos and each one's branches, once."""
    import os
    import signal

    from helpers import HANG_GUARD_S

    from anyorder_ray.roles.buffer import BufferJournal
    from anyorder_ray.roles.trial import make_buffer, make_rollout_actor
    from anyorder_ray.storage import Location

    ray = ray_local
    cfg = _ray_cfg("data.num_demos=12")
    journal = Location.parse(tmp_path / "trajectories")
    buffer, name = make_buffer(cfg, journal)
    actor = make_rollout_actor(cfg, 0, name)
    pid = lambda handle: ray.get(handle.__ray_call__.remote(lambda _self: os.getpid()))  # noqa: E731
    try:
        first = ray.get(actor.run.remote(max_batches=2), timeout=HANG_GUARD_S)
        assert first.trajectories == 8 and first.branches > 8
        acknowledged = ray.get(buffer.stats.remote())
        os.kill(pid(actor), signal.SIGKILL)
        resumed_at = ray.get(actor.next_seed.remote(), timeout=HANG_GUARD_S)  # a new process, asked the buffer
        os.kill(pid(buffer), signal.SIGKILL)
        restored = ray.get(buffer.stats.remote(), timeout=HANG_GUARD_S)  # the journal replayed
        rest = ray.get(actor.run.remote(), timeout=HANG_GUARD_S)
        stats = ray.get(buffer.stats.remote())
        held = held_trajectories(buffer)
    finally:
        ray.kill(actor, no_restart=True)
        ray.kill(buffer, no_restart=True)
    assert resumed_at == first.next_seed and rest.next_seed > resumed_at
    assert (restored.size, restored.branches, restored.restored) == (acknowledged.size, acknowledged.branches,
                                                                     acknowledged.size)  # fmt: skip
    demos = [t for t in held if t.provenance.source == "expert"]
    branches = [t for t in held if t.provenance.source == "branch"]
    assert len(demos) == 12 == len({t.seed for t in demos})  # the demo budget, no seed twice
    assert branches == _branches(demos, k=1, history_steps=cfg.data.branch_history_steps())  # each demo's, once
    assert stats.branches == len(branches) and stats.size == 12 + len(branches) and stats.evicted == 0
    records = list(BufferJournal(journal).records())
    assert sum(len(r.branches) for r in records) == len(branches)


@pytest.mark.slow
def test_a_tiny_iwm_trial_trains_on_demos_and_their_branches(ray_local, tmp_path):
    """The trial's actors (``start_actors``: the journaled buffer, a rollout actor that branches every demo batch) and a
    real TorchTrainer running ``train_loop_per_worker`` for a two-stage iwm arm: training starts on the 8 demos and all
    their branches, reports count the branches, switches from the world-model stage to imitation at step 4 of 8 and
    ends with finite losses."""
    import json

    from anyorder_ray.roles.buffer import BufferJournal
    from anyorder_ray.roles.train_loop import METRICS_LOG
    from anyorder_ray.roles.trial import start_actors
    from anyorder_ray.storage import Location

    cfg = _ray_cfg("data.num_demos=8", "train.max_steps=8", "train.report_every=2", "train.checkpoint_every=0",
                   "train.cpus_per_worker=1")  # fmt: skip
    journal = Location.parse(tmp_path / "trajectories")
    actors = start_actors(cfg, journal=journal)
    try:
        result = fit_one_worker(
            actors.loop_config(cfg, Location.parse(tmp_path / "run" / METRICS_LOG)), tmp_path / "run"
        )
    finally:
        actors.stop()
    assert result.error is None
    records = list(BufferJournal(journal).records())
    demos = [t for r in records for t in r.trajectories]
    branches = [b for r in records for b in r.branches]
    assert len(demos) >= 8 and branches and {b.seed for b in branches} <= {t.seed for t in demos}
    log = [json.loads(line) for line in (tmp_path / "run" / METRICS_LOG).read_text().splitlines()]
    assert [r["train/step"] for r in log] == [2, 4, 6, 8]
    assert all(r["rollout/branches"] == len(branches) for r in log)  # all there before step 1: the fixed data set
    assert [r["train/iwm_world_model"] for r in log] == [1.0, 1.0, 0.0, 0.0]
    assert all(math.isfinite(r["train/loss"]) and r["train/loss"] > 0 for r in log)
