"""Config: every shipped YAML loads and validates; bad input fails with one message naming every problem."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from anyorder_ray.config import (
    ConfigError,
    ExperimentConfig,
    MaskingConfig,
    TrainConfig,
    config_from_dict,
    load_config,
    parse_override,
)
from anyorder_ray.trial import trial_config

ROOT = Path(__file__).resolve().parent.parent
TUNE_CONFIGS = sorted((ROOT / "tune_configs").glob("*.yaml"))


def test_the_issue_lists_every_experiment_yaml():
    names = {p.stem for p in TUNE_CONFIGS}
    expected = {"causal_sft", "prefix_sft", "any_order_p15", "any_order_p30", "any_order_sft", "obs_only", "act_only",
                "sweep", "smoke"}  # fmt: skip
    assert expected <= names


@pytest.mark.parametrize("path", TUNE_CONFIGS, ids=lambda p: p.name)
def test_every_tune_config_loads_and_its_arms_resolve(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    for arm in cfg.sweep.arms:
        trial = trial_config(cfg, {"arm": arm, "seed": 3})
        assert trial.masking.mode == arm["mode"]
        assert trial.train.seed == 3


@pytest.mark.parametrize(
    ("name", "mode", "p"),
    [("causal_sft", "causal", None), ("prefix_sft", "prefix", None), ("any_order_p15", "any_order", 0.15),
     ("any_order_p30", "any_order", 0.3), ("any_order_sft", "any_order", 0.5), ("obs_only", "obs_only", 0.5),
     ("act_only", "act_only", 0.5)],
)  # fmt: skip
def test_single_experiment_yamls_run_the_arm_they_are_named_after(name, mode, p):
    cfg = load_config(ROOT / "tune_configs" / f"{name}.yaml")
    assert len(cfg.sweep.arms) == 1
    assert cfg.masking.mode == mode == cfg.sweep.arms[0]["mode"]
    if p is not None:
        assert cfg.masking.mask_prob == pytest.approx(p)


def test_default_sweep_covers_the_baselines_three_mask_probs_and_the_variants():
    cfg = load_config(ROOT / "tune_configs" / "sweep.yaml")
    labels = {MaskingConfig(**a).label() for a in cfg.sweep.arms}
    assert labels == {"causal", "prefix", "any_order@0.15", "any_order@0.3", "any_order@0.5", "cut_focus@0.3+unit",
                      "any_order@0.3+unit"}  # fmt: skip
    assert cfg.train.time_budget_s is not None  # equal wall time per arm
    study = load_config(ROOT / "tune_configs" / "any_order_study.yaml")
    assert study.sweep.arms == cfg.sweep.arms and len(study.sweep.seeds) >= 3


def test_overrides_apply_with_yaml_types():
    cfg = load_config(
        ROOT / "tune_configs" / "smoke.yaml", ["train.lr=1e-3", "masking.mode=causal", "sweep.seeds=[1,2]"]
    )
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.masking.mode == "causal"
    assert cfg.sweep.seeds == (1, 2)
    assert parse_override("data.window_steps=4") == (["data", "window_steps"], 4)


def test_all_problems_are_reported_at_once_with_suggestions():
    raw = {
        "trian": {},
        "train": {"lr": "fast", "mx_steps": 3},
        "masking": {"mask_prob": 1.5, "mode": "anyorder"},
    }
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, source="exp.yaml")
    msg = str(err.value)
    assert "4 problem(s)" in msg
    assert "unknown section 'trian' (did you mean 'train'?)" in msg
    assert "train.lr = 'fast' has the wrong type; expected float" in msg
    assert "unknown key train.mx_steps (did you mean 'max_steps'?)" in msg
    assert "mask_prob must be in (0, 1]" in msg and "mode 'anyorder' is unknown" in msg
    assert "exp.yaml" in msg


@pytest.mark.parametrize("p", [0.0, -0.1, 1.01])
def test_mask_prob_outside_0_1_is_rejected(p):
    with pytest.raises(ConfigError, match="mask_prob"):
        MaskingConfig(mode="any_order", mask_prob=p)


def test_batch_sizes_must_divide():
    with pytest.raises(ConfigError, match="multiple of micro_batch_size"):
        TrainConfig(global_batch_size=30, micro_batch_size=8)
    assert TrainConfig(global_batch_size=32, micro_batch_size=8).grad_accum_steps() == 4


def test_unreadable_and_malformed_yaml_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(scalar)


def test_sweep_arms_are_validated():
    with pytest.raises(ConfigError, match=r"arms\[1\]"):
        config_from_dict({"sweep": {"arms": [{"mode": "causal"}, {"mode": "sideways"}]}})
    with pytest.raises(ConfigError, match="allowed keys"):
        config_from_dict({"sweep": {"arms": [{"mode": "causal", "p": 0.3}]}})


def test_eval_seeds_are_kept_away_from_rollout_seeds():
    with pytest.raises(ConfigError, match="seed_start must be >= 1e9"):
        config_from_dict({"eval": {"seed_start": 5}})


def test_config_round_trips_through_dict():
    cfg = load_config(ROOT / "tune_configs" / "sweep.yaml")
    raw = cfg.to_dict()
    raw["sweep"]["arms"] = list(raw["sweep"]["arms"])
    again = config_from_dict(raw)
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_loss_weighting_and_causal_mixture_options_are_validated_and_labelled():
    m = MaskingConfig("action_focus", 0.3, causal_prob=0.25, loss_norm="unit", act_weight=4.0)
    assert m.label() == "action_focus@0.3+q0.25+unit+act4"
    assert not m.weights_are_uniform() and MaskingConfig().weights_are_uniform()
    assert MaskingConfig("causal").label() == "causal"
    for bad, match in (
        ({"loss_norm": "sequence"}, "loss_norm"),
        ({"causal_prob": 1.5}, "causal_prob"),
        ({"act_weight": -1.0}, "act_weight"),
        ({"obs_weight": 0.0, "act_weight": 0.0}, "both be 0"),
    ):
        with pytest.raises(ConfigError, match=match):
            MaskingConfig(**bad)
    with pytest.raises(ConfigError, match="time_budget_s"):
        load_config(None, ["train.time_budget_s=0"])
    assert load_config(None, ["train.time_budget_s=120"]).train.time_budget_s == 120.0


def test_more_than_one_eval_actor_is_refused_not_silently_ignored():
    with pytest.raises(ConfigError, match="num_actors must be 0 .* or 1"):
        load_config(None, ["eval.num_actors=2"])
    assert load_config(None, ["eval.num_actors=0"]).eval.num_actors == 0
