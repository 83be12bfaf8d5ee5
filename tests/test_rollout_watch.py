"""What the trainer knows about the actors that feed it (issue 13's fault and compute items): a rollout actor that died
for good and weight versions the actors always reject fail the trial with a clear error (real TorchTrainer runs, a
real kill, a real shape mismatch); the actors' policy forwards are counted with the trainer's FLOP accounting and
reported as ``rollout/inference_flops`` and ``compute/total_flops``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from anyorder_ray.config import ExperimentConfig, load_config
from anyorder_ray.roles.buffer import BufferJournal, BufferState, JournalRecord
from anyorder_ray.storage import Location
from anyorder_ray.training.budget import forward_flops, model_flops_per_token, step_cost
from envs.trajectory import Provenance

if TYPE_CHECKING:
    from anyorder_ray.roles.trial import TrialActors

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "tune_configs" / "smoke.yaml"


# -- the FLOP count ------------------------------------------------------------------------------------------------


def _tiny_config():
    from anyorder_ray.models.llada2_moe import LLaDA2MoeConfig

    return LLaDA2MoeConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4,
                           num_experts_per_tok=2, num_shared_experts=1, n_group=1, topk_group=1,
                           moe_intermediate_size=8, first_k_dense_replace=1, pad_token_id=0, eos_token_id=1,
                           mask_token_id=2)  # fmt: skip


def test_forward_flops_match_a_hand_count_for_a_tiny_config():
    """h=16, d=8, 2 query heads, 1 KV head, vocab 100; layer 0 dense (intermediate 32), layer 1 MoE (4 experts of 8,
    2 routed + 1 shared). Per token at length L, per layer: QKV 2*16*(2+2*1)*8 = 1024, output 2*2*8*16 = 512, scores
    and weighted sum 4*L*2*8 = 64 L; dense MLP 6*16*32 = 3072; MoE router 2*16*4 = 128 and experts 3*6*16*8 = 2304.
    So 8576 + 128 L per token, and the LM head 2*16*100 = 3200 per scored position."""
    config = _tiny_config()
    assert model_flops_per_token(config, 5, lm_head=False) == 8576 + 128 * 5
    assert model_flops_per_token(config, 5) == 8576 + 128 * 5 + 3200
    # Two sequences of 5 and 7 real tokens, 3 scored positions: 5*9216 + 7*9472 + 3*3200.
    assert forward_flops(config, [5, 7], targets=3) == 5 * 9216 + 7 * 9472 + 3 * 3200 == 121984


def test_a_training_step_costs_three_forwards_of_its_real_tokens():
    import torch

    config = _tiny_config()
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])  # 5 and 7 real tokens, padding excluded
    labels = torch.full((2, 7), -100)
    labels[0, 2], labels[1, 3], labels[1, 6] = 4, 5, 6
    assert step_cost(config, [{"attention_mask": mask, "labels": labels}]) == (12, 3 * 121984)


def test_the_action_scorer_counts_the_flops_of_the_forwards_it_runs(one_torch_thread):
    """The rollout actor's count: the policy's queries on GoToLocal, one forward (BabyAI's actions are one token each),
    every query's real tokens through the body, the LM head at its one masked position."""
    from anyorder_ray.data.encoding import UnitEncoder
    from anyorder_ray.evaluation.scoring import ActionScorer, PolicyQuery
    from anyorder_ray.models.factory import build_model, build_model_config, build_tokenizer
    from envs import make_world

    cfg = load_config(SMOKE, ["env.level=BabyAI-GoToLocal-v0", "env.obs_encoding=compact"])
    tokenizer = build_tokenizer(cfg.model, cfg.env)
    model, config = build_model(cfg.model, tokenizer, seed=0).eval(), build_model_config(cfg.model, tokenizer)
    world = make_world(cfg.env)
    queries = []
    for seed in range(3):
        obs, mission = world.reset(seed)
        queries.append(PolicyQuery(mission, (), obs))
    counted = ActionScorer(UnitEncoder(tokenizer), world.action_names, 1, cfg.data.max_seq_len, count_flops=config)
    plain = ActionScorer(UnitEncoder(tokenizer), world.action_names, 1, cfg.data.max_seq_len)
    assert counted.num_forwards == 1 and counted.flops == 0.0
    assert counted.act(model, queries) == plain.act(model, queries)  # counting changes nothing
    lengths = [len(counted.encode(q)) for q in queries]
    head = 2.0 * config.hidden_size * config.vocab_size
    expected = sum(n * model_flops_per_token(config, n, lm_head=False) for n in lengths) + len(queries) * head
    assert counted.flops == pytest.approx(expected, rel=1e-12) and plain.flops == 0.0
    counted.act(model, queries[:1])
    one = lengths[0] * model_flops_per_token(config, lengths[0], lm_head=False) + head
    assert counted.flops == pytest.approx(expected + one, rel=1e-12)


def test_the_buffer_sums_inference_flops_and_a_replayed_journal_keeps_them(tmp_path):
    played = Provenance("on_policy", 4, 0.5)
    state = BufferState(capacity=100)
    state.add("demos", 8, worker=0, next_seed=8)
    state.add("p", 4, worker=0, next_seed=12, provenance=played, inference_flops=1e9)
    state.add("p again", 4, worker=0, next_seed=12, provenance=played, inference_flops=2e9)  # a repeat: still spent
    assert state.stats().inference_flops == 3e9 and state.stats().as_metrics()["rollout/inference_flops"] == 3e9
    journal = BufferJournal(Location.parse(tmp_path / "journal"))
    journal.append(JournalRecord(0, 8, [], inference_flops=0.0))
    journal.append(JournalRecord(0, 12, [], played, inference_flops=1.5e9))
    replay = BufferState(capacity=100)
    for r in BufferJournal(Location.parse(tmp_path / "journal")).records():
        replay.add(r.trajectories, len(r.trajectories), r.worker, r.next_seed, r.provenance, r.inference_flops)
    assert replay.stats().inference_flops == 1.5e9
    old = BufferJournal(Location.parse(ROOT / "tests" / "data" / "journal_v1"))
    assert [r.inference_flops for r in old.records()] == [0.0, 0.0]  # journals from before the count: none spent


# -- the board's count of versions rejected in a row ---------------------------------------------------------------


def test_the_board_counts_publications_rejected_in_a_row_until_one_is_loaded():
    from anyorder_ray.roles.weights import PolicyBoard

    board = PolicyBoard()
    first = board.publish(["w2"], 2)
    board.reject(0, 2, "shape mismatch", first)
    board.reject(1, 2, "shape mismatch", first)  # the same publication, another actor: counted once in a row
    assert board.rejected_in_a_row() == (1, "actor 1, version 2: shape mismatch")
    second = board.publish(["w4"], 4)
    board.reject(0, 4, "missing keys", second)
    assert board.rejected_in_a_row()[0] == 2
    stats = board.stats()
    assert (stats["rollout/weights_rejected"], stats["rollout/weights_rejected_in_a_row"]) == (3, 2)
    board.loaded(1, second)  # one actor could load it: the versions are not all rejected
    assert board.rejected_in_a_row()[0] == 0
    third = board.publish(["w6"], 6)
    board.reject(0, 6, "non-finite", third)
    board.reject(0, 6, "retried from a board that restarted", ("another instance", 9))  # not this board's
    board.loaded(0, first)  # an old load arriving late resets nothing newer
    assert board.rejected_in_a_row() == (1, "actor 0, version 6: retried from a board that restarted")


# -- on a real local Ray: real trials ------------------------------------------------------------------------------


def _cfg(*overrides: str) -> ExperimentConfig:
    return load_config(SMOKE, ["data.buffer_capacity=100000", "rollout.episodes_per_batch=4", "rollout.max_restarts=1",
                               "train.max_steps=40", "train.report_every=4", "train.checkpoint_every=0",
                               "train.cpus_per_worker=1", "eval.enabled=false", *overrides])  # fmt: skip


def _fit_fails(loop: dict, out: Path) -> str:
    """Run ``train_loop_per_worker`` on one worker; it must fail: the error's text."""
    import ray.train
    from helpers import fit_one_worker

    with pytest.raises(ray.train.TrainingFailedError) as failed:
        fit_one_worker(loop, out)
    return str(failed.value)


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@contextlib.contextmanager
def _rollout_killed_after_step_6(tmp_path: Path) -> Iterator[tuple[TrialActors, dict]]:
    """A streaming trial's buffer and rollout actor, and a train loop config whose hook kills the actor for good after
    step 6 (``ray.kill(no_restart=True)``, as if its restarts were used up); the actors end with the block."""
    from helpers import KillActorOnce

    from anyorder_ray.roles.train_loop import METRICS_LOG
    from anyorder_ray.roles.trial import TrialActors, make_buffer, make_rollout_actor

    cfg = _cfg("data.regime=streaming", "data.min_buffer_size=16")
    buffer, buffer_name = make_buffer(cfg)
    actor = make_rollout_actor(cfg, 0, buffer_name)
    actors = TrialActors(buffer, [actor], [actor.run.remote()], None, None)
    try:
        loop = actors.loop_config(cfg, Location.parse(tmp_path / "run" / METRICS_LOG))
        loop["after_step"] = KillActorOnce(actor, actors.runs, step=6)
        yield actors, loop
    finally:
        actors.stop()


@pytest.mark.slow
def test_the_trainer_fails_the_trial_when_a_rollout_actor_dies_for_good(ray_local, tmp_path):
    """Streaming data, the rollout actor killed for good after step 6. The buffer still holds data, so sampling alone
    would go on; the trainer's next refresh (step 20) sees the failed ``run`` and the trial fails naming the actor and
    the cause, well before step 40."""
    from anyorder_ray.roles.train_loop import METRICS_LOG

    with _rollout_killed_after_step_6(tmp_path) as (actors, loop):
        error = _fit_fails(loop, tmp_path / "run")
        produced = ray_local.get(actors.buffer.stats.remote()).produced
    assert "RolloutFailed" in error and "rollout actor 0 died for good" in error and "ActorDiedError" in error
    log = _log(tmp_path / "run" / METRICS_LOG)
    assert [r["train/step"] for r in log] == [4, 8, 12, 16, 20]  # stopped at the first refresh after the kill
    assert log[-1]["rollout/produced"] == produced  # the buffer had stopped growing: the data was stale


@pytest.mark.slow
def test_a_rollout_that_died_for_good_fails_the_run_without_the_restarts_it_could_not_use(ray_local, tmp_path):
    """The kill above with two worker-group restarts allowed and the sweep's ``RolloutFailureIsFinal`` callback: the
    run fails at step 20 with the ``RolloutFailed`` as a controller error, which Ray Train does not retry. Without the
    callback each restarted group failed again at its first refresh (with ``max_failures: -1``, for ever) and ``fit``
    raised the worker-group error of the third attempt."""
    import ray.train
    from helpers import fit_one_worker

    from anyorder_ray.roles.train_loop import METRICS_LOG, RolloutFailed, RolloutFailureIsFinal

    with _rollout_killed_after_step_6(tmp_path) as (_, loop), pytest.raises(ray.train.ControllerError) as failed:
        fit_one_worker(loop, tmp_path / "run", max_failures=2, callbacks=[RolloutFailureIsFinal()])
    cause = failed.value.controller_failure
    assert isinstance(cause, RolloutFailed) and "rollout actor 0 died for good (ActorDiedError" in str(cause)
    log = _log(tmp_path / "run" / METRICS_LOG)
    assert [r["train/step"] for r in log] == [4, 8, 12, 16, 20]


@pytest.mark.slow
def test_a_dagger_trial_whose_every_weight_version_is_rejected_fails_quoting_the_reason(ray_local, tmp_path):
    """The rollout actor's model has one layer, the trainer's two: every version the trainer publishes (every 2 steps)
    is genuinely rejected by ``load_policy_weights``. With ``rollout.max_rejected_versions: 2`` the trial fails at the
    first refresh after the second rejection (step 20: the test waits for it at step 8) with the loader's reason,
    and the reports carry ``rollout/weights_rejected``. The actor never acted with the policy: a dagger arm that
    would have been imitation."""
    from helpers import WaitForRejections

    from anyorder_ray.roles.train_loop import METRICS_LOG
    from anyorder_ray.roles.trial import TrialActors, make_board, make_buffer, make_rollout_actor

    dagger = ("data.regime=dagger", "data.num_demos=8", "rollout.batch_envs=4", "rollout.idle_poll_s=0.1",
              "rollout.weights_every_steps=2", "rollout.max_rejected_versions=2")  # fmt: skip
    cfg = _cfg(*dagger)
    one_layer = dataclasses.replace(cfg.model, overrides={**cfg.model.overrides, "num_hidden_layers": 1})
    other_model = dataclasses.replace(cfg, model=one_layer)
    buffer, buffer_name = make_buffer(cfg)
    board, board_name = make_board(cfg)
    actor = make_rollout_actor(other_model, 0, buffer_name, board_name)
    actors = TrialActors(buffer, [actor], [actor.run.remote()], None, board)
    try:
        loop = actors.loop_config(cfg, Location.parse(tmp_path / "run" / METRICS_LOG))
        loop["after_step"] = WaitForRejections(board, step=8, count=2)
        error = _fit_fails(loop, tmp_path / "run")
        stats = ray_local.get(buffer.stats.remote())
    finally:
        actors.stop()
    assert "RolloutFailed" in error and "rejected the last" in error and "max_rejected_versions: 2" in error
    assert "the weights do not fit the model" in error and "unexpected keys" in error  # the loader's own reason
    log = _log(tmp_path / "run" / METRICS_LOG)
    assert [r["train/step"] for r in log] == [4, 8, 12, 16, 20]
    assert log[-1]["rollout/weights_rejected"] >= 2 and log[-1]["rollout/weights_rejected_in_a_row"] >= 2
    assert (stats.onpolicy, stats.policy_version, log[-1]["rollout/inference_flops"]) == (0, 0, 0.0)
    assert log[-1]["compute/total_flops"] == log[-1]["train/total_flops"]  # no policy forward ran
