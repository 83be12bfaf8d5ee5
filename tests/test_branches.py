"""Early-experience branches (``envs.branches``): real BabyAI worlds, each branch checked against the world itself."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import babyai, expert_trajectories

from envs import make_world
from envs.branches import ReplayMismatch, branch_trajectories, uniform_proposer
from envs.trajectory import Provenance, Trajectory, Unit

LEVEL = "BabyAI-GoToLocal-v0"


@pytest.fixture(scope="module")
def demos() -> list[Trajectory]:
    return expert_trajectories(LEVEL, range(3))


def test_every_branch_is_a_real_transition_from_an_expert_state(demos) -> None:
    world = make_world(babyai(LEVEL), expert=False)
    check = make_world(babyai(LEVEL), expert=False)
    for demo in demos:
        branches = branch_trajectories(world, demo, k=2, rng=np.random.default_rng(0), history_steps=2)
        assert len(branches) == 2 * demo.num_actions  # BabyAI: 6 alternatives to the label in every state
        for b in branches:
            t, label = b.meta["branch_step"], b.meta["label"]
            assert label == demo.actions[t] and b.actions[-1] != label
            assert b.provenance == Provenance("branch") and b.labelled_actions == (True,) * (b.num_actions - 1) + (
                False,
            )
            lo = max(0, t - 2)
            assert b.observations[:-1] == demo.observations[lo : t + 1] and b.actions[:-1] == demo.actions[lo:t]
            # The world itself, driven independently: the demo's first t actions, then the alternative.
            check.reset(demo.seed)
            for a in demo.actions[:t]:
                check.step(a)
            obs = check.step(b.actions[-1]).obs
            assert obs == b.observations[-1] and b.meta["done"] == check.done and b.success == check.success


def test_alternatives_are_distinct_and_drawn_by_the_rng(demos) -> None:
    world = make_world(babyai(LEVEL), expert=False)
    one = branch_trajectories(world, demos[0], k=3, rng=np.random.default_rng(7), history_steps=1)
    two = branch_trajectories(world, demos[0], k=3, rng=np.random.default_rng(7), history_steps=1)
    other = branch_trajectories(world, demos[0], k=3, rng=np.random.default_rng(8), history_steps=1)
    assert one == two and one != other
    for t in range(demos[0].num_actions):
        alts = [b.actions[-1] for b in one if b.meta["branch_step"] == t]
        assert len(alts) == len(set(alts)) == 3
    # k past the candidates takes every one of them, in the world's order.
    every = branch_trajectories(world, demos[0], k=10, rng=np.random.default_rng(0), history_steps=0, steps=[0])
    assert [b.actions[-1] for b in every] == [a for a in world.valid_actions() if a != demos[0].actions[0]]
    assert all(b.num_actions == 1 and len(b.observations) == 2 for b in every)


def test_a_turn_changes_the_view_the_branch_records(demos) -> None:
    world = make_world(babyai(LEVEL), expert=False)

    def turn(trajectory, t, candidates, k, rng):
        return [a for a in ("left", "right") if a in candidates][:k]

    branches = branch_trajectories(world, demos[0], k=1, rng=np.random.default_rng(0), history_steps=1,
                                   proposer=turn, steps=[0])  # fmt: skip
    assert branches[0].observations[-1] != branches[0].observations[-2]


def test_a_trajectory_that_does_not_replay_is_refused(demos) -> None:
    demo = demos[0]
    units = list(demo.units)
    units[2] = Unit("obs", units[0].text if units[0].text != units[2].text else units[4].text, 1)
    forged = Trajectory(demo.mission, demo.level, demo.seed, tuple(units), demo.success)
    world = make_world(babyai(LEVEL), expert=False)
    with pytest.raises(ReplayMismatch, match="step 1"):
        branch_trajectories(world, forged, k=1, rng=np.random.default_rng(0), history_steps=1, steps=[1])


def test_bad_arguments_are_refused(demos) -> None:
    world = make_world(babyai(LEVEL), expert=False)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="k must be"):
        branch_trajectories(world, demos[0], k=0, rng=rng, history_steps=1)
    with pytest.raises(ValueError, match="not a state with an action"):
        branch_trajectories(world, demos[0], k=1, rng=rng, history_steps=1, steps=[demos[0].num_actions])
    with pytest.raises(ValueError, match="distinct valid non-expert"):
        branch_trajectories(world, demos[0], k=1, rng=rng, history_steps=1,
                            proposer=lambda traj, t, c, k, r: [traj.actions[t]])  # fmt: skip
    with pytest.raises(ValueError, match="from expert trajectories"):
        branch_trajectories(world, demos[0].with_provenance(Provenance("on_policy", 1, 0.5, 1)), k=1, rng=rng,
                            history_steps=1)  # fmt: skip
    assert uniform_proposer(demos[0], 0, ["a", "b"], 3, rng) == ["a", "b"]


def test_branch_provenance_is_validated() -> None:
    with pytest.raises(ValueError, match="branch follows the expert"):
        Provenance("branch", 0, 0.5, 0)
    with pytest.raises(ValueError, match="branch follows the expert"):
        Provenance("branch", 3, 1.0, 0)
    assert Provenance("branch", 3, 1.0, 1).source == "branch"
