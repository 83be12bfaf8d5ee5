"""The eval actor: scores the latest weights in the live world, on held-out expert trajectories, on off-expert
branches of them and on the transitions of its own episodes.

The trainer never waits on it: it sends ``evaluate`` with the weights of some step and collects the metric dict
whenever it is ready. Weights arrive in one of two ways (``eval.weights``; loaded by ``roles.weights``, as DAgger's
rollout actors load theirs):

- ``object_store``: an fp32 state dict that rank 0 put into the object store, as ``[ref]`` (nested in a list so Ray
  does not resolve it before the actor runs); loaded into a skeleton built once by ``models.factory.build_model``;
- ``checkpoint``: a checkpoint Ray Train persisted (a ``ray.train.Checkpoint``, or a local folder path), whose
  Hugging Face weights the actor loads itself with ``load_llada2_model`` (meta build, tensors assigned: one copy of
  the model in memory, none in the trainer's or in the object store).

The policy, the episodes and the NLL protocol are ``anyorder_ray.evaluation``; this module only holds the process.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray
import ray.train
import torch

from anyorder_ray.config import EvalConfig, ModelConfig
from anyorder_ray.data.encoding import UnitEncoder
from anyorder_ray.data.seeds import eval_episode_seeds, heldout_trajectory_seeds
from anyorder_ray.evaluation.episodes import EpisodeStats, run_episodes
from anyorder_ray.evaluation.nll import heldout_nll, transition_nll
from anyorder_ray.evaluation.scoring import ActionScorer
from anyorder_ray.evaluation.stats import eval_metrics
from anyorder_ray.evaluation.transitions import offexpert_branches, onpolicy_transitions
from anyorder_ray.models.factory import build_model, build_model_config, build_tokenizer
from anyorder_ray.roles.weights import Weights, load_policy_weights
from envs import EnvConfig, collect_expert_trajectories, evaluation_env, make_world

__all__ = ["EvalWorker", "make_eval_actor"]


class EvalWorker:
    """Actor class: wrap with ``make_eval_actor`` (or ``ray.remote(EvalWorker).options(...)``).

    On construction it collects the fixed held-out expert trajectories (successful ones only), branches them into the
    fixed off-expert transition set (``evaluation.transitions.offexpert_branches``: the same for every arm) and, for
    ``eval.weights: object_store``, builds the model skeleton; ``evaluate`` loads weights and returns the
    ``eval/...`` metrics: success, world-model NLL and exact match on the expert trajectories (``world_model_*``), on
    the off-expert branches (``offexpert_*``) and on the transitions of its own episodes (``onpolicy_*``: each arm's
    own states, unlike the two fixed sets), and the expert action NLL.

    Args:
        env: the world the trial trains in (the tokenizer is built from it, as the trainer's is); the actor plays
            ``evaluation_env(env)`` (held-out games where the world generates a pool of them) unless ``play`` is given.
        eval_cfg: seeds, episode counts, lockstep width, held-out set size, where weights come from.
        model: the trial's model section (the tokenizer and the skeleton are built from it, as the trainer does).
        history_steps: past steps in the policy's query (``ExperimentConfig.history_steps()``).
        max_length: token budget per query (``data.max_seq_len``).
        layout: the layout the arm trained with (``masking.layout``); its queries are encoded the same way.
        torch_threads: intra-op threads of this actor (match its CPU reservation).
        nll_batch_size: sequences per forward of the held-out NLL.
        play: the world to play and to draw the held-out trajectories from instead of ``evaluation_env(env)``
            (another split or level, for out-of-distribution checks: ``python -m anyorder_ray.evaluate``).
    """

    def __init__(
        self,
        env: EnvConfig,
        eval_cfg: EvalConfig,
        model: ModelConfig,
        history_steps: int,
        max_length: int,
        torch_threads: int = 1,
        nll_batch_size: int = 64,
        layout: str = "sequence",
        play: EnvConfig | None = None,
    ) -> None:
        torch.set_num_threads(max(1, int(torch_threads)))
        self._env = evaluation_env(env) if play is None else play
        self._cfg = eval_cfg
        self._history_steps = int(history_steps)
        self._max_length = int(max_length)
        self._nll_batch_size = int(nll_batch_size)
        self._layout = layout
        self._device = torch.device("cuda" if eval_cfg.num_gpus_per_actor > 0 else "cpu")
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"eval.num_gpus_per_actor={eval_cfg.num_gpus_per_actor:g} but this eval actor sees no CUDA device "
                "(Ray sets CUDA_VISIBLE_DEVICES from the actor's GPU share); set it to 0 to evaluate on CPU"
            )
        tokenizer = build_tokenizer(model, env)  # the trainer's: a token id means the same word in both
        self._encoder = UnitEncoder(tokenizer)
        world = make_world(self._env, expert=True)
        # One scorer for every world: a fixed action set (BabyAI) or, when it is empty, each state's valid_actions().
        self._scorer = ActionScorer(self._encoder, world.action_names, self._history_steps, self._max_length, layout)
        seeds = heldout_trajectory_seeds(eval_cfg, eval_cfg.heldout_trajectories)
        self._heldout, self._heldout_stats = collect_expert_trajectories(world, seeds)
        if not self._heldout:
            raise RuntimeError(f"the expert solved none of the {len(seeds)} held-out episodes of {world.level}")
        self._offexpert = offexpert_branches(
            make_world(self._env, expert=False), self._heldout, eval_cfg.offexpert_branches_per_state,
            eval_cfg.offexpert_transitions, np.random.default_rng(eval_cfg.seed_start), self._history_steps,
        )  # fmt: skip
        self._model_config = build_model_config(model, tokenizer)
        self._model: torch.nn.Module | None = None
        if eval_cfg.weights == "object_store":
            self._model = build_model(model, tokenizer, load_weights=False).float().eval().to(self._device)
        self._last_step: int | None = None
        self._last_episodes: EpisodeStats | None = None

    def heldout_size(self) -> int:
        """Number of held-out trajectories (expert successes among ``eval.heldout_trajectories`` seeds)."""
        return len(self._heldout)

    def offexpert_size(self) -> int:
        """Number of off-expert branch transitions (at most ``eval.offexpert_transitions``)."""
        return len(self._offexpert)

    def last_episodes(self) -> EpisodeStats | None:
        """Every episode of the last ``evaluate`` (seed, success, length, actions, observations), in seed order."""
        return self._last_episodes

    def last_step(self) -> int | None:
        """The training step of the weights last evaluated (None before the first ``evaluate``)."""
        return self._last_step

    def _load(self, weights: Weights) -> None:
        self._model = load_policy_weights(self._model, weights, self._model_config, self._device,
                                          state_dicts=self._cfg.weights == "object_store")  # fmt: skip

    def evaluate(self, weights: Weights, step: int, num_episodes: int | None = None) -> dict[str, float]:
        """Load ``weights`` (from training step ``step``) and return the ``eval/...`` metrics.

        Episodes use ``eval_episode_seeds(eval_cfg, num_episodes)`` (the same seeds at every call;
        ``num_episodes`` defaults to ``eval.episodes``), ``eval.batch_envs`` worlds in lockstep. Their transitions
        (at most ``eval.onpolicy_transitions``, a draw seeded by ``eval.seed_start``) are the on-policy set.
        """
        start = time.perf_counter()
        n = self._cfg.episodes if num_episodes is None else int(num_episodes)
        if n < 1:
            raise ValueError(f"num_episodes must be >= 1, got {n}")
        self._load(weights)
        episodes = run_episodes(
            self._model,
            self._scorer,
            lambda: make_world(self._env, expert=False),
            eval_episode_seeds(self._cfg, n),
            batch_envs=self._cfg.batch_envs,
            temperature=self._cfg.temperature,
        )
        query = (self._history_steps, self._max_length, self._nll_batch_size, self._layout)
        nll = heldout_nll(self._model, self._encoder, self._heldout, *query)
        offexpert = heldout_nll(self._model, self._encoder, self._offexpert, *query, last_only=True)
        mine = onpolicy_transitions(episodes.results, self._history_steps, self._cfg.onpolicy_transitions,
                                    np.random.default_rng(self._cfg.seed_start))  # fmt: skip
        onpolicy = transition_nll(self._model, self._encoder, mine, *query)
        self._last_step = int(step)
        self._last_episodes = episodes
        return eval_metrics(episodes, nll, step, time.perf_counter() - start, offexpert if self._offexpert else None,
                            onpolicy if mine else None)  # fmt: skip


def make_eval_actor(
    env: EnvConfig,
    eval_cfg: EvalConfig,
    model: ModelConfig,
    history_steps: int,
    max_length: int,
    torch_threads: int | None = None,
    layout: str = "sequence",
    **options: Any,
) -> ray.actor.ActorHandle:
    """Start one ``EvalWorker`` with resources and fault tolerance from ``eval_cfg``.

    ``torch_threads`` defaults to the actor's whole-CPU reservation (at least 1). ``max_task_retries=-1``
    re-runs an interrupted ``evaluate`` on the restarted actor (it is idempotent: same seeds, same weights).
    ``options`` go to ``.options()`` as well (e.g. a ``scheduling_strategy``). Every constructor argument is a small
    config value passed by value, so a restarted actor is always rebuilt from them.
    """
    threads = torch_threads if torch_threads is not None else max(1, int(eval_cfg.num_cpus_per_actor))
    cls = ray.remote(EvalWorker).options(
        num_cpus=eval_cfg.num_cpus_per_actor,
        num_gpus=eval_cfg.num_gpus_per_actor,
        max_restarts=eval_cfg.max_restarts,
        max_task_retries=-1,
        **options,
    )
    return cls.remote(env, eval_cfg, model, history_steps, max_length, threads, layout=layout)
