"""Policy weights on their way from the trainer to the actors that act with the model (the eval actor, DAgger's rollout
actors), and the one loader both use.

Weights travel as one of (``Weights``):

- an fp32 state dict that rank 0 put into the object store, as ``[ref]`` (nested in a list so Ray hands the actor
  the reference instead of resolving it before the call), loaded into a skeleton the actor built once;
- a persisted checkpoint (a ``ray.train.Checkpoint`` or a local folder) whose Hugging Face weights the actor loads
  itself (``load_llada2_model``).

``load_policy_weights`` checks a state dict against the skeleton (keys, shapes, finite values) before it copies a
single tensor, so a version that cannot be loaded raises ``WeightsRejected`` and leaves the model as it was: never
half-loaded, never silently used.

``PolicyBoard`` is the trial's notice board for DAgger: rank 0 publishes a version (the training step) every
``rollout.weights_every_steps`` steps (or ``weights_versions`` times per trial) without waiting, rollout actors look at
it before each batch and fetch only what is new. It holds the latest version only; the object belongs to rank 0 (a
version published by a training worker that died is lost with it: actors that fail to fetch it count a rejection and
keep their weights). Actors tell it what they loaded and what they rejected, so it knows how many versions in a row no
actor could load (``rejected_in_a_row``, the trainer's check against ``rollout.max_rejected_versions``; a restarted
board counts afresh).
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch

from anyorder_ray.training.checkpoint import state_dict_problems

__all__ = ["PolicyBoard", "Weights", "WeightsRejected", "load_policy_weights"]

logger = logging.getLogger(__name__)

Weights = Any  # a state dict, [ObjectRef of a state dict], an ObjectRef, a ray.train.Checkpoint, or a folder path


class WeightsRejected(ValueError):
    """A weight version that does not fit the model (wrong keys or shapes, non-finite values, not weights at all)."""


def load_policy_weights(
    model: torch.nn.Module | None,
    weights: Weights,
    model_config: Any,
    device: torch.device,
    state_dicts: bool = True,
) -> torch.nn.Module:
    """The model holding ``weights``: ``model`` (the skeleton) with a state dict copied in, or a model loaded from a
    checkpoint. ``state_dicts=False``: this actor takes checkpoints only (``eval.weights: checkpoint``).

    Raises ``WeightsRejected`` (the model untouched) for a state dict that does not fit the skeleton."""
    if isinstance(weights, list | tuple):
        if len(weights) != 1:
            raise WeightsRejected(f"weights as a list must hold exactly one ObjectRef, got {len(weights)} items")
        weights = weights[0]
    if isinstance(weights, ray.ObjectRef):
        weights = ray.get(weights)
    if isinstance(weights, ray.train.Checkpoint | str | os.PathLike):
        from anyorder_ray.models.llada2_moe import load_llada2_model

        with _local_folder(weights) as folder:
            return load_llada2_model(folder, config=model_config, device=device)
    if not isinstance(weights, Mapping):
        raise WeightsRejected(
            "weights must be a state dict, [ObjectRef], a ray.train.Checkpoint or a checkpoint folder, got "
            f"{type(weights).__name__}"
        )
    if not state_dicts or model is None:
        raise RuntimeError("this actor loads checkpoints (eval.weights: checkpoint), not state dicts")
    problems = state_dict_problems(model, weights)
    if problems:
        raise WeightsRejected("the weights do not fit the model: " + "; ".join(problems))
    model.load_state_dict(weights, strict=True)  # copies (and casts to fp32) into the skeleton
    return model.eval()


@contextlib.contextmanager
def _local_folder(weights: Any) -> Iterator[str]:
    """A local folder holding the checkpoint (a ``ray.train.Checkpoint`` on remote storage is downloaded)."""
    if isinstance(weights, ray.train.Checkpoint):
        with weights.as_directory() as folder:
            yield folder
        return
    folder = Path(os.fspath(weights))
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist (deleted by num_to_keep already?)")
    yield str(folder)


class PolicyBoard:
    """Actor class: the latest policy weights of a trial (create it with ``ray.remote(PolicyBoard).options(...)``).

    Each publication gets a new ``stamp`` (the board's instance id, a count), so a version published again (a training
    worker group restarted from an earlier checkpoint publishes the same steps again) is still new to the actors, and
    so is the first publication to a board that restarted (empty: count 0)."""

    def __init__(self) -> None:
        self._instance = uuid.uuid4().hex
        self._serial = 0
        self._version = 0
        self._planned_steps: int | None = None
        self._weights: Any = None
        self._rejected = 0
        self._loaded_serial = 0  # the newest publication of this board an actor loaded
        self._rejected_serials: set[int] = set()  # publications of this board an actor rejected
        self._rejecters: dict[int, set[int]] = {}  # per version: the actors that rejected it
        self._last_reason = ""

    def publish(self, weights: Any, version: int, planned_steps: int | None = None) -> tuple[str, int]:
        """Make ``weights`` (``[ref]``: the reference is kept, not resolved) of training step ``version`` the latest;
        ``planned_steps`` is the trial's step count (DAgger's beta schedule anneals over it). Returns its stamp."""
        if version < 1:
            raise ValueError(f"version must be a training step >= 1, got {version}")
        self._serial += 1
        self._version, self._planned_steps, self._weights = int(version), planned_steps, weights
        return self.stamp()

    def stamp(self) -> tuple[str, int]:
        """``(board instance, publications so far)``; count 0: no weights yet. A cheap look before fetching."""
        return self._instance, self._serial

    def latest(self) -> tuple[tuple[str, int], int, int | None, Any]:
        """``(stamp, version, planned_steps, weights)`` of the latest publication (references nested in the weights
        reach the caller unresolved)."""
        return self.stamp(), self._version, self._planned_steps, self._weights

    def reject(self, worker: int, version: int, reason: str, stamp: tuple[str, int] | None = None) -> None:
        """An actor could not load ``version`` (publication ``stamp``; None: the latest): counted
        (``rollout/weights_rejected``) and logged."""
        self._rejected += 1
        self._last_reason = f"actor {worker}, version {version}: {reason}"
        self._rejecters.setdefault(int(version), set()).add(int(worker))
        instance, serial = stamp if stamp is not None else self.stamp()
        if instance == self._instance:  # a call retried onto a restarted board names a publication it never made
            self._rejected_serials.add(serial)
        logger.warning("rollout actor %d rejected policy version %d: %s", worker, version, reason)

    def rejecters(self, version: int) -> set[int]:
        """The actors that rejected ``version`` (``rollout.sync``: the trainer does not wait for their batch of it)."""
        return set(self._rejecters.get(version, ()))

    def loaded(self, worker: int, stamp: tuple[str, int]) -> None:
        """An actor acts with publication ``stamp`` now: the versions rejected before it no longer count in a row."""
        if stamp[0] == self._instance:
            self._loaded_serial = max(self._loaded_serial, stamp[1])

    def rejected_in_a_row(self) -> tuple[int, str]:
        """``(publications rejected since the newest one an actor loaded, the last rejection's reason)``: each
        publication counts once however many actors rejected it; one loaded by any actor resets the count."""
        count = sum(1 for serial in self._rejected_serials if serial > self._loaded_serial)
        return count, self._last_reason

    def stats(self) -> dict[str, float]:
        return {"rollout/weights_published": self._serial, "rollout/weights_rejected": self._rejected,
                "rollout/weights_rejected_in_a_row": self.rejected_in_a_row()[0]}  # fmt: skip
