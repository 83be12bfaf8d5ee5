"""Training checkpoints: Hugging Face weights plus the typed state a run needs to continue exactly.

A checkpoint folder holds ``config.json`` + ``model.safetensors`` (``save_pretrained``), the tokenizer files, and
``training_state.pt``: the optimizer, the LR schedule, the step and one ``RankState`` per data-parallel rank (its RNG
streams and where its data pipeline stands). ``training_state.pt`` is written last, and the folder is written under
a temporary name and renamed into place (``fileio.atomic_directory``), so a crash mid-write never leaves a folder
that looks complete. Sharded (FSDP2) checkpoints keep the weights and optimizer in DCP files instead
(``training.sharding``) next to the same ``training_state.pt``.

On disk the state is plain dicts, lists and tensors (``torch.save``), so a checkpoint does not depend on where these
classes live; in memory it is typed.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anyorder_ray.data.encoding import EncodedExample
from anyorder_ray.fileio import atomic_directory

TRAINING_STATE = "training_state.pt"

__all__ = [
    "TRAINING_STATE",
    "RankState",
    "RngState",
    "TrainingState",
    "is_complete_checkpoint",
    "load_training_state",
    "load_weights_into",
    "save_checkpoint",
    "unwrap",
    "write_training_state",
]


@dataclass(frozen=True)
class RngState:
    """Every random stream of one rank: Python's, NumPy's and torch's global ones and the named generators of its
    data pipeline (``{"source": ..., "batch": ..., "sampler": ...}``)."""

    python: tuple
    numpy: tuple
    torch: torch.Tensor
    generators: dict[str, dict]

    @classmethod
    def capture(cls, generators: Mapping[str, np.random.Generator]) -> RngState:
        return cls(
            python=random.getstate(),
            numpy=np.random.get_state(),
            torch=torch.get_rng_state(),
            generators={k: g.bit_generator.state for k, g in generators.items()},
        )

    def restore(self, generators: Mapping[str, np.random.Generator]) -> None:
        """Set the global streams and every generator in ``generators`` (each must have been captured)."""
        missing = sorted(set(generators) - set(self.generators))
        if missing:
            raise KeyError(f"the checkpoint holds no state for the generators {missing}")
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch)
        for k, g in generators.items():
            g.bit_generator.state = self.generators[k]


@dataclass(frozen=True)
class RankState:
    """Where one rank stands: its random streams and its data pipeline.

    ``pending`` are the pre-bucketed micro-batches drawn (masks included) but not yet trained on; ``view_size`` is how
    many trajectories of the buffer the rank's view held; ``tokens`` and ``flops`` what it trained on so far.
    """

    rng: RngState
    pending: tuple[tuple[EncodedExample, ...], ...] = ()
    view_size: int = 0
    tokens: int = 0
    flops: float = 0.0


@dataclass(frozen=True)
class TrainingState:
    """What besides the weights a resumed run needs to continue the same trajectory of training."""

    step: int
    optimizer: dict
    """The optimizer's state dict (empty for a sharded checkpoint: the optimizer is in its DCP files)."""
    scheduler: dict
    ranks: tuple[RankState, ...]
    """One entry per rank of the worker group that wrote the checkpoint, in rank order."""
    metrics: dict = field(default_factory=dict)
    """Informational (the numeric metrics of the checkpoint's report); not needed to resume."""

    def rank(self, rank: int) -> RankState | None:
        """The state of ``rank``, or None for a rank the checkpoint does not know (a larger worker group than the
        one that wrote it: that rank keeps its fresh seeded streams and starts with no pending batches)."""
        return self.ranks[rank] if 0 <= rank < len(self.ranks) else None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)  # RngState and RankState become dicts; tensors stay tensors
        for rank, state in zip(out["ranks"], self.ranks, strict=True):
            rank["pending"] = [list(batch) for batch in state.pending]  # EncodedExample kept as objects
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TrainingState:
        ranks = tuple(
            RankState(
                rng=RngState(**r["rng"]),
                pending=tuple(tuple(batch) for batch in r["pending"]),
                view_size=int(r["view_size"]),
                tokens=int(r["tokens"]),
                flops=float(r.get("flops", 0.0)),
            )
            for r in raw["ranks"]
        )
        return cls(int(raw["step"]), raw["optimizer"], raw["scheduler"], ranks, dict(raw.get("metrics") or {}))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(directory: str | os.PathLike, model: torch.nn.Module, tokenizer: Any, state: TrainingState) -> Path:
    """Write a complete checkpoint at ``directory`` atomically."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        unwrap(model).save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_training_state(tmp, state)
    return directory


def write_training_state(directory: str | os.PathLike, state: TrainingState) -> Path:
    """Write ``training_state.pt`` into ``directory``; write it last, its presence marks a complete checkpoint."""
    path = Path(directory) / TRAINING_STATE
    torch.save(state.to_dict(), path)
    return path


def is_complete_checkpoint(directory: str | os.PathLike) -> bool:
    d = Path(directory)
    return (d / TRAINING_STATE).is_file() and (d / "config.json").is_file()


def load_training_state(directory: str | os.PathLike) -> TrainingState:
    d = Path(directory)
    if not is_complete_checkpoint(d):
        raise FileNotFoundError(f"{d} is not a complete checkpoint (needs config.json and {TRAINING_STATE})")
    return TrainingState.from_dict(torch.load(d / TRAINING_STATE, map_location="cpu", weights_only=False))


def load_weights_into(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Load the checkpoint's weights into an existing model (strict: every key must match)."""
    inner = unwrap(model)
    state_dict = type(inner).from_pretrained(directory).state_dict()
    missing, unexpected = inner.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {directory} does not match the model: missing {missing}, unexpected {unexpected}")


def state_dict_problems(model: torch.nn.Module, state_dict: Any, limit: int = 5) -> list[str]:
    """What keeps ``state_dict`` from loading into ``model`` as it is: missing or unexpected keys, values that are not
    tensors, wrong shapes, non-finite floats (at most ``limit`` of each kind are named). Empty: it loads.

    Checked before a single tensor is copied: ``load_state_dict`` copies every matching tensor before it raises on
    the first mismatch, so a bad state dict would otherwise leave the model half overwritten."""
    if not isinstance(state_dict, Mapping):
        return [f"weights must be a state dict (a mapping of tensors), got {type(state_dict).__name__}"]
    expected = unwrap(model).state_dict()
    problems = []
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    if missing:
        problems.append(f"{len(missing)} missing keys {missing[:limit]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys {unexpected[:limit]}")
    bad = []
    for key in sorted(expected.keys() & state_dict.keys()):
        value, want = state_dict[key], expected[key]
        if not isinstance(value, torch.Tensor):
            bad.append(f"{key} is a {type(value).__name__}, not a tensor")
        elif value.shape != want.shape:
            bad.append(f"{key} has shape {tuple(value.shape)}, the model's is {tuple(want.shape)}")
        elif value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad.append(f"{key} holds non-finite values")
    if bad:
        problems.append(f"{len(bad)} bad tensors: " + "; ".join(bad[:limit]))
    return problems
