"""``docs/results/gotolocal_window1/visible_target.py``: the bot states it scores and its target-in-view split, checked
against minigrid's own ``agent_sees`` on real GoToLocal episodes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from envs.babyai import BabyAIWorld

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "results" / "gotolocal_window1" / "visible_target.py"


def _script():
    spec = importlib.util.spec_from_file_location("visible_target", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_target_in_view_agrees_with_minigrid_along_bot_episodes():
    vt = _script()
    seen = []
    for seed in range(10):
        world = BabyAIWorld("BabyAI-GoToLocal-v0")
        world.reset(seed)
        while not world.done:
            env = world.env
            expected = any(env.agent_sees(*obj.cur_pos) for obj in env.instrs.desc.obj_set)
            assert vt.target_in_view(world) == expected
            seen.append(expected)
            world.step(world.expert_action())
    assert True in seen and False in seen  # both groups occur, so the split is not constant


def test_bot_states_hold_every_step_with_its_whole_history():
    vt = _script()
    episodes = vt.bot_states("BabyAI-GoToLocal-v0", range(5))
    assert len(episodes) == 5
    for steps in episodes:
        assert steps, "an episode with no state"
        for t, (query, action, _) in enumerate(steps):
            assert len(query.history) == t
            assert action in ("left", "right", "forward", "pickup", "drop", "toggle", "done")
            if t:
                assert query.history[-1] == (steps[t - 1][0].obs, steps[t - 1][1])
        assert steps[-1][2], "GoTo ends facing the target, so it is in view before the last action"
