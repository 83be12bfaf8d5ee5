"""The action scorer, lockstep episodes, Wilson bounds, the held-out NLL protocol and eval seed ranges.

The scorer tests use small torch modules whose logits are forced (the issue asks for exactly that): they
make the right answer known, so a scorer that reads the wrong positions or normalises wrongly fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from helpers import babyai, expert_trajectories, world_tokenizer
from torch import nn

from anyorder_ray.config import EvalConfig, RolloutConfig
from anyorder_ray.data.encoding import IGNORE_INDEX, UnitEncoder
from anyorder_ray.data.masking import UnitRole
from anyorder_ray.data.seeds import eval_episode_seeds, heldout_trajectory_seeds, rollout_seed_range
from anyorder_ray.data.tokenization import SPECIAL_TOKENS
from anyorder_ray.evaluation.episodes import EpisodeStats, run_episodes, sample_action
from anyorder_ray.evaluation.nll import NLLStats, heldout_nll, nll_queries
from anyorder_ray.evaluation.scoring import ActionScorer, PolicyQuery
from anyorder_ray.evaluation.stats import eval_metrics, wilson_interval
from envs import make_world

LEVEL = "BabyAI-GoToRedBallGrey-v0"
ACTION_NAMES = make_world(babyai(LEVEL), expert=False).action_names


def worlds(max_steps: int | None = None):
    """The world factory ``run_episodes`` takes: a fresh GoToRedBallGrey world without its expert."""
    return lambda: make_world(babyai(LEVEL, max_episode_steps=max_steps), expert=False)


@dataclass
class _Out:
    logits: torch.Tensor


class ForcedMaskLogits(nn.Module):
    """Logits forced per position: ``mask_rows[j]`` at the j-th mask token of a row, ``other`` elsewhere."""

    def __init__(self, mask_id: int, mask_rows: torch.Tensor, other: torch.Tensor) -> None:
        super().__init__()
        self.mask_id = mask_id
        self.register_buffer("mask_rows", mask_rows.float())  # [n, V]
        self.register_buffer("other", other.float())  # [V]
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> _Out:
        self.calls += 1
        b, length = input_ids.shape
        logits = self.other.expand(b, length, -1).clone()
        is_mask = input_ids == self.mask_id
        rank = (is_mask.cumsum(-1) - 1).clamp(0, len(self.mask_rows) - 1)  # index of each mask token in its row
        logits[is_mask] = self.mask_rows[rank[is_mask]]
        return _Out(logits)


class ContentHashPolicy(nn.Module):
    """Deterministic and exactly batch/padding invariant: the action at a mask token is an integer hash of the
    real tokens of its row (so it changes with the observation and the history)."""

    def __init__(self, mask_id: int, vocab_size: int, action_ids: list[int]) -> None:
        super().__init__()
        self.mask_id, self.vocab_size = mask_id, vocab_size
        self.register_buffer("action_ids", torch.tensor(action_ids))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> _Out:
        b, length = input_ids.shape
        pos = torch.arange(1, length + 1)
        key = (input_ids * attention_mask * pos * pos).sum(-1) % 1_000_003  # integer arithmetic: exact
        choice = self.action_ids[(key * 7919) % len(self.action_ids)]
        logits = torch.zeros(b, length, self.vocab_size)
        logits[torch.arange(b), :, choice] = 4.0
        return _Out(logits)


class ReplayPolicy(nn.Module):
    """Plays back bot trajectories: looks the whole (unpadded) query up in a table built with the scorer."""

    def __init__(self, table: dict[tuple[int, ...], int], vocab_size: int) -> None:
        super().__init__()
        self.table, self.vocab_size = table, vocab_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> _Out:
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        for row in range(len(input_ids)):
            key = tuple(input_ids[row][attention_mask[row].bool()].tolist())
            logits[row, :, self.table[key]] = 10.0
        return _Out(logits)


@pytest.fixture(scope="module")
def tokenizer():
    return world_tokenizer()


@pytest.fixture
def model(tokenizer):
    """The real tiny LLaDA2 model for the world tokenizer, seed 0, in eval mode."""
    from anyorder_ray.models.llada2_moe import LLaDA2MoeModelLM, llada2_config

    torch.manual_seed(0)
    cfg = llada2_config(
        "tiny", vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return LLaDA2MoeModelLM(cfg).eval()


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return UnitEncoder(tokenizer)


@pytest.fixture(scope="module")
def bot_trajectories():
    return expert_trajectories(LEVEL, range(1_700_000_000, 1_700_000_006))


def _query(traj, t: int) -> PolicyQuery:
    return PolicyQuery.at(traj, t)


def _ids(tokenizer, words) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(w) for w in words]


# --- scorer -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("best", ["toggle", "left", "done"])
def test_scorer_picks_forced_best_action(tokenizer, encoder, bot_trajectories, best):
    vocab = len(tokenizer)
    mask_row = torch.zeros(1, vocab)
    mask_row[0, tokenizer.convert_tokens_to_ids(best)] = 3.0
    mask_row[0, tokenizer.convert_tokens_to_ids("forward")] = 2.0  # runner-up
    # Everywhere except the mask, "pickup" wins: a scorer reading the wrong position would pick it.
    other = torch.zeros(vocab)
    other[tokenizer.convert_tokens_to_ids("pickup")] = 9.0
    model = ForcedMaskLogits(tokenizer.mask_token_id, mask_row, other)
    scorer = ActionScorer(encoder, ACTION_NAMES, history_steps=2, max_length=256)
    traj = bot_trajectories[0]
    queries = [_query(traj, t) for t in range(traj.num_actions)]
    assert scorer.act(model, queries) == [best] * len(queries)
    assert model.calls == 1  # one forward for the whole batch (every action is one world token)


def test_log_probs_are_normalised_log_softmax(tokenizer, encoder, bot_trajectories):
    vocab = len(tokenizer)
    row = torch.randn(1, vocab, generator=torch.Generator().manual_seed(0)) * 3
    model = ForcedMaskLogits(tokenizer.mask_token_id, row, torch.zeros(vocab))
    queries = [_query(t, 0) for t in bot_trajectories]
    lp = ActionScorer(encoder, ACTION_NAMES, 2, 256).log_probs(model, queries)
    expected = torch.log_softmax(row[0], -1)[_ids(tokenizer, ACTION_NAMES)]
    assert lp.shape == (len(queries), len(ACTION_NAMES))
    assert (lp <= 0).all()
    torch.testing.assert_close(lp, expected.expand_as(lp))
    # Scoring every word of the vocabulary: together with the special tokens the mass is exactly 1.
    words = [w for w in tokenizer.get_vocab() if w not in SPECIAL_TOKENS]
    lp_all = ActionScorer(encoder, words, 0, 256).log_probs(model, queries[:1])[0]
    special_mass = torch.softmax(row[0], -1)[_ids(tokenizer, SPECIAL_TOKENS)].sum()
    assert float(lp_all.exp().sum() + special_mass) == pytest.approx(1.0, abs=1e-5)


def test_multi_token_actions_sum_token_log_probs_one_forward_per_length(tokenizer, encoder, bot_trajectories):
    vocab = len(tokenizer)
    rows = torch.randn(2, vocab, generator=torch.Generator().manual_seed(1))
    model = ForcedMaskLogits(tokenizer.mask_token_id, rows, torch.zeros(vocab))
    names = ["left", "go forward", "pick up", "done"]  # 1, 2, 2, 1 world tokens
    scorer = ActionScorer(encoder, names, 1, 256)
    assert scorer.num_forwards == 2
    lp = scorer.log_probs(model, [_query(bot_trajectories[0], 1)])[0]
    lsm = torch.log_softmax(rows, -1)
    for i, name in enumerate(names):
        toks = _ids(tokenizer, name.split())
        assert float(lp[i]) == pytest.approx(float(sum(lsm[j, tok] for j, tok in enumerate(toks))), abs=1e-5)
    assert model.calls == 2
    assert scorer.act(model, [_query(bot_trajectories[0], 1)]) == [names[int(lp.argmax())]]


def test_scorer_query_keeps_only_history_steps(tokenizer, encoder, bot_trajectories):
    traj = max(bot_trajectories, key=lambda t: t.num_actions)
    assert traj.num_actions >= 3
    t = traj.num_actions - 1
    for history in (0, 1, 2):
        ex = ActionScorer(encoder, ACTION_NAMES, history, 1024).encode(_query(traj, t))
        kept = [r for r in ex.roles if r is not UnitRole.DROPPED]
        assert len(kept) == 2 * min(history, t) + 2  # history pairs + current obs + the masked action
        assert kept[-1] is UnitRole.TARGET and ex.num_targets == 1


def test_scorer_rejects_bad_arguments(encoder):
    with pytest.raises(ValueError, match="duplicates"):
        ActionScorer(encoder, ["left", "left"], 1, 64)
    with pytest.raises(ValueError, match="history_steps"):
        ActionScorer(encoder, ACTION_NAMES, -1, 64)
    with pytest.raises(ValueError, match="vocabulary"):
        ActionScorer(encoder, ["left", "teleport_xyzzy"], 1, 64)


def _fixed_set_reference(model, scorer: ActionScorer, queries) -> torch.Tensor:
    """The fixed-action-set scorer as it was before per-query candidates: per token length of ``action_names`` one
    forward over every query (placeholder: the first action of that length), then one gather."""
    from anyorder_ray.evaluation.scoring import eval_mode, target_log_probs

    names = scorer.action_names
    token_ids = [scorer.encoder.encode_text(name) for name in names]
    out = torch.empty((len(queries), len(names)))
    with eval_mode(model):
        for n in sorted({len(ids) for ids in token_ids}):
            idx = [i for i, ids in enumerate(token_ids) if len(ids) == n]
            cand = torch.tensor([token_ids[i] for i in idx])
            examples = [scorer.encode(q, names[idx[0]]) for q in queries]
            lp = torch.stack(target_log_probs(model, examples, scorer.pad_id)).cpu()
            out[:, idx] = lp[:, torch.arange(n)[None, :], cand].sum(-1)
    return out


def test_fixed_action_set_scores_are_unchanged_by_per_query_candidates(model, encoder, bot_trajectories):
    """BabyAI through the generalised scorer: ``log_probs`` (the fixed set), ``score`` with each state's
    ``valid_actions()`` and the pre-generalisation algorithm give bit-identical scores and the same actions, on the
    real tiny LLaDA2 model; a world without a fixed set is refused where one is needed, naming the way out."""
    world = make_world(babyai(LEVEL), expert=False)
    scorer = ActionScorer(encoder, world.action_names, 2, 256)
    queries = [_query(traj, t) for traj in bot_trajectories for t in range(traj.num_actions)]
    fixed = scorer.log_probs(model, queries)
    per_query = torch.stack(scorer.score(model, queries, [world.valid_actions()] * len(queries)))
    assert torch.equal(fixed, _fixed_set_reference(model, scorer, queries))
    assert torch.equal(per_query, fixed)
    assert scorer.act(model, queries) == scorer.act(model, queries, [world.valid_actions()] * len(queries))
    # Multi-token names too (two forwards): the same scores as before, to the last bit.
    names = ["left", "go forward", "pick up", "done"]
    multi = ActionScorer(encoder, names, 1, 256)
    torch.testing.assert_close(multi.log_probs(model, queries[:5]), _fixed_set_reference(model, multi, queries[:5]),
                               rtol=0, atol=0)  # fmt: skip
    free = ActionScorer(encoder, (), 1, 256)
    for call in (lambda: free.log_probs(model, queries[:1]), lambda: free.act(model, queries[:1])):
        with pytest.raises(ValueError, match="valid_actions"):
            call()
    with pytest.raises(ValueError, match="no candidate"):
        free.score(model, queries[:2], [("left",), ()])


# --- episodes -----------------------------------------------------------------------------------------------


def test_batched_episodes_equal_unbatched(tokenizer, encoder):
    model = ContentHashPolicy(tokenizer.mask_token_id, len(tokenizer), _ids(tokenizer, ACTION_NAMES))
    scorer = ActionScorer(encoder, ACTION_NAMES, 2, 256)
    seeds = list(eval_episode_seeds(EvalConfig(), 12))
    batched = run_episodes(model, scorer, worlds(12), seeds, batch_envs=5)
    single = run_episodes(model, scorer, worlds(12), seeds, batch_envs=1)
    assert batched.results == single.results
    assert [r.seed for r in batched.results] == seeds
    assert len({r.actions for r in batched.results}) > 1  # the policy really depends on what it sees
    # ... and within episodes (a hash may by chance repeat one action over a short episode, so most, not all).
    assert sum(len(set(r.actions)) > 1 for r in batched.results) >= len(seeds) - 2


def test_sampled_episodes_are_seeded_per_episode_and_leave_greedy_at_low_temperature(tokenizer, encoder):
    """``temperature > 0`` samples: an episode depends on its seed only (not on the batching or on being played
    again), it really leaves the greedy path, and towards temperature 0 it is the greedy episode."""
    model = ContentHashPolicy(tokenizer.mask_token_id, len(tokenizer), _ids(tokenizer, ACTION_NAMES))
    scorer = ActionScorer(encoder, ACTION_NAMES, 2, 256)
    seeds = list(eval_episode_seeds(EvalConfig(), 10))
    greedy = run_episodes(model, scorer, worlds(12), seeds, batch_envs=4)
    sampled = run_episodes(model, scorer, worlds(12), seeds, batch_envs=4, temperature=1.0)
    assert sampled.results == run_episodes(model, scorer, worlds(12), seeds, batch_envs=1, temperature=1.0).results
    assert sampled.results == run_episodes(model, scorer, worlds(12), seeds, batch_envs=3, temperature=1.0).results
    assert (greedy.temperature, sampled.temperature) == (0.0, 1.0)  # the stats say how the episodes were played
    # The hashed action has logit 4 against 0: about 0.9 of each step's mass, so 10 episodes of 12 steps leave it.
    assert sum(g.actions != s.actions for g, s in zip(greedy.results, sampled.results, strict=True)) >= 5
    assert run_episodes(model, scorer, worlds(12), seeds, batch_envs=4, temperature=1e-6).results == greedy.results
    with pytest.raises(ValueError, match="temperature"):
        run_episodes(model, scorer, worlds(12), seeds, batch_envs=4, temperature=-1.0)


def test_sample_action_draws_from_the_tempered_softmax_of_the_scores():
    names = ("a", "b", "c")
    probs = np.array([0.7, 0.2, 0.1])
    rng = np.random.default_rng(0)
    for temperature in (1.0, 0.5):
        draws = [sample_action(names, np.log(probs).tolist(), temperature, rng) for _ in range(20_000)]
        freq = np.array([draws.count(n) for n in names]) / len(draws)
        expected = probs ** (1 / temperature) / (probs ** (1 / temperature)).sum()
        assert np.abs(freq - expected).max() < 0.015, (temperature, freq, expected)


@pytest.mark.parametrize("action", ["done", "left"])
def test_forced_useless_policy_fails_every_episode(tokenizer, encoder, action):
    vocab = len(tokenizer)
    row = torch.zeros(1, vocab)
    row[0, tokenizer.convert_tokens_to_ids(action)] = 5.0
    model = ForcedMaskLogits(tokenizer.mask_token_id, row, torch.zeros(vocab))
    seeds = list(eval_episode_seeds(EvalConfig(), 6))
    stats = run_episodes(model, ActionScorer(encoder, ACTION_NAMES, 2, 256), worlds(7), seeds, batch_envs=4)
    # In GoTo levels "done" does not end the episode: both policies run into the step cap.
    assert stats.episodes == 6 and stats.successes == 0 and stats.success_rate == 0.0
    assert stats.mean_length == 7.0
    assert all(not r.success and r.length == 7 and r.reward == 0.0 for r in stats.results)
    assert all(r.actions == (action,) * 7 for r in stats.results)


def test_replayed_bot_actions_succeed(tokenizer, encoder, bot_trajectories):
    """A model that returns the bot's action for each exact query succeeds on every seed with the bot's
    episode lengths: success accounting and the history the episodes feed the scorer are both right."""
    scorer = ActionScorer(encoder, ACTION_NAMES, 2, 256)
    table = {
        tuple(scorer.encode(_query(traj, t)).input_ids): tokenizer.convert_tokens_to_ids(traj.actions[t])
        for traj in bot_trajectories
        for t in range(traj.num_actions)
    }
    seeds = [traj.seed for traj in bot_trajectories]
    stats = run_episodes(ReplayPolicy(table, len(tokenizer)), scorer, worlds(), seeds, batch_envs=4)
    assert stats.successes == stats.episodes == len(seeds)
    assert [r.length for r in stats.results] == [traj.num_actions for traj in bot_trajectories]
    assert all(r.reward > 0 for r in stats.results)
    assert [r.actions for r in stats.results] == [traj.actions for traj in bot_trajectories]


# --- Wilson interval ----------------------------------------------------------------------------------------


def test_wilson_known_values_and_edges():
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.49016, 0.94332), abs=1e-5)
    low, high = wilson_interval(50, 100)
    assert (low, high) == pytest.approx((0.40383, 0.59617), abs=1e-5)
    z2 = 1.96**2
    assert wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0))
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


# --- held-out NLL -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("history", [0, 2])
def test_nll_queries_mask_exactly_next_obs_and_action(encoder, bot_trajectories, history):
    traj = max(bot_trajectories, key=lambda t: t.num_actions)
    obs, acts = traj.observations, traj.actions
    world, action = nll_queries(traj, encoder, history, max_length=1024)
    assert len(world) == len(action) == traj.num_actions
    scorer = ActionScorer(encoder, ACTION_NAMES, history, 1024)
    for t, (w, a) in enumerate(zip(world, action, strict=True)):
        w_labels = [y for y in w.labels if y != IGNORE_INDEX]
        a_labels = [y for y in a.labels if y != IGNORE_INDEX]
        assert w_labels == list(encoder.encode_text(obs[t + 1]))
        assert a_labels == list(encoder.encode_text(acts[t]))
        past = min(history, t)
        # World model: history pairs + obs_t + act_t visible, obs_{t+1} the only target, nothing after.
        assert [r for r in w.roles if r is not UnitRole.DROPPED] == [UnitRole.VISIBLE] * (2 * past + 2) + [
            UnitRole.TARGET
        ]
        assert w.input_ids[-len(w_labels) - 1 : -1] == [encoder.mask_id] * len(w_labels)  # then only eos
        # Action NLL uses exactly the policy's query.
        assert a.input_ids == scorer.encode(_query(traj, t)).input_ids


def test_heldout_nll_of_uniform_model_is_log_vocab(tokenizer, encoder, bot_trajectories):
    vocab = len(tokenizer)
    model = ForcedMaskLogits(tokenizer.mask_token_id, torch.zeros(1, vocab), torch.zeros(vocab))
    stats = heldout_nll(model, encoder, bot_trajectories, history_steps=2, max_length=256, batch_size=5)
    steps = sum(t.num_actions for t in bot_trajectories)
    assert stats.action_tokens == steps
    assert stats.world_model_tokens == sum(len(encoder.encode_text(o)) for t in bot_trajectories
                                           for o in t.observations[1:])  # fmt: skip
    assert stats.world_model_nll == pytest.approx(math.log(vocab))
    assert stats.action_nll == pytest.approx(math.log(vocab))
    # Per observation: a whole next observation's NLL, here tokens-per-observation x log V.
    world_queries = sum(len(t.observations) - 1 for t in bot_trajectories)
    assert stats.world_model_nll_per_obs == pytest.approx(stats.world_model_tokens / world_queries * math.log(vocab))


def test_heldout_nll_rewards_the_right_tokens(tokenizer, encoder, bot_trajectories):
    """Favouring the most common true action at masks brings action NLL below log V; favouring a word that is
    never an action pushes it above."""
    from collections import Counter

    vocab = len(tokenizer)

    def nll_favouring(word: str) -> float:
        row = torch.zeros(1, vocab)
        row[0, tokenizer.convert_tokens_to_ids(word)] = 5.0
        model = ForcedMaskLogits(tokenizer.mask_token_id, row, torch.zeros(vocab))
        return heldout_nll(model, encoder, bot_trajectories, 2, 256).action_nll

    common = Counter(a for t in bot_trajectories for a in t.actions).most_common(1)[0][0]
    assert nll_favouring(common) < math.log(vocab) < nll_favouring("ball_red")


# --- metrics and seeds --------------------------------------------------------------------------------------


def test_eval_metrics_names_and_values():
    stats = EpisodeStats(successes=3, episodes=4, mean_length=5.5, results=(), seconds=2.0)
    nll = NLLStats(1.5, 0.25, 100, 10, 20, 0.1)
    m = eval_metrics(stats, nll, step=40, seconds=3.0)
    assert {
        "eval/success_rate", "eval/success_low", "eval/success_high", "eval/episodes", "eval/mean_episode_length",
        "eval/world_model_nll", "eval/action_nll", "eval/seconds", "eval/step",
    } <= set(m)  # fmt: skip
    assert all(k.startswith("eval/") for k in m)
    assert m["eval/success_rate"] == 0.75 and m["eval/step"] == 40 and m["eval/action_nll"] == 0.25
    assert m["eval/success_low"] < 0.75 < m["eval/success_high"]
    assert m["eval/temperature"] == 0.0  # how the episodes were played: greedy unless the stats say otherwise
    sampled = EpisodeStats(successes=3, episodes=4, mean_length=5.5, results=(), seconds=2.0, temperature=0.5)
    assert eval_metrics(sampled, nll, step=40, seconds=3.0)["eval/temperature"] == 0.5


@pytest.mark.parametrize(
    "rollout",
    [
        RolloutConfig(),
        RolloutConfig(num_actors=3, seed_start=12345),
        RolloutConfig(num_actors=8, seed_start=10**9 - 10**8 - 1),
    ],
)
@pytest.mark.parametrize("eval_cfg", [EvalConfig(), EvalConfig(seed_start=10**9 + 7)])
def test_eval_seeds_never_overlap_rollout_seeds(rollout, eval_cfg):
    evals = [eval_episode_seeds(eval_cfg, 10_000), heldout_trajectory_seeds(eval_cfg, 10_000)]
    rollouts = [rollout_seed_range(rollout, w) for w in range(rollout.num_actors)]
    for e in evals:
        for r in rollouts:
            assert max(e.start, r.start) >= min(e.stop, r.stop), (e, r)
    assert max(evals[0].start, evals[1].start) >= min(evals[0].stop, evals[1].stop)
    assert eval_episode_seeds(eval_cfg, 5) == eval_episode_seeds(eval_cfg, 5)  # the same seeds every time


# --- the real model -----------------------------------------------------------------------------------------


def test_scorer_on_tiny_llada2(model, tokenizer, encoder, bot_trajectories):
    scorer = ActionScorer(encoder, ACTION_NAMES, 2, 256)
    traj = max(bot_trajectories, key=lambda t: t.num_actions)
    queries = [_query(traj, t) for t in range(traj.num_actions)]  # different lengths: padding in the batch
    batched = scorer.log_probs(model, queries)
    single = torch.cat([scorer.log_probs(model, [q]) for q in queries])
    assert torch.isfinite(batched).all() and (batched <= 0).all()
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)
    stats = run_episodes(model, scorer, worlds(4), list(eval_episode_seeds(EvalConfig(), 3)), batch_envs=3)
    assert stats.episodes == 3 and 1 <= stats.mean_length <= 4
    nll = heldout_nll(model, encoder, bot_trajectories[:2], 2, 256)
    assert 0 < nll.action_nll < 3 * math.log(len(tokenizer)) and nll.world_model_nll > 0
