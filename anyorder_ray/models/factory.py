"""The one place the tokenizer and the model are built: trainer, eval actor, benches and tests all call these.

With no ``model_path`` the tokenizer is the word-level tokenizer of the run's world (deterministic, built locally
from ``envs.world_vocabulary``) and the model is a freshly initialised preset sized to it. With ``model_path`` both
come from that folder (a released LLaDA2.0 checkpoint, or one this project wrote); ``tokenizer_path`` overrides the
tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from anyorder_ray.config import ModelConfig
from anyorder_ray.data.tokenization import build_world_tokenizer, require_mask_token_id
from envs import EnvConfig, world_vocabulary


def build_tokenizer(cfg: ModelConfig, env: EnvConfig) -> PreTrainedTokenizerBase:
    """The tokenizer named by ``cfg`` (the world tokenizer of ``env`` by default); it must have a mask token."""
    path = cfg.tokenizer_path or cfg.model_path
    if path is None:
        tokenizer = build_world_tokenizer(world_vocabulary(env))
    else:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"tokenizer folder {path} does not exist (model.tokenizer_path / model.model_path)")
        tokenizer = AutoTokenizer.from_pretrained(path)
    require_mask_token_id(tokenizer)
    return tokenizer


def build_model_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase):
    """The HF config of the model ``cfg`` names (no weights): from ``model_path`` or the preset + overrides."""
    from anyorder_ray.models.llada2_moe import LLaDA2MoeConfig, llada2_config

    if cfg.model_path is not None:
        config = LLaDA2MoeConfig.from_pretrained(cfg.model_path)
        if config.vocab_size < len(tokenizer):
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens but the model at {cfg.model_path} only "
                f"{config.vocab_size}; use the tokenizer that came with the checkpoint"
            )
        # The tokenizer's mask token is the one training writes (156895 for LLaDA2.0, whose config.json does not
        # name it); saved and exported configs then say the same.
        config.mask_token_id = require_mask_token_id(tokenizer)
    else:
        overrides = dict(cfg.overrides)
        overrides.setdefault("vocab_size", len(tokenizer))
        overrides.setdefault("mask_token_id", require_mask_token_id(tokenizer))
        if tokenizer.pad_token_id is not None:
            overrides.setdefault("pad_token_id", tokenizer.pad_token_id)
        if tokenizer.eos_token_id is not None:
            overrides.setdefault("eos_token_id", tokenizer.eos_token_id)
        config = llada2_config(cfg.preset, **overrides)
    config._attn_implementation = cfg.attn_implementation
    return config


def build_model(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int | None = None, *, load_weights: bool = True
) -> torch.nn.Module:
    """A LLaDA2 model: loaded from ``cfg.model_path`` or initialised from ``cfg.preset`` (+ overrides), in fp32.

    ``load_weights=False`` builds the initialised skeleton only, also for a ``model_path`` (an eval actor that
    receives its weights later does not read the checkpoint twice). ``seed`` seeds the initialisation.
    """
    from anyorder_ray.models.llada2_moe import LLaDA2MoeModelLM

    config = build_model_config(cfg, tokenizer)
    if cfg.model_path is not None and load_weights:
        return LLaDA2MoeModelLM.from_pretrained(cfg.model_path, config=config)
    if seed is not None:
        torch.manual_seed(seed)
    return LLaDA2MoeModelLM(config)
