"""LLaDA 2.0 MoE (masked diffusion LM) in the Hugging Face style.

Importing this package registers ``llada2_moe`` with ``AutoConfig``, ``AutoModel`` and ``AutoModelForMaskedLM``
so ``from_pretrained`` on a saved folder works offline in any process (Ray workers included) that imports it.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from anyorder_ray.models.llada2_moe.checkpoint import (
    CheckpointLayout,
    RowReader,
    SafetensorsCheckpoint,
    convert_llada2_checkpoint,
    detect_folder_layout,
    detect_layout,
    load_llada2_state_dict,
    merge_experts,
    read_llada2_config,
    save_llada2_checkpoint,
    split_experts,
)
from anyorder_ray.models.llada2_moe.configuration_llada2_moe import (
    MERGED_MODEL_TYPE,
    MODEL_TYPE,
    LLaDA2MoeConfig,
)
from anyorder_ray.models.llada2_moe.modeling_llada2_moe import (
    LLaDA2MoeModel,
    LLaDA2MoeModelLM,
    LLaDA2MoePreTrainedModel,
    load_llada2_model,
)
from anyorder_ray.models.llada2_moe.presets import PRESETS, llada2_config

# Registration is the reason this package is imported by workers; exist_ok keeps re-imports harmless.
AutoConfig.register(MODEL_TYPE, LLaDA2MoeConfig, exist_ok=True)
AutoModel.register(LLaDA2MoeConfig, LLaDA2MoeModel, exist_ok=True)
AutoModelForMaskedLM.register(LLaDA2MoeConfig, LLaDA2MoeModelLM, exist_ok=True)

__all__ = [
    "MERGED_MODEL_TYPE",
    "MODEL_TYPE",
    "PRESETS",
    "CheckpointLayout",
    "LLaDA2MoeConfig",
    "LLaDA2MoeModel",
    "LLaDA2MoeModelLM",
    "LLaDA2MoePreTrainedModel",
    "RowReader",
    "SafetensorsCheckpoint",
    "convert_llada2_checkpoint",
    "detect_folder_layout",
    "detect_layout",
    "llada2_config",
    "load_llada2_model",
    "load_llada2_state_dict",
    "merge_experts",
    "read_llada2_config",
    "save_llada2_checkpoint",
    "split_experts",
]
