"""The dagger regime's pure parts on the real things (BabyAI GoToLocal with its bot, the tiny LLaDA2 as the policy
through the eval actor's ``ActionScorer``): beta mixing, the beta schedule, provenance through the buffer's bookkeeping,
its journal (old journals included) and eviction, and the weight check that keeps a bad version out of the model."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from helpers import fit_one_worker, held_trajectories, wait_for

from anyorder_ray.config import ConfigError, ExperimentConfig, RolloutConfig, load_config
from anyorder_ray.data.encoding import UnitEncoder
from anyorder_ray.evaluation.dagger import dagger_episodes
from anyorder_ray.evaluation.episodes import choose_actions
from anyorder_ray.evaluation.scoring import ActionScorer, PolicyQuery
from anyorder_ray.models.factory import build_model, build_model_config, build_tokenizer
from anyorder_ray.roles.buffer import BufferJournal, BufferState, JournalRecord, batch_provenance
from anyorder_ray.storage import Location
from envs import EnvConfig, collect_expert_trajectories, make_world
from envs.trajectory import EXPERT, Provenance, Trajectory

ROOT = Path(__file__).resolve().parent.parent
OLD_JOURNAL = Path(__file__).resolve().parent / "data" / "journal_v1"
"""A buffer journal written by the code before provenance existed (commit 43d0198): 3 GoToRedBallGrey expert demos,
seeds 0-2, in two batches."""
ENV = EnvConfig(level="BabyAI-GoToLocal-v0", obs_encoding="compact")
SEEDS = range(6)


@pytest.fixture(scope="module")
def policy(one_torch_thread):
    """The smoke preset's tiny LLaDA2 (seeded init) acting through the eval actor's scorer, as a rollout actor does."""
    cfg = load_config(ROOT / "tune_configs" / "smoke.yaml", ["env.level=BabyAI-GoToLocal-v0",
                                                              "env.obs_encoding=compact"])  # fmt: skip
    tokenizer = build_tokenizer(cfg.model, cfg.env)
    model = build_model(cfg.model, tokenizer, seed=0).eval()
    scorer = ActionScorer(UnitEncoder(tokenizer), make_world(ENV).action_names, cfg.history_steps(),
                          cfg.data.max_seq_len)  # fmt: skip
    return cfg, model, scorer


def _act(policy, temperature: float = 0.0):
    """The rollout actor's choice (``ActingPolicy.act``): greedy, or sampled from each episode's generator."""
    _, model, scorer = policy
    return lambda queries, candidates, rngs: choose_actions(scorer, model, queries, candidates, temperature, rngs)


def _worlds(n: int) -> list:
    return [make_world(ENV, expert=True) for _ in range(n)]


# -- beta mixing ---------------------------------------------------------------------------------------------------


def test_beta_one_reproduces_the_expert_trajectories_exactly(policy):
    expert, _ = collect_expert_trajectories(make_world(ENV), SEEDS)
    assert len(expert) >= 4  # the bot solves (almost) every GoToLocal episode
    dagger, stats = dagger_episodes(_worlds(3), SEEDS, _act(policy), beta=1.0, version=7, history_steps=1)
    by_seed = {t.seed: t for t in dagger}
    assert stats.policy_actions == 0 and stats.attempted == len(SEEDS)
    for demo in expert:
        t = by_seed[demo.seed]
        assert (t.mission, t.level, t.units, t.success) == (demo.mission, demo.level, demo.units, True)
        assert t.meta["executed"] == list(demo.actions)
        assert t.provenance == Provenance("on_policy", policy_version=7, beta=1.0, policy_actions=0)
        assert (t.meta["segment"], t.meta["episode_steps"]) == (0, demo.num_actions)  # one segment: never departed


def test_beta_zero_follows_the_policy_while_the_expert_labels_every_state(policy):
    """Replayed from scratch: every executed action is the policy's argmax for the query it had (history of executed
    actions), every stored action is the bot's answer in the state actually visited, every observation is that
    state, and every stored (obs, act, next obs) is a transition of the world: an episode is cut into segments after
    each step whose executed action was not the label."""
    cfg, model, scorer = policy
    trajs, stats = dagger_episodes(_worlds(1), range(3), _act(policy), beta=0.0, version=5, history_steps=1)
    assert stats.kept == 3 and stats.segments == len(trajs) > 3  # the untrained policy departs from the bot
    assert stats.policy_actions == stats.steps == sum(t.num_actions for t in trajs)
    disagreements = 0
    for seed in range(3):
        segments = [t for t in trajs if t.seed == seed]
        assert [t.meta["segment"] for t in segments] == list(range(len(segments)))
        world = make_world(ENV, expert=True)
        obs, mission = world.reset(seed)
        executed: list[str] = []
        past: list[str] = []
        for t in segments:
            assert t.provenance == Provenance("on_policy", 5, 0.0, t.num_actions)
            assert len(t.meta["executed"]) == t.num_actions and t.meta["episode_steps"] == _episode_steps(segments)
            for step, label in enumerate(t.actions):
                assert t.observations[step] == obs, (seed, step)
                assert label == world.expert_action(), (seed, step)  # the label: the bot in the state visited
                history = tuple(zip(past, executed, strict=True))[-1:]
                (action,) = scorer.act(model, [PolicyQuery(mission, history, obs)], [world.valid_actions()])
                assert t.meta["executed"][step] == action  # what was executed: the policy's choice
                disagreements += action != label
                past.append(obs)
                executed.append(action)
                obs, *_ = world.step(action)
                if step + 1 < len(t.observations):  # a stored next observation: the label was what ran
                    assert action == label and t.observations[step + 1] == obs, (seed, step)
                else:  # the segment ends here, without the observation its last step's departure led to
                    assert step == t.num_actions - 1 and action != label, (seed, step)
        assert world.done and segments[-1].success == world.success and not any(t.success for t in segments[:-1])
    assert disagreements > 0  # the policy's actions really are not the labels (else this test proves nothing)


def _episode_steps(segments: list) -> int:
    return sum(t.num_actions for t in segments)


def test_mixed_episodes_are_reproducible_and_do_not_depend_on_the_lockstep_batch(policy):
    args = {"policy": _act(policy), "beta": 0.5, "version": 3, "history_steps": 1}
    one, _ = dagger_episodes(_worlds(1), SEEDS, rng_seed=1, **args)
    three, _ = dagger_episodes(_worlds(3), SEEDS, rng_seed=1, **args)
    assert one == three and [t.meta["executed"] for t in one] == [t.meta["executed"] for t in three]
    other, _ = dagger_episodes(_worlds(3), SEEDS, rng_seed=2, **args)  # another actor: other coin flips
    assert [t.meta["executed"] for t in other] != [t.meta["executed"] for t in one]
    mixed = [t.provenance.policy_actions / t.num_actions for t in one]
    assert 0 < sum(mixed) / len(mixed) < 1  # both the expert and the policy drove


def test_sampled_policy_actions_are_seeded_per_episode(policy):
    """``rollout.temperature > 0``: the policy's actions are draws from each episode's own generator, so the episodes
    still do not depend on the lockstep batch; they leave the greedy policy's path, and the coin flips that hand the
    wheel to the policy stay the greedy run's (the draws come from a second generator)."""
    args = {"beta": 0.0, "version": 3, "history_steps": 1, "rng_seed": 1}
    greedy, _ = dagger_episodes(_worlds(3), SEEDS, _act(policy), **args)
    one, _ = dagger_episodes(_worlds(1), SEEDS, _act(policy, 1.0), **args)
    three, stats = dagger_episodes(_worlds(3), SEEDS, _act(policy, 1.0), **args)
    assert one == three and stats.policy_actions == stats.steps  # beta 0: every executed action is the policy's
    assert [t.meta["executed"] for t in three] != [t.meta["executed"] for t in greedy]
    cold, _ = dagger_episodes(_worlds(3), SEEDS, _act(policy, 1e-6), **args)
    assert cold == greedy
    # With beta 0.5 too: were the draws taken from the coin's generator, the coins (and the episodes) would differ.
    half = {**args, "beta": 0.5}
    assert dagger_episodes(_worlds(3), SEEDS, _act(policy, 1e-6), **half)[0] == dagger_episodes(
        _worlds(3), SEEDS, _act(policy), **half)[0]  # fmt: skip


# -- the beta schedule and the config ------------------------------------------------------------------------------


def test_the_beta_schedule_is_linear_over_the_planned_steps_then_flat():
    cfg = RolloutConfig(beta_start=0.8, beta_end=0.2)
    assert cfg.beta(0, planned_steps=100) == 1.0  # no weights: the expert alone
    assert cfg.beta(1, 100) == pytest.approx(0.8 - 0.6 / 100)
    assert cfg.beta(50, 100) == pytest.approx(0.5)
    assert cfg.beta(100, 100) == pytest.approx(0.2) == cfg.beta(400, 100)
    fixed = RolloutConfig(beta_start=1.0, beta_end=0.0, beta_anneal_steps=10)
    assert fixed.beta(5, planned_steps=1000) == pytest.approx(0.5)  # its own horizon wins over the trial's
    assert RolloutConfig(beta_start=0.3, beta_end=0.3).beta(7, 10) == pytest.approx(0.3)  # a constant beta
    with pytest.raises(ValueError, match="planned steps"):
        RolloutConfig().beta(3)


def test_dagger_config_errors_name_every_bad_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {regime: dager, eviction: lifo}\nrollout: {beta_start: 1.5, weights_every_steps: 0}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "bad.yaml" in msg and "'dager'" in msg and "dagger" in msg  # the allowed values are named
    assert "eviction" in msg and "onpolicy_first" in msg
    assert "beta_start must be in [0, 1]" in msg and "weights_every_steps must be >= 1" in msg
    cfg = load_config(ROOT / "tune_configs" / "smoke.yaml", ["data.regime=dagger", "data.num_demos=16"])
    assert isinstance(cfg, ExperimentConfig) and cfg.data.start_size() == 16  # trains once the demo set is there
    with pytest.raises(ConfigError, match="rollout.sync paces the dagger regime's on-policy batches"):
        load_config(ROOT / "tune_configs" / "smoke.yaml", ["rollout.sync=true"])  # the fixed regime has none
    with pytest.raises(ConfigError, match="train.time_budget_s plans none"):
        load_config(ROOT / "tune_configs" / "smoke.yaml", ["data.regime=dagger", "rollout.weights_versions=10",
                                                            "train.time_budget_s=60"])  # fmt: skip


# -- provenance through the buffer ---------------------------------------------------------------------------------


def _on_policy(version: int, beta: float = 0.5) -> Provenance:
    return Provenance("on_policy", version, beta, policy_actions=1)


def test_the_buffer_counts_provenance_and_keeps_the_demo_budget():
    state = BufferState(capacity=100, expert_quota=10)
    assert state.add("e0", 8, next_seed=8) and state.wants_expert()
    state.add("e1", 8, next_seed=16)  # trimmed to the 2 the budget has left
    assert not state.wants_expert() and state.wants_more()  # on-policy data still wanted
    state.add("e2", 8, next_seed=24)  # a late expert batch: dropped, counted
    state.add("p4", 5, next_seed=29, provenance=_on_policy(4, 0.75))
    state.add("p8", 5, next_seed=34, provenance=_on_policy(8, 0.5))
    stats = state.stats()
    assert (stats.size, stats.onpolicy, stats.expert_dropped, stats.policy_version) == (20, 10, 14, 8)
    metrics = stats.as_metrics()
    assert metrics["rollout/onpolicy_fraction"] == 0.5
    assert (metrics["rollout/policy_version"], metrics["rollout/beta"]) == (8, 0.5)
    assert state.snapshot() == [("e0", 0, 8), ("e1", 0, 2), ("p4", 0, 5), ("p8", 0, 5)]


def test_the_buffer_knows_which_actors_played_each_version():
    """``rollout.sync``'s bookkeeping: the trainer waits until every actor's batches of a version are acknowledged, and
    a restarted actor asks how many of which version it played; expert batches and repeats do not count."""
    state = BufferState(capacity=100, expert_quota=4)
    state.add("e", 4, worker=1, next_seed=4)
    state.add("p4", 3, worker=1, next_seed=8, provenance=_on_policy(4))
    state.add("p4b", 2, worker=0, next_seed=3, provenance=_on_policy(4))
    state.add("p8", 3, worker=1, next_seed=12, provenance=_on_policy(8))
    state.add("again", 3, worker=1, next_seed=12, provenance=_on_policy(12))  # a restarted actor's redo: dropped
    state.add("p8b", 3, worker=1, next_seed=15, provenance=_on_policy(8))
    assert (state.played(4), state.played(8), state.played(12), state.played(0)) == ({0: 1, 1: 1}, {1: 2}, {}, {})
    assert (state.last_played(0), state.last_played(1), state.last_played(2)) == ((4, 1), (8, 2), (0, 0))


@pytest.mark.parametrize("eviction", ["fifo", "onpolicy_first"])
def test_eviction_fifo_or_on_policy_first(eviction):
    state = BufferState(capacity=10, eviction=eviction)
    state.add("demos", 6)
    state.add("p1", 3, provenance=_on_policy(1))
    state.add("p2", 3, provenance=_on_policy(2))  # 12 > 10: two go
    state.add("p3", 4, provenance=_on_policy(3))  # four more go
    if eviction == "fifo":  # the oldest first, demos or not
        assert state.snapshot() == [("p1", 0, 3), ("p2", 0, 3), ("p3", 0, 4)]
        assert state.stats().onpolicy == 10
    else:  # the oldest on-policy trajectories first: the demo set stays whole
        assert state.snapshot() == [("demos", 0, 6), ("p3", 0, 4)]
        assert state.stats().onpolicy == 4
    assert state.stats().evicted == 6
    only_demos = BufferState(capacity=4, eviction="onpolicy_first")
    only_demos.add("a", 3)
    only_demos.add("b", 3)  # no on-policy data to evict: the oldest demos go
    assert only_demos.snapshot() == [("a", 2, 1), ("b", 0, 3)]


def test_a_batch_has_one_provenance():
    demo = Trajectory.from_steps("m", "l", 0, ["o0", "o1"], ["left"], success=True)
    assert batch_provenance([demo, demo]) == EXPERT == batch_provenance([])
    played = demo.with_provenance(_on_policy(3))
    assert batch_provenance([played]) == Provenance("on_policy", 3, 0.5)  # per-trajectory counts left out
    with pytest.raises(ValueError, match="one source, policy version and beta"):
        batch_provenance([demo, played])
    with pytest.raises(ValueError, match="needs the policy_version"):
        Provenance("on_policy", 0, 0.5)
    with pytest.raises(ValueError, match="source must be one of"):
        Provenance("replay")  # not a source


def test_journal_round_trip_with_provenance_and_old_journals_load_as_expert_demos(tmp_path, policy):
    trajs, _ = dagger_episodes(_worlds(2), range(3), _act(policy), beta=0.5, version=9, history_steps=1)
    journal = BufferJournal(Location.parse(tmp_path / "journal"))
    journal.append(JournalRecord(0, 3, trajs, batch_provenance(trajs)))
    journal.append(JournalRecord(0, 6, [], _on_policy(9)))  # a dropped batch keeps its provenance
    (first, dropped) = list(BufferJournal(Location.parse(tmp_path / "journal")).records())
    assert first.trajectories == trajs and first.provenance == Provenance("on_policy", 9, 0.5)
    assert [t.provenance for t in first.trajectories] == [t.provenance for t in trajs]
    assert [t.meta["executed"] for t in first.trajectories] == [t.meta["executed"] for t in trajs]
    assert dropped.provenance == _on_policy(9)
    assert [Trajectory.from_dict(t.to_dict()) for t in trajs] == trajs  # the JSONL record carries it too

    old = list(BufferJournal(Location.parse(OLD_JOURNAL)).records())
    assert [len(r.trajectories) for r in old] == [2, 1] and [r.next_seed for r in old] == [2, 3]
    demos = [t for r in old for t in r.trajectories]
    assert [t.seed for t in demos] == [0, 1, 2] and all(t.provenance == EXPERT for t in demos)
    assert all(r.provenance == EXPERT for r in old)
    expert, _ = collect_expert_trajectories(make_world(EnvConfig(obs_encoding="compact")), range(3))
    assert demos == expert  # the same demos the bot writes today, provenance included
    state = BufferState(capacity=10, expert_quota=3)  # a buffer replaying it, as a restarted actor does
    for r in old:
        state.add(r.trajectories, len(r.trajectories), r.worker, r.next_seed, r.provenance)
    assert (state.stats().size, state.stats().onpolicy, state.wants_expert()) == (3, 0, False)
    assert pickle.loads(pickle.dumps(demos[0])) == demos[0]


# -- weights that cannot be loaded ---------------------------------------------------------------------------------


def test_an_unloadable_state_dict_is_rejected_and_leaves_the_model_untouched(policy):
    from anyorder_ray.roles.weights import WeightsRejected, load_policy_weights

    cfg, model, _ = policy
    tokenizer = build_tokenizer(cfg.model, cfg.env)
    skeleton = build_model(cfg.model, tokenizer, seed=1).eval()
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    good = {k: v.clone() for k, v in model.state_dict().items()}
    first = next(iter(good))
    wrong_shape = {**good, first: torch.zeros(3, 3)}
    missing = {k: v for k, v in good.items() if k != first}
    not_finite = {**good, first: torch.full_like(good[first], float("nan"))}
    config = build_model_config(cfg.model, tokenizer)
    for bad, match in ((wrong_shape, "has shape"), (missing, "missing keys"), (not_finite, "non-finite"),
                       ({**good, "extra.weight": torch.ones(1)}, "unexpected keys"), (42, "got int")):  # fmt: skip
        with pytest.raises(WeightsRejected, match=match):
            load_policy_weights(skeleton, bad, config, torch.device("cpu"))
        for k, v in skeleton.state_dict().items():
            assert torch.equal(v, before[k]), (match, k)  # not a single tensor was copied
    loaded = load_policy_weights(skeleton, good, config, torch.device("cpu"))
    assert loaded is skeleton and all(torch.equal(v, good[k]) for k, v in skeleton.state_dict().items())


def test_every_publication_is_new_to_the_actors_even_a_repeated_version_or_a_restarted_board():
    from anyorder_ray.roles.weights import PolicyBoard

    board = PolicyBoard()
    assert board.stamp()[1] == 0  # no weights yet
    first = board.publish(["w8"], 8, planned_steps=100)
    again = board.publish(["w8 of a restarted trainer"], 8, planned_steps=100)
    assert first != again and board.latest() == (again, 8, 100, ["w8 of a restarted trainer"])
    restarted = PolicyBoard()
    assert restarted.publish(["w12"], 12)[1] == first[1] and restarted.stamp() != first  # same count, other board
    board.reject(0, 8, "shape mismatch")
    assert board.stats() == {"rollout/weights_published": 2, "rollout/weights_rejected": 1,
                             "rollout/weights_rejected_in_a_row": 1}  # fmt: skip
    with pytest.raises(ValueError, match="training step >= 1"):
        board.publish(["w0"], 0)


# -- on a real local Ray -------------------------------------------------------------------------------------------


def _dagger_cfg(*overrides: str) -> ExperimentConfig:
    return load_config(ROOT / "tune_configs" / "smoke.yaml", ["data.regime=dagger", "data.num_demos=8",
                       "rollout.episodes_per_batch=4", "rollout.batch_envs=4", "rollout.idle_poll_s=0.1",
                       "rollout.max_restarts=1", "eval.enabled=false", *overrides])  # fmt: skip


@pytest.mark.slow
def test_a_policy_actor_restarts_with_the_latest_weights_and_skips_an_unloadable_version(ray_local, policy):
    """A dagger rollout actor: expert demos up to the budget, then idle until weights exist; on-policy batches under
    the published version; SIGKILLed, it restarts and acts with the board's latest version again; a version whose
    tensors do not fit the model is rejected (logged, counted on the board) and never acts; the next good one does."""
    import os
    import signal

    from helpers import HANG_GUARD_S

    from anyorder_ray.roles.trial import make_board, make_buffer, make_rollout_actor

    ray = ray_local
    cfg = _dagger_cfg()
    _, model, _ = policy
    good = {k: v.detach().clone() for k, v in model.state_dict().items()}
    first = next(iter(good))
    bad = {**good, first: torch.zeros(2, 2)}  # wrong shape: cannot be loaded
    buffer, buffer_name = make_buffer(cfg)
    board, board_name = make_board(cfg)
    actor = make_rollout_actor(cfg, 0, buffer_name, board_name)
    stats = lambda: ray.get(buffer.stats.remote())  # noqa: E731
    rejected = lambda: ray.get(board.stats.remote())["rollout/weights_rejected"]  # noqa: E731
    # The actor runs one call at a time: while `run` is in flight the test watches the buffer and the board only.
    try:
        first_pid = ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()))  # queued before `run`
        run = actor.run.remote()
        wait_for(lambda: stats().produced >= 8, "the demo budget")
        assert (stats().size, stats().onpolicy) == (8, 0)  # no weights yet: the expert alone, within the budget

        ray.get(board.publish.remote([ray.put(good)], 3, 100))
        wait_for(lambda: stats().onpolicy >= 4, "an on-policy batch under version 3")
        os.kill(first_pid, signal.SIGKILL)
        killed_at = stats().produced
        resume_at_kill = ray.get(buffer.resume_seed.remote(0))
        wait_for(lambda: stats().produced >= killed_at + 8, "two batches of the restarted actor")

        ray.get(board.publish.remote([ray.put(bad)], 4, 100))
        wait_for(lambda: rejected() == 1, "the rejection")
        rejected_at = stats().produced
        wait_for(lambda: stats().produced >= rejected_at + 8, "two batches after the rejection")
        ray.get(board.publish.remote([ray.put(good)], 6, 100))
        wait_for(lambda: stats().policy_version == 6, "a batch under version 6")
        ray.get(buffer.stop.remote())
        report = ray.get(run, timeout=HANG_GUARD_S)  # retried on the restarted process, ended by the stop
        second_pid = ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()))
        n_rejected = rejected()
    finally:
        ray.kill(actor, no_restart=True)
    held = held_trajectories(buffer)
    ray.kill(buffer, no_restart=True)
    ray.kill(board, no_restart=True)

    assert second_pid != first_pid and report.policy_version == 6 and n_rejected == 1
    demos = [t for t in held if not t.provenance.on_policy]
    played = [t for t in held if t.provenance.on_policy]
    assert len(demos) == 8 and all(t.success for t in demos)  # exactly the demo budget
    versions = [t.provenance.policy_version for t in played]
    assert 4 not in versions and set(versions) == {3, 6}  # the bad version never acted
    assert versions == sorted(versions)
    after_restart = [t for t in held if t.seed >= resume_at_kill]
    assert after_restart[0].seed == resume_at_kill  # the restarted actor went on where the buffer said
    assert after_restart[0].provenance.policy_version == 3  # ... with the board's latest weights, not the expert alone
    for t in played:
        assert t.provenance.beta == pytest.approx(cfg.rollout.beta(t.provenance.policy_version, 100))
    # No episode twice across the restart (a dagger episode may be several segments of one seed).
    episodes = [(t.seed, t.meta.get("segment", 0)) for t in held]
    assert len(set(episodes)) == len(episodes)


@pytest.mark.slow
def test_a_tiny_dagger_trial_trains_on_relabelled_on_policy_data(ray_local, tmp_path):
    """The trial's actors (``start_actors``: buffer with its journal, policy board, dagger rollout actor) and a real
    TorchTrainer running ``train_loop_per_worker``: rank 0 publishes weights every 4 steps, the rollout actor plays
    with them, and its relabelled trajectories (policy version > 0) enter the buffer, its journal and the reports."""
    import json

    from helpers import WaitForOnPolicyData

    from anyorder_ray.roles.train_loop import METRICS_LOG
    from anyorder_ray.roles.trial import start_actors

    cfg = _dagger_cfg("train.max_steps=24", "train.report_every=4", "train.checkpoint_every=0",
                      "rollout.weights_every_steps=4", "train.cpus_per_worker=1")  # fmt: skip
    journal = Location.parse(tmp_path / "trajectories")
    actors = start_actors(cfg, journal=journal)
    try:
        loop = actors.loop_config(cfg, Location.parse(tmp_path / "run" / METRICS_LOG))
        # Step 8 waits for on-policy data (a synchronisation): the refresh at step 20 then sees it.
        loop["after_step"] = WaitForOnPolicyData(actors.buffer, 8)
        result = fit_one_worker(loop, tmp_path / "run")
    finally:
        actors.stop()
    assert result.error is None
    log = [json.loads(line) for line in (tmp_path / "run" / METRICS_LOG).read_text().splitlines()]
    assert [r["train/step"] for r in log] == [4, 8, 12, 16, 20, 24]
    last = log[-1]
    assert 0 < last["rollout/onpolicy_fraction"] < 1 and last["rollout/policy_version"] in (4, 8, 12, 16, 20)
    assert last["rollout/beta"] == pytest.approx(cfg.rollout.beta(last["rollout/policy_version"], 24))
    assert last["rollout/weights_published"] >= 2 and last["rollout/weights_rejected"] == 0
    # The actor's policy forwards are counted and added to the training FLOPs (the trial's total compute).
    assert last["rollout/inference_flops"] > 0
    assert last["compute/total_flops"] == pytest.approx(last["train/total_flops"] + last["rollout/inference_flops"])
    flops = [r["rollout/inference_flops"] for r in log]
    assert flops == sorted(flops)
    records = list(BufferJournal(journal).records())
    played = [t for r in records for t in r.trajectories if t.provenance.on_policy]
    assert played and all(t.provenance.policy_version > 0 for t in played)
    sources = [r.provenance.on_policy for r in records if r.trajectories]
    assert sources == sorted(sources)  # the demo set first (training starts on it), then on-policy data only
    assert sum(len(r.trajectories) for r in records if not r.provenance.on_policy) == 8  # the demo budget


@pytest.mark.slow
def test_the_synced_wait_ends_when_every_actor_played_or_rejected_the_version_and_times_out_naming_the_rest(ray_local):
    """``BufferSource.wait_for_version`` on the trial's real buffer and board actors: it returns once every actor has
    its batches of the version acknowledged or has rejected the version, and otherwise fails after its timeout,
    naming the actors it still waits for."""
    from anyorder_ray.roles.train_loop import BufferSource
    from anyorder_ray.roles.trial import make_board, make_buffer

    ray = ray_local
    cfg = _dagger_cfg()
    buffer, _ = make_buffer(cfg)
    board, _ = make_board(cfg)
    try:
        source = BufferSource(buffer, board=board)
        demo = Trajectory.from_steps("m", "l", 0, ["o0", "o1"], ["left"], success=True)
        played = [demo.with_provenance(_on_policy(4))]
        ray.get(buffer.add.remote(played, 0, 1))
        with pytest.raises(TimeoutError, match=r"version 4 from rollout actor\(s\) \[0\] .*sync_timeout_s"):
            source.wait_for_version(4, actors=1, batches=2, timeout_s=0.3)  # one of its two batches only
        ray.get(buffer.add.remote(played, 0, 2))
        ray.get(board.reject.remote(1, 4, "does not fit"))  # actor 1 rejected version 4: not waited for
        assert source.wait_for_version(4, actors=2, batches=2, timeout_s=30) >= 0
        with pytest.raises(TimeoutError, match=r"version 8 from rollout actor\(s\) \[0, 1\]"):
            source.wait_for_version(8, actors=2, timeout_s=0.3)
    finally:
        ray.kill(buffer, no_restart=True)
        ray.kill(board, no_restart=True)


@pytest.mark.slow
def test_a_synced_dagger_trial_trains_on_the_same_data_however_far_ahead_its_actor_runs(ray_local, tmp_path):
    """``rollout.sync``: the rollout actor plays exactly two batches under each version (``sync_batches``) and the
    trainer takes them in at the next publication, so a trial whose trainer sleeps half a second after every step (its
    actor far ahead; without sync it would play more batches per version and training would pick up more of them)
    reports the same losses as one that does not, from the same on-policy data. (Without sync the two differ from
    step 24 on: the refresh at step 20 finds more on-policy batches in the slow run.)"""
    import json

    from helpers import SlowSteps

    from anyorder_ray.roles.train_loop import METRICS_LOG
    from anyorder_ray.roles.trial import start_actors

    cfg = _dagger_cfg("train.max_steps=28", "train.report_every=4", "train.checkpoint_every=0",
                      "rollout.weights_versions=7", "train.cpus_per_worker=1", "rollout.sync=true",
                      "rollout.sync_batches=2", "data.bucket_pool_batches=1")  # fmt: skip
    # 7 versions over 28 planned steps: one every 4 steps. bucket_pool_batches=1: every step draws from the view as it
    # is then.
    runs = {}
    for name, hook in (("quick", None), ("slow", SlowSteps(0.5))):
        journal = Location.parse(tmp_path / name / "trajectories")
        actors = start_actors(cfg, journal=journal)
        try:
            loop = actors.loop_config(cfg, Location.parse(tmp_path / name / "run" / METRICS_LOG))
            loop["after_step"] = hook
            result = fit_one_worker(loop, tmp_path / name / "run")
        finally:
            actors.stop()
        assert result.error is None
        log = [json.loads(line) for line in (tmp_path / name / "run" / METRICS_LOG).read_text().splitlines()]
        records = [r for r in BufferJournal(journal).records() if r.provenance.on_policy]
        runs[name] = (log, records)
    for log, records in runs.values():
        assert [r["train/step"] for r in log] == [4, 8, 12, 16, 20, 24, 28] and log[-1]["train/sync_wait_s"] >= 0
        # Two batches per version, every version but the last (published at step 24, never waited for) taken in.
        versions = [r.provenance.policy_version for r in records]
        assert versions[:10] == [4, 4, 8, 8, 12, 12, 16, 16, 20, 20] and versions[10:] in ([], [24], [24, 24])
    (quick_log, quick_records), (slow_log, slow_records) = runs["quick"], runs["slow"]
    assert [r["train/loss"] for r in quick_log] == [r["train/loss"] for r in slow_log]
    assert [r["train/total_tokens"] for r in quick_log] == [r["train/total_tokens"] for r in slow_log]
    played = lambda records: [t for r in records[:10] for t in r.trajectories]  # noqa: E731 (units, provenance: all)
    assert played(quick_records) == played(slow_records) and played(quick_records)
