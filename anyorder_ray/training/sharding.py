"""FSDP2 sharded training of the LLaDA2 model (``train.data_parallel_mode: fsdp2``); no Ray in here.

- Build: the model is created on the ``meta`` device (no memory), every ``LLaDA2MoeDecoderLayer`` and then the
  root are ``fully_shard``-ed (parameters become DTensors sharded on dim 0 over the data-parallel mesh), and only
  then is memory allocated, for each rank's shard alone. Weights come from ``model.model_path``, where every rank
  reads only its own rows of each tensor from the safetensors files (either expert layout), so no rank ever holds
  the full model; or, for a preset, from the seeded init of the unsharded path built on rank 0 and scattered,
  which makes a sharded run start from exactly the weights a DDP run starts from.
- Mixed precision (GPU): bf16 parameters in forward/backward, gradients reduce-scattered in fp32, fp32 master
  weights and optimizer state. On CPU everything stays fp32 (bf16 autocast trained the default model slower than
  fp32 there: `TrainConfig.enable_mixed_precision`).
- Activation checkpointing: transformers' per-layer checkpoint of ``forward``, which keeps FSDP2's hooks outside
  the recomputed region.
- Gradient accumulation: ``gradient_sync`` turns the reduce-scatter off for all but the step's last micro-batch.
  FSDP2 averages gradients over the ranks like DDP, so ``objective.data_parallel_normaliser`` is exact for both.
- Checkpoints: ``torch.distributed.checkpoint`` (DCP) writes model and optimizer shards, one file per rank, under
  ``sharded/`` next to ``training_state.pt`` (schedule, step, RNG, data position). Each rank writes into its own
  local folder; Ray merges the ranks' folders into one checkpoint, and DCP reshards on load.
- Export: ``export_hf_checkpoint`` gathers one tensor at a time and rank 0 writes the per-expert Hugging Face layout
  (``config.json``, safetensors shards, tokenizer) that ``from_pretrained`` and the released tooling load.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import PreTrainedTokenizerBase

from anyorder_ray.config import ModelConfig
from anyorder_ray.models.factory import build_model, build_model_config
from anyorder_ray.training.checkpoint import TrainingState, load_training_state, unwrap, write_training_state

logger = logging.getLogger(__name__)

SHARDED_STATE = "sharded"
"""Sub-folder of a checkpoint holding the DCP files (``.metadata`` and one ``__<rank>_0.distcp`` per rank)."""

__all__ = [
    "SHARDED_STATE",
    "build_sharded_model",
    "export_hf_checkpoint",
    "full_state_dict",
    "gradient_sync",
    "init_from_rank0",
    "is_sharded",
    "is_sharded_checkpoint",
    "iter_full_tensors",
    "load_local_shards",
    "load_sharded_checkpoint",
    "local_rows",
    "mixed_precision_policy",
    "run_idle_experts",
    "save_sharded_checkpoint",
    "shard_model",
]


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (possibly inside a ``torch.compile`` wrapper) is an FSDP2 module."""
    return isinstance(unwrap(model), FSDPModule)


def mixed_precision_policy(enabled: bool, device: torch.device) -> MixedPrecisionPolicy:
    """bf16 parameters with fp32 gradient reduction when ``enabled`` on an accelerator; fp32 otherwise.

    On CPU the request is ignored with a warning: bf16 matmuls there are two orders of magnitude slower than fp32.
    """
    if enabled and device.type != "cpu":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if enabled:
        logger.warning("train.enable_mixed_precision is ignored on CPU: FSDP2 keeps fp32 parameters there")
    return MixedPrecisionPolicy()


def run_idle_experts(model: nn.Module) -> nn.Module:
    """Make every MoE block run all its experts, also those that got no token (a zero, but connected, gradient).

    Data parallelism needs it: FSDP2's reduce-scatter and DDP's bucketed all-reduce expect a gradient for every
    parameter from every rank, and which experts a rank's tokens reach differs from rank to rank."""
    from anyorder_ray.models.llada2_moe.modeling_llada2_moe import LLaDA2MoeSparseMoeBlock

    for block in model.modules():
        if isinstance(block, LLaDA2MoeSparseMoeBlock):
            block.run_idle_experts = True
    return model


def shard_model(model: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None = None) -> nn.Module:
    """``fully_shard`` every decoder layer (one all-gather per layer, freed after its forward), then the root
    (embeddings, final norm, LM head). Works on a ``meta`` model; returns the same object, now an ``FSDPModule``.

    MoE blocks are switched to ``run_idle_experts``: a layer's reduce-scatter must get a gradient for every expert
    from every rank, also from a rank on which the expert received no token (its gradient there is zero)."""
    from anyorder_ray.models.llada2_moe.modeling_llada2_moe import LLaDA2MoeDecoderLayer

    run_idle_experts(model)
    mp_policy = mp_policy or MixedPrecisionPolicy()
    layers = [m for m in model.modules() if isinstance(m, LLaDA2MoeDecoderLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LLaDA2MoeDecoderLayer to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    return model


def build_sharded_model(
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
    seed: int,
    *,
    mixed_precision: bool = False,
    activation_checkpointing: bool = False,
    mesh: DeviceMesh | None = None,
) -> nn.Module:
    """The LLaDA2 model ``cfg`` names, sharded over ``mesh`` (default: every rank of the default process group).

    Collective: every rank calls it. With ``cfg.model_path`` each rank reads only its shard from the checkpoint;
    otherwise rank 0 builds the preset with ``factory.build_model(cfg, tokenizer, seed)`` (the unsharded path's
    init, so both paths start from the same weights; only rank 0 holds the full model, once, on CPU) and the
    other ranks receive their shards from it.
    """
    from anyorder_ray.models.llada2_moe import LLaDA2MoeModelLM

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("build_sharded_model needs an initialised torch.distributed process group")
    config = build_model_config(cfg, tokenizer)
    with torch.device("meta"):
        model = LLaDA2MoeModelLM(config)
    if activation_checkpointing:
        model.activation_checkpointing_enable()
    mesh = mesh or init_device_mesh(device.type, (dist.get_world_size(),))
    shard_model(model, mesh, mixed_precision_policy(mixed_precision, device))
    model.to_empty(device=device)
    if cfg.model_path is not None:
        load_local_shards(model, cfg.model_path)
    else:
        init_from_rank0(model, lambda: build_model(cfg, tokenizer, seed=seed))
    _reset_derived_buffers(model)
    return model


def _reset_derived_buffers(model: nn.Module) -> None:
    """Recompute the non-persistent buffers (RoPE frequencies), which ``to_empty`` left uninitialised."""
    from anyorder_ray.models.llada2_moe.modeling_llada2_moe import LLaDA2MoeRotaryEmbedding, rope_inv_freq

    with torch.no_grad():
        for module in unwrap(model).modules():
            if isinstance(module, LLaDA2MoeRotaryEmbedding):
                module.inv_freq.copy_(rope_inv_freq(module.config, device=module.inv_freq.device))


def local_rows(tensor: torch.Tensor) -> tuple[int, int]:
    """Rows ``[start, stop)`` (dim 0) of the global tensor that this rank holds: FSDP2's ``Shard(0)`` follows
    ``torch.chunk``; a replicated or plain tensor is held whole."""
    if not isinstance(tensor, DTensor):
        return 0, tensor.shape[0] if tensor.dim() else 1
    if tensor.device_mesh.ndim != 1 or len(tensor.placements) != 1:
        raise ValueError(f"only 1-D meshes are supported, got placements {tensor.placements}")
    placement = tensor.placements[0]
    rows = tensor.shape[0]
    if placement.is_replicate():
        return 0, rows
    if not (placement.is_shard() and placement.dim == 0):
        raise ValueError(f"expected Shard(0) or Replicate placement, got {placement}")
    world, rank = tensor.device_mesh.size(), tensor.device_mesh.get_local_rank()
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    stop = min(start + chunk, rows)
    if stop - start != tensor.to_local().shape[0]:
        raise RuntimeError(f"local shard has {tensor.to_local().shape[0]} rows, expected {stop - start}")
    return start, stop


@torch.no_grad()
def load_local_shards(model: nn.Module, folder: str | os.PathLike[str]) -> int:
    """Fill a materialised (``to_empty``) sharded model from a LLaDA2 checkpoint folder, each rank reading only the
    rows it holds (buffers, a few floats, whole). Strict: missing, unexpected or mis-shaped tensors raise.

    Returns the number of elements this rank read from disk (its shard: about the model's size / world size).
    """
    from anyorder_ray.models.llada2_moe import SafetensorsCheckpoint

    checkpoint = SafetensorsCheckpoint.open(folder)
    targets = unwrap(model).state_dict(keep_vars=True)
    read = 0
    with checkpoint.row_reader() as reader:
        on_disk = set(reader.keys())
        missing, unexpected = sorted(set(targets) - on_disk), sorted(on_disk - set(targets))
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {folder} does not match LLaDA2MoeModelLM: {len(missing)} missing keys {missing[:10]}, "
                f"{len(unexpected)} unexpected keys {unexpected[:10]}"
            )
        mismatched = [
            f"{key}: checkpoint {reader.shape(key)} vs model {list(t.shape)}"
            for key, t in targets.items()
            if reader.shape(key) != list(t.shape)
        ]
        if mismatched:
            raise ValueError(f"shape mismatch between {folder} and the model: " + "; ".join(mismatched[:10]))
        for key, target in targets.items():
            start, stop = local_rows(target)
            rows = reader.rows(key, start, stop)
            local = target.to_local() if isinstance(target, DTensor) else target
            local.copy_(rows.reshape(local.shape))
            read += rows.numel()
    return read


def init_from_rank0(model: nn.Module, build_full: Callable[[], nn.Module]) -> None:
    """Scatter the weights of ``build_full()`` (called on rank 0 only) into the sharded ``model``. Collective."""
    full = build_full().state_dict() if _rank() == 0 else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(unwrap(model), full, options=options)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Run the block with data-parallel gradient reduction on (``enabled``) or off, for gradient accumulation:
    FSDP2's ``set_requires_gradient_sync``, DDP's ``no_sync``; a no-op for a plain model."""
    inner = unwrap(model)
    if enabled:
        yield
    elif isinstance(inner, FSDPModule):
        inner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            inner.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full weights on CPU on rank 0 and ``{}`` on the others (for the eval actor). Collective."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(unwrap(model), options=options)


def iter_full_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` for every state-dict entry, gathered one at a time (CPU copies on rank 0). Every
    rank must consume the iterator to the end: each sharded tensor is an all-gather."""
    on_rank0 = _rank() == 0
    for key, value in unwrap(model).state_dict().items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        yield key, full.detach().to("cpu") if on_rank0 else full


def export_hf_checkpoint(
    model: nn.Module, folder: str | os.PathLike[str], tokenizer: PreTrainedTokenizerBase | None = None
) -> list[Path]:
    """Write the consolidated weights of a sharded model in the per-expert Hugging Face layout (rank 0 writes,
    streaming: at most one output shard in memory). Collective; returns the files written ([] off rank 0)."""
    from anyorder_ray.models.llada2_moe import save_llada2_checkpoint

    items = iter_full_tensors(model)
    if _rank() != 0:
        for _ in items:
            pass
        return []
    paths = save_llada2_checkpoint(items, folder, config=unwrap(model).config)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return paths


def save_sharded_checkpoint(
    directory: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenizer: PreTrainedTokenizerBase | None,
    state: TrainingState | None,
    *,
    export: bool = False,
) -> Path:
    """Write this rank's part of a sharded checkpoint into ``directory`` (a folder of its own on every rank).
    Collective.

    Every rank writes its DCP shard of the weights and optimizer state; rank 0 also the ``.metadata`` and then
    ``config.json``, the tokenizer and, last, ``training_state.pt`` from ``state`` (its ``optimizer`` is unused:
    the optimizer is in the DCP files). With ``export`` rank 0 also writes the consolidated per-expert weights, so
    the merged folder is both a resumable checkpoint and a Hugging Face model folder.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_state, optim_state = get_state_dict(unwrap(model), optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(directory / SHARDED_STATE))
    if export:
        export_hf_checkpoint(model, directory, tokenizer)
    if _rank() == 0:
        if state is None:
            raise ValueError("rank 0 needs the TrainingState to write")
        if not export:
            unwrap(model).config.save_pretrained(directory)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)
        write_training_state(directory, state)
    return directory


def is_sharded_checkpoint(directory: str | os.PathLike[str]) -> bool:
    return (Path(directory) / SHARDED_STATE / ".metadata").is_file()


def load_sharded_checkpoint(
    directory: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer
) -> TrainingState:
    """Load weights and optimizer state of a sharded checkpoint into the sharded ``model`` / ``optimizer`` (any
    world size: DCP reshards) and return the rest of the training state. Collective."""
    directory = Path(directory)
    if not is_sharded_checkpoint(directory):
        raise FileNotFoundError(
            f"{directory} holds no sharded (FSDP2) state in {SHARDED_STATE}/; it was written by a "
            "data_parallel_mode=ddp run, which only that mode can resume"
        )
    state = load_training_state(directory)
    model_state, optim_state = get_state_dict(unwrap(model), optimizer)
    dcp.load({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(directory / SHARDED_STATE))
    set_state_dict(unwrap(model), optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    return state
