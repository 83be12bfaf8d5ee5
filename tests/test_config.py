"""Config: every shipped YAML loads and validates; bad input fails with one message naming every problem."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
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

ROOT = Path(__file__).resolve().parent.parent
TUNE_CONFIGS = sorted((ROOT / "tune_configs").glob("*.yaml"))


def test_the_issue_lists_every_experiment_yaml():
    names = {p.stem for p in TUNE_CONFIGS}
    expected = {"causal_sft", "prefix_sft", "any_order_p15", "any_order_p30", "any_order_sft", "obs_only", "act_only",
                "sweep", "smoke", "base"}  # fmt: skip
    assert expected <= names


@pytest.mark.parametrize("path", TUNE_CONFIGS, ids=lambda p: p.name)
def test_every_tune_config_loads_and_its_arms_resolve(path):
    if path.stem.startswith("textworld") and importlib.util.find_spec("textworld") is None:
        pytest.skip("textworld is not installed: its configs fail the env check, as they should")
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.arms() and all(isinstance(arm, MaskingConfig) for arm in cfg.arms())
    for arm in cfg.arms():
        trial = cfg.trial({"arm": arm.label(), "seed": 3})
        assert trial.masking == arm and trial.train.seed == 3
        assert trial.sweep.arms == ()  # a trial runs one arm


@pytest.mark.parametrize("path", TUNE_CONFIGS, ids=lambda p: p.name)
def test_every_experiment_file_states_only_what_differs_from_its_base(path):
    import yaml

    raw = yaml.safe_load(path.read_text())
    if path.stem in ("base", "smoke", "llada2_mini_gpu"):  # the roots: a laptop experiment, a smoke test, GPU size
        assert "base" not in raw
        return
    assert "base" in raw, f"{path.name} should extend a base file"
    assert "masking" not in raw or "arms" not in raw.get("sweep", {}), "an arm stated twice (masking and arms)"


@pytest.mark.parametrize(
    ("name", "mode", "p"),
    [("causal_sft", "causal", None), ("prefix_sft", "prefix", None), ("any_order_p15", "any_order", 0.15),
     ("any_order_p30", "any_order", 0.3), ("any_order_sft", "any_order", 0.5), ("obs_only", "obs_only", 0.5),
     ("act_only", "act_only", 0.5)],
)  # fmt: skip
def test_single_experiment_yamls_run_the_arm_they_are_named_after(name, mode, p):
    cfg = load_config(ROOT / "tune_configs" / f"{name}.yaml")
    assert len(cfg.arms()) == 1 and cfg.arms()[0].mode == mode
    if p is not None:
        assert cfg.arms()[0].mask_prob == pytest.approx(p)


def test_default_sweep_runs_causal_and_the_best_any_order_arm_under_dagger_reproducibly_at_equal_compute():
    cfg = load_config(ROOT / "tune_configs" / "sweep.yaml")
    assert [arm.label() for arm in cfg.arms()] == ["causal", "cut_focus+block+unit+obs0.5"]
    assert cfg.train.compute_budget() == ("flops", 2.4e13) and cfg.train.time_budget_s is None  # compute, not seconds
    assert cfg.data.regime == "dagger" and cfg.rollout.sync  # the environment in the loop, independent of the load
    assert not cfg.eval.concurrent  # evaluations do not share the trainer's cores
    imitation = load_config(ROOT / "tune_configs" / "imitation.yaml")
    assert imitation.data.regime == "fixed" and imitation.model == cfg.model and imitation.env == cfg.env
    assert imitation.train.flop_budget * 4 == cfg.train.flop_budget


def test_imitation_sweep_runs_the_baselines_and_the_two_any_order_arms_at_equal_compute():
    cfg = load_config(ROOT / "tune_configs" / "imitation.yaml")
    labels = [arm.label() for arm in cfg.arms()]
    assert labels == ["causal", "prefix", "any_order@0.3+unit", "cut_focus+block+unit"]
    assert cfg.train.compute_budget()[0] == "flops" and cfg.train.time_budget_s is None  # equal compute, not seconds
    ablation = load_config(ROOT / "tune_configs" / "ablation.yaml")
    assert {"any_order@0.15", "any_order@0.3", "any_order@0.5"} <= {arm.label() for arm in ablation.arms()}
    assert set(labels) <= {arm.label() for arm in ablation.arms()}
    assert ablation.train == cfg.train and ablation.model == cfg.model  # the same budget and model


def test_any_order_study_reproduces_its_published_experiment():
    import yaml

    study = load_config(ROOT / "tune_configs" / "any_order_study.yaml")
    published = yaml.safe_load((ROOT / "docs" / "results" / "any_order_study" / "experiment.yaml").read_text())
    assert [arm.label() for arm in study.arms()] == [
        MaskingConfig(**{**published["masking"], **arm}).label() for arm in published["sweep"]["arms"]
    ]
    assert len(study.sweep.seeds) >= 3
    assert study.train.time_budget_s == 120 and study.train.flop_budget is None  # as published


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
    with pytest.raises(ConfigError, match=r"unknown key sweep.arms\[0\].p; allowed: mode"):
        config_from_dict({"sweep": {"arms": [{"mode": "causal", "p": 0.3}]}})
    with pytest.raises(ConfigError, match=r"arms \['causal'\] appear more than once"):
        config_from_dict({"sweep": {"arms": [{"mode": "causal"}, {"mode": "causal", "mask_prob": 0.2}]}})


def test_eval_seeds_are_kept_away_from_rollout_seeds():
    with pytest.raises(ConfigError, match="seed_start must be >= 1e9"):
        config_from_dict({"eval": {"seed_start": 5}})


@pytest.mark.parametrize("path", TUNE_CONFIGS, ids=lambda p: p.name)
def test_config_round_trips_through_plain_data(path):
    import yaml

    cfg = load_config(path)
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg


def test_an_arm_is_labelled_by_what_it_trains_when_the_masking_section_disagrees(tmp_path):
    # The file's masking section sets the unit-mean loss and obs weight; the arms do not mention them, so both arms
    # train with them, and their labels say so (and the trial config, the tables' source, agrees).
    path = tmp_path / "exp.yaml"
    path.write_text("masking: {mode: any_order, mask_prob: 0.4, loss_norm: unit, obs_weight: 0.5}\n"
                    "sweep: {arms: [{mode: causal}, {mode: cut_focus, mask_prob: 0.3}]}\n")  # fmt: skip
    cfg = load_config(path)
    assert [arm.label() for arm in cfg.arms()] == ["causal+unit+obs0.5", "cut_focus@0.3+unit+obs0.5"]
    trial = cfg.trial({"arm": "cut_focus@0.3+unit+obs0.5", "seed": 1, "mask_prob": 0.25})
    assert (trial.masking.mode, trial.masking.mask_prob, trial.masking.loss_norm) == ("cut_focus", 0.25, "unit")
    assert trial.masking.label() == "cut_focus@0.25+unit+obs0.5"
    assert cfg.trial({"arm": "causal+unit+obs0.5", "mask_prob": 0.25}).masking.mask_prob == 0.4  # causal ignores it
    with pytest.raises(KeyError, match="no arm labelled 'causal'"):
        cfg.trial({"arm": "causal"})


def test_a_base_file_is_extended_key_by_key_and_a_loop_is_refused(tmp_path):
    (tmp_path / "root.yaml").write_text("train: {lr: 0.001, max_steps: 50}\nmodel: {overrides: {hidden_size: 64}}\n")
    (tmp_path / "mid.yaml").write_text("base: root.yaml\ntrain: {max_steps: 70}\nsweep: {seeds: [1, 2]}\n")
    (tmp_path / "leaf.yaml").write_text("base: mid.yaml\nmodel: {overrides: {num_hidden_layers: 2}}\n"
                                        "sweep: {seeds: [3]}\n")  # fmt: skip
    cfg = load_config(tmp_path / "leaf.yaml")
    assert (cfg.train.lr, cfg.train.max_steps, cfg.sweep.seeds) == (0.001, 70, (3,))  # lists replace
    assert cfg.model.overrides == {"hidden_size": 64, "num_hidden_layers": 2}  # mappings merge
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="cannot read config file .*nowhere.yaml"):
        load_config(tmp_path / "c.yaml")


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


def test_evaluation_is_switched_by_a_boolean_and_weights_come_from_a_known_place():
    assert load_config(None, ["eval.enabled=false"]).eval.actors() == 0
    assert load_config(None).eval.actors() == 1
    with pytest.raises(ConfigError, match="eval.enabled = 2 has the wrong type; expected bool"):
        load_config(None, ["eval.enabled=2"])
    with pytest.raises(ConfigError, match="unknown key eval.num_actors"):
        load_config(None, ["eval.num_actors=1"])
    with pytest.raises(ConfigError, match="weights"):
        load_config(None, ["eval.weights=disk"])
    assert load_config(None).eval.temperature == 0.0  # greedy unless a config says otherwise
    assert load_config(None, ["eval.temperature=0.5"]).eval.temperature == 0.5
    with pytest.raises(ConfigError, match="temperature must be >= 0"):
        load_config(None, ["eval.temperature=-1"])
    assert load_config(None).rollout.temperature == 0.0  # dagger actors act greedily unless told
    assert load_config(None, ["rollout.temperature=1.0"]).rollout.temperature == 1.0
    with pytest.raises(ConfigError, match="rollout.temperature = -0.5|temperature must be >= 0, got -0.5"):
        load_config(None, ["rollout.temperature=-0.5"])


def test_branch_and_iwm_keys_are_validated_all_at_once_and_labelled(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {branches_per_state: -1, branch_every: 0}\n"
                    "masking: {branches: 1.5, iwm_schedule: interleaved, iwm_world_model_fraction: 1.0}\n")  # fmt: skip
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "bad.yaml" in msg and "branches_per_state must be >= 0" in msg and "branch_every must be >= 1" in msg
    assert (
        "branches (a share of draws) must be in [0, 1]" in msg and "iwm_world_model_fraction must be in (0, 1)" in msg
    )
    assert "'interleaved'" in msg and "two_stage, mixture" in msg  # the allowed schedules are named
    with pytest.raises(ConfigError, match="branches > 0 needs one of prefix, any_order, .*iwm"):
        MaskingConfig("causal", branches=0.5)  # a branch's only labelled actions are its demo's
    with pytest.raises(ConfigError, match="mixture mixes branches with demos"):
        MaskingConfig("iwm", iwm_schedule="mixture")
    with pytest.raises(ConfigError, match=r"arms \['iwm\+br0.5'\] train on branches .* data.branches_per_state is 0"):
        load_config(None, ["masking.mode=iwm", "masking.branches=0.5"])
    cfg = load_config(None, ["masking.mode=iwm", "masking.branches=0.5", "data.branches_per_state=2"])
    assert cfg.collects_branches() and cfg.data.branch_history_steps() == cfg.data.window_steps - 1
    assert not load_config(None, ["data.branches_per_state=2"]).collects_branches()  # the arm does not train on them
    assert MaskingConfig("iwm", iwm_world_model_fraction=0.3).label() == "iwm[wm0.3]"
    assert MaskingConfig("iwm", iwm_schedule="mixture", branches=0.25).label() == "iwm[mixture]+br0.25"
    assert MaskingConfig("cut_focus", 0.3, loss_norm="unit", branches=0.5).label() == "cut_focus@0.3+unit+br0.5"


def test_the_iwm_stage_is_a_function_of_the_step_and_the_planned_steps():
    two = MaskingConfig("iwm", iwm_world_model_fraction=0.3)
    assert two.iwm_switch_step(100) == 30
    assert [two.iwm_stage(s, 100) for s in (0, 29, 30, 99)] == ["world_model"] * 2 + ["imitation"] * 2
    assert MaskingConfig("iwm", iwm_schedule="mixture", branches=0.5).iwm_stage(0, 100) == "mixture"
    assert MaskingConfig("prefix").iwm_stage(0, 100) is None


def test_the_iwm_study_compares_the_baselines_at_equal_compute_on_one_demo_set():
    cfg = load_config(ROOT / "tune_configs" / "iwm_gotolocal.yaml")
    assert [arm.label() for arm in cfg.arms()] == ["causal", "prefix", "iwm+br0.5", "cut_focus@0.3+unit",
                                                   "cut_focus@0.3+unit+br0.5", "cut_focus+block+unit",
                                                   "cut_focus+block+unit+br0.5"]  # fmt: skip
    assert cfg.data.regime == "fixed" and cfg.data.num_demos == 500 and cfg.data.branches_per_state >= 1
    assert cfg.train.compute_budget()[0] == "flops" and cfg.env.level == "BabyAI-GoToLocal-v0"
    dagger = load_config(ROOT / "tune_configs" / "dagger_gotolocal.yaml")
    assert cfg.train.flop_budget == dagger.train.flop_budget and cfg.data.num_demos == dagger.data.num_demos


def test_the_scarce_demo_dagger_study_differs_from_its_imitation_run_in_the_regime_only():
    cfg = load_config(ROOT / "tune_configs" / "dagger_gotolocal_scarce.yaml")
    gotolocal = load_config(ROOT / "tune_configs" / "gotolocal.yaml")
    assert cfg.data.regime == "dagger" and cfg.rollout.sync  # the data depend on the config and seed, not the load
    assert cfg.rollout.temperature == cfg.eval.temperature == 1.0  # the policy acts as it is evaluated
    assert cfg.data.num_demos * 8 == gotolocal.data.num_demos and cfg.data.window_steps == gotolocal.data.window_steps
    assert cfg.train.compute_budget() == gotolocal.train.compute_budget() == ("flops", 2.4e13)
    assert cfg.env == gotolocal.env and cfg.model == gotolocal.model and len(cfg.sweep.seeds) >= 3
    imitation = load_config(
        ROOT / "tune_configs" / "dagger_gotolocal_scarce.yaml", ["data.regime=fixed", "rollout.sync=false"]
    )  # the README's imitation command
    assert replace(imitation.data, regime="dagger") == cfg.data and imitation.train == cfg.train
    assert imitation.arms() == cfg.arms() and imitation.eval == cfg.eval


def test_model_compile_is_off_whole_or_regional():
    assert load_config(None).model.compile is False
    assert load_config(None, ["model.compile=true"]).model.compile is True
    assert load_config(None, ["model.compile=regional"]).model.compile == "regional"
    with pytest.raises(ConfigError, match="model.compile = 'layers' has the wrong type"):
        load_config(None, ["model.compile=layers"])


def test_the_block_dagger_study_differs_from_its_imitation_runs_in_the_regime_and_rollout_only():
    cfg = load_config(ROOT / "tune_configs" / "dagger_block_gotolocal.yaml")
    imitation = load_config(ROOT / "tune_configs" / "iwm_gotolocal.yaml", ["train.flop_budget=1.2e13"])
    assert cfg.data.regime == "dagger" and cfg.rollout.sync  # the data depend on the config and seed, not the load
    assert cfg.rollout.temperature == cfg.eval.temperature == 0.0  # the policy acts as it is evaluated: greedily
    assert replace(cfg.data, regime="fixed", eviction="fifo") == imitation.data
    assert cfg.train == imitation.train and cfg.eval == imitation.eval and cfg.model == imitation.model
    assert cfg.env == imitation.env and len(cfg.sweep.seeds) >= 3
    assert {arm.label() for arm in cfg.arms()} <= {arm.label() for arm in imitation.arms()}


def test_onpolicy_mode_needs_the_dagger_regime():
    arm = ["sweep.arms=[{mode: cut_focus, layout: block, loss_norm: unit, onpolicy_mode: causal}]"]
    path = ROOT / "tune_configs" / "dagger_block_gotolocal.yaml"
    cfg = load_config(path, arm)
    assert [a.label() for a in cfg.arms()] == ["cut_focus+block+unit+onpolicy_causal"]
    with pytest.raises(ConfigError, match="only the dagger regime has on-policy data"):
        load_config(path, [*arm, "data.regime=fixed", "rollout.sync=false"])
