"""The re-evaluation command's argument handling (its real run on a finished sweep is in test_sweep_e2e.py)."""

from __future__ import annotations

import pytest

from anyorder_ray import evaluate


def test_evaluation_name_spells_the_overrides():
    assert evaluate.evaluation_name([]) == "own-world"
    assert evaluate.evaluation_name(["env.split=test", "eval.final_episodes=200"]) == "split-test_final_episodes-200"
    assert evaluate.evaluation_name(["env.level=tw-cooking --recipe 2"]) == "level-tw-cooking-recipe-2"


def test_options_may_follow_the_run_and_the_overrides():
    args = evaluate.parse_args(["runs/x", "env.split=test", "--threads", "3", "eval.final_episodes=5"])
    assert (args.run, args.threads, args.overrides) == ("runs/x", 3, ["env.split=test", "eval.final_episodes=5"])


@pytest.mark.parametrize("override", ["model.preset=tiny", "masking.mask_prob=0.1", "env.split"])
def test_only_env_and_eval_settings_can_change(tmp_path, capsys, override):
    assert evaluate.main([str(tmp_path), override]) == 2
    err = capsys.readouterr().err
    assert override in err and "only env.<key>=<value> and eval.<key>=<value>" in err


def test_a_folder_that_is_not_a_run_is_named(tmp_path, capsys):
    assert evaluate.main([str(tmp_path / "nowhere")]) == 2
    assert "no experiment.yaml there" in capsys.readouterr().err


def test_a_bad_env_override_is_a_config_error(tmp_path, capsys):
    (tmp_path / "experiment.yaml").write_text("env: {level: BabyAI-GoToRedBallGrey-v0}\n")
    assert evaluate.main([str(tmp_path), "env.split=nonsense"]) == 2
    assert "BabyAI has no game pools" in capsys.readouterr().err
