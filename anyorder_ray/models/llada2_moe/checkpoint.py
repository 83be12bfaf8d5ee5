"""LLaDA 2.0 checkpoints on disk: the two expert layouts, sharded safetensors, conversion and strict loading.

Layouts (everything except the routed experts is named identically in both):

- ``per_expert`` -- the released Hub layout and this package's module layout:
  ``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`` with shapes ``[I, H]``, ``[I, H]``, ``[H, I]``;
  ``config.json`` has ``model_type: llada2_moe``.
- ``merged`` -- dFactory (VeOmni) training layout: one stacked tensor per layer and projection,
  ``model.layers.{i}.mlp.experts.{gate,up,down}_proj`` (no ``.weight``) with shapes ``[E, I, H]``, ``[E, I, H]``,
  ``[E, H, I]``; ``config.json`` has ``model_type: llada2_moe_veomni``, which is how dFactory's modeling code
  knows to build fused experts.

Folders hold ``config.json`` plus either ``model.safetensors`` or shards named
``model-0000k-of-0000n.safetensors`` with a ``model.safetensors.index.json`` (``weight_map``: key -> shard), the
Hugging Face convention. Tensors are read one at a time through memory-mapped ``safe_open`` handles, so peak
memory is the model plus one stacked expert tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from anyorder_ray.models.llada2_moe.configuration_llada2_moe import (
    MERGED_MODEL_TYPE,
    MODEL_TYPE,
    LLaDA2MoeConfig,
)

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

_PER_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MERGED_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)$")


class CheckpointLayout(StrEnum):
    """How routed-expert weights are stored."""

    PER_EXPERT = "per_expert"
    MERGED = "merged"

    @property
    def model_type(self) -> str:
        return MODEL_TYPE if self is CheckpointLayout.PER_EXPERT else MERGED_MODEL_TYPE


def _as_layout(layout: CheckpointLayout | str) -> CheckpointLayout:
    try:
        return CheckpointLayout(layout)
    except ValueError:
        raise ValueError(
            f"unknown checkpoint layout {layout!r}; allowed: {[m.value for m in CheckpointLayout]}"
        ) from None


def per_expert_key(layer: int, expert: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def merged_key(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{proj}"


def detect_layout(keys: Iterable[str]) -> CheckpointLayout:
    """``merged`` if any key is a stacked-expert tensor, else ``per_expert``; both at once is an error."""
    has_merged = has_per_expert = False
    for key in keys:
        has_merged |= bool(_MERGED_KEY.match(key))
        has_per_expert |= bool(_PER_EXPERT_KEY.match(key))
    if has_merged and has_per_expert:
        raise ValueError("checkpoint mixes merged (stacked) and per-expert keys; expected one layout")
    return CheckpointLayout.MERGED if has_merged else CheckpointLayout.PER_EXPERT


# --- pure state-dict conversion -------------------------------------------------------------------------------
def merge_experts(state_dict: Mapping[str, torch.Tensor], config: LLaDA2MoeConfig) -> dict[str, torch.Tensor]:
    """Per-expert -> merged: stack each layer's ``num_experts`` tensors of a projection along a new dim 0."""
    return dict(_merge_stream(state_dict.items(), config))


def split_experts(state_dict: Mapping[str, torch.Tensor], config: LLaDA2MoeConfig) -> dict[str, torch.Tensor]:
    """Merged -> per-expert: each ``[E, ...]`` stacked tensor becomes ``E`` separate (copied) weights."""
    return dict(_split_stream(state_dict.items(), config))


def _split_stream(
    items: Iterable[tuple[str, torch.Tensor]], config: LLaDA2MoeConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    for key, tensor in items:
        match = _MERGED_KEY.match(key)
        if match is None:
            yield key, tensor
            continue
        layer, proj = int(match.group(1)), match.group(2)
        if tensor.dim() != 3 or tensor.shape[0] != config.num_experts:
            raise ValueError(
                f"{key}: stacked expert tensor must be [num_experts={config.num_experts}, ., .], "
                f"got {list(tensor.shape)}"
            )
        for expert in range(config.num_experts):
            # clone: views into one storage would be written back as shared tensors.
            yield per_expert_key(layer, expert, proj), tensor[expert].clone()


def _merge_stream(
    items: Iterable[tuple[str, torch.Tensor]], config: LLaDA2MoeConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    pending: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, tensor in items:
        match = _PER_EXPERT_KEY.match(key)
        if match is None:
            yield key, tensor
            continue
        layer, expert, proj = int(match.group(1)), int(match.group(2)), match.group(3)
        if not 0 <= expert < config.num_experts:
            raise ValueError(f"{key}: expert index {expert} outside [0, num_experts={config.num_experts})")
        group = pending.setdefault((layer, proj), {})
        group[expert] = tensor
        if len(group) == config.num_experts:  # emit as soon as complete, keeping at most a few layers in memory
            del pending[(layer, proj)]
            yield merged_key(layer, proj), torch.stack([group[e] for e in range(config.num_experts)])
    if pending:
        incomplete = {f"layer {layer} {proj}": len(group) for (layer, proj), group in sorted(pending.items())}
        raise ValueError(f"cannot merge experts: incomplete expert sets (have/need {config.num_experts}): {incomplete}")


# --- reading ------------------------------------------------------------------------------------------------
def read_llada2_config(folder: str | os.PathLike[str]) -> LLaDA2MoeConfig:
    """Read ``config.json`` of a per-expert or merged LLaDA 2.0 folder (other model types are an error)."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}")
    data: dict[str, Any] = json.loads(path.read_text())
    model_type = data.pop("model_type", None)
    allowed = (MODEL_TYPE, MERGED_MODEL_TYPE)
    if model_type not in allowed:
        raise ValueError(
            f"{path} describes model_type {model_type!r}, not a LLaDA 2.0 MoE checkpoint; allowed: {list(allowed)}"
        )
    # auto_map points at the Hub's remote code, which this implementation replaces.
    data.pop("auto_map", None)
    data.pop("transformers_version", None)
    return LLaDA2MoeConfig(**data)


@dataclass(frozen=True)
class SafetensorsCheckpoint:
    """A folder's safetensors weights: key -> shard file, validated up front, tensors read lazily."""

    folder: Path
    weight_map: dict[str, str]

    @classmethod
    def open(cls, folder: str | os.PathLike[str]) -> SafetensorsCheckpoint:
        """Validate the index (if any) and every shard header; raise a clear error on a missing or truncated
        shard, or on an index that names keys its shard does not hold."""
        root = Path(folder)
        index_path = root / INDEX_FILE
        if index_path.is_file():
            index = json.loads(index_path.read_text())
            if "weight_map" not in index:
                raise ValueError(f"{index_path} has no 'weight_map'")
            weight_map: dict[str, str] = dict(index["weight_map"])
        elif (root / SINGLE_FILE).is_file():
            weight_map = {key: SINGLE_FILE for key in _shard_keys(root / SINGLE_FILE)}
        else:
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {root}")
        by_shard: dict[str, set[str]] = {}
        for key, shard in weight_map.items():
            by_shard.setdefault(shard, set()).add(key)
        for shard, keys in sorted(by_shard.items()):
            shard_path = root / shard
            if not shard_path.is_file():
                raise FileNotFoundError(
                    f"shard {shard} listed in {INDEX_FILE} is missing from {root} ({len(keys)} tensors)"
                )
            absent = keys - _shard_keys(shard_path)
            if absent:
                raise ValueError(
                    f"shard {shard_path} lacks {len(absent)} tensors its index lists, e.g. {sorted(absent)[:3]}"
                )
        return cls(root, weight_map)

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def layout(self) -> CheckpointLayout:
        return detect_layout(self.weight_map)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """All tensors, shard by shard (one open memory map at a time), in each shard's index order."""
        by_shard: dict[str, list[str]] = {}
        for key, shard in self.weight_map.items():
            by_shard.setdefault(shard, []).append(key)
        for shard, keys in by_shard.items():
            with safe_open(self.folder / shard, framework="pt", device="cpu") as handle:
                for key in keys:
                    yield key, handle.get_tensor(key)

    def per_expert_items(self, config: LLaDA2MoeConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """``items()`` in the per-expert layout whatever the folder's layout (merged tensors are split)."""
        return _split_stream(self.items(), config)

    @contextlib.contextmanager
    def row_reader(self) -> Iterator[RowReader]:
        """A ``RowReader`` over this folder; its shard files stay open (memory-mapped) until the context exits."""
        with contextlib.ExitStack() as stack:
            yield RowReader(self, stack)

    def shapes(self) -> dict[str, list[int]]:
        """Key -> shape from the shard headers, without reading any tensor data."""
        out: dict[str, list[int]] = {}
        by_shard: dict[str, list[str]] = {}
        for key, shard in self.weight_map.items():
            by_shard.setdefault(shard, []).append(key)
        for shard, keys in by_shard.items():
            with safe_open(self.folder / shard, framework="pt", device="cpu") as handle:
                for key in keys:
                    out[key] = list(handle.get_slice(key).get_shape())
        return out


class RowReader:
    """Reads single tensors, or rows ``[start, stop)`` of them, by their *per-expert* name from a checkpoint in either
    layout, touching nothing else on disk: a rank of a sharded model reads only its own slice of each weight.

    In a merged-layout folder an expert's weight is sliced out of its layer's stacked ``[E, ...]`` tensor.
    """

    def __init__(self, checkpoint: SafetensorsCheckpoint, stack: contextlib.ExitStack) -> None:
        self._checkpoint = checkpoint
        self._stack = stack
        self._handles: dict[str, Any] = {}

    def _slice(self, key: str) -> Any:
        shard = self._checkpoint.weight_map[key]
        if shard not in self._handles:
            path = self._checkpoint.folder / shard
            self._handles[shard] = self._stack.enter_context(safe_open(path, framework="pt", device="cpu"))
        return self._handles[shard].get_slice(key)

    def _source(self, key: str) -> tuple[str, int | None]:
        """(key on disk, expert index in the stacked tensor or None)."""
        if key in self._checkpoint.weight_map:
            return key, None
        match = _PER_EXPERT_KEY.match(key)
        if match is not None:
            stacked, expert = merged_key(int(match.group(1)), match.group(3)), int(match.group(2))
            if stacked in self._checkpoint.weight_map and expert < self._slice(stacked).get_shape()[0]:
                return stacked, expert
        raise KeyError(f"{key} is not in the checkpoint {self._checkpoint.folder}")

    def keys(self) -> list[str]:
        """Every tensor name in the per-expert layout (stacked tensors expanded to one name per expert)."""
        out = []
        for key in self._checkpoint.weight_map:
            match = _MERGED_KEY.match(key)
            if match is None:
                out.append(key)
                continue
            experts = int(self._slice(key).get_shape()[0])
            out += [per_expert_key(int(match.group(1)), e, match.group(2)) for e in range(experts)]
        return out

    def shape(self, key: str) -> list[int]:
        source, expert = self._source(key)
        shape = [int(n) for n in self._slice(source).get_shape()]
        return shape if expert is None else shape[1:]

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` along dim 0 (the whole tensor for a 0-d one), in the checkpoint's dtype."""
        source, expert = self._source(key)
        view = self._slice(source)
        if expert is not None:
            return view[expert : expert + 1, start:stop][0]
        return view[:] if len(view.get_shape()) == 0 else view[start:stop]


def _shard_keys(path: Path) -> set[str]:
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            return set(handle.keys())
    except SafetensorError as err:
        size = path.stat().st_size
        raise ValueError(
            f"cannot read safetensors file {path} ({size} bytes): {err}. It is probably truncated or corrupt "
            "(an interrupted download or copy); fetch or write it again."
        ) from err


def detect_folder_layout(folder: str | os.PathLike[str]) -> CheckpointLayout | None:
    """Layout of a local checkpoint folder, or ``None`` if ``folder`` is not a local safetensors folder."""
    root = Path(folder)
    if not root.is_dir():
        return None
    config_path = root / CONFIG_NAME
    if config_path.is_file() and json.loads(config_path.read_text()).get("model_type") == MERGED_MODEL_TYPE:
        return CheckpointLayout.MERGED
    if (root / INDEX_FILE).is_file():
        return detect_layout(json.loads((root / INDEX_FILE).read_text()).get("weight_map", {}))
    if (root / SINGLE_FILE).is_file():
        return detect_layout(_shard_keys(root / SINGLE_FILE))
    return None


def load_llada2_state_dict(
    folder: str | os.PathLike[str], config: LLaDA2MoeConfig | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of a folder (either layout) converted to the per-expert layout, in checkpoint dtype."""
    config = config or read_llada2_config(folder)
    return dict(_split_stream(SafetensorsCheckpoint.open(folder).items(), config))


# --- writing ------------------------------------------------------------------------------------------------
class _ShardWriter:
    """Writes tensors into shards of at most ``max_shard_bytes`` (a single larger tensor gets its own shard),
    under temporary names first because the final ``-of-N`` count is only known at the end."""

    def __init__(self, folder: Path, max_shard_bytes: int) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.temp_files: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self.current[key] = tensor.detach().to("cpu").contiguous()
        self.current_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.folder / f".tmp-shard-{len(self.temp_files):05d}.safetensors"
        save_file(self.current, str(path), metadata={"format": "pt"})
        self.temp_files.append((path, list(self.current)))
        self.current, self.current_bytes = {}, 0

    def finish(self) -> list[Path]:
        if self.current or not self.temp_files:
            self._flush()
        if len(self.temp_files) == 1:
            path = self.folder / SINGLE_FILE
            self.temp_files[0][0].replace(path)
            (self.folder / INDEX_FILE).unlink(missing_ok=True)
            return [path]
        count = len(self.temp_files)
        weight_map: dict[str, str] = {}
        paths = []
        for i, (temp, keys) in enumerate(self.temp_files, start=1):
            name = f"model-{i:05d}-of-{count:05d}.safetensors"
            temp.replace(self.folder / name)
            paths.append(self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (self.folder / SINGLE_FILE).unlink(missing_ok=True)
        return paths


def _write_config(config: LLaDA2MoeConfig, folder: Path, layout: CheckpointLayout) -> None:
    data = config.to_dict()
    data["model_type"] = layout.model_type
    data["architectures"] = ["LLaDA2MoeModelLM"]
    (folder / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _write(
    items: Iterable[tuple[str, torch.Tensor]],
    config: LLaDA2MoeConfig,
    folder: str | os.PathLike[str],
    layout: CheckpointLayout | str,
    max_shard_bytes: int,
) -> list[Path]:
    layout = _as_layout(layout)
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    for stale in list(root.glob("model-*-of-*.safetensors")) + [root / SINGLE_FILE, root / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    stream = _split_stream(items, config)  # normalise whatever comes in to per-expert first
    if layout is CheckpointLayout.MERGED:
        stream = _merge_stream(stream, config)
    writer = _ShardWriter(root, max_shard_bytes)
    for key, tensor in stream:
        writer.add(key, tensor)
    paths = writer.finish()
    _write_config(config, root, layout)
    return paths


def save_llada2_checkpoint(
    model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    folder: str | os.PathLike[str],
    config: LLaDA2MoeConfig | None = None,
    layout: CheckpointLayout | str = CheckpointLayout.PER_EXPERT,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[Path]:
    """Write weights + ``config.json`` in ``layout`` ("per_expert" = Hub, "merged" = dFactory), sharded at
    ``max_shard_bytes``. Returns the safetensors files written.

    The weights are a model, a state dict, or an iterable of ``(key, tensor)`` pairs; an iterable is consumed
    one tensor at a time, so a generator that gathers each tensor of a sharded model keeps no more than one
    output shard in memory."""
    if isinstance(model_or_state_dict, torch.nn.Module):
        config = config or model_or_state_dict.config
        items: Iterable[tuple[str, torch.Tensor]] = model_or_state_dict.state_dict().items()
    elif isinstance(model_or_state_dict, Mapping):
        items = dict(model_or_state_dict).items()
    else:
        items = model_or_state_dict
    if config is None:
        raise ValueError("save_llada2_checkpoint needs config= when given a state dict")
    return _write(items, config, folder, layout, max_shard_bytes)


def convert_llada2_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    layout: CheckpointLayout | str,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[Path]:
    """Rewrite the checkpoint folder ``src`` into ``dst`` in ``layout``, streaming tensor by tensor; other files
    (tokenizer, generation config) are copied unchanged."""
    src_root, dst_root = Path(src), Path(dst)
    if src_root.resolve() == dst_root.resolve():
        raise ValueError("convert_llada2_checkpoint needs a destination different from the source")
    config = read_llada2_config(src_root)
    checkpoint = SafetensorsCheckpoint.open(src_root)
    dst_root.mkdir(parents=True, exist_ok=True)
    weight_files = set(checkpoint.weight_map.values()) | {INDEX_FILE, SINGLE_FILE, CONFIG_NAME}
    for path in src_root.iterdir():
        if path.is_file() and path.name not in weight_files:
            shutil.copy2(path, dst_root / path.name)
    return _write(checkpoint.items(), config, dst_root, layout, max_shard_bytes)


__all__ = [
    "CheckpointLayout",
    "RowReader",
    "SafetensorsCheckpoint",
    "convert_llada2_checkpoint",
    "detect_folder_layout",
    "detect_layout",
    "load_llada2_state_dict",
    "merge_experts",
    "merged_key",
    "per_expert_key",
    "read_llada2_config",
    "save_llada2_checkpoint",
    "split_experts",
]
