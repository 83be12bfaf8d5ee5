"""Eval actors: score the latest weights in the live environment and on held-out bot trajectories.

The trainer never waits on them: it sends ``evaluate`` with the weights of some step and collects the metric
dict whenever it is ready. Weights come as a state dict in the object store (``[ref]``, nested in a list so
Ray does not resolve it before the actor runs) or as a checkpoint folder path (for models too large to ship
every time). The policy, the episodes and the NLL protocol are ``anyorder_ray.policy``; this module only
holds the process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import ray
import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedTokenizerBase

from anyorder_ray.config import EnvConfig, EvalConfig
from anyorder_ray.policy import ActionScorer, eval_metrics, heldout_nll, run_episodes
from anyorder_ray.seeds import eval_episode_seeds, heldout_trajectory_seeds
from anyorder_ray.transform import UnitEncoder

__all__ = ["EvalWorker", "build_model", "make_eval_actor"]

Weights = Any  # a state dict, [ObjectRef of a state dict], an ObjectRef, or a checkpoint folder path


def build_model(model_config: Mapping[str, Any] | PreTrainedConfig) -> nn.Module:
    """An fp32 model skeleton in eval mode from a LLaDA2 config (object or ``to_dict()``) or any masked-LM
    HF config."""
    # The package import also registers llada2_moe with the Auto classes in this (worker) process.
    from anyorder_ray.models.llada2_moe import MODEL_TYPE, LLaDA2MoeConfig, LLaDA2MoeModelLM

    if isinstance(model_config, Mapping):
        model_type = model_config.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"a config dict must describe a {MODEL_TYPE!r} model, got model_type={model_type!r}")
        model_config = LLaDA2MoeConfig.from_dict(dict(model_config))
    if isinstance(model_config, LLaDA2MoeConfig):
        model = LLaDA2MoeModelLM(model_config)
    elif isinstance(model_config, PreTrainedConfig):
        from transformers import AutoModelForMaskedLM

        model = AutoModelForMaskedLM.from_config(model_config)
    else:
        raise TypeError(f"model_config must be a dict or a PreTrainedConfig, got {type(model_config).__name__}")
    return model.float().eval()


def _load_tokenizer(tokenizer: str | os.PathLike | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(tokenizer))


class EvalWorker:
    """Actor class: wrap with ``make_eval_actor`` (or ``ray.remote(EvalWorker).options(...)``).

    On construction it collects the fixed held-out bot trajectories (successful ones only) and builds the
    model skeleton; ``evaluate`` loads weights into it and returns the ``eval/...`` metrics.

    Args:
        env: the world to evaluate in.
        eval_cfg: seeds, episode counts, lockstep width, held-out set size.
        model_config: the model's HF config, or its ``to_dict()``.
        tokenizer: a tokenizer object or a folder saved with ``save_pretrained``.
        history_steps: past steps in the policy's query (``ExperimentConfig.history_steps()``).
        max_length: token budget per query (``data.max_seq_len``).
        torch_threads: intra-op threads of this actor (match its CPU reservation).
        nll_batch_size: sequences per forward of the held-out NLL.
    """

    def __init__(
        self,
        env: EnvConfig,
        eval_cfg: EvalConfig,
        model_config: Mapping[str, Any] | PreTrainedConfig,
        tokenizer: str | os.PathLike | PreTrainedTokenizerBase,
        history_steps: int,
        max_length: int,
        torch_threads: int = 1,
        nll_batch_size: int = 64,
    ) -> None:
        from envs.babyai import ACTION_NAMES, collect_bot_trajectories_with_stats, normalize_level

        torch.set_num_threads(max(1, int(torch_threads)))
        self._env = env
        self._cfg = eval_cfg
        self._level = normalize_level(env.level)
        self._history_steps = int(history_steps)
        self._max_length = int(max_length)
        self._nll_batch_size = int(nll_batch_size)
        self._encoder = UnitEncoder(_load_tokenizer(tokenizer))
        self._scorer = ActionScorer(self._encoder, ACTION_NAMES, self._history_steps, self._max_length)
        seeds = heldout_trajectory_seeds(eval_cfg, eval_cfg.heldout_trajectories)
        self._heldout, self._heldout_stats = collect_bot_trajectories_with_stats(
            self._level, seeds, env.max_episode_steps, encoding=env.obs_encoding
        )
        if not self._heldout:
            raise RuntimeError(f"the bot solved none of the {len(seeds)} held-out episodes of {self._level}")
        self._model = build_model(model_config)
        if eval_cfg.num_gpus_per_actor > 0:
            if not torch.cuda.is_available():
                raise RuntimeError(
                    f"eval.num_gpus_per_actor={eval_cfg.num_gpus_per_actor:g} but this eval actor sees no CUDA device "
                    "(Ray sets CUDA_VISIBLE_DEVICES from the actor's GPU share); set it to 0 to evaluate on CPU"
                )
            self._model.to("cuda")
        self._last_step: int | None = None

    def heldout_size(self) -> int:
        """Number of held-out trajectories (bot successes among ``eval.heldout_trajectories`` seeds)."""
        return len(self._heldout)

    def last_step(self) -> int | None:
        """The training step of the weights last evaluated (None before the first ``evaluate``)."""
        return self._last_step

    def _load(self, weights: Weights) -> None:
        if isinstance(weights, list | tuple):
            if len(weights) != 1:
                raise ValueError(f"weights as a list must hold exactly one ObjectRef, got {len(weights)} items")
            weights = weights[0]
        if isinstance(weights, ray.ObjectRef):
            weights = ray.get(weights)
        if isinstance(weights, str | os.PathLike):
            # A checkpoint folder (HF format); from_pretrained also converts other layouts it knows.
            loaded = type(self._model).from_pretrained(os.fspath(weights), dtype=torch.float32)
            weights = loaded.state_dict()
        if not isinstance(weights, Mapping):
            raise TypeError(
                f"weights must be a state dict, [ObjectRef], or a checkpoint path, got {type(weights).__name__}"
            )
        # strict: a missing or unexpected key means trainer and evaluator disagree on the model.
        self._model.load_state_dict(weights, strict=True)  # copies (and casts to fp32) into the skeleton
        self._model.eval()

    def evaluate(self, weights: Weights, step: int, num_episodes: int | None = None) -> dict[str, float]:
        """Load ``weights`` (from training step ``step``) and return the ``eval/...`` metrics.

        Episodes use ``eval_episode_seeds(eval_cfg, num_episodes)`` (the same seeds at every call;
        ``num_episodes`` defaults to ``eval.episodes``), ``eval.batch_envs`` environments in lockstep.
        """
        start = time.perf_counter()
        n = self._cfg.episodes if num_episodes is None else int(num_episodes)
        if n < 1:
            raise ValueError(f"num_episodes must be >= 1, got {n}")
        self._load(weights)
        episodes = run_episodes(
            self._model,
            self._scorer,
            self._level,
            eval_episode_seeds(self._cfg, n),
            batch_envs=self._cfg.batch_envs,
            max_steps=self._env.max_episode_steps,
            encoding=self._env.obs_encoding,
        )
        nll = heldout_nll(
            self._model, self._encoder, self._heldout, self._history_steps, self._max_length, self._nll_batch_size
        )
        self._last_step = int(step)
        return eval_metrics(episodes, nll, step, time.perf_counter() - start)


def make_eval_actor(
    env: EnvConfig,
    eval_cfg: EvalConfig,
    model_config: Mapping[str, Any] | PreTrainedConfig,
    tokenizer: str | os.PathLike | PreTrainedTokenizerBase,
    history_steps: int,
    max_length: int,
    torch_threads: int | None = None,
    **options: Any,
) -> ray.actor.ActorHandle:
    """Start one ``EvalWorker`` with resources and fault tolerance from ``eval_cfg``.

    ``torch_threads`` defaults to the actor's whole-CPU reservation (at least 1). ``max_task_retries=-1``
    re-runs an interrupted ``evaluate`` on the restarted actor (it is idempotent: same seeds, same weights).
    ``options`` go to ``.options()`` as well (e.g. a ``scheduling_strategy``).
    """
    threads = torch_threads if torch_threads is not None else max(1, int(eval_cfg.num_cpus_per_actor))
    cls = ray.remote(EvalWorker).options(
        num_cpus=eval_cfg.num_cpus_per_actor,
        num_gpus=eval_cfg.num_gpus_per_actor,
        max_restarts=eval_cfg.max_restarts,
        max_task_retries=-1,
        **options,
    )
    return cls.remote(env, eval_cfg, model_config, tokenizer, history_steps, max_length, threads)
