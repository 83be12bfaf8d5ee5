"""Trajectory records: validation, JSONL round trip, malformed files reported with their line number."""

from __future__ import annotations

import json
import pickle

import pytest

from anyorder_ray.data.jsonl import TrajectoryFileError, load_jsonl, save_jsonl
from envs.trajectory import Trajectory, Unit


def _traj(seed: int = 0) -> Trajectory:
    return Trajectory.from_steps("go to the red ball", "BabyAI-GoToRedBallGrey-v0", seed,
                                 ["o0", "o1", "o2"], ["left", "forward"], success=True)  # fmt: skip


def test_units_alternate_and_expose_kinds():
    t = _traj()
    assert t.kinds == ("obs", "act", "obs", "act", "obs")
    assert t.actions == ("left", "forward") and t.observations == ("o0", "o1", "o2")
    assert [u.step for u in t.units] == [0, 0, 1, 1, 2]
    with pytest.raises(ValueError, match="must alternate"):
        Trajectory("m", "l", 0, (Unit("act", "left", 0),), True)
    with pytest.raises(ValueError, match="kind must be one of"):
        Unit("reward", "1", 0)
    with pytest.raises(ValueError, match="len\\(observations\\)"):
        Trajectory.from_steps("m", "l", 0, ["o"], ["a", "b"], True)


def test_jsonl_round_trip_and_pickle(tmp_path):
    trajs = [_traj(s) for s in range(5)]
    path = tmp_path / "sub" / "demos.jsonl"
    assert save_jsonl(path, trajs) == 5
    assert load_jsonl(path) == trajs
    assert pickle.loads(pickle.dumps(trajs)) == trajs
    assert not [p for p in path.parent.iterdir() if p.name != "demos.jsonl"]  # no temp file left


def test_a_malformed_line_fails_the_whole_load_naming_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(_traj().to_dict())
    path.write_text(good + "\n" + good + "\n" + '{"mission": "x", "units": [' + "\n")
    with pytest.raises(TrajectoryFileError, match=r"bad.jsonl:3: malformed trajectory record"):
        load_jsonl(path)
    path.write_text(good + "\n" + json.dumps({"mission": "x"}) + "\n")
    with pytest.raises(TrajectoryFileError, match=r":2: .*missing keys"):
        load_jsonl(path)


def test_a_failed_save_leaves_the_old_file_intact(tmp_path):
    path = tmp_path / "demos.jsonl"
    save_jsonl(path, [_traj(1)])

    def broken():
        yield _traj(2)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        save_jsonl(path, broken())
    assert load_jsonl(path) == [_traj(1)]
    assert [p.name for p in tmp_path.iterdir()] == ["demos.jsonl"]
