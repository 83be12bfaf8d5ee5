"""The eval actor end to end on a local Ray: weights via the object store and via a persisted checkpoint."""

from __future__ import annotations

import math

import pytest

from anyorder_ray.config import EvalConfig, ModelConfig
from anyorder_ray.models.factory import build_model, build_tokenizer
from envs import EnvConfig

EXPECTED = {
    "eval/success_rate", "eval/success_low", "eval/success_high", "eval/episodes", "eval/mean_episode_length",
    "eval/world_model_nll", "eval/world_model_nll_per_obs", "eval/action_nll", "eval/seconds", "eval/step",
    "eval/world_model_exact", "eval/offexpert_world_model_nll", "eval/offexpert_world_model_nll_per_obs",
    "eval/offexpert_world_model_exact", "eval/offexpert_transitions", "eval/onpolicy_world_model_nll",
    "eval/onpolicy_world_model_nll_per_obs", "eval/onpolicy_world_model_exact", "eval/onpolicy_transitions",
    "eval/temperature",
}  # fmt: skip


@pytest.mark.slow
def test_eval_actor_reports_the_same_metrics_from_the_object_store_and_from_a_checkpoint(ray_local, tmp_path):
    from ray.train import Checkpoint

    from anyorder_ray.roles.evaluator import make_eval_actor

    ray = ray_local
    env = EnvConfig(level="GoToRedBallGrey", max_episode_steps=6)
    model_cfg = ModelConfig(overrides={"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
                                       "moe_intermediate_size": 32})  # fmt: skip
    tokenizer = build_tokenizer(model_cfg, env)
    model = build_model(model_cfg, tokenizer, seed=0).eval()
    model.save_pretrained(tmp_path / "ckpt")  # what a trial's checkpoint holds (HF weights, per-expert layout)

    eval_cfg = EvalConfig(num_cpus_per_actor=0.5, episodes=4, batch_envs=4, heldout_trajectories=3, max_restarts=0)
    by_store = make_eval_actor(env, eval_cfg, model_cfg, history_steps=1, max_length=160)
    by_checkpoint = make_eval_actor(env, EvalConfig(**{**eval_cfg.__dict__, "weights": "checkpoint"}), model_cfg,
                                    history_steps=1, max_length=160)  # fmt: skip
    assert 1 <= ray.get(by_store.heldout_size.remote()) <= 3

    from_store = ray.get(by_store.evaluate.remote([ray.put(model.state_dict())], 7))
    assert set(from_store) >= EXPECTED
    assert from_store["eval/step"] == 7 and from_store["eval/episodes"] == 4
    assert isinstance(from_store["eval/episodes"], int)
    assert 0.0 <= from_store["eval/success_low"] <= from_store["eval/success_rate"] <= from_store["eval/success_high"]
    assert from_store["eval/success_high"] <= 1.0
    assert 1 <= from_store["eval/mean_episode_length"] <= 6
    nlls = ("world_model_nll", "action_nll", "offexpert_world_model_nll", "onpolicy_world_model_nll")
    for key in (f"eval/{k}" for k in nlls):
        assert 0 < from_store[key] < 3 * math.log(len(tokenizer)), key
    assert from_store["eval/offexpert_transitions"] >= 1 and from_store["eval/onpolicy_transitions"] >= 4
    assert ray.get(by_store.last_step.remote()) == 7

    # The same weights from a checkpoint, given as Ray Train hands it over and as a folder: the same numbers.
    for weights in (Checkpoint.from_directory(str(tmp_path / "ckpt")), str(tmp_path / "ckpt")):
        from_ckpt = ray.get(by_checkpoint.evaluate.remote(weights, 8, 4))
        for key in EXPECTED - {"eval/seconds", "eval/step"}:
            assert from_ckpt[key] == pytest.approx(from_store[key], rel=1e-5), key

    # A checkpoint gone (deleted by num_to_keep) is reported, naming the folder; a state dict of another model is
    # refused, naming the mismatch; a checkpoint-reading actor refuses state dicts.
    with pytest.raises(ray.exceptions.RayTaskError, match="does not exist"):
        ray.get(by_checkpoint.evaluate.remote(str(tmp_path / "gone"), 9))
    bad = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head")}
    with pytest.raises(ray.exceptions.RayTaskError, match="lm_head"):
        ray.get(by_store.evaluate.remote([ray.put(bad)], 9))
    with pytest.raises(ray.exceptions.RayTaskError, match="loads checkpoints"):
        ray.get(by_checkpoint.evaluate.remote([ray.put(model.state_dict())], 9))
    ray.kill(by_store)
    ray.kill(by_checkpoint)
