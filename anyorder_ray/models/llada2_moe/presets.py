"""Named sizes of LLaDA 2.0 MoE: ``tiny`` (CPU default, same code paths) and the released ``mini`` / ``flash``."""

from __future__ import annotations

import dataclasses
from typing import Any

from anyorder_ray.models.llada2_moe.configuration_llada2_moe import LLaDA2MoeConfig

# LLaDA2.0-mini as released (config.json on the Hub and in dFactory's configs/model_configs/llada2_mini).
_MINI: dict[str, Any] = {
    "vocab_size": 157184,
    "hidden_size": 2048,
    "intermediate_size": 5120,
    "num_hidden_layers": 20,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "moe_intermediate_size": 512,
    "num_experts": 256,
    "num_experts_per_tok": 8,
    "num_shared_experts": 1,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 1,
    "rope_theta": 600000.0,
    "partial_rotary_factor": 0.5,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
    "pad_token_id": 156892,
    "eos_token_id": 156892,
    "mask_token_id": 156895,
}

# LLaDA2.0-flash differs from mini only in width, depth and heads.
_FLASH: dict[str, Any] = {
    **_MINI,
    "hidden_size": 4096,
    "intermediate_size": 9216,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "moe_intermediate_size": 1024,
}

# CPU default: every code path of the released model (dense first layer, grouped routing with expert bias, a
# shared expert, GQA, partial RoPE) at ~2.3M parameters (vocab 400). Sized with bench/model_throughput.py on the
# 2-core CPU (batch 32 x 128 tokens, fwd+bwd): width 192 keeps matmuls efficient enough for ~0.54 MFU at
# ~0.32 s/step; width 128 fell to ~0.45 MFU, widths 256+ gain nothing but cost 0.45-0.6 s/step.
_TINY: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 192,
    "intermediate_size": 576,
    "num_hidden_layers": 3,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "moe_intermediate_size": 144,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "num_shared_experts": 1,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 1,
    "rope_theta": 600000.0,
    "partial_rotary_factor": 0.5,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
}

PRESETS: dict[str, dict[str, Any]] = {"tiny": _TINY, "mini": _MINI, "flash": _FLASH}
_SPECIAL_TOKENS = ("pad_token_id", "eos_token_id", "mask_token_id")


def _config_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(LLaDA2MoeConfig)}


def llada2_config(preset: str, **overrides: Any) -> LLaDA2MoeConfig:
    """The configuration of ``preset`` ("tiny", "mini" or "flash") with ``overrides`` applied.

    For ``tiny`` the special tokens follow the vocabulary unless given: ``mask = V - 1`` and ``pad = eos = V - 2``
    (a project tokenizer normally passes its own ids together with its ``vocab_size``).

    Raises:
        ValueError: unknown preset, an override that is not a config field, or an invalid resulting config.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown LLaDA2 preset {preset!r}; allowed: {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - _config_fields())
    if unknown:
        raise ValueError(f"unknown LLaDA2MoeConfig field(s) {unknown} in overrides for preset {preset!r}")
    values = dict(PRESETS[preset])
    values.update(overrides)
    if preset == "tiny":
        vocab = values["vocab_size"]
        values.setdefault("mask_token_id", vocab - 1)
        values.setdefault("pad_token_id", vocab - 2)
        values.setdefault("eos_token_id", values["pad_token_id"])
    return LLaDA2MoeConfig(**values)


__all__ = ["PRESETS", "llada2_config"]
