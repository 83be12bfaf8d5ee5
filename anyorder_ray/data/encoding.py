"""Trajectory -> token ids for any-order training and evaluation (one encoder for both).

Layout (world tokenizer; other tokenizers use the text markers of ``UnitMarkers``)::

    <|mission|> m1 m2 ... <|obs|> o1 o2 ... <|act|> a <|obs|> o1 ... <|eos|>

* ``VISIBLE`` unit: its tokens as is, label -100.
* ``TARGET`` unit: every token replaced by the mask token id, label = the original id.
* ``DROPPED`` unit: absent (separator included).
* Separators, the mission and eos are always visible (label -100): they say where units are and of which
  kind, which is information the model is entitled to at both training and inference time.

``encode_units`` takes explicit roles and is what the policy and the NLL evaluation call;
``process_any_order_sft_example`` is ``encode_units`` with roles from a sampler. Sequences longer than
``max_length`` keep the mission and the most recent units that fit (never a partial unit).

The block layout (``encode_blocks``) puts every query of a window into one sequence, the layout of LLaDA2.0's
block-diffusion SFT: a clean stream (the mission, then every unit as is) followed by one block of mask tokens per
target unit. Attention is block-causal: a clean unit sees the mission and the clean units up to itself; target block
``j`` sees the mission, the clean units before ``j`` and itself; nothing sees a target block but itself. Target block
``j`` sits at the positions unit ``j`` has in the clean stream, so its logits equal those of the query "everything
before ``j``, then ``j`` masked" encoded alone in the same layout (``collate`` builds the 4-D mask and the
positions from ``EncodedExample.blocks``).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from anyorder_ray.data.masking import AnyOrderMaskSampler, UnitRole, unlabelled_units
from anyorder_ray.data.tokenization import UnitMarkers, require_mask_token_id, unknown_words
from envs.trajectory import UNIT_KINDS, Trajectory, Unit

__all__ = [
    "IGNORE_INDEX",
    "KIND_IDS",
    "EncodedExample",
    "UnitEncoder",
    "bucket_by_length",
    "collate",
    "crop_window",
    "block_keep",
    "encode_blocks",
    "encode_units",
    "model_inputs",
    "target_logits",
    "padding_waste",
    "process_any_order_sft_example",
]

IGNORE_INDEX = -100
"""Label of a position that is not a target (PyTorch's cross-entropy default ``ignore_index``)."""
KIND_IDS = {kind: i for i, kind in enumerate(UNIT_KINDS)}
"""``unit_kinds`` value of each unit kind's tokens: obs 0, act 1."""
_OTHER = -1  # unit_ids / unit_kinds value of mission, separator and eos tokens (and padding)

UnknownPolicy = Literal["raise", "allow"]


@dataclass(frozen=True, slots=True)
class EncodedExample:
    """One encoded sequence; all per-token lists have the same length.

    Attributes:
        input_ids: token ids, target-unit tokens replaced by the mask id.
        labels: original ids at target-unit tokens, ``IGNORE_INDEX`` elsewhere.
        unit_ids: index (in the units passed in) of the unit each token belongs to; -1 for the mission,
            separators and eos.
        unit_kinds: 0 for observation tokens, 1 for action tokens, -1 otherwise.
        roles: one role per unit passed in, as encoded: units removed by windowing are ``DROPPED`` here,
            so a unit appears in ``input_ids`` iff its role is not ``DROPPED``.
        num_targets: number of target tokens (labels != ``IGNORE_INDEX``).
        blocks: block layout only (None otherwise): the attention block of each token, 0 for the mission,
            ``2 + 2 i`` for clean unit ``i``, ``3 + 2 j`` for the target block of unit ``j`` (``block_keep``).
        position_ids: block layout only: each token's position (a target block repeats its clean unit's).
    """

    input_ids: list[int]
    labels: list[int]
    unit_ids: list[int]
    unit_kinds: list[int]
    roles: tuple[UnitRole, ...]
    num_targets: int
    blocks: list[int] | None = None
    position_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_target_units(self) -> int:
        return sum(1 for r in self.roles if r is UnitRole.TARGET)


class UnitEncoder:
    """A tokenizer plus its ``UnitMarkers`` and an LRU cache of unit-text token ids.

    The trainer and the eval actors encode the same observation and action texts over and over; the cache
    turns that into dict look-ups. Picklable (the cache is dropped on pickling, e.g. when sent to Ray).

    Args:
        tokenizer: any HF tokenizer with a mask token.
        on_unknown: ``"raise"`` (default) refuses a unit or mission containing the unknown token, naming
            the words; ``"allow"`` encodes them as the unknown token.
        cache_size: maximum number of distinct texts kept.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, on_unknown: UnknownPolicy = "raise", cache_size: int = 65536
    ) -> None:
        if on_unknown not in ("raise", "allow"):
            raise ValueError(f"on_unknown must be 'raise' or 'allow', got {on_unknown!r}")
        self.tokenizer = tokenizer
        self.mask_id = require_mask_token_id(tokenizer)
        self.markers = UnitMarkers.for_tokenizer(tokenizer)
        self.on_unknown = on_unknown
        self.cache_size = cache_size
        self._unk_id = tokenizer.unk_token_id
        self._cache: OrderedDict[str, tuple[int, ...]] = OrderedDict()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state

    def encode_text(self, text: str) -> tuple[int, ...]:
        """Token ids of one unit or mission text (without separators), cached."""
        ids = self._cache.get(text)
        if ids is not None:
            self._cache.move_to_end(text)
            return ids
        ids = tuple(self.tokenizer.encode(self.markers.text_prefix + text, add_special_tokens=False))
        if not ids:
            raise ValueError(f"text {text!r} encodes to no tokens; units and the mission must be non-empty")
        if self.on_unknown == "raise" and self._unk_id is not None and self._unk_id in ids:
            words = unknown_words(self.tokenizer, self.markers.text_prefix + text)
            raise ValueError(
                f"text {text!r} contains words outside the tokenizer's vocabulary: {words}; extend the "
                f"vocabulary (build_world_tokenizer(words=...)) or pass on_unknown='allow'"
            )
        self._cache[text] = ids
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return ids


# One encoder per tokenizer object, so callers may pass a bare tokenizer without losing the cache.
_ENCODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _as_encoder(tokenizer: PreTrainedTokenizerBase | UnitEncoder) -> UnitEncoder:
    if isinstance(tokenizer, UnitEncoder):
        return tokenizer
    try:
        enc = _ENCODERS.get(tokenizer)
        if enc is None:
            enc = _ENCODERS[tokenizer] = UnitEncoder(tokenizer)
        return enc
    except TypeError:  # not weak-referenceable / hashable: no shared cache
        return UnitEncoder(tokenizer)


def encode_units(
    mission: str,
    units: Sequence[Unit],
    roles: Sequence[UnitRole | str],
    tokenizer: PreTrainedTokenizerBase | UnitEncoder,
    max_length: int,
) -> EncodedExample:
    """Encode ``mission`` and ``units`` under explicit ``roles``: the one encoder of training and eval.

    If the non-dropped units do not fit in ``max_length`` tokens, the window keeps the mission plus the
    most recent units that fit; if that window holds no target, it ends at the last target unit instead
    (so a target always survives when there is one).

    Raises:
        ValueError: mismatched lengths, an unknown role, or ``max_length`` too small for the mission plus
            one unit (the message names both lengths).
    """
    enc = _as_encoder(tokenizer)
    if len(roles) != len(units):
        raise ValueError(f"need one role per unit, got {len(roles)} roles for {len(units)} units")
    try:
        roles = tuple(UnitRole(r) for r in roles)
    except ValueError:
        raise ValueError(f"roles must be among {[r.value for r in UnitRole]}, got {list(roles)}") from None
    markers = enc.markers

    head = markers.mission + enc.encode_text(mission)
    fixed = len(head) + len(markers.eos)
    kept = [i for i, r in enumerate(roles) if r is not UnitRole.DROPPED]
    bodies = {i: enc.encode_text(units[i].text) for i in kept}
    sizes = {i: len(markers.for_kind(units[i].kind)) + len(bodies[i]) for i in kept}

    window = _fit_window(kept, sizes, roles, budget=max_length - fixed, fixed=fixed, max_length=max_length)

    input_ids = list(head)
    unit_ids = [_OTHER] * len(head)
    unit_kinds = [_OTHER] * len(head)
    labels = [IGNORE_INDEX] * len(head)
    for i in window:
        unit = units[i]
        sep = markers.for_kind(unit.kind)
        body = bodies[i]
        input_ids += sep
        labels += [IGNORE_INDEX] * len(sep)
        unit_ids += [_OTHER] * len(sep)
        unit_kinds += [_OTHER] * len(sep)
        if roles[i] is UnitRole.TARGET:
            input_ids += [enc.mask_id] * len(body)
            labels += body
        else:
            input_ids += body
            labels += [IGNORE_INDEX] * len(body)
        unit_ids += [i] * len(body)
        unit_kinds += [KIND_IDS[unit.kind]] * len(body)
    input_ids += markers.eos
    labels += [IGNORE_INDEX] * len(markers.eos)
    unit_ids += [_OTHER] * len(markers.eos)
    unit_kinds += [_OTHER] * len(markers.eos)

    in_window = set(window)
    final_roles = tuple(r if i in in_window else UnitRole.DROPPED for i, r in enumerate(roles))
    num_targets = sum(len(bodies[i]) for i in window if roles[i] is UnitRole.TARGET)
    return EncodedExample(input_ids, labels, unit_ids, unit_kinds, final_roles, num_targets)


def _fit_window(
    kept: list[int],
    sizes: dict[int, int],
    roles: tuple[UnitRole, ...],
    *,
    budget: int,
    fixed: int,
    max_length: int,
) -> list[int]:
    """Units of the window: the longest suffix of ``kept`` within ``budget`` that holds a target if any can."""
    if budget < 0:
        raise ValueError(f"max_length={max_length} is too small: the mission and eos alone need {fixed} tokens")
    if sum(sizes.values()) <= budget:
        return kept
    window = _suffix(kept, sizes, budget)
    last_unit = kept[-1]
    targets = [k for k, i in enumerate(kept) if roles[i] is UnitRole.TARGET]
    if targets and not any(roles[i] is UnitRole.TARGET for i in window):
        window = _suffix(kept[: targets[-1] + 1], sizes, budget)
        last_unit = kept[targets[-1]]
    if not window:
        needed = fixed + sizes[last_unit]
        raise ValueError(f"max_length={max_length} is too small: the mission, eos and one unit need {needed} tokens")
    return window


def _suffix(units: list[int], sizes: dict[int, int], budget: int) -> list[int]:
    total, start = 0, len(units)
    while start > 0 and total + sizes[units[start - 1]] <= budget:
        start -= 1
        total += sizes[units[start]]
    return units[start:]


def encode_blocks(
    mission: str,
    units: Sequence[Unit],
    targets: Sequence[int],
    tokenizer: PreTrainedTokenizerBase | UnitEncoder,
    max_length: int,
) -> EncodedExample:
    """Encode ``mission`` and ``units`` in the block layout with a query block for every unit index in ``targets``.

    The clean stream holds units up to the last target (exclusive: nothing after it is any query's context). If the
    sequence does not fit in ``max_length``, the earliest units are dropped (with their queries) until it does; the
    last target always stays.

    Raises:
        ValueError: no target, a target out of range, or ``max_length`` too small for the mission and the last target.
    """
    enc = _as_encoder(tokenizer)
    targets = sorted(set(int(t) for t in targets))
    if not targets:
        raise ValueError("the block layout needs at least one target unit")
    if targets[0] < 0 or targets[-1] >= len(units):
        raise ValueError(f"target units {targets} out of range for {len(units)} units")
    markers = enc.markers
    head = markers.mission + enc.encode_text(mission)
    last = targets[-1]
    bodies = [enc.encode_text(units[i].text) for i in range(last + 1)]
    sizes = [len(markers.for_kind(units[i].kind)) + len(bodies[i]) for i in range(last + 1)]

    def length(start: int) -> int:
        return len(head) + sum(sizes[start:last]) + sum(sizes[j] for j in targets if j >= start)

    start = next((s for s in range(last + 1) if length(s) <= max_length), None)
    if start is None:
        raise ValueError(f"max_length={max_length} is too small: the mission and one query need {length(last)} tokens")

    input_ids, labels = list(head), [IGNORE_INDEX] * len(head)
    unit_ids, unit_kinds = [_OTHER] * len(head), [_OTHER] * len(head)
    blocks, positions = [0] * len(head), list(range(len(head)))
    starts: dict[int, int] = {}

    def add(i: int, block: int, position: int, masked: bool) -> None:
        sep, body, kind = markers.for_kind(units[i].kind), bodies[i], KIND_IDS[units[i].kind]
        input_ids.extend([*sep, *([enc.mask_id] * len(body) if masked else body)])
        labels.extend([IGNORE_INDEX] * len(sep) + (list(body) if masked else [IGNORE_INDEX] * len(body)))
        unit_ids.extend([_OTHER] * len(sep) + [i] * len(body))
        unit_kinds.extend([_OTHER] * len(sep) + [kind] * len(body))
        blocks.extend([block] * sizes[i])
        positions.extend(range(position, position + sizes[i]))

    position = len(head)
    for i in range(start, last):
        starts[i] = position
        add(i, 2 + 2 * i, position, masked=False)
        position += sizes[i]
    starts[last] = position
    kept = [j for j in targets if j >= start]
    for j in kept:
        add(j, 3 + 2 * j, starts[j], masked=True)
    roles = tuple(
        UnitRole.TARGET if i in kept else UnitRole.VISIBLE if start <= i < last else UnitRole.DROPPED
        for i in range(len(units))
    )
    num_targets = sum(len(bodies[j]) for j in kept)
    return EncodedExample(input_ids, labels, unit_ids, unit_kinds, roles, num_targets, blocks, positions)


def block_keep(blocks: torch.Tensor) -> torch.Tensor:
    """The ``[B, 1, L, L]`` boolean keep-mask of block-layout ``blocks`` ``[B, L]`` (-1 at padding); see the module
    docstring for the rule."""
    a, b = blocks[:, :, None], blocks[:, None, :]
    unit_a, unit_b = (a - 2).div(2, rounding_mode="floor"), (b - 2).div(2, rounding_mode="floor")
    clean_a, clean_b = (a >= 2) & (a % 2 == 0), (b >= 2) & (b % 2 == 0)
    target_a, target_b = (a >= 3) & (a % 2 == 1), (b >= 3) & (b % 2 == 1)
    keep = (b == 0) & (a >= 0)
    keep |= clean_b & clean_a & (unit_b <= unit_a)
    keep |= clean_b & target_a & (unit_b < unit_a)
    keep |= target_b & (a == b)
    return keep[:, None]


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The model's keyword arguments for a collated batch: ids, the attention mask (the 2-D keep-mask, or the block
    layout's 4-D one) and, for the block layout, the positions."""
    out = {"input_ids": batch["input_ids"].to(device)}
    if "block_mask" in batch:
        out["attention_mask"] = batch["block_mask"].to(device)
        out["position_ids"] = batch["position_ids"].to(device)
    else:
        out["attention_mask"] = batch["attention_mask"].to(device)
    return out


def target_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """The model's logits at the batch's target positions, ``[n_targets, V]`` in row-major order. A model whose
    ``forward`` takes ``logits_mask`` (the LLaDA2 model) computes its LM head there only; any other masked LM is run
    in full and its logits selected."""
    targets = (batch["labels"] != IGNORE_INDEX).to(device)
    inputs = model_inputs(batch, device)
    if _takes_logits_mask(type(model)):
        return model(**inputs, logits_mask=targets).logits
    return model(**inputs).logits[targets]


_LOGITS_MASK: dict[type, bool] = {}


def _takes_logits_mask(cls: type) -> bool:
    if cls not in _LOGITS_MASK:
        import inspect

        forward = getattr(cls, "forward", None)
        _LOGITS_MASK[cls] = forward is not None and "logits_mask" in inspect.signature(forward).parameters
    return _LOGITS_MASK[cls]


def process_any_order_sft_example(
    trajectory: Trajectory,
    sampler: AnyOrderMaskSampler,
    tokenizer: PreTrainedTokenizerBase | UnitEncoder,
    max_length: int,
) -> EncodedExample:
    """Sample fresh roles for ``trajectory`` and encode it (crop long episodes first with ``crop_window``); an action
    that is not a label (a branch's alternative) is never a target."""
    roles = sampler.sample(trajectory.kinds, unlabelled_units(trajectory.labelled_actions))
    return encode_units(trajectory.mission, trajectory.units, roles, tokenizer, max_length)


def crop_window(trajectory: Trajectory, max_steps: int, rng: np.random.Generator) -> Trajectory:
    """A random contiguous window holding at most ``max_steps`` actions, for training on long episodes.

    The window ends at a unit boundary drawn uniformly among those that leave at least one action in it,
    and starts at the earliest observation that keeps ``max_steps`` actions or fewer, so it may end with
    the observation that follows its last action. Episodes with ``max_steps`` actions or fewer are
    returned unchanged. Steps are renumbered from 0; ``meta["window_start_step"]`` records the offset.
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    n = len(trajectory.units)
    if trajectory.num_actions <= max_steps:
        return trajectory
    # Units [start, end): end in 2..n (units[1] is act_0, so end >= 2 always includes an action).
    end = int(rng.integers(2, n + 1))
    # Back up 2*max_steps units from the end, one more when the window ends with an observation (odd
    # `end`): obs, act, ..., act, obs still holds max_steps actions and keeps the start on an observation.
    start = max(0, end - 2 * max_steps - end % 2)
    offset = start // 2
    units = tuple(Unit(u.kind, u.text, u.step - offset) for u in trajectory.units[start:end])
    meta = {**trajectory.meta, "window_start_step": offset}
    return Trajectory(trajectory.mission, trajectory.level, trajectory.seed, units, trajectory.success, meta,
                      trajectory.provenance)  # fmt: skip


def collate(
    examples: Sequence[EncodedExample], pad_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad a batch into ``[batch, length]`` long tensors.

    Returns ``input_ids`` (``pad_id`` at padding), ``labels`` (``IGNORE_INDEX`` at padding),
    ``attention_mask`` (1 real, 0 padding), ``unit_ids`` and ``unit_kinds`` (-1 at padding); for block-layout examples
    also ``block_mask`` (``[B, 1, L, L]``, ``block_keep``) and ``position_ids`` (0 at padding). Pass a batch to the
    model with ``model_inputs``.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    length = max(len(e) for e in examples)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    fields = {"input_ids": pad_id, "labels": IGNORE_INDEX, "unit_ids": _OTHER, "unit_kinds": _OTHER}
    out = {name: torch.full((len(examples), length), fill, dtype=torch.long) for name, fill in fields.items()}
    out["attention_mask"] = torch.zeros((len(examples), length), dtype=torch.long)
    block = [ex.blocks is not None for ex in examples]
    if any(block) and not all(block):
        raise ValueError("cannot collate block-layout and sequence-layout examples into one batch")
    if all(block):
        fields |= {"blocks": -1, "position_ids": 0}
        out |= {name: torch.full((len(examples), length), fields[name], dtype=torch.long) for name in
                ("blocks", "position_ids")}  # fmt: skip
    for row, ex in enumerate(examples):
        n = len(ex)
        for name in fields:
            out[name][row, :n] = torch.tensor(getattr(ex, name), dtype=torch.long)
        out["attention_mask"][row, :n] = 1
    if all(block):
        out["block_mask"] = block_keep(out.pop("blocks"))
    return out


def bucket_by_length(
    examples: Sequence[EncodedExample], batch_size: int, rng: np.random.Generator
) -> list[list[EncodedExample]]:
    """Group examples of similar length into batches (in random batch order) to keep padding low.

    Sorts a random permutation by length (ties stay random), cuts consecutive runs of ``batch_size``
    (the last batch may be smaller) and shuffles the batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    perm = rng.permutation(len(examples))
    order = sorted(perm.tolist(), key=lambda i: len(examples[i]))
    batches = [[examples[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def padding_waste(batches: Sequence[Sequence[EncodedExample]], pad_to_multiple_of: int | None = None) -> float:
    """Fraction of padded positions over all positions when each batch is padded by ``collate``."""
    real = padded = 0
    for batch in batches:
        length = max(len(e) for e in batch)
        if pad_to_multiple_of:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        real += sum(len(e) for e in batch)
        padded += length * len(batch)
    return 0.0 if padded == 0 else 1.0 - real / padded
