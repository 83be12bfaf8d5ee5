"""Rollout actors: run the world's expert (and, in the dagger regime, the latest policy) on their own seed range and
feed the trajectory buffer.

Each batch goes to ``buffer.add`` by value and the buffer puts it into the object store, so the buffer
owns it. Once the buffer acknowledged a batch, the data survives this actor's death; a restarted actor asks the buffer
where it left off and continues from the next seed, so no acknowledged trajectory is lost and no seed
is used twice (should the dead actor's last ``add`` land after its successor read the resume seed, the
buffer drops whichever copy of those seeds arrives second).

Dagger (``data.regime: dagger``): before each batch the actor looks at the trial's ``PolicyBoard`` (one small call,
never a wait) and loads a newer version if there is one into its ``roles.acting.ActingPolicy``, through the eval actor's
loader (``roles.weights``). With weights it plays ``evaluation.dagger.dagger_episodes`` with the same ``ActionScorer``
as the eval actor and beta from ``rollout.beta(version, planned_steps)``; without weights it runs the expert alone, and
once the demo budget is full it idles (``rollout.idle_poll_s``) until weights arrive. A version that cannot be loaded is
logged, counted on the board (``rollout/weights_rejected``) and skipped: the actor keeps the weights it had; a version
loaded is reported to the board too, which tells the trainer when the actors rejected ``rollout.max_rejected_versions``
versions in a row (the trial then fails: ``roles.train_loop.BufferSource``). A restarted actor starts from the board's
latest version.

``rollout.sync``: the actor plays exactly ``rollout.sync_batches`` batches under each version it loads and then idles
(polling the board every ``rollout.idle_poll_s``) until the next; the trainer waits at its next publication for them
(``BufferSource.wait_for_version``), so a trial's data does not depend on how fast the actors ran. A restarted actor
asks the buffer how many batches of which version it had acknowledged, so it plays none of them again.

Compute: the policy's forwards are counted (``training.budget.forward_flops``, the trainer's accounting) and sent with
each batch to the buffer, which sums them into ``rollout/inference_flops`` (journaled with the batch, so a restarted
buffer keeps the count; the forwards of a batch that never reached the buffer, its actor died first, are not counted).

Early-experience branches (``data.branches_per_state`` for an arm with ``masking.branches`` > 0): after each batch of
expert demos the actor branches every demo (``envs.branches``, uniform alternatives, on a world without its expert)
and hands the branches to the buffer in the same ``add`` as the demos, so they are acknowledged (and journaled) together
and a restarted actor, resuming after the last acknowledged ``add``, never makes a demo's branches twice nor loses
them. A demo's alternatives are drawn from a generator seeded by (actor, episode seed): they do not depend on batching.
Only expert demos are branched (on-policy trajectories are not), with uniform alternatives when they are collected:
the fixed regime collects its demos before any weights exist, and so does dagger (training starts on the whole demo
set).

Policy branches (``data.branch_proposer: policy``, dagger only): once the actor holds weights it branches its demos a
second time, with alternatives drawn from the policy (``evaluation.proposer.PolicyProposer``, over the acting model and
scorer, so its forwards are counted in ``inference_flops`` like the acting ones; provenance: the weights' version).
Those demos were acknowledged long before (the trainer waited for all of them), so their policy branches need their
own guarantee; rather than a cursor of branched demos kept in the buffer, they ride with the on-policy batches, by a
fixed map of seeds: the buffer's ``demo_span`` says which of the actor's seeds were accepted demos (below ``stop``) and
where its on-policy seeds start (``next_seed``, fixed before any weights exist), and the on-policy batch of seeds
``[lo, hi)`` carries the policy branches of the demos of seeds ``[lo, hi)`` shifted down by ``next_seed - start``.
Each such demo is collected again by the expert (worlds and the bot are deterministic given the seed; the branching
replays and checks every observation), branched with the weights the batch was played with, from a generator seeded by
(actor, demo seed, 1), and handed over in the batch's ``add``: acknowledged and journaled together, dropped together
when a restarted actor's redo repeats the batch's seeds, so a demo's policy branches are made once and never lost, by
the same rule as the batch itself. Uniform branches of the demos stay (the trainer draws branches from its first
step, before any weights); the policy branches come on top, one batch of demos per on-policy batch, so the demo set is
branched once over as many on-policy batches as it took demo batches (a trial that ends first leaves the rest
unbranched by the policy).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import ray

from anyorder_ray.config import ModelConfig, RolloutConfig
from anyorder_ray.data.seeds import rollout_seed_range
from anyorder_ray.roles.buffer import DemoSpan
from envs import EnvConfig, Trajectory, collect_expert_trajectories, make_world
from envs.branches import branch_trajectories

if TYPE_CHECKING:
    from anyorder_ray.roles.acting import ActingPolicy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutReport:
    """What one actor did in one ``run`` call."""

    worker: int
    episodes: int
    trajectories: int
    """Trajectories handed to the buffer (a dagger episode can be several: ``dagger_episodes``' segments)."""
    failed: int
    """Episodes that did not succeed (the expert's are dropped; dagger's are stored all the same)."""
    seconds: float
    next_seed: int
    onpolicy: int = 0
    """Trajectories (segments) played under policy weights (dagger)."""
    policy_version: int = 0
    """The version of the weights this actor held at the end (0: none)."""
    inference_flops: float = 0.0
    """Model FLOPs of the policy's forwards in this call (0 for the expert alone)."""
    branches: int = 0
    """Early-experience branches made and handed to the buffer with their demos."""


@dataclass(frozen=True)
class BranchPlan:
    """What a rollout actor branches (plain values, so a restart rebuilds): ``data.branches_per_state`` alternatives
    from every ``data.branch_every``-th state of each demo, with ``history_steps`` expert steps before each;
    ``proposer``: ``data.branch_proposer`` (``policy``: the demos again once weights exist, module docstring) with
    ``data.branch_temperature``."""

    per_state: int
    every: int
    history_steps: int
    proposer: str = "uniform"
    temperature: float = 1.0


@dataclass(frozen=True)
class PolicySource:
    """What a dagger rollout actor needs to act with the trial's weights (plain values, so a restart rebuilds)."""

    board_name: str
    """The trial's named ``PolicyBoard`` actor."""
    model: ModelConfig
    history_steps: int
    max_length: int
    layout: str = "sequence"


class RolloutWorker:
    """Actor class: ``ray.remote(RolloutWorker).options(num_cpus=..., max_restarts=...)``."""

    def __init__(
        self,
        env: EnvConfig,
        rollout: RolloutConfig,
        worker: int,
        buffer_name: str,
        policy: PolicySource | None = None,
        branches: BranchPlan | None = None,
    ) -> None:
        """``buffer_name``: the trial's named ``TrajectoryBuffer`` actor, looked up on every (re)start. A handle passed
        as a constructor argument would be a reference Ray has to keep alive for restarts (it logs an ERROR that
        such a restart can fail); a name is plain data. ``policy``: act with the trial's weights (dagger).
        ``branches``: branch every expert demo (early experience)."""
        if branches is not None and branches.proposer == "policy" and policy is None:
            raise ValueError("policy branches need the trial's weights: a BranchPlan with proposer 'policy' needs a "
                             "PolicySource (the dagger regime)")  # fmt: skip
        self._cfg = rollout
        self._branches = branches
        self._demo_span: DemoSpan | None = None  # asked of the buffer at the first policy branches
        self._branch_world = make_world(env, expert=False) if branches is not None else None
        self._worker = worker
        self._buffer = ray.get_actor(buffer_name)
        self._world = make_world(env, expert=True)
        self._seeds = rollout_seed_range(rollout, worker)
        resume = ray.get(self._buffer.resume_seed.remote(worker))
        self._next_seed = resume if resume is not None else self._seeds.start
        self._policy: ActingPolicy | None = None
        # rollout.sync: (the newest version of this actor's acknowledged on-policy batches, how many); a restart asks.
        self._played: tuple[int, int] = (0, 0)
        if policy is not None and rollout.sync:
            self._played = tuple(ray.get(self._buffer.last_played.remote(worker)))
        self._worlds = [self._world]
        if policy is not None:
            # Only a dagger actor loads torch, transformers and the model (``roles.acting``): an expert-only actor
            # starts in about a second instead of several (measured: importing them is most of an actor's start-up).
            import torch

            from anyorder_ray.roles.acting import ActingPolicy

            torch.set_num_threads(max(1, round(rollout.num_cpus_per_actor)))
            self._policy = ActingPolicy(policy, env, self._world.action_names, worker, rollout.temperature)
            self._worlds += [make_world(env, expert=True) for _ in range(rollout.batch_envs - 1)]
            self._history_steps = policy.history_steps

    def next_seed(self) -> int:
        return self._next_seed

    def policy_version(self) -> int:
        """The version of the weights this actor acts with (0: none, the expert alone)."""
        return self._policy.version if self._policy is not None else 0

    def run(self, max_batches: int | None = None) -> RolloutReport:
        """Produce batches until the buffer has enough (or ``max_batches``); returns a report."""
        start, episodes, kept, failed, batches, onpolicy = time.perf_counter(), 0, 0, 0, 0, 0
        flops, branched = 0.0, 0
        keep_going = True
        while keep_going and (max_batches is None or batches < max_batches):
            lo = self._next_seed
            hi = min(lo + self._cfg.episodes_per_batch, self._seeds.stop)
            if lo >= hi:
                break  # seed range exhausted
            policy = self._policy
            if policy is not None:
                policy.refresh()
            if policy is not None and self._version_done(policy.version):
                # rollout.sync: this version's batches are in; the trainer publishes the next once it took them in.
                keep_going = ray.get(self._buffer.wants_more.remote())
                if keep_going:
                    time.sleep(self._cfg.idle_poll_s)
                continue
            if policy is not None and policy.version > 0:
                beta = self._cfg.beta(policy.version, policy.planned_steps)
                from anyorder_ray.evaluation.dagger import dagger_episodes

                trajs, stats = dagger_episodes(self._worlds, range(lo, hi), policy.act, beta, policy.version,
                                               self._history_steps, rng_seed=self._worker)  # fmt: skip
                onpolicy += len(trajs)
                attempted, succeeded = stats.attempted, stats.succeeded
                branches: list[Trajectory] = self._policy_branches(policy, lo, hi)  # of earlier demos, if asked
            else:
                if policy is not None and not ray.get(self._buffer.wants_expert.remote()):
                    # Dagger with the demo budget full and no weights yet: nothing useful to do until they come.
                    keep_going = ray.get(self._buffer.wants_more.remote())
                    if keep_going:
                        time.sleep(self._cfg.idle_poll_s)
                    continue
                trajs, collected = collect_expert_trajectories(self._world, range(lo, hi))
                attempted, succeeded = collected.attempted, collected.succeeded
                branches = self._branch(trajs)
            branched += len(branches)
            batch_flops = policy.take_flops() if policy is not None else 0.0
            keep_going = ray.get(self._buffer.add.remote(trajs, self._worker, hi, branches, batch_flops))
            self._next_seed = hi
            if self._cfg.sync and policy is not None and policy.version > 0:
                version, count = self._played
                self._played = (version, count + 1) if version == policy.version else (policy.version, 1)
            flops += batch_flops
            episodes += attempted
            kept += len(trajs)
            failed += attempted - succeeded
            batches += 1
        return RolloutReport(self._worker, episodes, kept, failed, time.perf_counter() - start, self._next_seed,
                             onpolicy, self.policy_version(), inference_flops=flops,
                             branches=branched)  # fmt: skip

    def _version_done(self, version: int) -> bool:
        """``rollout.sync``: whether this actor has played its ``sync_batches`` batches under ``version`` (0: no
        weights, never done; an older version than the last played: done, it never plays again)."""
        if not self._cfg.sync or version == 0:
            return False
        played, count = self._played
        return version < played or (version == played and count >= self._cfg.sync_batches)

    def _branch(self, demos: list[Trajectory]) -> list[Trajectory]:
        """The early-experience branches of ``demos`` (none without a ``BranchPlan``)."""
        plan = self._branches
        if plan is None:
            return []
        out: list[Trajectory] = []
        for demo in demos:
            rng = np.random.default_rng([self._worker, demo.seed])  # per demo: independent of batch boundaries
            steps = range(0, demo.num_actions, plan.every)
            out += branch_trajectories(self._branch_world, demo, plan.per_state, rng, plan.history_steps, steps=steps)
        return out

    def _policy_branches(self, policy: ActingPolicy, lo: int, hi: int) -> list[Trajectory]:
        """The policy's branches of this actor's demos that ride with its on-policy batch of seeds ``[lo, hi)``: the
        demos of those seeds shifted down by the span's ``next_seed - start`` (module docstring); none without a
        ``policy`` branch plan."""
        plan = self._branches
        if plan is None or plan.proposer != "policy":
            return []
        if self._demo_span is None:  # fixed before any weights exist: asked once per process
            none = DemoSpan(self._seeds.start, self._seeds.start)  # no demo of this actor was accepted
            self._demo_span = ray.get(self._buffer.demo_span.remote(self._worker)) or none
        span = self._demo_span
        shift = span.next_seed - self._seeds.start  # on-policy seed s carries the demo of seed s - shift
        seeds = range(max(lo - shift, self._seeds.start), min(hi - shift, span.stop))
        if not seeds:
            return []
        demos, _ = collect_expert_trajectories(self._world, seeds)  # the same demos: the bot is deterministic
        proposer = policy.proposer(plan.temperature)
        out: list[Trajectory] = []
        for demo in demos:
            steps = range(0, demo.num_actions, plan.every)
            proposer.prefetch(demo, steps)  # one batched forward per demo
            rng = np.random.default_rng([self._worker, demo.seed, 1])  # per demo, apart from its uniform branches'
            out += branch_trajectories(self._branch_world, demo, plan.per_state, rng, plan.history_steps, proposer,
                                       steps, policy_version=policy.version)  # fmt: skip
        return out
