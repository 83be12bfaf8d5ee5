"""BabyAI text world: determinism, pickling, bot success, lossless serialization, vocabulary, noise."""

from __future__ import annotations

import contextlib
import io
import pickle
import random
import re

import gymnasium as gym
import numpy as np
import pytest
from helpers import results_script
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from anyorder_ray.data.jsonl import load_jsonl, save_jsonl
from envs import EnvConfig, World, collect_expert_trajectories, env_problems, make_world
from envs import world_vocabulary as vocab_of
from envs.babyai import (
    ACTION_NAMES,
    GRID_OBS_WORDS,
    BabyAIWorld,
    ObsEncoding,
    babyai_levels,
    cell_words,
    make_env,
    normalize_level,
    parse_obs,
    reset_env,
    serialize_obs,
    world_vocabulary,
)
from envs.base import CollectStats
from envs.trajectory import Trajectory


def collect_with_stats(level: str, seeds, max_steps: int | None = None) -> tuple[list[Trajectory], CollectStats]:
    return collect_expert_trajectories(BabyAIWorld(level, max_steps=max_steps), seeds)


def collect(level: str, seeds, max_steps: int | None = None) -> list[Trajectory]:
    return collect_with_stats(level, seeds, max_steps)[0]


TRAIN_LEVELS = (
    "BabyAI-GoToRedBallGrey-v0",
    "BabyAI-GoToLocal-v0",
    "BabyAI-PickupLoc-v0",
    "BabyAI-PutNextLocal-v0",
)
# Levels with doors (open/closed/locked), keys and boxes, so the observations cover more cell words.
DOOR_LEVELS = ("BabyAI-UnlockLocal-v0", "BabyAI-GoToObjDoor-v0", "BabyAI-OpenDoorsOrderN4-v0")
MISSION_TOKEN = re.compile(r"\w+|[^\w\s]")  # the world tokenizer's split: words and punctuation


def assert_exact_roundtrip(obs: dict, text: str) -> None:
    image, direction = parse_obs(text)
    assert image.dtype == np.uint8 and image.shape == (7, 7, 3)
    np.testing.assert_array_equal(image, obs["image"])
    assert direction == obs["direction"]
    assert serialize_obs({"image": image, "direction": direction}) == text
    assert len(text.split()) == GRID_OBS_WORDS


# --- levels ------------------------------------------------------------------------------------------------


def test_normalize_level_accepts_full_and_short_names() -> None:
    for name in ("BabyAI-GoToLocal-v0", "BabyAI-GoToLocal", "GoToLocal"):
        assert normalize_level(name) == "BabyAI-GoToLocal-v0"
    assert len(babyai_levels()) > 50 and all(lvl.startswith("BabyAI-") for lvl in babyai_levels())


def test_unknown_level_error_names_close_matches() -> None:
    with pytest.raises(ValueError, match="BabyAI-GoToLocal-v0"):
        normalize_level("GoToLocl")
    with pytest.raises(ValueError, match="unknown BabyAI level"):
        make_env("NoSuchLevelAtAll")


def test_make_env_same_seed_same_level() -> None:
    a, b = make_env("GoToLocal", seed=7), make_env("BabyAI-GoToLocal-v0", seed=7)
    assert a.mission == b.mission
    np.testing.assert_array_equal(a.gen_obs()["image"], b.gen_obs()["image"])
    c = make_env("GoToLocal", seed=8)
    assert (a.mission, a.agent_pos) != (c.mission, c.agent_pos)


# --- trajectories ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["GoToLocal", "PutNextLocal"])
def test_same_seed_identical_trajectory(level: str) -> None:
    first = collect(level, range(8))
    second = collect(level, range(8))
    assert first == second
    assert [t.meta for t in first] == [t.meta for t in second]
    assert len({t.units for t in first}) == len(first)  # different seeds really differ


def test_trajectories_pickle_and_jsonl_roundtrip(tmp_path) -> None:
    trajs = collect("PickupLoc", range(5))
    assert pickle.loads(pickle.dumps(trajs)) == trajs
    path = tmp_path / "bot.jsonl"
    assert save_jsonl(path, trajs) == len(trajs)
    loaded = load_jsonl(path)
    assert loaded == trajs
    assert [t.meta for t in loaded] == [t.meta for t in trajs]


@pytest.mark.parametrize("level", TRAIN_LEVELS)
def test_bot_solves_training_levels(level: str) -> None:
    trajs, stats = collect_with_stats(level, range(100))
    assert stats.attempted == 100 and stats.succeeded + stats.failed == 100
    assert stats.success_rate >= 0.98, stats
    assert len(trajs) == stats.succeeded
    for traj in trajs[:10]:
        n = traj.meta["num_steps"]
        # obs_0, act_0, ..., act_{n-1}, obs_n: the final observation is kept.
        assert len(traj.units) == 2 * n + 1 and traj.units[-1].kind == "obs"
        assert traj.success and traj.level == level
        assert set(traj.actions) <= set(ACTION_NAMES)
        # Replaying the actions in a fresh world reproduces every observation and succeeds.
        world = BabyAIWorld(level, expert=False)
        obs_text, mission = world.reset(traj.seed)
        assert (obs_text, mission) == (traj.observations[0], traj.mission)
        for action, expected in zip(traj.actions, traj.observations[1:], strict=True):
            obs_text, reward, terminated, _ = world.step(action)
            assert obs_text == expected
        assert terminated and reward > 0


def test_failed_episodes_are_dropped_and_counted() -> None:
    # PutNext needs at least a pickup and a drop, so one step can never succeed.
    trajs, stats = collect_with_stats("PutNextLocal", range(6), max_steps=1)
    assert trajs == [] and (stats.attempted, stats.succeeded, stats.failed) == (6, 0, 6)
    assert stats.failed_seeds == tuple(range(6))
    # GoToLocal with a 2-step cap: some episodes succeed, the rest are dropped, none is a fake success.
    trajs, stats = collect_with_stats("GoToLocal", range(40), max_steps=2)
    assert stats.failed >= 1 and stats.succeeded + stats.failed == 40 and len(trajs) == stats.succeeded
    assert all(t.success and t.meta["num_steps"] <= 2 for t in trajs)
    assert collect("GoToLocal", range(40), max_steps=2) == trajs  # the same seeds drop the same episodes


def test_collection_does_not_print_sampling_rejected(capfd) -> None:
    # Precondition: this level/seed does print the noise when reset without silencing.
    raw = gym.make("BabyAI-GoToObjDoor-v0", disable_env_checker=True).unwrapped
    raw.reset(seed=0)
    assert "Sampling rejected" in capfd.readouterr().out
    collect("GoToObjDoor", range(3))
    collect("PutNextLocal", range(3, 6))  # seed 4 also rejects samples
    reset_env(raw, 0)
    captured = capfd.readouterr()
    assert "Sampling rejected" not in captured.out + captured.err


# --- the registry adapter ------------------------------------------------------------------------------------


def test_the_registry_builds_the_configured_world_and_judges_its_keys() -> None:
    cfg = EnvConfig(world="babyai", level="GoToLocal", max_episode_steps=7, obs_encoding="compact")
    world = make_world(cfg, expert=False)
    assert isinstance(world, BabyAIWorld) and world.level == "BabyAI-GoToLocal-v0"
    assert world.encoding == ObsEncoding.COMPACT and world.env.max_steps == 7
    with pytest.raises(RuntimeError, match="expert=False"):
        world.reset(0)
        world.expert_action()
    assert vocab_of(cfg) == world_vocabulary()
    assert env_problems(cfg) == []
    problems = env_problems(EnvConfig(level="GoToLocl", obs_encoding="pixels"))
    assert len(problems) == 2 and "BabyAI-GoToLocal-v0" in problems[0] and "grid, compact" in problems[1]
    with pytest.raises(ValueError, match="world 'minecraft' is unknown; allowed: babyai"):
        EnvConfig(world="minecraft")


def test_success_is_the_worlds_own_check() -> None:
    trajectory = collect("GoToRedBallGrey", [5])[0]
    world = BabyAIWorld("GoToRedBallGrey", expert=False)
    world.reset(5)
    for action in trajectory.actions:
        assert not world.success
        world.step(action)
    assert world.done and world.success
    world.reset(5)
    while not world.done:  # turning in place never reaches the ball: truncated, not a success
        world.step("left")
    assert not world.success


# --- the runner --------------------------------------------------------------------------------------------


def test_world_is_a_text_world_and_rejects_misuse() -> None:
    world = BabyAIWorld("GoToRedBallGrey")
    assert isinstance(world, World) and world.action_names == ACTION_NAMES == world.valid_actions()
    with pytest.raises(RuntimeError, match="reset"):
        world.step("left")
    world.reset(0)
    with pytest.raises(ValueError, match="allowed"):
        world.step("jump")
    while not world.done:
        world.step(world.expert_action())
    with pytest.raises(RuntimeError, match="episode is over"):
        world.step("left")
    plain = BabyAIWorld("GoToLocal", expert=False)
    plain.reset(0)
    with pytest.raises(RuntimeError, match="expert=False"):
        plain.expert_action()


def test_expert_stays_in_sync_after_off_policy_actions() -> None:
    # The bot is told every action actually taken, so it still solves episodes after random detours
    # (no "toggle": opening a box makes the bot give up by design).
    rng = random.Random(0)
    world = BabyAIWorld("GoToLocal")
    solved = 0
    for seed in range(30):
        world.reset(seed)
        for _ in range(3):
            if not world.done:
                world.step(rng.choice(["left", "right", "forward", "pickup", "drop"]))
        reward, terminated = 0.0, False
        while not world.done:
            _, reward, terminated, _ = world.step(world.expert_action())
        solved += terminated and reward > 0
    assert solved >= 27


def test_carried_object_is_drawn_at_the_agents_cell() -> None:
    world = BabyAIWorld("PickupLoc")
    checked = 0
    for seed in range(10):
        world.reset(seed)
        assert world.env.carrying is None
        assert parse_obs(world.serialize(world.raw_obs))[0][3, 6].tolist() == [1, 0, 0]  # empty
        while not world.done:
            action = world.expert_action()
            text, *_ = world.step(action)
            if action == "pickup" and world.env.carrying is not None:
                carried = list(world.env.carrying.encode())
                assert parse_obs(text)[0][3, 6].tolist() == carried
                checked += 1
    assert checked >= 9


# --- serialization -----------------------------------------------------------------------------------------


def _random_rollout_obs(level: str, seeds: range, steps: int, rng: random.Random) -> list[tuple[dict, str]]:
    world = BabyAIWorld(level, expert=False)
    out = []
    for seed in seeds:
        text, _ = world.reset(seed)
        out.append((world.raw_obs, text))
        for _ in range(steps):
            if world.done:
                break
            text, *_ = world.step(rng.choice(ACTION_NAMES[:-1]))  # no "done": keep episodes going
            out.append((world.raw_obs, text))
    return out


@pytest.fixture(scope="module")
def real_observations() -> list[tuple[dict, str]]:
    """Thousands of real (raw obs, text) pairs: bot episodes on the training levels + random rollouts."""
    out: list[tuple[dict, str]] = []
    for level in TRAIN_LEVELS:
        world = BabyAIWorld(level)
        for seed in range(1000, 1060):
            text, _ = world.reset(seed)
            out.append((world.raw_obs, text))
            while not world.done:
                text, *_ = world.step(world.expert_action())
                out.append((world.raw_obs, text))
    rng = random.Random(0)
    for level in (*DOOR_LEVELS, "BabyAI-GoToLocal-v0"):
        out += _random_rollout_obs(level, range(25), 40, rng)
    return out


def test_serialization_roundtrips_real_observations(real_observations) -> None:
    assert len(real_observations) >= 3000
    for obs, text in real_observations:
        assert_exact_roundtrip(obs, text)
    seen = {w for _, text in real_observations for w in text.split()}
    # The sample really exercises doors in all states and the common objects.
    assert {"wall", "empty", "unseen"} <= seen
    for state in ("open", "closed", "locked"):
        assert any(w.startswith("door_") and w.endswith(f"_{state}") for w in seen), state
    assert seen <= set(world_vocabulary())


@settings(max_examples=40, deadline=None)
@given(
    level=st.sampled_from((*TRAIN_LEVELS, *DOOR_LEVELS)),
    seed=st.integers(0, 10_000),
    actions=st.lists(st.sampled_from(ACTION_NAMES), max_size=30),
)
def test_serialization_roundtrips_random_rollouts(level: str, seed: int, actions: list[str]) -> None:
    world = BabyAIWorld(level, expert=False)
    text, _ = world.reset(seed)
    assert_exact_roundtrip(world.raw_obs, text)
    for action in actions:
        if world.done:
            break
        text, *_ = world.step(action)
        assert_exact_roundtrip(world.raw_obs, text)


_valid_images = st.tuples(
    arrays(np.uint8, (7, 7), elements=st.integers(0, 10)),
    arrays(np.uint8, (7, 7), elements=st.integers(0, 5)),
    arrays(np.uint8, (7, 7), elements=st.integers(0, 2)),
).map(lambda channels: np.stack(channels, axis=-1))


@settings(max_examples=300, deadline=None)
@given(image=_valid_images, direction=st.integers(0, 3))
def test_serialization_roundtrips_arbitrary_triples(image: np.ndarray, direction: int) -> None:
    obs = {"image": image, "direction": direction}
    assert_exact_roundtrip(obs, serialize_obs(obs))


@settings(max_examples=300, deadline=None)
@given(image=_valid_images, direction=st.integers(0, 3))
def test_compact_encoding_roundtrips_arbitrary_triples(image: np.ndarray, direction: int) -> None:
    obs = {"image": image, "direction": direction}
    text = serialize_obs(obs, encoding="compact")
    parsed, parsed_direction = parse_obs(text, encoding="compact")
    np.testing.assert_array_equal(parsed, image)
    assert parsed_direction == direction


def test_compact_encoding_is_lossless_and_short_on_real_observations(real_observations) -> None:
    from anyorder_ray.data.tokenization import build_world_tokenizer

    tokenizer = build_world_tokenizer(world_vocabulary())
    lengths = []
    for obs, grid_text in real_observations:
        text = serialize_obs(obs, encoding=ObsEncoding.COMPACT)
        image, direction = parse_obs(text, encoding="compact")
        np.testing.assert_array_equal(image, obs["image"])
        assert direction == obs["direction"]
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.unk_token_id not in ids and len(ids) == len(text.split())  # one token per word
        lengths.append(len(ids))
        assert parse_obs(grid_text)[1] == direction
    lengths = np.asarray(lengths)
    # Single-room levels: ~19 words on average against the grid encoding's fixed 50.
    assert lengths.mean() < 25 and lengths.max() <= GRID_OBS_WORDS


def test_compact_encoding_examples_and_rejections() -> None:
    image = np.zeros((7, 7, 3), dtype=np.uint8)
    image[..., 0] = 1  # all empty
    image[3, 0] = (6, 0, 0)  # a red ball at x=3 of the farthest row
    image[4, 0] = (6, 0, 0)  # and another one next to it
    obs = {"image": image, "direction": 3}
    assert serialize_obs(obs, encoding="compact") == "north empty_x3 ball_red x2 empty_x44"
    with pytest.raises(ValueError, match="exactly 49"):
        parse_obs("north empty_x3 ball_red x2 empty_x43", encoding="compact")
    with pytest.raises(ValueError, match="canonical"):
        parse_obs("north empty x3 ball_red x2 empty_x44", encoding="compact")
    with pytest.raises(ValueError, match="canonical"):
        parse_obs("north empty_x2 empty ball_red x2 empty_x44", encoding="compact")
    with pytest.raises(ValueError, match="does not follow a cell word"):
        parse_obs("north x3 ball_red x2 empty_x44", encoding="compact")
    with pytest.raises(ValueError, match="not a cell word"):
        parse_obs("north empty_x3 bal_red x2 empty_x44", encoding="compact")


def test_cell_words_are_a_bijection_with_readable_names() -> None:
    words = cell_words()
    assert len(words) == 11 * 6 * 3 == len(set(words))
    assert {"unseen", "empty", "wall", "ball_red", "key_yellow", "box_grey", "door_blue_locked"} <= set(words)
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", w) for w in words)  # one token each for the tokenizer


def test_parse_and_serialize_reject_bad_input() -> None:
    obs = make_env("GoToLocal", seed=0).gen_obs()
    text = serialize_obs(obs)
    words = text.split()
    with pytest.raises(ValueError, match="50 words"):
        parse_obs(" ".join(words[:-1]))
    with pytest.raises(ValueError, match="direction"):
        parse_obs(" ".join(["up", *words[1:]]))
    with pytest.raises(ValueError, match="not a cell word"):
        parse_obs(" ".join([*words[:5], "wal", *words[6:]]))
    bad = obs["image"].copy()
    bad[0, 0] = (11, 0, 0)
    with pytest.raises(ValueError, match="out of range"):
        serialize_obs({"image": bad, "direction": 0})
    with pytest.raises(ValueError, match="allowed"):
        serialize_obs(obs, encoding="pixels")
    assert serialize_obs(obs, encoding=ObsEncoding.GRID) == serialize_obs(obs, encoding="grid") == text


# --- vocabulary --------------------------------------------------------------------------------------------


def test_vocabulary_is_deterministic_and_covers_actions_and_cells() -> None:
    vocab = world_vocabulary()
    assert vocab == world_vocabulary() and len(vocab) == len(set(vocab))
    assert set(ACTION_NAMES) <= set(vocab) and set(cell_words()) <= set(vocab)
    assert "," in vocab


def test_vocabulary_covers_missions_of_every_level() -> None:
    vocab = set(world_vocabulary())
    missing: dict[str, list[str]] = {}
    for level in babyai_levels():
        env = make_env(level)
        for seed in (0, 1):
            mission = reset_env(env, seed)["mission"]
            unknown = [w for w in MISSION_TOKEN.findall(mission) if w not in vocab]
            if unknown:
                missing[f"{level}/{seed}: {mission}"] = unknown
    assert not missing, missing


def test_silencing_uses_no_global_state() -> None:
    # reset_env must leave stdout usable afterwards (the redirect is scoped to the reset).
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        reset_env(make_env("GoToObjDoor"), 0)
        print("after")
    assert buf.getvalue() == "after\n"


# docs/results/gotolocal_window1/visible_target.py: which GoToLocal states have the mission's object in view.
def _visible_target_script():
    return results_script("gotolocal_window1", "visible_target.py")


def test_target_in_view_agrees_with_minigrid_along_bot_episodes():
    vt = _visible_target_script()
    seen = []
    for seed in range(10):
        world = BabyAIWorld("BabyAI-GoToLocal-v0")
        world.reset(seed)
        while not world.done:
            env = world.env
            expected = any(env.agent_sees(*obj.cur_pos) for obj in env.instrs.desc.obj_set)
            assert vt.target_in_view(world) == expected
            seen.append(expected)
            world.step(world.expert_action())
    assert True in seen and False in seen  # both groups occur, so the split is not constant


def test_bot_states_hold_every_step_with_its_whole_history():
    vt = _visible_target_script()
    episodes = vt.bot_states("BabyAI-GoToLocal-v0", range(5))
    assert len(episodes) == 5
    for steps in episodes:
        assert steps, "an episode with no state"
        for t, (query, action, _) in enumerate(steps):
            assert len(query.history) == t
            assert action in ("left", "right", "forward", "pickup", "drop", "toggle", "done")
            if t:
                assert query.history[-1] == (steps[t - 1][0].obs, steps[t - 1][1])
        assert steps[-1][2], "GoTo ends facing the target, so it is in view before the last action"


def test_failures_with_target_seen_replays_only_the_failed_episodes(tmp_path):
    vt = _visible_target_script()
    world = BabyAIWorld("BabyAI-GoToLocal-v0", expert=False)
    rows, expected_seen = [], 0
    for seed in range(4):
        world.reset(seed)
        seen = vt.target_in_view(world)
        actions = []
        while not world.done:  # turning in place until the level's step cap: a timeout
            world.step("left")
            actions.append("left")
            seen = seen or any(world.env.agent_sees(*o.cur_pos) for o in world.env.instrs.desc.obj_set)
        expected_seen += int(seen)
        rows.append(f"t,causal,0,{seed},0,{len(actions)},0.0,{' | '.join(actions)}")
    rows.append("t,causal,0,99,1,3,0.9,forward | forward | left")  # a success is not replayed
    path = tmp_path / "episodes.csv"
    path.write_text("trial,arm,seed,episode_seed,success,length,reward,actions\n" + "\n".join(rows) + "\n")
    counts = vt.failures_with_target_seen(path, "BabyAI-GoToLocal-v0")
    assert counts["failed"] == 4 and counts["timeouts"] == 4
    assert counts["target_seen"] == expected_seen and expected_seen > 0
    assert counts["target_seen_within_5"] == expected_seen  # four left turns show every direction
    # Without a level, the world is the one the evaluation.yaml beside the CSV names (python -m anyorder_ray.evaluate).
    (tmp_path / "evaluation.yaml").write_text("env:\n  level: BabyAI-GoToLocal-v0\n  max_episode_steps: null\n")
    assert vt.failures_with_target_seen(path) == counts
    with pytest.raises(FileNotFoundError, match="evaluation.yaml"):
        vt.failures_with_target_seen(tmp_path / "elsewhere" / "episodes.csv")
