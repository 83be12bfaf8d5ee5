"""Buffer bookkeeping and the trainer's sampler (pure), and the rollout -> buffer -> trainer path on a real local
Ray."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import HANG_GUARD_S

from anyorder_ray.config import EvalConfig, RolloutConfig
from anyorder_ray.data.batching import LocalSource, TrajectoryView
from anyorder_ray.data.seeds import eval_episode_seeds, heldout_trajectory_seeds, rollout_seed_range
from anyorder_ray.roles.buffer import BufferState
from envs.trajectory import EXPERT, Provenance


def test_eviction_keeps_the_newest_trajectories():
    state = BufferState(capacity=5)
    for batch in range(3):
        state.add(f"b{batch}", 3, worker=0)
    stats = state.stats()
    assert (stats.size, stats.produced, stats.evicted) == (5, 9, 4)
    # b0 fully gone, one trajectory of b1 evicted from its front, all of b2 kept.
    assert state.snapshot() == [("b1", 1, 2), ("b2", 0, 3)]


def test_the_view_samples_uniformly_over_held_trajectories_only():
    # Batches as the buffer snapshots them after evicting 2 of "old": (batch, first held index, held count).
    old, new = [f"old{i}" for i in range(4)], [f"new{i}" for i in range(4)]
    view = TrajectoryView(np.random.default_rng(0))
    assert view.update([(old, 2, 2), (new, 0, 4)]) == 6
    picks = view.sample(20000)
    held = {"old2", "old3", *new}
    assert set(picks) == held
    counts = np.array([picks.count(k) for k in sorted(held)])
    assert counts.min() > 20000 / 6 * 0.9 and counts.max() < 20000 / 6 * 1.1
    # Same generator state, same draws; an update to a later snapshot forgets evicted trajectories.
    again = TrajectoryView(np.random.default_rng(0))
    again.update([(old, 2, 2), (new, 0, 4)])
    assert again.sample(50) == picks[:50]
    view.update([(new, 3, 1)])
    assert set(view.sample(100)) == {"new3"}


def test_the_view_refuses_bad_entries_and_sampling_before_data():
    view = TrajectoryView(np.random.default_rng(0))
    with pytest.raises(RuntimeError, match="wait for data"):
        view.sample(1)
    with pytest.raises(ValueError, match="does not fit a batch of 3"):
        view.update([(["a", "b", "c"], 2, 2)])
    with pytest.raises(ValueError, match="at least one trajectory"):
        LocalSource([])


def test_fixed_budget_holds_exactly_the_target_and_stops_producers():
    state = BufferState(capacity=100, target=10)
    assert state.add("a", 4) is True
    assert state.add("b", 4) is True
    assert state.add("c", 4) is False  # trimmed to 2, target reached
    assert state.stats().size == 10 and state.stats().produced == 10
    assert state.snapshot()[-1] == ("c", 0, 2)
    assert state.add("d", 4) is False and state.stats().size == 10


def test_resume_seed_survives_for_a_restarted_producer():
    state = BufferState(capacity=10)
    assert state.resume_seed(1) is None
    state.add("a", 2, worker=1, next_seed=132)
    state.add("b", 2, worker=0, next_seed=40)
    assert state.resume_seed(1) == 132 and state.resume_seed(0) == 40


def test_bad_capacity_is_refused():
    assert BufferState(capacity=3).snapshot() == []
    with pytest.raises(ValueError, match="capacity"):
        BufferState(capacity=0)
    with pytest.raises(ValueError, match="target"):
        BufferState(capacity=3, target=4)


@pytest.mark.parametrize("num_actors", [1, 2, 3, 7])
def test_rollout_and_eval_seeds_never_overlap(num_actors):
    cfg = RolloutConfig(num_actors=num_actors, seed_start=123)
    ranges = [rollout_seed_range(cfg, i) for i in range(num_actors)]
    for a in range(num_actors):
        for b in range(a + 1, num_actors):
            assert ranges[a].stop <= ranges[b].start
    ev = EvalConfig()
    top = max(r.stop for r in ranges)
    assert top <= eval_episode_seeds(ev, 10_000).start
    assert eval_episode_seeds(ev, 10_000).stop <= heldout_trajectory_seeds(ev, 10_000).start


@pytest.mark.slow
def test_rollout_actors_fill_a_fixed_budget_with_unique_demos(ray_local):
    ray = ray_local
    from anyorder_ray.roles.buffer import TrajectoryBuffer
    from anyorder_ray.roles.rollout import RolloutWorker
    from anyorder_ray.roles.train_loop import BufferSource
    from envs import EnvConfig

    budget = 50
    rollout = RolloutConfig(num_actors=2, num_cpus_per_actor=0.5, episodes_per_batch=8)
    buffer = ray.remote(TrajectoryBuffer).options(name="buffer-two-producers", num_cpus=0).remote(100, target=budget)
    workers = [
        ray.remote(RolloutWorker).options(num_cpus=0.5).remote(EnvConfig(), rollout, i, "buffer-two-producers")
        for i in range(2)
    ]
    reports = ray.get([w.run.remote() for w in workers], timeout=HANG_GUARD_S)
    assert all(r.trajectories > 0 for r in reports)
    stats = ray.get(buffer.stats.remote())
    assert stats.size == stats.produced == budget
    held = []
    for ref, start, count in ray.get(buffer.snapshot.remote()):
        held += ray.get(ref)[start : start + count]
    assert len(held) == budget
    assert len({t.seed for t in held}) == budget  # unique demos
    assert all(t.success for t in held)
    # The trainer's side: a worker-local view over the same buffer, sampled without the actor.
    source = BufferSource(buffer, rng=np.random.default_rng(1))
    assert source.wait_until(budget) == budget
    drawn = source.sample(2000)
    assert {t.seed for t in drawn} == {t.seed for t in held}  # every held demo drawn, nothing else
    assert source.refresh(limit=20) == 20 and {t.seed for t in source.sample(500)} == {t.seed for t in held[:20]}
    for w in workers:
        ray.kill(w)
    ray.kill(buffer)


# -- early-experience branches ---------------------------------------------------------------------------------------

BRANCH = Provenance("branch")


def test_branches_ride_outside_the_demo_budget_and_the_fixed_data_set_is_never_evicted():
    state = BufferState(capacity=30, target=10)
    assert state.add("d0", 6, next_seed=6) and state.add("b0", 12, provenance=BRANCH)
    assert state.wants_more()  # 6 of the 10 demos: branches count toward nothing
    assert state.accepted(6, 0, 12, EXPERT) == 4  # the next batch of 6 demos is trimmed to the budget's 4 ...
    assert not state.add("d1", 6, next_seed=12) and not state.wants_more()  # ... and fills it
    with pytest.raises(ValueError, match="data.buffer_capacity"):
        state.check_room(9)  # 6 + 12 + 4 held, 9 more would evict the data set
    state.add("b1", 8, provenance=BRANCH)
    stats = state.stats()
    assert (stats.size, stats.produced, stats.branches, stats.evicted) == (30, 30, 20, 0)
    assert stats.as_metrics()["rollout/branches"] == 20
    assert state.snapshot() == [("d0", 0, 6), ("b0", 0, 12), ("d1", 0, 4), ("b1", 0, 8)]
    assert state.accepted(6, 0, 18, EXPERT) == 0 and state.accepted(3, 0, 6, EXPERT) == 0  # past the budget; a repeat
    with pytest.raises(ValueError, match="no seeds of its own"):
        state.add("b2", 1, next_seed=20, provenance=BRANCH)


def test_branches_are_evicted_and_counted_like_demos_and_stay_out_of_the_dagger_quota():
    stream = BufferState(capacity=10)  # streaming: fifo over demos and branches alike
    stream.add("d0", 2, next_seed=2)
    stream.add("b0", 6, provenance=BRANCH)
    stream.add("d1", 2, next_seed=4)
    stream.add("b1", 6, provenance=BRANCH)
    assert stream.snapshot() == [("b0", 4, 2), ("d1", 0, 2), ("b1", 0, 6)] and stream.stats().branches == 8
    dagger = BufferState(capacity=100, expert_quota=4, eviction="onpolicy_first")
    dagger.add("d0", 4, next_seed=4)
    dagger.add("b0", 20, provenance=BRANCH)
    assert not dagger.wants_expert() and dagger.stats().expert_dropped == 0  # the quota is the demos' alone
    dagger.add("p1", 90, next_seed=94, provenance=Provenance("on_policy", 1, 0.5, 1))  # 14 on-policy ones go first
    assert dagger.snapshot()[:2] == [("d0", 0, 4), ("b0", 0, 20)] and dagger.stats().branches == 20
