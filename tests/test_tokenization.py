"""World tokenizer: pre-tokenisation, special tokens, UNK handling, save/load, foreign tokenizers."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from anyorder_ray.data.tokenization import (
    ACT_TOKEN,
    EOS_TOKEN,
    MASK_TOKEN,
    MISSION_TOKEN,
    OBS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    UNK_TOKEN,
    UnitMarkers,
    build_world_tokenizer,
    count_unknown,
    require_mask_token_id,
    unknown_words,
)

WORDS = ["go", "to", "the", "ball_red", "door_blue_locked", ",", ".", "then", "open", "north", "wall", "left"]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_world_tokenizer(WORDS)


def pieces(tok: PreTrainedTokenizerFast, text: str) -> list[str]:
    return tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False))


def test_pretokenisation_splits_punctuation_but_not_underscores(tok: PreTrainedTokenizerFast) -> None:
    assert pieces(tok, "go to the ball_red, then open door_blue_locked.") == [
        "go", "to", "the", "ball_red", ",", "then", "open", "door_blue_locked", ".",
    ]  # fmt: skip
    assert pieces(tok, "  north\twall\n left ") == ["north", "wall", "left"]


def test_special_tokens_have_fixed_ids_and_roles(tok: PreTrainedTokenizerFast) -> None:
    vocab = tok.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == list(range(7))
    assert len(tok) == 7 + len(set(WORDS))
    assert (tok.pad_token, tok.unk_token, tok.mask_token, tok.eos_token) == (
        PAD_TOKEN, UNK_TOKEN, MASK_TOKEN, EOS_TOKEN,
    )  # fmt: skip
    assert require_mask_token_id(tok) == vocab[MASK_TOKEN]
    # Separators written in raw text are matched whole (not split into "<", "|", ...).
    assert pieces(tok, f"{OBS_TOKEN} north {ACT_TOKEN} left {MASK_TOKEN}") == [
        OBS_TOKEN, "north", ACT_TOKEN, "left", MASK_TOKEN,
    ]  # fmt: skip


def test_ids_do_not_depend_on_word_order_or_duplicates() -> None:
    a = build_world_tokenizer(WORDS)
    b = build_world_tokenizer(list(reversed(WORDS)) + WORDS[:3])
    assert a.get_vocab() == b.get_vocab()


@pytest.mark.parametrize("bad", ["two words", "ball,red", "<<", "wall."])
def test_words_that_would_split_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="pre-tokenize to themselves"):
        build_world_tokenizer([*WORDS, bad])


def test_empty_vocabulary_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        build_world_tokenizer([])


def test_unknown_words_become_unk_never_vanish(tok: PreTrainedTokenizerFast) -> None:
    text = "go to the zebra, then open ball_blue"
    assert pieces(tok, text) == ["go", "to", "the", UNK_TOKEN, ",", "then", "open", UNK_TOKEN]
    assert count_unknown(tok, text) == 2
    assert unknown_words(tok, text) == ["zebra", "ball_blue"]
    assert count_unknown(tok, "go to the ball_red") == 0
    assert unknown_words(tok, "go to the ball_red") == []
    # Case is not normalised: a capitalised word is unknown, not silently lower-cased.
    assert unknown_words(tok, "Go north") == ["Go"]


def test_save_load_round_trip(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, PreTrainedTokenizerFast)
    assert loaded.get_vocab() == tok.get_vocab()
    for text in ["go to the ball_red, then open door_blue_locked.", "zebra north", f"{OBS_TOKEN} left"]:
        assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert (loaded.mask_token_id, loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (
        tok.mask_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id,
    )  # fmt: skip
    assert UnitMarkers.for_tokenizer(loaded) == UnitMarkers.for_tokenizer(tok)


def test_world_markers_are_dedicated_single_tokens(tok: PreTrainedTokenizerFast) -> None:
    m = UnitMarkers.for_tokenizer(tok)
    vocab = tok.get_vocab()
    assert m.dedicated and m.text_prefix == ""
    assert (m.mission, m.obs, m.act, m.eos) == (
        (vocab[MISSION_TOKEN],), (vocab[OBS_TOKEN],), (vocab[ACT_TOKEN],), (vocab[EOS_TOKEN],),
    )  # fmt: skip
    assert m.for_kind("obs") == m.obs and m.for_kind("act") == m.act
    with pytest.raises(ValueError, match="'obs' or 'act'"):
        m.for_kind("mission")


def _byte_bpe(mask: bool = True) -> PreTrainedTokenizerFast:
    """A differently built tokenizer: byte-level BPE trained here, specials in another order, no UNK."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = ["Mission: go to the ball_red Observation: north wall Action: left"] * 20
    specials = ["[EOS]", "[PAD]", "[MASK]"] if mask else ["[EOS]", "[PAD]"]
    core.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    kwargs = {"mask_token": "[MASK]"} if mask else {}
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", eos_token="[EOS]", **kwargs)


def test_foreign_tokenizer_gets_text_markers() -> None:
    bpe = _byte_bpe()
    m = UnitMarkers.for_tokenizer(bpe)
    assert not m.dedicated and m.text_prefix == " "
    assert bpe.decode(list(m.mission)) == "Mission:"
    assert bpe.decode(list(m.obs)) == " Observation:"
    assert bpe.decode(list(m.act)) == " Action:"
    assert m.eos == (bpe.convert_tokens_to_ids("[EOS]"),)
    assert require_mask_token_id(bpe) == bpe.convert_tokens_to_ids("[MASK]")
    assert count_unknown(bpe, "anything at all ☃") == 0  # byte-level: nothing is unknown


def test_tokenizer_without_mask_token_is_rejected_with_the_fix() -> None:
    with pytest.raises(ValueError, match="no mask token.*add_special_tokens.*mask_token"):
        require_mask_token_id(_byte_bpe(mask=False))


def test_foreign_tokenizer_that_cannot_spell_markers_is_rejected() -> None:
    # A word-level tokenizer without separators and without "Observation" etc.: markers would be UNK.
    vocab = {"[UNK]": 0, "[MASK]": 1, "north": 2}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wl = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", mask_token="[MASK]")
    with pytest.raises(ValueError, match="fallback marker"):
        UnitMarkers.for_tokenizer(wl)


def test_the_world_tokenizer_covers_the_world() -> None:
    from envs import EnvConfig, world_vocabulary

    words = world_vocabulary(EnvConfig())
    tok = build_world_tokenizer(words)
    assert len(tok) == len(SPECIAL_TOKENS) + len(set(words) - set(SPECIAL_TOKENS))
    text = " ".join(words)
    assert count_unknown(tok, text) == 0
    assert pieces(tok, text) == list(words)  # every world word is exactly one token
