"""Tokenizers for the text worlds, and the unit separators every tokenizer needs.

``build_world_tokenizer`` makes a word-level tokenizer with HF ``tokenizers``, wrapped as a
``transformers.PreTrainedTokenizerFast`` (``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round
trip). Pre-tokenisation splits on whitespace and isolates every punctuation character *except* the
underscore, so ``"ball_red, then"`` -> ``["ball_red", ",", "then"]``: cell words such as
``door_blue_locked`` stay one token. There is no normaliser (text is taken as is, case included).

Unknown words are never dropped: they encode to the ``<|unk|>`` token. ``count_unknown`` /
``unknown_words`` find them; the encoder in ``anyorder_ray.data.encoding`` refuses units containing them by
default, because an unknown word in a world trajectory means the vocabulary and the serializer disagree.

Any other HF tokenizer with a mask token can stand in (e.g. the LLaDA 2.0 one). ``UnitMarkers`` resolves
the unit separators for it: the dedicated separator tokens when the vocabulary has them, otherwise short
text markers ("Mission:", " Observation:", " Action:") encoded with that tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "ACT_TOKEN",
    "EOS_TOKEN",
    "MASK_TOKEN",
    "MISSION_TOKEN",
    "OBS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "UNK_TOKEN",
    "UnitMarkers",
    "build_world_tokenizer",
    "count_unknown",
    "require_mask_token_id",
    "unknown_words",
]

PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
MASK_TOKEN = "<|mask|>"
EOS_TOKEN = "<|eos|>"
MISSION_TOKEN = "<|mission|>"
OBS_TOKEN = "<|obs|>"
ACT_TOKEN = "<|act|>"
# Order fixes the ids (0..6) so they do not move when the world vocabulary grows.
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    UNK_TOKEN,
    MASK_TOKEN,
    EOS_TOKEN,
    MISSION_TOKEN,
    OBS_TOKEN,
    ACT_TOKEN,
)
SEPARATOR_TOKENS: tuple[str, ...] = (MISSION_TOKEN, OBS_TOKEN, ACT_TOKEN)


def _world_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # `Punctuation()` would also split on "_" (Unicode class Pc), breaking "ball_red"; `[^\w\s]` keeps
    # underscores inside words and isolates each other punctuation character as its own word.
    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[^\w\s]"), behavior="isolated")]
    )


def build_world_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """Build the word-level tokenizer of the text world.

    Args:
        words: the vocabulary (``envs.world_vocabulary(env_cfg)``). Each word must survive
            pre-tokenisation as one piece (no whitespace, punctuation only as a single character).
            Duplicates are ignored and ids are assigned in sorted order, so the result does not depend
            on the iteration order of ``words``.

    Returns:
        A ``PreTrainedTokenizerFast`` with pad/unk/mask/eos tokens and the unit separators
        ``<|mission|>``, ``<|obs|>``, ``<|act|>`` (ids 0..6, in ``SPECIAL_TOKENS`` order). Words outside
        the vocabulary encode to ``<|unk|>`` (never silently removed). Save it with ``save_pretrained``
        and load it with ``transformers.AutoTokenizer.from_pretrained``.
    """
    pre = _world_pre_tokenizer()
    vocab_words = sorted(set(words) - set(SPECIAL_TOKENS))
    bad = [w for w in vocab_words if [p for p, _ in pre.pre_tokenize_str(w)] != [w]]
    if bad:
        raise ValueError(
            f"vocabulary words must pre-tokenize to themselves (no whitespace; punctuation only as a "
            f"single-character word); offending: {bad[:10]}"
        )
    if not vocab_words:
        raise ValueError("the vocabulary is empty")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({w: len(SPECIAL_TOKENS) + i for i, w in enumerate(vocab_words)})

    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre
    # Registered as added special tokens so "<|mask|>" in raw text is matched whole, not split on "<|".
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        mask_token=MASK_TOKEN,
        eos_token=EOS_TOKEN,
        extra_special_tokens=list(SEPARATOR_TOKENS),
    )


def require_mask_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's mask token id; ``ValueError`` saying how to fix it when there is none."""
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no mask token; any-order training replaces target "
            f"units by it. Fix: tokenizer.add_special_tokens({{'mask_token': '{MASK_TOKEN}'}}) (and resize "
            f"the model's embeddings), or use anyorder_ray.data.tokenization.build_world_tokenizer()"
        )
    return int(mask_id)


def unknown_words(tokenizer: PreTrainedTokenizerBase, text: str) -> list[str]:
    """The pieces of ``text`` that the tokenizer maps to its unknown token, in order."""
    unk_id = tokenizer.unk_token_id
    if unk_id is None:  # e.g. byte-level BPE: every string is representable
        return []
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [text[s:e] for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True) if tid == unk_id]


def count_unknown(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """How many tokens of ``text`` are the unknown token (0 for tokenizers without one)."""
    unk_id = tokenizer.unk_token_id
    if unk_id is None:
        return 0
    return sum(1 for t in tokenizer.encode(text, add_special_tokens=False) if t == unk_id)


# Text markers for tokenizers without our separator tokens; the leading spaces match how words continue
# a sentence in byte-level BPE vocabularies.
_TEXT_MARKERS = {"mission": "Mission:", "obs": " Observation:", "act": " Action:"}


@dataclass(frozen=True, slots=True)
class UnitMarkers:
    """Token ids that open the mission and each unit kind, and close the sequence, for one tokenizer.

    Attributes:
        mission / obs / act: ids written before the mission / an observation / an action. Always visible.
        eos: ids written at the end of every sequence (empty when the tokenizer has no eos token).
        text_prefix: prepended to each unit and mission text before encoding it ("" with separator
            tokens, " " with text markers so a word after "Action:" is encoded as a continuation).
        dedicated: True when the separators are single special tokens of the vocabulary.
    """

    mission: tuple[int, ...]
    obs: tuple[int, ...]
    act: tuple[int, ...]
    eos: tuple[int, ...]
    text_prefix: str
    dedicated: bool

    def for_kind(self, kind: str) -> tuple[int, ...]:
        if kind == "obs":
            return self.obs
        if kind == "act":
            return self.act
        raise ValueError(f"unit kind must be 'obs' or 'act', got {kind!r}")

    @classmethod
    def for_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> UnitMarkers:
        """Separator tokens when the vocabulary has all three, else text markers encoded by ``tokenizer``."""
        vocab = tokenizer.get_vocab()
        eos = () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)
        if all(t in vocab for t in SEPARATOR_TOKENS):
            return cls(
                mission=(vocab[MISSION_TOKEN],),
                obs=(vocab[OBS_TOKEN],),
                act=(vocab[ACT_TOKEN],),
                eos=eos,
                text_prefix="",
                dedicated=True,
            )
        ids: dict[str, tuple[int, ...]] = {}
        for name, text in _TEXT_MARKERS.items():
            enc = tuple(tokenizer.encode(text, add_special_tokens=False))
            if not enc or count_unknown(tokenizer, text):
                raise ValueError(
                    f"tokenizer {type(tokenizer).__name__} lacks the separator tokens {SEPARATOR_TOKENS} and "
                    f"cannot encode the fallback marker {text!r} without unknown tokens; add the separators "
                    f"as special tokens"
                )
            ids[name] = enc
        return cls(mission=ids["mission"], obs=ids["obs"], act=ids["act"], eos=eos, text_prefix=" ", dedicated=False)
