"""Encoding trajectories: exact token layouts per mode, windowing, cropping, collation, bucketing."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from anyorder_ray.data.encoding import (
    IGNORE_INDEX,
    EncodedExample,
    UnitEncoder,
    bucket_by_length,
    collate,
    crop_window,
    encode_units,
    padding_waste,
    process_any_order_sft_example,
)
from anyorder_ray.data.masking import AnyOrderMaskSampler, MaskMode, UnitRole
from anyorder_ray.data.tokenization import build_world_tokenizer
from envs.trajectory import Trajectory, Unit

V, T, D = UnitRole.VISIBLE, UnitRole.TARGET, UnitRole.DROPPED
WORDS = ["go", "to", "the", "ball_red", "north", "east", "wall", "empty", "left", "forward", ","]
M = "<|mask|>"

# Hand-written episode: unit sizes (tokens, separator excluded) are 3, 1, 3, 1, 2; mission is 4 words.
TRAJ = Trajectory.from_steps(
    mission="go to the ball_red",
    level="test",
    seed=0,
    observations=["north wall empty", "east empty ball_red", "east ball_red"],
    actions=["left", "forward"],
    success=True,
)
HEAD = ["<|mission|>", "go", "to", "the", "ball_red"]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_world_tokenizer(WORDS)


def check(tok: PreTrainedTokenizerFast, ex: EncodedExample, tokens: list[str], labels: list[str | None]) -> None:
    """Exact comparison against hand-written token strings (None = ignored label)."""
    assert ex.input_ids == tok.convert_tokens_to_ids(tokens)
    assert ex.labels == [IGNORE_INDEX if lab is None else tok.convert_tokens_to_ids(lab) for lab in labels]
    assert len(ex.unit_ids) == len(ex.unit_kinds) == len(ex.input_ids)
    assert ex.num_targets == sum(lab is not None for lab in labels)


def full(tok: PreTrainedTokenizerFast, units_roles: tuple[UnitRole, ...]) -> list[int]:
    """input_ids with every target filled back in (the sequence the labels describe)."""
    ex = encode_units(TRAJ.mission, TRAJ.units, units_roles, tok, 64)
    return [lab if lab != IGNORE_INDEX else i for i, lab in zip(ex.input_ids, ex.labels, strict=True)]


# --- exact layouts, one per mode (roles as the mode would draw them) --------------------------------

OBS0, ACT0 = ["<|obs|>", "north", "wall", "empty"], ["<|act|>", "left"]
OBS1, ACT1 = ["<|obs|>", "east", "empty", "ball_red"], ["<|act|>", "forward"]
OBS2 = ["<|obs|>", "east", "ball_red"]
N5, N4, N3, N2, N1 = [None] * 5, [None] * 4, [None] * 3, [None] * 2, [None]

EXACT = {
    # causal: act_1 is the target, everything after it dropped.
    "causal": (
        (V, V, V, T, D),
        HEAD + OBS0 + ACT0 + OBS1 + ["<|act|>", M, "<|eos|>"],
        N5 + N4 + N2 + N4 + [None, "forward", None],
    ),
    # prefix: cut after act_0, later observations targets, later action visible.
    "prefix": (
        (V, V, T, V, T),
        HEAD + OBS0 + ACT0 + ["<|obs|>", M, M, M] + ACT1 + ["<|obs|>", M, M, "<|eos|>"],
        N5 + N4 + N2 + [None, "east", "empty", "ball_red"] + N2 + [None, "east", "ball_red", None],
    ),
    "any_order": (
        (T, V, V, T, V),
        HEAD + ["<|obs|>", M, M, M] + ACT0 + OBS1 + ["<|act|>", M] + OBS2 + ["<|eos|>"],
        N5 + [None, "north", "wall", "empty"] + N2 + N4 + [None, "forward"] + N3 + N1,
    ),
    "obs_only": (
        (V, V, T, V, V),
        HEAD + OBS0 + ACT0 + ["<|obs|>", M, M, M] + ACT1 + OBS2 + ["<|eos|>"],
        N5 + N4 + N2 + [None, "east", "empty", "ball_red"] + N2 + N3 + N1,
    ),
    "act_only": (
        (V, T, V, T, V),
        HEAD + OBS0 + ["<|act|>", M] + OBS1 + ["<|act|>", M] + OBS2 + ["<|eos|>"],
        N5 + N4 + [None, "left"] + N4 + [None, "forward"] + N3 + N1,
    ),
    # mixture at a high drawn p: every unit a target; the mission and separators stay visible.
    "mixture": (
        (T, T, T, T, T),
        HEAD + ["<|obs|>", M, M, M, "<|act|>", M, "<|obs|>", M, M, M, "<|act|>", M, "<|obs|>", M, M, "<|eos|>"],
        N5
        + [None, "north", "wall", "empty", None, "left", None, "east", "empty", "ball_red"]
        + [None, "forward", None, "east", "ball_red", None],
    ),
}


@pytest.mark.parametrize("mode", list(EXACT))
def test_exact_layout_per_mode(tok: PreTrainedTokenizerFast, mode: str) -> None:
    roles, tokens, labels = EXACT[mode]
    ex = encode_units(TRAJ.mission, TRAJ.units, roles, tok, max_length=64)
    check(tok, ex, tokens, labels)
    assert ex.roles == roles


def test_exact_unit_ids_and_kinds(tok: PreTrainedTokenizerFast) -> None:
    ex = encode_units(TRAJ.mission, TRAJ.units, EXACT["causal"][0], tok, max_length=64)
    # HEAD(5) | obs sep, 3 obs tokens | act sep, 1 | obs sep, 3 | act sep, 1 | eos
    assert ex.unit_ids == [-1] * 5 + [-1, 0, 0, 0, -1, 1, -1, 2, 2, 2, -1, 3, -1]
    assert ex.unit_kinds == [-1] * 5 + [-1, 0, 0, 0, -1, 1, -1, 0, 0, 0, -1, 1, -1]
    assert ex.num_target_units == 1


@pytest.mark.parametrize("mode", list(MaskMode))
def test_sampled_masks_encode_consistently(tok: PreTrainedTokenizerFast, mode: MaskMode) -> None:
    """For every mode, sampled masks replace exactly the target units' tokens and label them exactly."""
    train = AnyOrderMaskSampler(mode, mask_prob=0.4, seed=3)
    replay = AnyOrderMaskSampler(mode, mask_prob=0.4, seed=3)
    mask_id = tok.mask_token_id
    seen = set()
    for _ in range(40):
        ex = process_any_order_sft_example(TRAJ, train, tok, max_length=64)
        roles = replay.sample(TRAJ.kinds)
        assert ex == encode_units(TRAJ.mission, TRAJ.units, roles, tok, 64)  # same single encoder
        seen.add(ex.roles)
        assert ex.roles == roles and T in roles
        visible = tuple(V if r is T else r for r in roles)
        assert full(tok, roles) == encode_units(TRAJ.mission, TRAJ.units, visible, tok, 64).input_ids
        for i, (inp, lab, uid) in enumerate(zip(ex.input_ids, ex.labels, ex.unit_ids, strict=True)):
            is_target = uid >= 0 and roles[uid] is T
            assert (inp == mask_id) == is_target, i
            assert (lab != IGNORE_INDEX) == is_target, i
        assert ex.input_ids[: len(HEAD)] == tok.convert_tokens_to_ids(HEAD)  # mission always visible
        kept = {u for u in ex.unit_ids if u >= 0}
        assert kept == {i for i, r in enumerate(roles) if r is not D}
    assert len(seen) > 1  # a fresh mask per call


def test_eval_layouts_share_the_encoder(tok: PreTrainedTokenizerFast) -> None:
    # Policy: history visible, next action target (later units not given).
    policy = encode_units(TRAJ.mission, TRAJ.units[:2], (V, T), tok, 64)
    check(tok, policy, HEAD + OBS0 + ["<|act|>", M, "<|eos|>"], N5 + N4 + [None, "left", None])
    # World model: history + act_0 visible, obs_1 target.
    wm = encode_units(TRAJ.mission, TRAJ.units, ["visible", "visible", "target", "dropped", "dropped"], tok, 64)
    check(
        tok,
        wm,
        HEAD + OBS0 + ACT0 + ["<|obs|>", M, M, M, "<|eos|>"],
        N5 + N4 + N2 + [None, "east", "empty", "ball_red", None],
    )


def test_bad_roles_rejected(tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="one role per unit"):
        encode_units(TRAJ.mission, TRAJ.units, (V, T), tok, 64)
    with pytest.raises(ValueError, match="visible.*target.*dropped"):
        encode_units(TRAJ.mission, TRAJ.units, (V, T, V, V, "masked"), tok, 64)


# --- windowing ------------------------------------------------------------------------------------
# Sizes with separators: mission+eos 6, obs_0 4, act_0 2, obs_1 4, act_1 2, obs_2 3 (total 21).


def test_window_fits_everything_at_exact_length(tok: PreTrainedTokenizerFast) -> None:
    ex = encode_units(TRAJ.mission, TRAJ.units, (V, V, V, V, T), tok, max_length=21)
    assert len(ex) == 21 and D not in ex.roles


def test_window_keeps_mission_and_most_recent_whole_units(tok: PreTrainedTokenizerFast) -> None:
    ex = encode_units(TRAJ.mission, TRAJ.units, (V, V, V, V, T), tok, max_length=20)
    assert ex.roles == (D, V, V, V, T)  # obs_0 (4 tokens) would need 21
    ex = encode_units(TRAJ.mission, TRAJ.units, (V, V, V, V, T), tok, max_length=16)
    check(tok, ex, HEAD + OBS1 + ACT1 + ["<|obs|>", M, M, "<|eos|>"], N5 + N4 + N2 + [None, "east", "ball_red", None])
    assert ex.roles == (D, D, V, V, T)  # 15 tokens: act_0 would not fit whole, so it is left out


def test_window_ends_at_last_target_when_recent_units_hold_none(tok: PreTrainedTokenizerFast) -> None:
    ex = encode_units(TRAJ.mission, TRAJ.units, (V, T, V, V, V), tok, max_length=16)
    check(tok, ex, HEAD + OBS0 + ["<|act|>", M, "<|eos|>"], N5 + N4 + [None, "left", None])
    assert ex.roles == (V, T, D, D, D)
    ex = encode_units(TRAJ.mission, TRAJ.units, (T, V, V, V, V), tok, max_length=16)
    assert ex.roles == (T, D, D, D, D) and ex.num_targets == 3


def test_window_too_small_names_lengths(tok: PreTrainedTokenizerFast) -> None:
    assert encode_units(TRAJ.mission, TRAJ.units, (V, V, V, V, T), tok, max_length=9).roles == (D, D, D, D, T)
    with pytest.raises(ValueError, match="max_length=8 .*need 9 tokens"):
        encode_units(TRAJ.mission, TRAJ.units, (V, V, V, V, T), tok, max_length=8)
    with pytest.raises(ValueError, match="max_length=5 .*alone need 6 tokens"):
        encode_units(TRAJ.mission, TRAJ.units, (V, V, V, V, T), tok, max_length=5)


@settings(max_examples=200, deadline=None)
@given(
    roles=st.lists(st.sampled_from([V, T, D]), min_size=5, max_size=5).filter(lambda r: T in r),
    max_length=st.integers(min_value=10, max_value=25),
)
def test_window_never_cuts_a_unit_and_keeps_a_target(
    tok: PreTrainedTokenizerFast, roles: list[UnitRole], max_length: int
) -> None:
    ex = encode_units(TRAJ.mission, TRAJ.units, roles, tok, max_length)
    assert len(ex) <= max_length
    sizes = [3, 1, 3, 1, 2]
    for u, size in enumerate(sizes):
        n = ex.unit_ids.count(u)
        assert n in (0, size)  # whole unit or nothing
        assert (n > 0) == (ex.roles[u] is not D)
    kept = [u for u, r in enumerate(roles) if r is not D]
    window = [u for u in kept if ex.roles[u] is not D]
    assert window == kept[kept.index(window[0]) : kept.index(window[-1]) + 1]  # contiguous among kept
    assert ex.num_targets > 0
    assert ex.input_ids[: len(HEAD)] == tok.convert_tokens_to_ids(HEAD)


# --- unknown words, caching -----------------------------------------------------------------------


def test_unknown_word_in_unit_raises_naming_it(tok: PreTrainedTokenizerFast) -> None:
    units = (Unit("obs", "north zebra", 0), Unit("act", "left", 0))
    with pytest.raises(ValueError, match=r"outside the tokenizer's vocabulary: \['zebra'\]"):
        encode_units("go to the ball_red", units, (V, T), tok, 64)
    with pytest.raises(ValueError, match="giraffe"):
        encode_units("go to the giraffe", TRAJ.units[:2], (V, T), tok, 64)


def test_unknown_word_allowed_is_kept_as_unk(tok: PreTrainedTokenizerFast) -> None:
    units = (Unit("obs", "north zebra", 0), Unit("act", "left", 0))
    enc = UnitEncoder(tok, on_unknown="allow")
    ex = encode_units("go to the ball_red", units, (T, V), enc, 64)
    check(
        tok,
        ex,
        HEAD + ["<|obs|>", M, M, "<|act|>", "left", "<|eos|>"],
        N5 + [None, "north", "<|unk|>", None, None, None],
    )
    with pytest.raises(ValueError, match="'raise' or 'allow'"):
        UnitEncoder(tok, on_unknown="drop")  # type: ignore[arg-type]


def test_empty_unit_rejected(tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="encodes to no tokens"):
        encode_units("go", (Unit("obs", "  ", 0),), (T,), tok, 64)


def test_unit_encoder_caches_and_pickles(tok: PreTrainedTokenizerFast) -> None:
    enc = UnitEncoder(tok, cache_size=2)
    a = enc.encode_text("north wall")
    assert enc.encode_text("north wall") is a  # served from the cache
    enc.encode_text("east")
    enc.encode_text("left")  # evicts "north wall" (least recently used)
    again = enc.encode_text("north wall")
    assert again == a and again is not a
    clone = pickle.loads(pickle.dumps(enc))
    assert clone.encode_text("north wall empty") == enc.encode_text("north wall empty")
    assert encode_units(TRAJ.mission, TRAJ.units, EXACT["prefix"][0], clone, 64) == encode_units(
        TRAJ.mission, TRAJ.units, EXACT["prefix"][0], tok, 64
    )


# --- other tokenizers -----------------------------------------------------------------------------


def _byte_bpe() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = ["Mission: go to the ball_red Observation: north wall empty Action: left forward"] * 20
    core.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["[EOS]", "[PAD]", "[MASK]"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", eos_token="[EOS]", mask_token="[MASK]")


def test_foreign_bpe_tokenizer_with_text_markers() -> None:
    bpe = _byte_bpe()
    mask = bpe.mask_token_id
    roles = (V, T, V, V, T)
    ex = encode_units(TRAJ.mission, TRAJ.units, roles, bpe, 128)

    def e(text: str) -> list[int]:
        return bpe.encode(text, add_special_tokens=False)

    pieces = [(e("Mission:") + e(" go to the ball_red"), None)]
    for unit, role in zip(TRAJ.units, roles, strict=True):
        marker = e(" Observation:" if unit.kind == "obs" else " Action:")
        pieces += [(marker, None), (e(" " + unit.text), role)]
    pieces.append(([bpe.convert_tokens_to_ids("[EOS]")], None))
    want_inputs = [t for ids, role in pieces for t in ([mask] * len(ids) if role is T else ids)]
    want_labels = [t if role is T else IGNORE_INDEX for ids, role in pieces for t in ids]
    assert ex.input_ids == want_inputs
    assert ex.labels == want_labels
    filled = [lab if lab != IGNORE_INDEX else i for i, lab in zip(ex.input_ids, ex.labels, strict=True)]
    assert bpe.decode(filled) == (
        "Mission: go to the ball_red Observation: north wall empty Action: left Observation: east empty "
        "ball_red Action: forward Observation: east ball_red[EOS]"
    )


def test_foreign_word_level_with_own_separator_ids() -> None:
    # Same separator names, other ids and other special names: the tokenizer's own ids must be used.
    words = ["north", "left", "go", "<|act|>", "<|obs|>", "<|mission|>", "[MASK]", "[UNK]", "[END]"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wl = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", mask_token="[MASK]", eos_token="[END]")
    units = (Unit("obs", "north", 0), Unit("act", "left", 0))
    ex = encode_units("go", units, (V, T), wl, 16)
    assert ex.input_ids == [5, 2, 4, 0, 3, 6, 8]  # <|mission|> go <|obs|> north <|act|> [MASK] [END]
    assert ex.labels == [IGNORE_INDEX] * 5 + [1, IGNORE_INDEX]


def test_tokenizer_without_mask_token_rejected() -> None:
    core = Tokenizer(models.WordLevel({"[UNK]": 0, "go": 1}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    no_mask = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    with pytest.raises(ValueError, match="no mask token"):
        encode_units("go", TRAJ.units[:2], (V, T), no_mask, 16)


# --- crop_window ----------------------------------------------------------------------------------


def _long(n_steps: int) -> Trajectory:
    return Trajectory.from_steps(
        "go", "test", 1, [f"o{t}" for t in range(n_steps + 1)], [f"a{t}" for t in range(n_steps)], True, {"k": 1}
    )


def test_crop_window_short_episode_unchanged() -> None:
    traj = _long(3)
    assert crop_window(traj, 3, np.random.default_rng(0)) is traj
    with pytest.raises(ValueError, match="max_steps"):
        crop_window(traj, 0, np.random.default_rng(0))


def test_crop_window_windows_are_contiguous_bounded_and_cover_everything() -> None:
    traj = _long(12)  # 25 units
    n = len(traj.units)
    rng = np.random.default_rng(0)
    ends, covered = [], set()
    for _ in range(3000):
        w = crop_window(traj, 3, rng)
        off = w.meta["window_start_step"]
        assert w.meta["k"] == 1 and w.mission == traj.mission
        assert 1 <= w.num_actions <= 3
        start = 2 * off
        assert [u.text for u in w.units] == [u.text for u in traj.units[start : start + len(w.units)]]
        assert [u.step for u in w.units] == [i // 2 for i in range(len(w.units))]
        end = start + len(w.units)
        if start > 0:
            assert w.num_actions == 3  # only windows clamped at the episode start are shorter
        ends.append(end)
        covered.update(range(start, end))
    assert covered == set(range(n))
    counts = np.bincount(ends, minlength=n + 1)[2:]
    assert counts.min() > 0
    expected = 3000 / (n - 1)
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))  # end boundary uniform on 2..n
    a = [crop_window(traj, 4, np.random.default_rng(9)).units for _ in range(3)]
    assert a[0] == a[1] == a[2]


# --- collation and bucketing ----------------------------------------------------------------------


def test_collate_pads_every_field(tok: PreTrainedTokenizerFast) -> None:
    short = encode_units(TRAJ.mission, TRAJ.units[:2], (V, T), tok, 64)
    long = encode_units(TRAJ.mission, TRAJ.units, EXACT["prefix"][0], tok, 64)
    batch = collate([short, long], pad_id=tok.pad_token_id)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "unit_ids", "unit_kinds"}
    assert all(v.shape == (2, len(long)) and v.dtype == torch.long for v in batch.values())
    n = len(short)
    assert batch["input_ids"][0].tolist() == short.input_ids + [tok.pad_token_id] * (len(long) - n)
    assert batch["labels"][0, n:].eq(IGNORE_INDEX).all() and batch["labels"][0, :n].tolist() == short.labels
    assert batch["unit_ids"][0, n:].eq(-1).all() and batch["unit_kinds"][0, n:].eq(-1).all()
    assert batch["attention_mask"].sum(1).tolist() == [n, len(long)]
    assert batch["input_ids"][1].tolist() == long.input_ids and batch["unit_kinds"][1].tolist() == long.unit_kinds
    padded = collate([short], pad_id=0, pad_to_multiple_of=8)
    assert padded["input_ids"].shape == (1, 16) and padded["attention_mask"].sum() == n
    with pytest.raises(ValueError, match="empty"):
        collate([], pad_id=0)


def _fake(length: int) -> EncodedExample:
    return EncodedExample([1] * length, [IGNORE_INDEX] * length, [-1] * length, [-1] * length, (), 0)


def test_padding_waste_exact() -> None:
    assert padding_waste([[_fake(2), _fake(4)]]) == 0.25
    assert padding_waste([[_fake(2), _fake(4)]], pad_to_multiple_of=8) == 1 - 6 / 16


def test_bucket_by_length_groups_similar_lengths() -> None:
    rng = np.random.default_rng(0)
    examples = [_fake(int(x)) for x in rng.integers(100, 1000, size=512)]
    batches = bucket_by_length(examples, 16, np.random.default_rng(1))
    assert sorted(id(e) for b in batches for e in b) == sorted(id(e) for e in examples)
    assert all(len(b) == 16 for b in batches)
    naive = [examples[i : i + 16] for i in range(0, 512, 16)]
    assert padding_waste(batches) < 0.05 < 0.2 < padding_waste(naive)
    with pytest.raises(ValueError, match="batch_size"):
        bucket_by_length(examples, 0, rng)
