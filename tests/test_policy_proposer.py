"""The policy proposer for early-experience branches (issue 13, ``data.branch_proposer: policy``): on real BabyAI
GoToLocal demos and the smoke preset's tiny LLaDA2 through the acting ``ActionScorer``: what it proposes (distinct,
valid, never the label, a function of the generator and the weights), that it follows the policy (a model made to
prefer one action gets it proposed first), the config checks, the buffer carrying policy branches with on-policy
batches, and on a real local Ray a dagger rollout actor branching its demos with the published weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import expert_trajectories

from anyorder_ray.config import ConfigError, load_config
from anyorder_ray.data.encoding import UnitEncoder
from anyorder_ray.evaluation.proposer import PolicyProposer
from anyorder_ray.evaluation.scoring import ActionScorer, PolicyQuery
from anyorder_ray.models.factory import build_model, build_model_config, build_tokenizer
from anyorder_ray.roles.buffer import BufferState, DemoSpan
from envs import EnvConfig, make_world
from envs.branches import branch_trajectories, uniform_proposer
from envs.trajectory import EXPERT, Provenance

ROOT = Path(__file__).resolve().parent.parent
LEVEL = "BabyAI-GoToLocal-v0"
ENV = EnvConfig(level=LEVEL, obs_encoding="compact")
ACTIONS = ("left", "right", "forward", "pickup", "drop", "toggle", "done")


@pytest.fixture(scope="module")
def policy(one_torch_thread):
    """The smoke preset's tiny LLaDA2 (seeded init) and the scorer a dagger rollout actor acts with."""
    cfg = load_config(ROOT / "tune_configs" / "smoke.yaml", [f"env.level={LEVEL}", "env.obs_encoding=compact"])
    tokenizer = build_tokenizer(cfg.model, cfg.env)
    model = build_model(cfg.model, tokenizer, seed=0).float().eval()
    scorer = ActionScorer(UnitEncoder(tokenizer), make_world(ENV).action_names, cfg.history_steps(),
                          cfg.data.max_seq_len, count_flops=build_model_config(cfg.model, tokenizer))  # fmt: skip
    return model, scorer


@pytest.fixture(scope="module")
def demos():
    return expert_trajectories(LEVEL, range(3), obs_encoding="compact")


def _branches(proposer, demo, k: int, seed: int, version: int = 5) -> list:
    world = make_world(ENV, expert=False)
    return branch_trajectories(world, demo, k, np.random.default_rng(seed), 1, proposer, policy_version=version)


def test_policy_alternatives_are_distinct_valid_not_the_label_and_a_function_of_the_rng(policy, demos):
    model, scorer = policy
    proposer = PolicyProposer(scorer, model)
    flops = scorer.flops
    for demo in demos:
        one = _branches(proposer, demo, 3, seed=0)
        assert one == _branches(proposer, demo, 3, seed=0)  # same generator, same weights: the same branches
        assert one != _branches(proposer, demo, 3, seed=1)
        assert len(one) == 3 * demo.num_actions  # BabyAI: 6 candidates in every state
        for t in range(demo.num_actions):
            alts = [b.actions[-1] for b in one if b.meta["branch_step"] == t]
            assert len(set(alts)) == 3 and demo.actions[t] not in alts and set(alts) <= set(ACTIONS)
        assert all(b.provenance == Provenance("branch", 5, 1.0, 1) for b in one)  # the weights' version recorded
    assert scorer.flops > flops  # the proposer's forwards are counted where the acting ones are
    # k past the candidates: every one of them, in the policy's draw order.
    every = _branches(proposer, demos[0], 10, seed=0)
    assert sorted(b.actions[-1] for b in every if b.meta["branch_step"] == 0) == sorted(
        a for a in ACTIONS if a != demos[0].actions[0]
    )


def test_prefetched_scores_are_the_per_state_scores_in_one_forward(policy, demos):
    model, scorer = policy
    demo = demos[1]
    candidates = [a for a in ACTIONS if a != "left"]
    direct = PolicyProposer(scorer, model)
    fetched = PolicyProposer(scorer, model)
    flops = scorer.flops
    fetched.prefetch(demo, range(demo.num_actions))
    one_forward = scorer.flops - flops
    for t in range(demo.num_actions):
        assert np.allclose(fetched.scores(demo, t, candidates), direct.scores(demo, t, candidates), atol=1e-5)
        # the scorer's own query at that state: the demo's steps before t as the history
        expected = scorer.score(model, [PolicyQuery.at(demo, t)], [candidates])[0].double().numpy()
        assert np.allclose(fetched.scores(demo, t, candidates), expected, atol=1e-5)
    assert scorer.flops - flops > one_forward  # the direct ones cost a forward per state; the prefetch one in all


def test_a_model_made_to_prefer_one_action_gets_it_proposed_first(policy, demos):
    """Scaling the LM head by ``c`` multiplies every score difference by exactly ``c``: the model then puts nearly all
    its mass on its favourite candidate in each state. Its proposer draws that one first under every generator (the
    margin is >= 40 nats, so a Gumbel draw overturning it has probability below e^-40); the uniform proposer does
    not."""
    model, scorer = policy
    demo = max(demos, key=lambda d: d.num_actions)
    states = range(demo.num_actions)
    candidates = {t: [a for a in ACTIONS if a != demo.actions[t]] for t in states}
    base = PolicyProposer(scorer, model)
    gaps = []
    favourite = {}
    for t in states:
        s = np.sort(base.scores(demo, t, candidates[t]))
        gaps.append(s[-1] - s[-2])
        favourite[t] = candidates[t][int(np.argmax(base.scores(demo, t, candidates[t])))]
    scale = 40.0 / min(gaps)
    sharp = build_model_like(model, scale)
    proposer = PolicyProposer(scorer, sharp)
    proposer.prefetch(demo, states)
    policy_first = uniform_first = 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        for t in states:
            policy_first += proposer(demo, t, candidates[t], 2, rng)[0] == favourite[t]
            uniform_first += uniform_proposer(demo, t, candidates[t], 1, rng)[0] == favourite[t]
    draws = 30 * len(states)
    assert policy_first == draws
    assert uniform_first < draws / 2  # ~1/6 of the draws


def build_model_like(model, lm_head_scale: float):
    """A copy of ``model`` with its LM head scaled (every logit times ``lm_head_scale``)."""
    import copy

    sharp = copy.deepcopy(model)
    with torch.no_grad():
        sharp.lm_head.weight.mul_(lm_head_scale)
    return sharp


def test_the_first_alternative_is_a_draw_of_the_policy_restricted_to_the_candidates(policy, demos):
    """At temperature 2 the first alternative of state 0 is drawn with probability softmax(score / 2) over the
    candidates: over 4000 seeded draws (a fixed, reproducible sample) every frequency is within 0.03 of it (about four
    standard errors)."""
    model, scorer = policy
    demo = demos[0]
    candidates = [a for a in ACTIONS if a != demo.actions[0]]
    proposer = PolicyProposer(scorer, model, temperature=2.0)
    proposer.prefetch(demo, [0])
    logits = proposer.scores(demo, 0, candidates) / 2.0
    expected = np.exp(logits - logits.max())
    expected /= expected.sum()
    rng = np.random.default_rng(0)
    firsts = [proposer(demo, 0, candidates, 1, rng)[0] for _ in range(4000)]
    freq = np.array([firsts.count(a) for a in candidates]) / len(firsts)
    assert np.abs(freq - expected).max() < 0.03
    with pytest.raises(ValueError, match="temperature must be > 0"):
        PolicyProposer(scorer, model, temperature=0.0)


# -- config ----------------------------------------------------------------------------------------------------------


def test_the_policy_proposer_needs_the_dagger_regime_and_branches(tmp_path):
    ok = ["data.regime=dagger", "data.num_demos=16", "data.branches_per_state=1", "data.branch_proposer=policy",
          "masking.mode=iwm", "masking.branches=0.5", "sweep.arms=[]"]  # fmt: skip
    cfg = load_config(None, ok)
    assert cfg.data.branch_proposer == "policy" and cfg.collects_branches()
    path = tmp_path / "bad.yaml"
    path.write_text("data: {regime: fixed, branch_proposer: policy, branches_per_state: 0, branch_temperature: 0}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "bad.yaml" in msg and "only the dagger regime has them (regime is 'fixed')" in msg
    assert "branches_per_state is 0" in msg and "branch_temperature must be > 0" in msg
    with pytest.raises(ConfigError, match="no arm trains on branches"):
        load_config(None, [*ok[:4], "sweep.arms=[]"])  # the default arm does not train on branches
    with pytest.raises(ConfigError, match=r"data.branch_proposer = 'greedy' .*'uniform', 'policy'"):
        load_config(None, ["data.branch_proposer=greedy"])


# -- the buffer ------------------------------------------------------------------------------------------------------


def test_the_buffer_knows_each_producers_demo_span_and_keeps_it_through_trims_and_drops():
    state = BufferState(capacity=100, expert_quota=5)
    assert state.demo_span(0) is None
    state.add("a", 3, worker=0, next_seed=4, seeds=[0, 2, 3])  # seed 1 failed
    state.add("b", 3, worker=1, next_seed=104, seeds=[100, 101, 103])  # trimmed to 2: the quota is 5
    state.add("c", 2, worker=0, next_seed=8, seeds=[4, 5])  # past the quota: dropped
    on_policy = Provenance("on_policy", 3, 0.5, 2)
    state.add("d", 4, worker=0, next_seed=12, provenance=on_policy, seeds=[8, 9, 10, 11])  # moves no span
    assert state.demo_span(0) == DemoSpan(stop=4, next_seed=8)
    assert state.demo_span(1) == DemoSpan(stop=102, next_seed=104)
    assert state.stats().expert_dropped == 3 and EXPERT.source == "expert"


# -- on a real local Ray ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_policy_branches_ride_with_their_on_policy_batch_through_repeats_and_the_journal(ray_local, tmp_path, demos):
    """The buffer (``TrajectoryBuffer``, here in the driver) keeps the policy's branches an on-policy batch carries
    exactly when it keeps the batch: a repeated batch (a restarted actor's redo) brings none; a buffer rebuilt from its
    journal holds the same branches and the same demo spans."""
    from anyorder_ray.roles.buffer import TrajectoryBuffer
    from anyorder_ray.storage import Location

    world = make_world(ENV, expert=False)
    version = Provenance("branch", 3, 1.0, 1)
    branches = [b for d in demos for b in branch_trajectories(world, d, 1, np.random.default_rng(d.seed), 1,
                                                               policy_version=3)]  # fmt: skip
    played = [d.with_provenance(Provenance("on_policy", 3, 0.5, 1)) for d in demos]
    journal = Location.parse(tmp_path / "journal")
    buffer = TrajectoryBuffer(100, journal=journal, expert_quota=len(demos))
    buffer.add(demos, worker=0, next_seed=10)
    buffer.add(played[:1], 0, 14, branches)  # the policy's branches of the demos ride with an on-policy batch
    buffer.add(played[:1], 0, 14, branches)  # the redo of that batch: dropped, its branches too
    stats = buffer.stats()
    assert (stats.branches, stats.repeated, stats.onpolicy) == (len(branches), 1, 1)
    assert all(b.provenance == version for b in branches) and buffer.demo_span(0) == DemoSpan(demos[-1].seed + 1, 10)
    rebuilt = TrajectoryBuffer(100, journal=journal, expert_quota=len(demos))
    assert rebuilt.stats().branches == len(branches) and rebuilt.demo_span(0) == buffer.demo_span(0)
    with pytest.raises(ValueError, match="branches come with their expert demos or an on-policy batch"):
        buffer.add(branches, 0, 20, branches)


@pytest.mark.slow
def test_a_dagger_actor_branches_its_demos_with_the_published_weights_once_across_a_restart(ray_local):
    """A dagger rollout actor with ``branch_proposer: policy``: its demos come with uniform branches (no weights yet);
    once weights of version 3 are published, its on-policy batches carry the policy's branches of those demos (version
    3), and the forwards are counted. SIGKILLed after its first batch of policy branches, it restarts with the same
    weights and the redo of its seeds neither repeats nor skips a demo: every branched state of every demo is branched
    by the policy exactly once."""
    import os
    import signal

    from helpers import HANG_GUARD_S, held_trajectories, wait_for

    from anyorder_ray.roles.trial import make_board, make_buffer, make_rollout_actor

    ray = ray_local
    # Two episodes per batch: the policy branches of the 8 demos come over four on-policy batches, so the kill lands
    # with demos still to branch (printed; the exactly-once check holds wherever it lands).
    cfg = load_config(ROOT / "tune_configs" / "smoke.yaml", ["data.regime=dagger", "data.num_demos=8",
                      "rollout.episodes_per_batch=2", "rollout.batch_envs=2", "rollout.idle_poll_s=0.1",
                      "rollout.max_restarts=1", "eval.enabled=false", "data.branches_per_state=1",
                      "data.branch_proposer=policy", "masking.mode=iwm", "masking.branches=0.5",
                      "sweep.arms=[]"])  # fmt: skip
    model = build_model(cfg.model, build_tokenizer(cfg.model, cfg.env), seed=0)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    buffer, buffer_name = make_buffer(cfg)
    board, board_name = make_board(cfg)
    actor = make_rollout_actor(cfg, 0, buffer_name, board_name)
    stats = lambda: ray.get(buffer.stats.remote())  # noqa: E731

    def branched_by_policy(held: list) -> set[int]:
        return {t.seed for t in held if t.provenance.source == "branch" and t.provenance.policy_version == 3}

    def policy_branches_of_every_demo():
        held = held_trajectories(buffer)
        demo_seeds = {t.seed for t in held if t.provenance.source == "expert"}
        return held if branched_by_policy(held) >= demo_seeds else None

    try:
        first_pid = ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()))  # queued before `run`
        run = actor.run.remote()
        wait_for(lambda: stats().size - stats().branches == 8, "the demo budget")
        ray.get(board.publish.remote([ray.put(weights)], 3, 100))
        wait_for(lambda: branched_by_policy(held_trajectories(buffer)), "the first policy branches", poll_s=0.2)
        os.kill(first_pid, signal.SIGKILL)
        at_kill = branched_by_policy(held_trajectories(buffer))
        held = wait_for(policy_branches_of_every_demo, "the policy's branches of every demo", poll_s=0.5)
        ray.get(buffer.stop.remote())
        report = ray.get(run, timeout=HANG_GUARD_S)  # retried on the restarted process, ended by the stop
        second_pid = ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()))
    finally:
        ray.kill(actor, no_restart=True)
        ray.kill(buffer, no_restart=True)
        ray.kill(board, no_restart=True)

    print(f"demos branched by the policy at the kill: {len(at_kill)} of 8")
    demos = {t.seed: t for t in held if t.provenance.source == "expert"}
    assert second_pid != first_pid and len(demos) == 8 and report.policy_version == 3 and report.inference_flops > 0
    uniform = [t for t in held if t.provenance == Provenance("branch")]
    by_policy = [t for t in held if t.provenance.source == "branch" and t.provenance.policy_version > 0]
    assert by_policy and all(t.provenance == Provenance("branch", 3, 1.0, 1) for t in by_policy)
    assert len(uniform) == sum(d.num_actions for d in demos.values())  # one alternative per state, at collection
    # Every state of every demo branched once by the policy (k = 1), none twice (not even across the restart), none of
    # a demo not in the buffer.
    states = sorted((t.seed, t.meta["branch_step"]) for t in by_policy)
    assert states == sorted((seed, s) for seed, d in demos.items() for s in range(d.num_actions))
    for t in by_policy:
        demo, step = demos[t.seed], t.meta["branch_step"]
        assert t.meta["label"] == demo.actions[step] != t.actions[-1]
        assert t.observations[-2] == demo.observations[step]
