"""Training checkpoints in HF format plus the state needed to resume exactly.

A checkpoint folder holds ``config.json`` + ``model.safetensors`` (``save_pretrained``), the tokenizer
files, and ``training_state.pt`` (optimizer, LR schedule, step, RNG states, each rank's data-pipeline
position). Folders are written under a
temporary name and renamed into place, so a crash mid-write never leaves a folder that looks complete;
``training_state.pt`` is written last and its presence marks a complete checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

TRAINING_STATE = "training_state.pt"


@dataclass(frozen=True)
class TrainingState:
    """What besides the weights a resumed run needs to continue the same trajectory of training."""

    step: int
    optimizer: dict
    scheduler: dict
    rng: dict
    """``{"per_rank": {rank: capture_rng(...)}}``."""
    extra: dict
    """Informational (e.g. the metrics of the checkpoint's report); not needed to resume."""
    pipeline: dict = field(default_factory=dict)
    """``{"per_rank": {rank: {...}}}``: where each rank's data pipeline stands (pending batches, buffer view,
    token count), so a resumed run draws exactly the batches the uninterrupted run would have drawn."""


def capture_rng(generators: dict[str, np.random.Generator]) -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {k: g.bit_generator.state for k, g in generators.items()},
    }


def restore_rng(state: dict, generators: dict[str, np.random.Generator]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    for k, g in generators.items():
        if k in state["generators"]:
            g.bit_generator.state = state["generators"][k]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    tokenizer: Any,
    state: TrainingState,
) -> Path:
    """Write a complete checkpoint at ``directory`` atomically (temp folder + rename)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        unwrap(model).save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_training_state(tmp, state)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def write_training_state(directory: str | os.PathLike, state: TrainingState) -> Path:
    """Write ``training_state.pt`` into ``directory``; write it last, its presence marks a complete checkpoint."""
    path = Path(directory) / TRAINING_STATE
    torch.save(
        {
            "step": state.step,
            "optimizer": state.optimizer,
            "scheduler": state.scheduler,
            "rng": state.rng,
            "extra": state.extra,
            "pipeline": state.pipeline,
        },
        path,
    )
    return path


def is_complete_checkpoint(directory: str | os.PathLike) -> bool:
    d = Path(directory)
    return (d / TRAINING_STATE).is_file() and (d / "config.json").is_file()


def load_training_state(directory: str | os.PathLike) -> TrainingState:
    d = Path(directory)
    if not is_complete_checkpoint(d):
        raise FileNotFoundError(f"{d} is not a complete checkpoint (needs config.json and {TRAINING_STATE})")
    raw = torch.load(d / TRAINING_STATE, map_location="cpu", weights_only=False)
    return TrainingState(
        raw["step"], raw["optimizer"], raw["scheduler"], raw["rng"], raw.get("extra", {}), raw.get("pipeline", {})
    )


def load_weights_into(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Load the checkpoint's weights into an existing model (strict: every key must match)."""
    inner = unwrap(model)
    state_dict = type(inner).from_pretrained(directory).state_dict()
    missing, unexpected = inner.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {directory} does not match the model: missing {missing}, unexpected {unexpected}")
