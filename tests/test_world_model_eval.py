"""World-model evaluation off the expert's states (issue 13): exact-match next-observation accuracy, the off-expert
branch set and the on-policy transition set, on real BabyAI data, and the eval actor's class reporting them.

The exact-match tests use models whose argmax is known: an oracle that puts its mass on the true tokens of the queries
it was built from (so a changed target or a planted wrong token must show), and the real tiny LLaDA2 model trained to
memorise one branch transition (the logits-mask path of the real forward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from helpers import babyai, expert_trajectories, world_tokenizer
from torch import nn

from anyorder_ray.config import EvalConfig, ModelConfig
from anyorder_ray.data.encoding import IGNORE_INDEX, UnitEncoder
from anyorder_ray.data.masking import UnitRole
from anyorder_ray.evaluation.episodes import run_episodes
from anyorder_ray.evaluation.nll import Transition, heldout_nll, nll_queries, transition_nll, world_model_query
from anyorder_ray.evaluation.scoring import ActionScorer, pad_id_of, target_log_probs
from anyorder_ray.evaluation.stats import eval_metrics
from anyorder_ray.evaluation.transitions import offexpert_branches, onpolicy_transitions
from envs import Trajectory, make_world

LEVEL = "BabyAI-GoToRedBallGrey-v0"
HISTORY = 1
MAX_LEN = 256
TINY = ModelConfig(overrides={"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
                              "moe_intermediate_size": 32})  # fmt: skip
NEW_KEYS = (
    "eval/world_model_exact",
    "eval/offexpert_world_model_nll",
    "eval/offexpert_world_model_nll_per_obs",
    "eval/offexpert_world_model_exact",
    "eval/onpolicy_world_model_nll",
    "eval/onpolicy_world_model_nll_per_obs",
    "eval/onpolicy_world_model_exact",
)


@dataclass
class _Out:
    logits: torch.Tensor


class OracleWorldModel(nn.Module):
    """Logit 10 on the true token at every mask position of the queries it knows (a table from the unpadded input ids
    to the target ids, read off the encoded queries), 0 elsewhere (and everywhere for any other query): its argmax is
    the right observation exactly."""

    def __init__(self, examples, mask_id: int, vocab_size: int) -> None:
        super().__init__()
        self.mask_id, self.vocab_size = mask_id, vocab_size
        self.table = {tuple(e.input_ids): [y for y in e.labels if y != IGNORE_INDEX] for e in examples}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> _Out:
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        for row in range(len(input_ids)):
            key = tuple(input_ids[row][attention_mask[row].bool()].tolist())
            if key in self.table:
                where = (input_ids[row] == self.mask_id).nonzero().flatten()
                logits[row, where, self.table[key]] = 10.0
        return _Out(logits)


@pytest.fixture(scope="module")
def tokenizer():
    return world_tokenizer()


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return UnitEncoder(tokenizer)


@pytest.fixture(scope="module")
def experts():
    return expert_trajectories(LEVEL, range(1_700_000_000, 1_700_000_006))


@pytest.fixture(scope="module")
def branches(experts):
    world = make_world(babyai(LEVEL), expert=False)
    return offexpert_branches(world, experts, k=2, cap=10_000, rng=np.random.default_rng(0), history_steps=HISTORY)


def _with_word_changed(traj: Trajectory, encoder: UnitEncoder) -> Trajectory:
    """``traj`` with one word of its last observation replaced by another word of the same token length."""
    words = traj.observations[-1].split(" ")
    other = next(w for o in traj.observations for w in o.split(" ") if w != words[0]
                 and len(encoder.encode_text(w)) == len(encoder.encode_text(words[0])))  # fmt: skip
    units = list(traj.units)
    units[-1] = replace(units[-1], text=" ".join([other, *words[1:]]))
    return replace(traj, units=tuple(units))


# --- exact match --------------------------------------------------------------------------------------------


def test_exact_match_counts_queries_whose_whole_observation_is_the_argmax(tokenizer, encoder, experts):
    world = [q for traj in experts for q in nll_queries(traj, encoder, HISTORY, MAX_LEN)[0]]
    oracle = OracleWorldModel(world, tokenizer.mask_token_id, len(tokenizer))
    right = heldout_nll(oracle, encoder, experts, HISTORY, MAX_LEN, batch_size=5)
    assert right.world_model_exact == 1.0
    # The NLL of the same forward: logit 10 on the true token, 0 on the V - 1 others, at every position.
    assert right.world_model_nll == pytest.approx(math.log1p((len(tokenizer) - 1) * math.exp(-10.0)), rel=1e-4)

    # One wrong token in every other query: exactly the rest are exact matches.
    for i, q in enumerate(world):
        if i % 2:
            labels = oracle.table[tuple(q.input_ids)]
            labels[-1] = (labels[-1] + 1) % len(tokenizer)
    half = heldout_nll(oracle, encoder, experts, HISTORY, MAX_LEN, batch_size=3)
    assert half.world_model_exact == pytest.approx(sum(1 for i in range(len(world)) if i % 2 == 0) / len(world))
    assert half.world_model_nll > right.world_model_nll

    # A changed target observation (the visible query is the same, so the oracle answers the old one): no longer exact.
    oracle = OracleWorldModel(world, tokenizer.mask_token_id, len(tokenizer))
    changed = [_with_word_changed(t, encoder) for t in experts]
    assert heldout_nll(oracle, encoder, experts, HISTORY, MAX_LEN, last_only=True).world_model_exact == 1.0
    assert heldout_nll(oracle, encoder, changed, HISTORY, MAX_LEN, last_only=True).world_model_exact == 0.0


def test_tiny_llada2_that_memorised_a_branch_transition_reconstructs_it_exactly(
    tokenizer, encoder, branches, one_torch_thread
):
    """The real model and its logits-mask forward: trained on one off-expert transition until it fits, its greedy
    one-pass reconstruction is exact there, and not for the same query with one word of the target changed."""
    from anyorder_ray.models.factory import build_model

    model = build_model(TINY, tokenizer, seed=0)
    branch = branches[3]
    (query,), _ = nll_queries(branch, encoder, HISTORY, MAX_LEN, last_only=True)
    before = heldout_nll(model, encoder, [branch], HISTORY, MAX_LEN, last_only=True)
    labels = torch.tensor([y for y in query.labels if y != IGNORE_INDEX])
    optim = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(400):
        (rows,) = target_log_probs(model, [query], pad_id_of(encoder))
        if bool((rows.argmax(-1) == labels).all()) and float(rows.detach().max(-1).values.min()) > math.log(0.9):
            break
        optim.zero_grad()
        (-rows.gather(1, labels[:, None]).sum()).backward()
        optim.step()
    after = heldout_nll(model, encoder, [branch], HISTORY, MAX_LEN, last_only=True)
    assert before.world_model_exact == 0.0 and after.world_model_exact == 1.0
    assert after.world_model_nll < 0.2 < before.world_model_nll and after.queries == 1
    changed = heldout_nll(model, encoder, [_with_word_changed(branch, encoder)], HISTORY, MAX_LEN, last_only=True)
    # Every true token has p > 0.9, so the changed one has p < 0.1: at least log 10 more nats on the observation.
    assert changed.world_model_exact == 0.0
    assert changed.world_model_nll_per_obs > after.world_model_nll_per_obs + math.log(10) - 0.5


# --- the off-expert branch set ------------------------------------------------------------------------------


def test_branch_queries_target_only_the_last_observation_after_the_alternative(encoder, experts, branches):
    for branch in branches[:12]:
        t = branch.meta["branch_step"]
        expert = next(e for e in experts if e.seed == branch.seed)
        world, action = nll_queries(branch, encoder, HISTORY, MAX_LEN, last_only=True)
        assert len(world) == 1 and action == []  # the alternative is no label: no action query
        (w,) = world
        assert [y for y in w.labels if y != IGNORE_INDEX] == list(encoder.encode_text(branch.observations[-1]))
        past = min(HISTORY, t)
        assert [r for r in w.roles if r is not UnitRole.DROPPED] == [UnitRole.VISIBLE] * (2 * past + 2) + [
            UnitRole.TARGET
        ]
        # The expert's own query at t with the alternative in place of the label: the same query.
        alt = world_model_query(expert.mission, expert.observations[: t + 1] + (branch.observations[-1],),
                                expert.actions[:t] + (branch.actions[-1],), t, encoder, HISTORY, MAX_LEN)  # fmt: skip
        assert w.input_ids == alt.input_ids and w.labels == alt.labels
        assert branch.actions[-1] != expert.actions[t] == branch.meta["label"]
        # Every step: one world query per transition, action queries for the expert labels only.
        all_world, all_action = nll_queries(branch, encoder, HISTORY, MAX_LEN)
        assert (len(all_world), len(all_action)) == (branch.num_actions, branch.num_actions - 1)


def test_offexpert_set_is_fixed_by_its_seed_and_capped(experts, branches):
    states = sum(e.num_actions for e in experts)
    assert len(branches) == 2 * states  # BabyAI has 6 alternatives to every label: k = 2 of them at each state
    assert len({(b.seed, b.meta["branch_step"], b.actions[-1]) for b in branches}) == len(branches)
    for b in branches:
        assert b.provenance.source == "branch" and b.labelled_actions[-1] is False
        assert b.num_actions == min(HISTORY, b.meta["branch_step"]) + 1

    def build(cap: int, seed: int) -> list[Trajectory]:
        world = make_world(babyai(LEVEL), expert=False)
        return offexpert_branches(world, experts, 2, cap, np.random.default_rng(seed), HISTORY)

    capped = build(7, 0)
    assert len(capped) == 7 and capped == build(7, 0)  # the same set at every build: every arm gets it
    assert capped != build(7, 1)
    assert build(0, 0) == []
    # Every branch is a real transition: the world, driven independently, agrees.
    world = make_world(babyai(LEVEL), expert=False)
    for b in capped:
        expert = next(e for e in experts if e.seed == b.seed)
        world.reset(b.seed)
        for a in expert.actions[: b.meta["branch_step"]]:
            world.step(a)
        assert world.step(b.actions[-1]).obs == b.observations[-1]


# --- the on-policy set --------------------------------------------------------------------------------------


def test_onpolicy_transitions_are_the_episodes_own_steps(tokenizer, encoder):
    from anyorder_ray.models.factory import build_model

    model = build_model(TINY, tokenizer, seed=0).eval()
    scorer = ActionScorer(encoder, make_world(babyai(LEVEL), expert=False).action_names, HISTORY, MAX_LEN)
    seeds = list(range(2_000_000_000, 2_000_000_004))
    stats = run_episodes(model, scorer, lambda: make_world(babyai(LEVEL, max_episode_steps=5), expert=False), seeds,
                         batch_envs=3)  # fmt: skip
    world = make_world(babyai(LEVEL, max_episode_steps=5), expert=False)
    for ep in stats.results:  # the recorded observations are the world's, replaying the executed actions
        obs, mission = world.reset(ep.seed)
        assert ep.mission == mission and len(ep.observations) == len(ep.actions) + 1 == ep.length + 1
        assert [obs] + [world.step(a).obs for a in ep.actions] == list(ep.observations)
    steps = sum(ep.length for ep in stats.results)

    every = onpolicy_transitions(stats.results, HISTORY, 10_000, np.random.default_rng(0))
    assert len(every) == steps
    first = stats.results[0]
    for t, tr in enumerate(every[: first.length]):
        lo = max(0, t - HISTORY)
        assert tr == Transition(first.mission, first.observations[lo : t + 2], first.actions[lo : t + 1])
    some = onpolicy_transitions(stats.results, HISTORY, 5, np.random.default_rng(0))
    assert len(some) == 5 and set(some) <= set(every)
    assert some == onpolicy_transitions(stats.results, HISTORY, 5, np.random.default_rng(0))

    # Scored on the executed actions: a world-model query per transition, no action NLL.
    nll = transition_nll(model, encoder, every, HISTORY, MAX_LEN, batch_size=4)
    assert nll.queries == steps and math.isnan(nll.action_nll) and nll.action_tokens == 0
    assert 0 < nll.world_model_nll < 3 * math.log(len(tokenizer)) and 0.0 <= nll.world_model_exact <= 1.0
    queries = [world_model_query(t.mission, t.observations, t.actions, len(t.actions) - 1, encoder, HISTORY, MAX_LEN)
               for t in every]  # fmt: skip
    oracle = OracleWorldModel(queries, tokenizer.mask_token_id, len(tokenizer))
    assert transition_nll(oracle, encoder, every, HISTORY, MAX_LEN).world_model_exact == 1.0


def test_eval_metrics_without_a_set_report_nan_and_no_transitions():
    from anyorder_ray.evaluation.episodes import EpisodeStats
    from anyorder_ray.evaluation.nll import NLLStats

    stats = EpisodeStats(successes=1, episodes=2, mean_length=3.0, results=(), seconds=1.0)
    m = eval_metrics(stats, NLLStats(1.0, 0.5, 10, 5, 15, 0.1, 20.0, 0.25), 3, 1.0,
                     onpolicy=NLLStats(2.0, math.nan, 10, 0, 4, 0.1, 30.0, 0.5))  # fmt: skip
    assert set(NEW_KEYS) <= set(m)
    assert m["eval/world_model_exact"] == 0.25 and m["eval/onpolicy_world_model_exact"] == 0.5
    assert m["eval/onpolicy_transitions"] == 4 and m["eval/offexpert_transitions"] == 0
    assert math.isnan(m["eval/offexpert_world_model_nll"]) and math.isnan(m["eval/offexpert_world_model_exact"])


# --- the eval actor's class ---------------------------------------------------------------------------------


def test_eval_worker_reports_expert_offexpert_and_onpolicy_world_model_metrics(tokenizer):
    from anyorder_ray.models.factory import build_model, build_tokenizer
    from anyorder_ray.roles.evaluator import EvalWorker

    env = babyai(LEVEL, max_episode_steps=6)
    eval_cfg = EvalConfig(episodes=3, heldout_trajectories=3, batch_envs=3, offexpert_transitions=5,
                          onpolicy_transitions=7)  # fmt: skip
    worker = EvalWorker(env, eval_cfg, TINY, history_steps=HISTORY, max_length=MAX_LEN)
    assert worker.offexpert_size() == 5
    model = build_model(TINY, build_tokenizer(TINY, env), seed=0)
    m = worker.evaluate(model.state_dict(), step=2)
    for key in NEW_KEYS:
        assert math.isfinite(m[key]), key
    for key in ("eval/world_model_exact", "eval/offexpert_world_model_exact", "eval/onpolicy_world_model_exact"):
        assert 0.0 <= m[key] <= 1.0, key
    steps = sum(ep.length for ep in worker.last_episodes().results)
    assert m["eval/offexpert_transitions"] == 5 and m["eval/onpolicy_transitions"] == min(7, steps)
    assert m["eval/offexpert_world_model_nll"] > 0 and m["eval/onpolicy_world_model_nll"] > 0
    assert m == {**worker.evaluate(model.state_dict(), step=2), "eval/seconds": m["eval/seconds"],
                 "eval/episodes_per_s": m["eval/episodes_per_s"]}  # fmt: skip
    # The report says how the actions were picked: greedy here; a sampling worker plays other episodes.
    assert m["eval/temperature"] == 0.0
    greedy = worker.last_episodes().results
    sampler = EvalWorker(env, replace(eval_cfg, temperature=1.0), TINY, history_steps=HISTORY,
                         max_length=MAX_LEN)  # fmt: skip
    assert sampler.evaluate(model.state_dict(), step=2)["eval/temperature"] == 1.0
    assert [e.seed for e in sampler.last_episodes().results] == [e.seed for e in greedy]
    assert [e.actions for e in sampler.last_episodes().results] != [e.actions for e in greedy]
