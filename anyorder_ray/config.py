"""Typed, grouped, validated experiment configuration.

One frozen dataclass per concern; ``ExperimentConfig`` groups them. YAML files in ``tune_configs/``
load into it, and CLI overrides (``train.lr=1e-3``) apply on top. Every problem in a file is
reported at once, naming the file, the key and the allowed values.

Composition: a YAML file may name a ``base:`` file (relative to itself) and state only what differs. Mappings
merge key by key (the file's keys win), lists and scalars replace. Sweep arms are resolved once, when the config
loads: each entry of ``sweep.arms`` is a partial ``masking`` section merged onto the file's ``masking`` section,
so ``ExperimentConfig.arms()`` holds complete ``MaskingConfig`` values and every label, trial and table is made
from them. Without ``sweep.arms`` the sweep has one arm, the ``masking`` section itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from anyorder_ray.data.masking import BLOCK_MODES, BRANCH_MODES, IWM_SCHEDULES, MaskMode
from envs.registry import EnvConfig, env_problems

LOSS_NORMS = ("token", "unit")
REGIMES = ("fixed", "streaming", "dagger")
BRANCH_PROPOSERS = ("uniform", "policy")
EVICTIONS = ("fifo", "onpolicy_first")
LAYOUTS = ("sequence", "block")


_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


class ConfigError(ValueError):
    """Raised for an invalid config; the message lists every problem found."""


def _check(problems: list[str], ok: bool, msg: str) -> None:
    if not ok:
        problems.append(msg)


def _raise(name: str, problems: list[str]) -> None:
    if problems:
        raise ConfigError(f"invalid {name} config: " + "; ".join(problems))


def validate_env(env: EnvConfig, source: str = "config") -> None:
    """Check the keys only the world's adapter can judge (``env.level``, ``env.obs_encoding``).

    Not part of ``EnvConfig.__post_init__`` because it imports the world's packages (about a second for
    minigrid) and configs are rebuilt inside every trial; entry points call it once, before Ray starts, so a
    misspelt level fails at once instead of inside every rollout actor.
    """
    p = [f"{source}: {problem}" for problem in env_problems(env)]
    if p:
        raise ConfigError(f"{len(p)} problem(s) in config:\n  - " + "\n  - ".join(p))


@dataclass(frozen=True)
class DataConfig:
    """How trajectories become training sequences."""

    max_seq_len: int = 256
    """Maximum tokens per sequence; longer windows keep the mission and the most recent units."""
    window_steps: int = 3
    """Steps (obs, act) per randomly cropped training window; history seen by the policy is window_steps - 1."""
    regime: Literal["fixed", "streaming", "dagger"] = "fixed"
    """``fixed``: exactly ``num_demos`` unique successful demos; ``streaming``: actors keep producing expert demos;
    ``dagger``: exactly ``num_demos`` expert demos, then the actors act with the trainer's latest weights (the expert's
    action executed with probability beta, see ``rollout.beta_*``) and stream the visited states, labelled by the
    expert, into the buffer until training ends."""
    num_demos: int = 1000
    """Demo budget of the fixed and dagger regimes (expert demonstrations; dagger's on-policy data comes on top)."""
    buffer_capacity: int = 20000
    """Trajectories the buffer keeps; past it, trajectories are evicted following ``eviction``."""
    eviction: Literal["fifo", "onpolicy_first"] = "fifo"
    """Which trajectories go first past ``buffer_capacity``: ``fifo`` (default) the oldest; ``onpolicy_first`` the
    oldest on-policy ones, expert demos only once no on-policy trajectory is left (the demo set is kept)."""
    min_buffer_size: int = 64
    """Streaming regime: training starts once the buffer holds this many expert demos (their branches come on top).
    The fixed regime always waits for its whole demo set and its branches, so what a run trains on never depends on
    how fast the rollout actors were."""
    bucket_pool_batches: int = 32
    """Micro-batches encoded at once and grouped by length (more: less padding; 8 measured 5.6%, 32 1-2%)."""
    branches_per_state: int = 0
    """Early-experience branches (``envs.branches``): alternative actions (not the expert's, chosen by
    ``branch_proposer``) tried from each branched state of every expert demo, each stored as a branch trajectory ending
    with the observation it led to; 0: none. Collected only for arms that train on them (``masking.branches`` > 0);
    never counted in ``num_demos``."""
    branch_every: int = 1
    """Branch from every ``branch_every``-th state of a demo (1: every state with an expert action)."""
    branch_proposer: Literal["uniform", "policy"] = "uniform"
    """Who chooses a branch's alternative actions: ``uniform`` (drawn uniformly among the state's other valid actions,
    when the demo is collected); ``policy`` (dagger regime only, the one whose rollout actors hold weights: once the
    actor has the trial's weights it branches its demos again, each demo's states with alternatives drawn without
    replacement from the policy's scores, ``evaluation.proposer``, provenance recording the weights' version; the
    uniform branches made with the demos stay, training needs branches from its first step; ``roles.rollout``)."""
    branch_temperature: float = 1.0
    """``branch_proposer: policy``: the policy's scores are divided by this before the draw (1: its distribution;
    towards 0: its ranking; large: uniform)."""

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, self.max_seq_len >= 16, f"max_seq_len must be >= 16, got {self.max_seq_len}")
        _check(p, self.window_steps >= 1, f"window_steps must be >= 1, got {self.window_steps}")
        _check(p, self.regime in REGIMES, f"regime {self.regime!r} is unknown; allowed: {', '.join(REGIMES)}")
        _check(p, self.eviction in EVICTIONS, f"eviction {self.eviction!r} is unknown; allowed: {', '.join(EVICTIONS)}")
        _check(p, self.num_demos >= 1, f"num_demos must be >= 1, got {self.num_demos}")
        _check(p, self.buffer_capacity >= 1, "buffer_capacity must be >= 1")
        _check(p, 1 <= self.min_buffer_size <= self.buffer_capacity, "need 1 <= min_buffer_size <= buffer_capacity")
        _check(p, self.bucket_pool_batches >= 1, f"bucket_pool_batches must be >= 1, got {self.bucket_pool_batches}")
        _check(p, self.branches_per_state >= 0, f"branches_per_state must be >= 0 (0: no branches), got "
               f"{self.branches_per_state}")  # fmt: skip
        _check(p, self.branch_every >= 1, f"branch_every must be >= 1 (1: every state), got {self.branch_every}")
        _check(p, self.branch_proposer in BRANCH_PROPOSERS, f"branch_proposer {self.branch_proposer!r} is unknown; "
               f"allowed: {', '.join(BRANCH_PROPOSERS)}")  # fmt: skip
        _check(p, self.branch_temperature > 0, f"branch_temperature must be > 0, got {self.branch_temperature}")
        if self.branch_proposer == "policy":
            _check(p, self.regime == "dagger", f"branch_proposer policy needs weights in the rollout actors: only the "
                   f"dagger regime has them (regime is {self.regime!r}); use branch_proposer uniform")  # fmt: skip
            _check(p, self.branches_per_state > 0, "branch_proposer policy proposes branches, but branches_per_state "
                   "is 0 (no branches): set it >= 1")  # fmt: skip
        if self.regime in ("fixed", "dagger"):
            _check(
                p,
                self.num_demos <= self.buffer_capacity,
                f"{self.regime} regime: num_demos ({self.num_demos}) must fit in buffer_capacity "
                f"({self.buffer_capacity})",
            )
        if self.regime == "dagger" and self.eviction == "onpolicy_first":
            # With no room past the demos, every on-policy batch would be evicted the moment it arrives: imitation.
            _check(
                p,
                self.num_demos < self.buffer_capacity,
                f"dagger regime with eviction onpolicy_first: buffer_capacity ({self.buffer_capacity}) must exceed "
                f"num_demos ({self.num_demos}), or no on-policy trajectory is ever kept",
            )
        _raise("data", p)

    def start_size(self) -> int:
        """Expert demos needed before training starts: the whole demo set (fixed, dagger), ``min_buffer_size``
        (streaming). A demo batch's branches reach the buffer in the same acknowledged ``add``: they are there too."""
        return self.min_buffer_size if self.regime == "streaming" else self.num_demos

    def branch_history_steps(self) -> int:
        """Expert steps a branch keeps before its branch state: a training window minus one, so a whole branch fits a
        window (``crop_window`` never cuts it) and its alternative action sees the policy's own history."""
        return self.window_steps - 1


@dataclass(frozen=True)
class RolloutConfig:
    """Rollout actors: the expert bot, and in the dagger regime (``data.regime: dagger``) the policy it labels.

    Dagger: each actor looks for newer weights before every batch (a small call to the trial's weight board, never a
    wait); until the first weights exist it runs the expert only (and once the demo budget is full, idles until they
    do). A batch under weights of training step ``v`` executes the expert's action with probability
    ``beta(v, planned_steps)`` at each step and the policy's action otherwise (greedy, or sampled with
    ``temperature``); the expert labels every state.
    """

    num_actors: int = 1
    num_cpus_per_actor: float = 0.25
    episodes_per_batch: int = 32
    """Trajectories put into the object store per batch."""
    seed_start: int = 0
    """Training seeds are ``[seed_start, seed_start + 10**8)``, split evenly among actors."""
    max_restarts: int = 3
    """Restarts of each rollout actor, and of the trial's buffer actor (which replays its journal)."""
    beta_start: float = 0.5
    """Dagger: probability of executing the expert's action under the first weights (step 0 of the schedule)."""
    beta_end: float = 0.0
    """Dagger: the probability at the end of the anneal (and after it)."""
    beta_anneal_steps: int | None = None
    """Dagger: training steps over which beta goes linearly from ``beta_start`` to ``beta_end``; None: the trial's
    planned steps (the budget's step count, published with the weights)."""
    weights_every_steps: int = 25
    """Dagger: training steps between two weight versions the trainer publishes to the rollout actors."""
    weights_versions: int | None = None
    """Dagger: publish about this many weight versions over the trial's planned steps instead: every
    ``round(planned / weights_versions)`` steps, fixed from the plan made before the first step (a dagger trial plans
    its budget again at every publication; where that adds steps it adds versions), so arms whose steps cost different
    FLOPs at one compute budget get about as many versions, and with ``sync`` as much on-policy data. Needs a step plan
    (a compute budget or ``max_steps``, not ``time_budget_s``)."""
    batch_envs: int = 8
    """Dagger: worlds each actor plays in lockstep (one batched policy forward per step for all of them)."""
    idle_poll_s: float = 0.5
    """Dagger: seconds an actor sleeps between looks at the weight board while it has nothing to do (demo budget
    full, no weights yet)."""
    temperature: float = 0.0
    """Dagger: how the policy picks the actions it executes: 0 greedy (the argmax); > 0 sampled from
    ``softmax(score / temperature)`` over the candidates, from a generator per episode (seeded by the actor and the
    episode seed). Set it to ``eval.temperature`` to collect the states the evaluated policy visits."""
    max_rejected_versions: int = 3
    """Dagger: weight versions in a row the rollout actors may reject (a ``WeightsRejected`` config mismatch, a failed
    fetch) before the trial fails with the last rejection's reason; any version an actor loads resets the count."""
    sync: bool = False
    """Dagger: each weight version gets exactly ``sync_batches`` batches (of ``episodes_per_batch`` episodes) from
    every actor, and the trainer takes them in at the next publication, waiting for them there if the actors are
    slower (``train/sync_wait_s`` says how long). What a trial trains on then depends on the config and seed only, not
    on machine load, so its results reproduce on a busy machine. With ``false`` (the default) actors never block
    training: each plays as many batches as it can under the newest weights and training picks them up every 20
    steps, so what it sees depends on how fast the actors ran. Reproducible with one actor (the default); several
    actors' batches of one version enter the buffer in arrival order."""
    sync_batches: int = 1
    """Dagger with ``sync``: batches each actor plays under each weight version."""
    sync_timeout_s: float = 1800.0
    """Dagger with ``sync``: how long the trainer waits for a version's batches before the trial fails (naming the
    actors that did not deliver); a dead actor fails it at once."""

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, self.num_actors >= 1, "num_actors must be >= 1")
        for key in ("beta_start", "beta_end"):
            _check(p, 0.0 <= getattr(self, key) <= 1.0, f"{key} must be in [0, 1], got {getattr(self, key)}")
        _check(p, self.beta_anneal_steps is None or self.beta_anneal_steps >= 1, "beta_anneal_steps must be >= 1 "
               f"(or null: the trial's planned steps), got {self.beta_anneal_steps}")  # fmt: skip
        _check(p, self.weights_every_steps >= 1, f"weights_every_steps must be >= 1, got {self.weights_every_steps}")
        n = self.weights_versions
        _check(p, n is None or n >= 1, f"weights_versions must be >= 1 (or null: weights_every_steps), got {n}")
        _check(p, self.batch_envs >= 1, f"batch_envs must be >= 1, got {self.batch_envs}")
        _check(p, self.idle_poll_s > 0, f"idle_poll_s must be > 0, got {self.idle_poll_s}")
        _check(p, self.sync_timeout_s > 0, f"sync_timeout_s must be > 0, got {self.sync_timeout_s}")
        _check(p, self.sync_batches >= 1, f"sync_batches must be >= 1, got {self.sync_batches}")
        n = self.max_rejected_versions
        _check(p, n >= 1, f"max_rejected_versions must be >= 1, got {n}")
        _check(p, self.num_cpus_per_actor > 0, "num_cpus_per_actor must be > 0")
        _check(p, self.episodes_per_batch >= 1, "episodes_per_batch must be >= 1")
        _check(p, self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _check(p, 0 <= self.seed_start < 10**9 - 10**8, "seed_start must be in [0, 9e8) (eval seeds start at 1e9)")
        _raise("rollout", p)

    def beta(self, version: int, planned_steps: int | None = None) -> float:
        """Dagger's beta for weights of training step ``version``: 1 without weights (``version`` 0, the expert
        alone), then linear from ``beta_start`` (step 0) to ``beta_end`` at ``beta_anneal_steps`` (or
        ``planned_steps``, the trial's step count, when that is None) and flat after it."""
        if version < 0:
            raise ValueError(f"version must be >= 0, got {version}")
        if version == 0:
            return 1.0
        horizon = self.beta_anneal_steps or planned_steps
        if not horizon:
            raise ValueError("the beta schedule needs beta_anneal_steps or the trial's planned steps")
        frac = min(1.0, version / horizon)
        return self.beta_start + (self.beta_end - self.beta_start) * frac


@dataclass(frozen=True)
class ModelConfig:
    """Which model to train (dFactory key names where the concept is the same)."""

    preset: str = "tiny"
    """``tiny`` (CPU), ``mini`` or ``flash`` (released sizes); ignored when ``model_path`` is set."""
    model_path: str | None = None
    """Local folder with a LLaDA2.0 checkpoint (config.json + safetensors) to start from."""
    tokenizer_path: str | None = None
    """Local tokenizer folder; None builds the word-level world tokenizer (or uses model_path's)."""
    attn_implementation: str = "sdpa"
    """``sdpa`` (``torch.nn.functional.scaled_dot_product_attention``) or ``eager`` (the explicit softmax of the
    scores: the naive reference, slower, same results to float rounding)."""
    overrides: dict = field(default_factory=dict)
    """Config fields to override on the preset, e.g. ``{num_hidden_layers: 2}``."""
    compile: bool | Literal["regional"] = False
    """The trainer's model: ``false`` eager; ``true`` the whole model in ``torch.compile`` (its MoE dispatch breaks
    the graph and recompiles per expert load: 0.96x in ``bench/compile_speed.py``); ``regional`` each decoder layer's
    attention and norms and every dense SwiGLU compiled on their own, the MoE dispatch eager
    (``modeling_llada2_moe.compile_regions``: 1.067x on the default model, ~25 s of compile per trial)."""

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(
            p, self.preset in ("tiny", "mini", "flash"), f"preset must be one of tiny, mini, flash, got {self.preset!r}"
        )
        _check(p, self.attn_implementation in ("sdpa", "eager"), "attn_implementation must be 'sdpa' or 'eager'")
        _raise("model", p)


@dataclass(frozen=True)
class MaskingConfig:
    """The mask distribution and how its targets are weighted in the loss: the training arm of a trial."""

    mode: str = "any_order"
    """One of causal, prefix, any_order, obs_only, act_only, mixture, action_focus, cut_focus, iwm (see ``masking``)."""
    mask_prob: float = 0.5
    """Target probability per unit (any_order, obs_only, act_only, action_focus, cut_focus)."""
    mixture_range: tuple[float, float] = (0.05, 1.0)
    """Range mask_prob is drawn from per example in ``mixture`` mode."""
    causal_prob: float = 0.0
    """Probability that an example uses the causal mask instead of ``mode``'s (a causal/any-order mixture)."""
    loss_norm: str = "token"
    """``token``: mean over target tokens (dFactory's); ``unit``: each target unit's mean token loss, averaged
    over target units, so a 50-token observation weighs as much as a 1-token action."""
    obs_weight: float = 1.0
    """Weight of observation targets (per token or per unit, following ``loss_norm``)."""
    act_weight: float = 1.0
    """Weight of action targets."""
    layout: str = "sequence"
    """``sequence``: one sampled mask per example, bidirectional attention (every mode). ``block``: every query of the
    mode in a window in one sequence, block-causal over a clean copy and one masked block per query
    (``data.encoding.encode_blocks``; modes causal, prefix, cut_focus, iwm; ``mask_prob`` unused); evaluation then
    encodes its queries in the same layout."""
    branches: float = 0.0
    """Share of training draws taken from the early-experience branches (``data.branches_per_state``), the rest from
    the demos (and on-policy data); 0: the arm never sees a branch and none are collected for it. A branch's
    alternative action is never a target (it is no label), only context; see ``data.masking``."""
    onpolicy_mode: str | None = None
    """The mode of the trajectories the policy acted in (the dagger regime's on-policy segments, relabelled by the
    expert); None: the arm's ``mode``. ``causal`` trains them on DAgger's own objective, the policy query with the
    expert's labels, while the demos and branches keep the arm's mode (any-order world-model queries on the expert's
    states only). In the block layout it must be a block mode."""
    iwm_schedule: str = "two_stage"
    """Mode ``iwm`` (implicit world modelling, Zhang et al. 2025): ``two_stage``: next-observation prediction for the
    first ``iwm_world_model_fraction`` of the planned steps (a branch: its last observation; a demo: the observation
    after a random step), then imitation (the causal objective on demos only); ``mixture``: every draw, a branch gets
    the next-observation target and a demo the causal one (``branches`` sets the mix)."""
    iwm_world_model_fraction: float = 0.5
    """Mode ``iwm``, ``two_stage``: share of the planned steps spent on the world-model stage (the switch is the step
    ``round(fraction x planned steps)``, fixed before step 0 and kept by checkpoints; under a time budget, of the plan
    as it stands, which is fixed early in the run)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "mixture_range", tuple(self.mixture_range))
        p: list[str] = []
        _check(p, self.mode in tuple(MaskMode), f"mode {self.mode!r} is unknown; allowed: "
               f"{', '.join(m.value for m in MaskMode)}")  # fmt: skip
        _check(p, 0.0 < self.mask_prob <= 1.0, f"mask_prob must be in (0, 1], got {self.mask_prob}")
        lo, hi = self.mixture_range
        _check(p, 0.0 < lo <= hi <= 1.0, f"mixture_range must satisfy 0 < low <= high <= 1, got {self.mixture_range}")
        _check(p, 0.0 <= self.causal_prob <= 1.0, f"causal_prob must be in [0, 1], got {self.causal_prob}")
        _check(p, self.loss_norm in LOSS_NORMS, f"loss_norm {self.loss_norm!r} is unknown; allowed: "
               f"{', '.join(LOSS_NORMS)}")  # fmt: skip
        _check(p, self.obs_weight >= 0 and self.act_weight >= 0, "obs_weight and act_weight must be >= 0")
        _check(p, self.obs_weight + self.act_weight > 0, "obs_weight and act_weight cannot both be 0")
        _check(p, self.layout in LAYOUTS, f"layout {self.layout!r} is unknown; allowed: {', '.join(LAYOUTS)}")
        if self.layout == "block":
            _check(p, self.mode in BLOCK_MODES, f"layout block serves the modes {', '.join(BLOCK_MODES)}, "
                   f"not {self.mode!r}")  # fmt: skip
            _check(p, self.causal_prob == 0, "causal_prob mixes in sequence-layout examples: use it with layout "
                   "sequence")  # fmt: skip
        if self.onpolicy_mode is not None:
            _check(p, self.onpolicy_mode in tuple(MaskMode), f"onpolicy_mode {self.onpolicy_mode!r} is unknown; "
                   f"allowed: {', '.join(m.value for m in MaskMode)}")  # fmt: skip
            _check(p, self.layout != "block" or self.onpolicy_mode in BLOCK_MODES, f"layout block serves the modes "
                   f"{', '.join(BLOCK_MODES)}, not onpolicy_mode {self.onpolicy_mode!r}")  # fmt: skip
            _check(p, self.onpolicy_mode != MaskMode.IWM, "onpolicy_mode iwm: on-policy segments have no branch (its "
                   "world-model target); use causal or a world-model mode")  # fmt: skip
        _check(p, 0.0 <= self.branches <= 1.0, f"branches (a share of draws) must be in [0, 1], got {self.branches}")
        if self.branches > 0:
            _check(p, self.mode in BRANCH_MODES, f"mode {self.mode!r} trains only actions, and a branch's only "
                   f"labelled actions are its demo's: branches > 0 needs one of {', '.join(BRANCH_MODES)}")  # fmt: skip
        _check(p, self.iwm_schedule in IWM_SCHEDULES, f"iwm_schedule {self.iwm_schedule!r} is unknown; allowed: "
               f"{', '.join(IWM_SCHEDULES)}")  # fmt: skip
        _check(p, 0.0 < self.iwm_world_model_fraction < 1.0, "iwm_world_model_fraction must be in (0, 1), got "
               f"{self.iwm_world_model_fraction}")  # fmt: skip
        if self.mode == MaskMode.IWM and self.iwm_schedule == "mixture":
            _check(p, self.branches > 0, "iwm_schedule mixture mixes branches with demos: set branches > 0 (without "
                   "branches it is the causal arm)")  # fmt: skip
        _raise("masking", p)

    def uses_mask_prob(self) -> bool:
        """Whether ``mask_prob`` shapes this arm's masks."""
        return self.layout == "sequence" and MaskMode(self.mode).uses_mask_prob

    def label(self) -> str:
        """Short arm name for tables, from every field that differs from its default (so two different arms never
        share one): ``causal``, ``any_order@0.3``, ``action_focus@0.3+unit+act4``, ``mixture[0.1-0.5]``,
        ``iwm+br0.5``."""
        name = f"{self.mode}@{self.mask_prob:g}" if self.uses_mask_prob() else self.mode
        if self.mode == MaskMode.MIXTURE and self.mixture_range != MaskingConfig.mixture_range:
            name += f"[{self.mixture_range[0]:g}-{self.mixture_range[1]:g}]"
        if self.mode == MaskMode.IWM and self.iwm_schedule != MaskingConfig.iwm_schedule:
            name += f"[{self.iwm_schedule}]"
        elif self.mode == MaskMode.IWM and self.iwm_world_model_fraction != MaskingConfig.iwm_world_model_fraction:
            name += f"[wm{self.iwm_world_model_fraction:g}]"
        if self.layout != "sequence":
            name += f"+{self.layout}"
        if self.causal_prob:
            name += f"+q{self.causal_prob:g}"
        if self.loss_norm != "token":
            name += f"+{self.loss_norm}"
        if self.obs_weight != 1.0:
            name += f"+obs{self.obs_weight:g}"
        if self.act_weight != 1.0:
            name += f"+act{self.act_weight:g}"
        if self.branches:
            name += f"+br{self.branches:g}"
        if self.onpolicy_override() is not None:
            name += f"+onpolicy_{self.onpolicy_mode}"
        return name

    def onpolicy_override(self) -> str | None:
        """The mode on-policy segments train on when it is not the arm's ``mode`` (None: they train as the demos)."""
        return self.onpolicy_mode if self.onpolicy_mode != self.mode else None

    def iwm_stage(self, step: int, planned_steps: int) -> str | None:
        """What mode ``iwm`` trains at training step ``step`` of ``planned_steps``: ``world_model`` (two_stage, before
        the switch), ``imitation`` (after it) or ``mixture``; None for every other mode."""
        if self.mode != MaskMode.IWM:
            return None
        if self.iwm_schedule == "mixture":
            return "mixture"
        return "world_model" if step < self.iwm_switch_step(planned_steps) else "imitation"

    def iwm_switch_step(self, planned_steps: int) -> int:
        """Two-stage ``iwm``: the first imitation step (the world-model stage is steps ``[0, switch)``)."""
        return round(self.iwm_world_model_fraction * planned_steps)

    def weights_are_uniform(self) -> bool:
        """True when the loss is the plain target-token mean (no per-token weights needed)."""
        return self.loss_norm == "token" and self.obs_weight == self.act_weight


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and the TorchTrainer (dFactory key names where the concept is the same)."""

    lr: float = 2e-3
    lr_warmup_ratio: float = 0.05
    lr_decay_style: Literal["cosine", "constant", "linear"] = "cosine"
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    global_batch_size: int = 32
    micro_batch_size: int = 32
    max_steps: int = 600
    """The step count when no budget is set; with a budget, only a cap."""
    flop_budget: float | None = None
    """Train on this many model FLOPs (forward + backward, ``training.budget.sequence_flops``) instead: the step count,
    and with it the LR schedule's horizon, follows deterministically from the data, the masks and the seed (the mean
    cost of a step is measured on a seeded probe of the trial's own batches before the first step), so the same config
    trains the same steps on a quiet or a busy machine, and arms of one sweep get equal compute."""
    token_budget: int | None = None
    """Train on this many real (non-padding) tokens instead; planned like ``flop_budget``."""
    time_budget_s: float | None = None
    """Train for this many seconds of wall time instead (capped by ``max_steps``): the step count is fixed from the
    measured step rate early in the run (``training.budget.StepBudget``), so it depends on the machine and its load."""
    num_workers: int = 1
    """Ray Train workers (DDP over gloo on CPU, NCCL on GPU)."""
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    torch_threads: int = 2
    """Intra-op threads per worker on CPU."""
    enable_mixed_precision: bool = False
    """fsdp2 on GPU: bf16 parameters in compute, fp32 master weights and gradient reduction. Ignored on CPU and by
    ddp: on the 2-core development CPU (with AMX) a bf16 matmul is ~6x faster than fp32 at these shapes, but
    ``torch.autocast("cpu", torch.bfloat16)`` trains the default width-128 model at 0.59x fp32's tokens/s (the
    casts and elementwise work outweigh the matmuls; ``bench/step_variants.py``, docs/BENCHMARKS.md)."""
    enable_gradient_checkpointing: bool = False
    data_parallel_mode: Literal["ddp", "fsdp2"] = "ddp"
    """``ddp``: every worker holds the whole model; ``fsdp2``: parameters, gradients and optimizer state sharded over
    the workers (``anyorder_ray.training.sharding``), sharded checkpoints, a consolidated HF export in the final one."""
    report_every: int = 25
    """Steps between ``ray.train.report`` calls."""
    checkpoint_every: int = 200
    """Steps between HF-format checkpoints (0: only the final one)."""
    seed: int = 0
    output_dir: str = "runs"
    """Where sweeps write their results (absolute, or relative to the working directory)."""
    max_failures: int = 2
    """Worker-group restarts from the last checkpoint after a training worker dies (-1: no limit). A rollout that
    failed for good (``roles.train_loop.RolloutFailed``) fails the trial without a restart, which could not bring a
    dead rollout actor back."""

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(p, 0 <= self.lr_warmup_ratio < 1, "lr_warmup_ratio must be in [0, 1)")
        _check(p, self.lr_decay_style in ("cosine", "constant", "linear"), "lr_decay_style: cosine, constant, linear")
        _check(p, self.weight_decay >= 0, "weight_decay must be >= 0")
        _check(p, self.max_grad_norm > 0, "max_grad_norm must be > 0")
        _check(p, self.num_workers >= 1, "num_workers must be >= 1")
        _check(p, self.micro_batch_size >= 1, "micro_batch_size must be >= 1")
        per_step = self.micro_batch_size * self.num_workers
        _check(
            p,
            self.global_batch_size >= per_step and self.global_batch_size % per_step == 0,
            f"global_batch_size ({self.global_batch_size}) must be a multiple of micro_batch_size x num_workers "
            f"({self.micro_batch_size} x {self.num_workers})",
        )
        _check(p, self.max_steps >= 1, "max_steps must be >= 1")
        _check(p, self.time_budget_s is None or self.time_budget_s > 0, "time_budget_s must be > 0 (or null)")
        _check(p, self.flop_budget is None or self.flop_budget > 0, "flop_budget must be > 0 (or null)")
        _check(p, self.token_budget is None or self.token_budget > 0, "token_budget must be > 0 (or null)")
        budgets = [k for k in ("flop_budget", "token_budget", "time_budget_s") if getattr(self, k) is not None]
        _check(p, len(budgets) <= 1, f"set at most one of flop_budget, token_budget, time_budget_s (got {budgets})")
        _check(p, self.cpus_per_worker > 0, "cpus_per_worker must be > 0")
        _check(p, self.torch_threads >= 1, "torch_threads must be >= 1")
        _check(p, self.data_parallel_mode in ("ddp", "fsdp2"), "data_parallel_mode must be 'ddp' or 'fsdp2'")
        _check(p, self.report_every >= 1, "report_every must be >= 1")
        _check(p, self.checkpoint_every >= 0, "checkpoint_every must be >= 0")
        _check(p, self.max_failures >= -1, f"max_failures must be >= -1 (-1: no limit), got {self.max_failures}")
        _raise("train", p)

    def grad_accum_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.num_workers)

    def compute_budget(self) -> tuple[str, float] | None:
        """``("flops", amount)`` or ``("tokens", amount)`` when the run trains on a compute budget, else None."""
        if self.flop_budget is not None:
            return "flops", float(self.flop_budget)
        if self.token_budget is not None:
            return "tokens", float(self.token_budget)
        return None

    def budget_label(self) -> str:
        """The budget for tables: ``2e+14 FLOPs``, ``5e+06 tokens``, ``120 s`` or ``600 steps``."""
        if self.flop_budget is not None:
            return f"{self.flop_budget:.3g} FLOPs"
        if self.token_budget is not None:
            return f"{self.token_budget:.3g} tokens"
        if self.time_budget_s is not None:
            return f"{self.time_budget_s:g} s"
        return f"{self.max_steps} steps"

    def warmup_steps(self) -> int:
        return int(self.lr_warmup_ratio * self.max_steps)


@dataclass(frozen=True)
class EvalConfig:
    """Asynchronous evaluation in the live environment and on held-out trajectories."""

    enabled: bool = True
    """Run the trial's eval actor (live episodes and held-out NLL while training, and the final evaluation)."""
    weights: Literal["object_store", "checkpoint"] = "object_store"
    """How the eval actor gets the weights: ``object_store`` (rank 0 puts an fp32 state dict; fine for the presets)
    or ``checkpoint`` (each evaluation follows a checkpointed report and the actor loads that persisted checkpoint's
    Hugging Face weights itself: no full copy in rank 0's memory or the object store, for real-size models)."""
    num_cpus_per_actor: float = 0.5
    num_gpus_per_actor: float = 0.0
    """GPU share of each eval actor (e.g. 0.25: four share a GPU); > 0 runs its policy and NLL on CUDA."""
    concurrent: bool = True
    """Evaluate while training goes on (the actor needs CPUs or a GPU share of its own). ``false``: the trainer waits
    for each evaluation, and the actor borrows the trainer's threads meanwhile, so on a small machine evaluation
    does not slow training down (the wait is reported as ``train/eval_wait_s``, left out of ``train/tokens_per_s``)."""
    every_steps: int = 100
    """Training steps between pushing weights to the eval actor (it skips stale ones)."""
    episodes: int = 64
    """Episodes per evaluation while training."""
    final_episodes: int = 200
    """Episodes of the final evaluation of a trial."""
    heldout_trajectories: int = 64
    """Bot trajectories for world-model / action NLL."""
    offexpert_branches_per_state: int = 1
    """Off-expert world-model set: uniform alternative actions per state of the held-out trajectories
    (``envs.branches``; the same set for every arm, seeded by ``seed_start``)."""
    offexpert_transitions: int = 256
    """At most this many off-expert branch transitions (a seeded draw of states when there are more); 0: no such set."""
    onpolicy_transitions: int = 256
    """At most this many transitions of each evaluation's own episodes for the on-policy world-model set (a seeded
    draw over their steps); 0: no such set."""
    batch_envs: int = 64
    """Environments stepped in lockstep per batched forward."""
    seed_start: int = 1_000_000_000
    """Evaluation seeds start here: disjoint from every rollout seed."""
    history_steps: int | None = None
    """Past steps the policy sees; None derives it from data.window_steps - 1."""
    temperature: float = 0.0
    """How the evaluated policy picks its actions in live episodes: 0 is greedy (the argmax over the candidates);
    > 0 samples from the softmax of the candidates' scores divided by it (1: the policy's own distribution over the
    candidates), from a generator seeded by each episode's seed."""
    max_restarts: int = 3

    def actors(self) -> int:
        """Eval actors of one trial (0 or 1)."""
        return 1 if self.enabled else 0

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, self.weights in ("object_store", "checkpoint"), f"weights must be 'object_store' or 'checkpoint', "
               f"got {self.weights!r}")  # fmt: skip
        _check(p, self.num_cpus_per_actor > 0, "num_cpus_per_actor must be > 0")
        _check(p, self.num_gpus_per_actor >= 0, f"num_gpus_per_actor must be >= 0, got {self.num_gpus_per_actor}")
        _check(p, self.every_steps >= 1, "every_steps must be >= 1")
        _check(p, self.episodes >= 1 and self.final_episodes >= 1, "episodes and final_episodes must be >= 1")
        _check(p, self.heldout_trajectories >= 1, "heldout_trajectories must be >= 1")
        _check(p, self.offexpert_branches_per_state >= 1, "offexpert_branches_per_state must be >= 1")
        _check(p, self.offexpert_transitions >= 0 and self.onpolicy_transitions >= 0,
               "offexpert_transitions and onpolicy_transitions must be >= 0")  # fmt: skip
        _check(p, self.batch_envs >= 1, "batch_envs must be >= 1")
        _check(p, self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _check(p, self.seed_start >= 10**9, "seed_start must be >= 1e9 so eval seeds never meet rollout seeds")
        _raise("eval", p)


@dataclass(frozen=True)
class SweepConfig:
    """The Ray Tune search over training arms."""

    name: str = "anyorder"
    arms: tuple[MaskingConfig, ...] = ()
    """Masking arms. In YAML each is a partial ``masking`` section merged onto the file's ``masking`` section when
    the config loads (e.g. ``{mode: any_order, mask_prob: 0.3}``); here they are complete. Empty: one arm, the
    ``masking`` section."""
    seeds: tuple[int, ...] = (0,)
    """Training seeds; each arm runs once per seed."""
    search: Literal["grid", "random"] = "grid"
    """``grid`` runs every arm; ``random`` also samples mask_prob of p-modes from ``mask_prob_range``."""
    mask_prob_range: tuple[float, float] = (0.1, 0.6)
    num_samples: int = 1
    """Tune samples per grid point (random search)."""
    scheduler: Literal["none", "asha"] = "none"
    asha_grace_period: int = 4
    """Reports before ASHA may stop a trial."""
    max_concurrent_trials: int = 1
    storage_path: str | None = None
    """Tune storage (shared path on clusters); None uses ``train.output_dir``."""
    trial_cpus: float = 0.01
    """CPU share of each trial's driver function (the workers hold the real resources)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "arms", tuple(self.arms))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "mask_prob_range", tuple(self.mask_prob_range))
        p: list[str] = []
        bad = [i for i, arm in enumerate(self.arms) if not isinstance(arm, MaskingConfig)]
        _check(p, not bad, f"arms {bad} are not MaskingConfig values (YAML arms are resolved by config_from_dict)")
        labels = [arm.label() for arm in self.arms if isinstance(arm, MaskingConfig)]
        dupes = sorted({label for label in labels if labels.count(label) > 1})
        _check(p, not dupes, f"arms {dupes} appear more than once")
        _check(p, len(self.seeds) >= 1, "seeds must list at least one seed")
        _check(p, self.search in ("grid", "random"), f"search must be 'grid' or 'random', got {self.search!r}")
        lo, hi = self.mask_prob_range
        _check(p, 0 < lo <= hi <= 1, f"mask_prob_range must satisfy 0 < low <= high <= 1, got {self.mask_prob_range}")
        _check(p, self.num_samples >= 1, "num_samples must be >= 1")
        _check(p, self.scheduler in ("none", "asha"), f"scheduler must be 'none' or 'asha', got {self.scheduler!r}")
        _check(p, self.max_concurrent_trials >= 1, "max_concurrent_trials must be >= 1")
        _check(p, 0 < self.trial_cpus <= 1, "trial_cpus must be in (0, 1]")
        _raise("sweep", p)


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one sweep needs; components receive only their own section."""

    env: EnvConfig = field(default_factory=EnvConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self) -> None:
        p: list[str] = []
        if not self.data.branches_per_state:
            with_branches = [arm.label() for arm in self.arms() if arm.branches > 0]
            _check(p, not with_branches, f"arms {with_branches} train on branches (masking.branches > 0) but "
                   "data.branches_per_state is 0: set it >= 1 (alternatives per state)")  # fmt: skip
        _check(p, self.rollout.weights_versions is None or self.train.time_budget_s is None, "rollout.weights_versions "
               "spreads the versions over the planned steps, but train.time_budget_s plans none: use a compute "
               "budget (train.flop_budget or token_budget) or max_steps, or rollout.weights_every_steps")  # fmt: skip
        with_onpolicy = [arm.label() for arm in self.arms() if arm.onpolicy_mode is not None]
        _check(p, not with_onpolicy or self.data.regime == "dagger", f"arms {with_onpolicy} set masking.onpolicy_mode, "
               f"but only the dagger regime has on-policy data and data.regime is {self.data.regime!r}")  # fmt: skip
        _check(p, not self.rollout.sync or self.data.regime == "dagger", "rollout.sync paces the dagger regime's "
               f"on-policy batches, but data.regime is {self.data.regime!r}: set data.regime dagger or rollout.sync "
               "false")  # fmt: skip
        if self.data.branch_proposer == "policy":
            _check(p, any(arm.branches > 0 for arm in self.arms()), "data.branch_proposer policy, but no arm trains on "
                   "branches (masking.branches is 0 in every arm), so none are made: set masking.branches > 0 or use "
                   "branch_proposer uniform")  # fmt: skip
        _raise("experiment", p)

    def collects_branches(self) -> bool:
        """Whether the rollout actors make early-experience branches: the data asks for them and the arm trains on them
        (a trial's config; a sweep's ``masking`` section otherwise)."""
        return self.data.branches_per_state > 0 and self.masking.branches > 0

    def history_steps(self) -> int:
        """Past steps in the policy's query: as many as a training window holds before its last step."""
        return self.eval.history_steps if self.eval.history_steps is not None else self.data.window_steps - 1

    def arms(self) -> tuple[MaskingConfig, ...]:
        """The sweep's arms, resolved: ``sweep.arms``, or the ``masking`` section alone."""
        return self.sweep.arms or (self.masking,)

    def arm(self, label: str) -> MaskingConfig:
        """The arm whose ``label()`` is ``label``."""
        for arm in self.arms():
            if arm.label() == label:
                return arm
        raise KeyError(f"no arm labelled {label!r}; arms: {[a.label() for a in self.arms()]}")

    def trial(self, params: Mapping[str, Any]) -> ExperimentConfig:
        """The config of one Tune trial: ``params["arm"]`` (a label) as the ``masking`` section, with a sampled
        ``params["mask_prob"]`` (random search) applied where the arm's mode uses it, and ``params["seed"]``."""
        masking = self.arm(params["arm"]) if "arm" in params else self.masking
        if "mask_prob" in params and masking.uses_mask_prob():
            masking = dataclasses.replace(masking, mask_prob=float(params["mask_prob"]))
        train = dataclasses.replace(self.train, seed=int(params.get("seed", self.train.seed)))
        return dataclasses.replace(self, masking=masking, train=train, sweep=dataclasses.replace(self.sweep, arms=()))

    def replace(self, **sections: Any) -> ExperimentConfig:
        return dataclasses.replace(self, **sections)

    def to_dict(self) -> dict:
        """Plain YAML-ready data (lists for tuples) that ``config_from_dict`` loads back to an equal config."""
        return _plain(dataclasses.asdict(self))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


_SECTION_TYPES: dict[str, type] = {
    "env": EnvConfig,
    "data": DataConfig,
    "rollout": RolloutConfig,
    "model": ModelConfig,
    "masking": MaskingConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "sweep": SweepConfig,
}


def _did_you_mean(key: str, allowed: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_ok(value: Any, annotation: Any) -> bool:
    """Loose runtime check of YAML values against the dataclass annotations."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation is dict or origin is dict:
        return isinstance(value, Mapping)
    if origin is tuple or annotation is tuple:
        return isinstance(value, Sequence) and not isinstance(value, str)
    return True


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _section_kwargs(cls: type, name: str, value: Any, source: str, problems: list[str]) -> dict[str, Any] | None:
    """The keyword arguments of section ``name`` (a mapping of ``cls``'s fields), or None with its problems."""
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        problems.append(f"{source}: {name} must be a mapping, got {type(value).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in fields(cls)]
    kwargs, ok = {}, True
    for key, v in value.items():
        if key not in allowed:
            problems.append(
                f"{source}: unknown key {name}.{key}{_did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}"
            )
            ok = False
        elif not _type_ok(v, hints[key]):
            problems.append(f"{source}: {name}.{key} = {v!r} has the wrong type; expected {_type_name(hints[key])}")
            ok = False
        else:
            kwargs[key] = float(v) if hints[key] is float and isinstance(v, int) else v
    return kwargs if ok else None


def _build(cls: type, kwargs: dict[str, Any], source: str, problems: list[str], base: Any = None) -> Any:
    """``cls(**kwargs)`` (or ``base`` with ``kwargs`` replaced), its validation errors collected in ``problems``."""
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ValueError as e:  # ConfigError, or EnvConfig's own
        problems.append(f"{source}: {e}")
        return None


def _resolve_arms(raw_arms: Any, masking: MaskingConfig, source: str, problems: list[str]) -> tuple | None:
    """Each partial masking section of ``sweep.arms`` merged onto ``masking``: the arms as complete values."""
    if not isinstance(raw_arms, Sequence) or isinstance(raw_arms, str):
        problems.append(f"{source}: sweep.arms must be a list of partial masking sections, got {raw_arms!r}")
        return None
    arms = []
    for i, raw in enumerate(raw_arms):
        if isinstance(raw, MaskingConfig):
            arms.append(raw)
            continue
        kwargs = _section_kwargs(MaskingConfig, f"sweep.arms[{i}]", raw, source, problems)
        arm = _build(MaskingConfig, kwargs, f"{source}: sweep.arms[{i}] {raw}", problems, base=masking) if (
            kwargs is not None) else None  # fmt: skip
        arms.append(arm)
    return tuple(arms) if all(a is not None for a in arms) else None


def config_from_dict(raw: Mapping[str, Any], source: str = "<dict>") -> ExperimentConfig:
    """Build an ``ExperimentConfig`` from nested mappings, reporting every problem at once.

    ``sweep.arms`` entries are partial masking sections, resolved against the ``masking`` section here.
    """
    problems: list[str] = []
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: top level must be a mapping of sections {sorted(_SECTION_TYPES)}")
    for name in raw:
        if name not in _SECTION_TYPES:
            problems.append(
                f"{source}: unknown section {name!r}{_did_you_mean(name, _SECTION_TYPES)}; "
                f"allowed: {', '.join(_SECTION_TYPES)}"
            )
    sections: dict[str, Any] = {}
    for name, cls in _SECTION_TYPES.items():
        if name not in raw:
            continue
        value = raw[name]
        arms = None
        if name == "sweep" and isinstance(value, Mapping) and "arms" in value:
            value = {k: v for k, v in value.items() if k != "arms"}
            masking = sections.get("masking", MaskingConfig()) or MaskingConfig()
            arms = _resolve_arms(raw[name]["arms"], masking, source, problems)
            if arms is None:
                continue
        kwargs = _section_kwargs(cls, name, value, source, problems)
        if kwargs is None:
            continue
        if arms is not None:
            kwargs["arms"] = arms
        section = _build(cls, kwargs, source, problems)
        if section is not None:
            sections[name] = section
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in config:\n  - " + "\n  - ".join(problems))
    try:
        return ExperimentConfig(**sections)
    except ConfigError as e:  # a problem across sections
        raise ConfigError(f"1 problem(s) in config:\n  - {source}: {e}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.lr=1e-3`` -> (["train", "lr"], 0.001); values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=1e-3)")
    key, _, value = item.partition("=")
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise ConfigError(f"override key {key!r} must be section.key (e.g. masking.mask_prob)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
    # YAML reads 1e-3 as a string (it wants 1.0e-3); accept the common float spelling.
    if isinstance(parsed, str) and _FLOAT_RE.match(parsed):
        parsed = float(parsed)
    return path, parsed


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Apply ``section.key=value`` overrides to a raw (YAML-shaped) dict, returning a new dict."""
    out = {k: dict(v or {}) for k, v in raw.items()}
    for item in overrides:
        (section, key), value = parse_override(item)
        out.setdefault(section, {})[key] = value
    return out


BASE_KEY = "base"
"""Top-level YAML key naming the file this one extends (a path relative to this file)."""


def read_yaml(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config file, with its ``base:`` chain merged in, and errors that name the file."""
    path = Path(path)
    if path.resolve() in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path.resolve()))
        raise ConfigError(f"{path}: the base: chain loops back on itself ({cycle})")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    raw = _coerce_floats(raw)
    base = raw.pop(BASE_KEY, None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: {BASE_KEY} must be a file path (relative to {path.parent}), got {base!r}")
    return merge_config(read_yaml(path.parent / base, (*_chain, path.resolve())), raw)


def merge_config(base: Mapping[str, Any], delta: Mapping[str, Any]) -> dict:
    """``delta`` over ``base``: mappings merge key by key (``delta`` wins), lists and scalars replace."""
    out = dict(base)
    for key, value in delta.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = value
    return out


def _coerce_floats(obj: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string; turn such scientific-notation strings into floats."""
    if isinstance(obj, dict):
        return {k: _coerce_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_coerce_floats(v) for v in obj]
    if isinstance(obj, str) and _FLOAT_RE.match(obj):
        return float(obj)
    return obj


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load a YAML experiment config (or the defaults) and apply CLI overrides."""
    raw = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        raw = apply_overrides(raw, overrides)
        source += " + overrides"
    return config_from_dict(raw, source)


def default_config_path() -> Path:
    """The default sweep shipped in ``tune_configs/sweep.yaml`` (next to the package, or in the CWD)."""
    here = Path(__file__).resolve().parent.parent / "tune_configs" / "sweep.yaml"
    return here if here.exists() else Path("tune_configs/sweep.yaml")
