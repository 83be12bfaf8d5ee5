"""Eval throughput: episodes/s of the batched eval loop vs one environment at a time, same seeds and model.

Both sides are ``anyorder_ray.evaluation.episodes.run_episodes`` (what the eval actor runs) with the ``ActionScorer`` of
the imitation sweep (``tune_configs/imitation.yaml``, the default sweep's model too: its tiny model, ``history_steps``
and ``max_seq_len``), on the same held-out eval seeds: ``batch_envs=64`` (every lockstep step of all live episodes is
one batched forward) vs ``batch_envs=1``. The model is trained briefly first (``--train-steps`` steps of the trainer's
``BatchMaker`` + ``train_step`` on bot trajectories, causal mode: the quickest to act sensibly) so episodes end when the
policy reaches the goal instead of all running to the step limit; ``--checkpoint`` evaluates a saved model instead.
Torch threads default to the eval actor's own setting in the sweep (1 thread for its 0.5 CPU).

What bounds the ratio (printed by the script and tabulated in docs/BENCHMARKS.md): batching removes the fixed
per-forward cost (Python dispatch of ~3 layers x (attention, norms, MoE routing), small-tensor ops) and the per-step
Python of the loop, but not the FLOPs, and this model is small enough that at batch 64 the forward is compute-bound
on the CPU's matmul throughput: the per-sequence cost at batch 64 is a fixed floor, so the speed-up is at most
(per-sequence cost at batch 1) / (per-sequence cost at batch 64). The script measures both, the share of matmuls in
a profiled batch-64 forward, and how much of each loop is spent in the policy vs the environment.

Run: ``python bench/eval_throughput.py`` (full, ~1.5 minutes) or ``--quick`` (< 1 minute). Any experiment config runs:
``--config tune_configs/textworld_smoke.yaml`` plays TextWorld's held-out games (``envs.evaluation_env``), scoring each
state's admissible commands, one forward per command length.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from _common import Result, expert_data, load_average, print_results
from torch import nn

from anyorder_ray.config import ExperimentConfig, MaskingConfig, load_config
from anyorder_ray.data.batching import BatchMaker, LocalSource
from anyorder_ray.data.encoding import UnitEncoder
from anyorder_ray.data.seeds import eval_episode_seeds, heldout_trajectory_seeds
from anyorder_ray.evaluation.episodes import EpisodeStats, run_episodes
from anyorder_ray.evaluation.scoring import ActionScorer, PolicyQuery
from anyorder_ray.models.factory import build_model, build_tokenizer
from anyorder_ray.training.optim import make_optimizer
from anyorder_ray.training.recipe import train_step
from envs import EnvConfig, Trajectory, evaluation_env, make_world


class TimedScorer:
    """Delegates to an ``ActionScorer`` and accumulates the wall time spent in ``act`` (the policy's share)."""

    def __init__(self, scorer: ActionScorer) -> None:
        self._scorer = scorer
        self.seconds = 0.0
        self.calls = 0
        self.queries = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scorer, name)

    def act(
        self, model: nn.Module, queries: Sequence[PolicyQuery], candidates: Sequence[Sequence[str]] | None = None
    ) -> list[str]:
        start = time.perf_counter()
        out = self._scorer.act(model, queries, candidates)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.queries += len(queries)
        return out


def train_briefly(
    cfg: ExperimentConfig, model: nn.Module, encoder: UnitEncoder, data: list[Trajectory], steps: int
) -> None:
    """``steps`` steps of the trainer's loop pieces (causal mode: trains exactly the policy's query)."""
    train_cfg = dataclasses.replace(cfg.train, max_steps=steps)
    optimizer, scheduler = make_optimizer(model, train_cfg)
    masking = MaskingConfig(**{**dataclasses.asdict(cfg.masking), "mode": "causal"})
    batches = BatchMaker(cfg.data, masking, encoder, encoder.tokenizer.pad_token_id, seed=0)
    source = LocalSource(data, np.random.default_rng(0))
    start, loss = time.perf_counter(), float("nan")
    for step in range(steps):
        micro = [batches.bucketed(source, train_cfg.micro_batch_size) for _ in range(train_cfg.grad_accum_steps())]
        loss = train_step(model, optimizer, scheduler, micro, train_cfg.max_grad_norm, torch.device("cpu")).loss
        if (step + 1) % 50 == 0:
            print(f"[train] step {step + 1}/{steps}: loss {loss:.3f}", flush=True)
    print(f"[train] {steps} steps in {time.perf_counter() - start:.1f} s, final loss {loss:.3f}", flush=True)


@dataclasses.dataclass(frozen=True)
class PolicyStates:
    """Policy queries with each state's candidates (``valid_actions()``), as ``run_episodes`` scores them."""

    queries: list[PolicyQuery]
    candidates: list[tuple[str, ...]]

    def __getitem__(self, part: slice) -> PolicyStates:
        return PolicyStates(self.queries[part], self.candidates[part])

    def __len__(self) -> int:
        return len(self.queries)


def policy_states(env: EnvConfig, trajectories: list[Trajectory], n: int) -> PolicyStates:
    """``n`` realistic policy queries: the states of expert trajectories, with their histories (the scorer keeps the
    last ``history_steps``), and each state's ``valid_actions()`` (the trajectory replayed in the world: a
    fixed-action world gives its whole set)."""
    world = make_world(env, expert=False)
    states = PolicyStates([], [])
    for traj in trajectories:
        world.reset(traj.seed)
        for t, action in enumerate(traj.actions):
            states.queries.append(PolicyQuery.at(traj, t))
            states.candidates.append(world.valid_actions())
            if len(states) == n:
                return states
            world.step(action)
    return states


def per_sequence_cost(model: nn.Module, scorer: ActionScorer, states: PolicyStates, batch: int) -> float:
    """Median seconds per query of ``scorer.score`` (encode + collate + forwards + scoring) at ``batch``."""
    chunks = [states[s : s + batch] for s in range(0, len(states) - batch + 1, batch)]
    scorer.score(model, chunks[0].queries, chunks[0].candidates)  # warm-up
    times = []
    for chunk in chunks:
        start = time.perf_counter()
        scorer.score(model, chunk.queries, chunk.candidates)
        times.append((time.perf_counter() - start) / len(chunk))
    return statistics.median(times)


def matmul_share(model: nn.Module, scorer: ActionScorer, states: PolicyStates) -> tuple[float, float]:
    """Share of the batched ``score`` CPU time in matmul kernels, and the padding share of that batch (encoded with
    each state's first candidate)."""
    from torch.profiler import ProfilerActivity, profile

    scorer.score(model, states.queries, states.candidates)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        scorer.score(model, states.queries, states.candidates)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    lengths = [len(scorer.encode(q, c[0])) for q, c in zip(states.queries, states.candidates, strict=True)]
    padding = 1.0 - sum(lengths) / (max(lengths) * len(lengths))
    return matmul / max(total, 1e-9), padding


def timed_episodes(
    model: nn.Module, scorer: ActionScorer, env: EnvConfig, seeds: Sequence[int], batch_envs: int
) -> tuple[EpisodeStats, TimedScorer]:
    timed = TimedScorer(scorer)
    worlds = lambda: make_world(env, expert=False)  # noqa: E731
    stats = run_episodes(model, timed, worlds, seeds, batch_envs=batch_envs)  # type: ignore[arg-type]
    print(
        f"[eval] batch_envs={batch_envs}: {stats.episodes} episodes in {stats.seconds:.1f} s = "
        f"{stats.episodes_per_s:.2f} episodes/s, success {stats.success_rate:.2f}, mean length "
        f"{stats.mean_length:.1f}; {timed.calls} forwards of {timed.queries / max(timed.calls, 1):.1f} queries, "
        f"policy {timed.seconds / stats.seconds:.0%} of the time ({load_average()})",
        flush=True,
    )
    return stats, timed


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps and episodes (< 1 minute)")
    parser.add_argument("--config", default="tune_configs/imitation.yaml")
    parser.add_argument("--checkpoint", default=None, help="a saved model folder to evaluate instead of training")
    parser.add_argument("--train-steps", type=int, default=None, help="default 200 (quick 40)")
    parser.add_argument("--episodes", type=int, default=None, help="default 256 (quick 32)")
    parser.add_argument("--batch-envs", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads while evaluating (eval actor: 1)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    if args.checkpoint:
        cfg = cfg.replace(model=dataclasses.replace(cfg.model, model_path=args.checkpoint))
    level = make_world(cfg.env, expert=False).level
    train_steps = args.train_steps if args.train_steps is not None else (40 if args.quick else 200)
    episodes = args.episodes or (32 if args.quick else 256)

    tokenizer = build_tokenizer(cfg.model, cfg.env)
    encoder = UnitEncoder(tokenizer)
    model = build_model(cfg.model, tokenizer, seed=cfg.train.seed)
    eval_env = evaluation_env(cfg.env)  # what the eval actor plays: held-out games where the world has a pool
    heldout, _ = expert_data(eval_env, heldout_trajectory_seeds(cfg.eval, 64))
    if not args.checkpoint and train_steps > 0:
        torch.set_num_threads(cfg.train.torch_threads)
        data, _ = expert_data(cfg.env, range(200 if args.quick else cfg.data.num_demos))
        train_briefly(cfg, model, encoder, data, train_steps)
    torch.set_num_threads(args.threads)
    model.eval()
    scorer = ActionScorer(encoder, make_world(eval_env).action_names, cfg.history_steps(), cfg.data.max_seq_len)
    seeds = list(eval_episode_seeds(cfg.eval, episodes))
    print(
        f"{level}: {episodes} eval seeds, history_steps {cfg.history_steps()}, torch threads {torch.get_num_threads()}",
        flush=True,
    )

    batched, timed_b = timed_episodes(model, scorer, eval_env, seeds, args.batch_envs)
    single, timed_s = timed_episodes(model, scorer, eval_env, seeds, 1)
    same = sum(a.actions == b.actions for a, b in zip(batched.results, single.results, strict=True))
    print(f"same actions in {same}/{len(seeds)} episodes (float noise between batch shapes can flip near-ties)")
    speedup = batched.episodes_per_s / single.episodes_per_s

    # Why the ratio is what it is: per-query policy cost at batch 1 vs the lockstep width, and the matmul share.
    n_states = 4 * args.batch_envs if args.quick else 8 * args.batch_envs
    states = policy_states(eval_env, heldout, n_states)
    cost_1 = per_sequence_cost(model, scorer, states[: 2 * args.batch_envs], 1)
    cost_b = per_sequence_cost(model, scorer, states, args.batch_envs)
    share, padding = matmul_share(model, scorer, states[: args.batch_envs])
    steps_s = (single.seconds - timed_s.seconds) / max(timed_s.calls, 1)
    steps_b = (batched.seconds - timed_b.seconds) / max(timed_b.queries, 1)
    print(
        f"policy cost per query: {cost_1 * 1e3:.2f} ms at batch 1, {cost_b * 1e3:.2f} ms at batch {args.batch_envs} "
        f"(ceiling on the policy speed-up {cost_1 / cost_b:.1f}x); matmuls are {share:.0%} of the batched forward's "
        f"CPU time, padding {padding:.0%} of its positions; environment + loop per env step: "
        f"{steps_s * 1e3:.2f} ms alone vs {steps_b * 1e3:.2f} ms batched"
    )
    print(f"batched {batched.episodes_per_s:.2f} vs one at a time {single.episodes_per_s:.2f} episodes/s")
    results = [
        Result("eval_speedup_batched", speedup, ">=", 10),
        Result("eval_episodes_per_s_batched", batched.episodes_per_s),
        Result("eval_episodes_per_s_single", single.episodes_per_s),
        Result("eval_policy_cost_ratio_b1_vs_batched", cost_1 / cost_b),
    ]
    print_results(results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
