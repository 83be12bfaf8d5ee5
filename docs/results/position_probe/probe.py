"""Train one arm in this process (a plain loop over the trainer's batches) and play it: a quick way to compare model or
encoding settings at a fixed step count without Ray.

    python docs/results/position_probe/probe.py 1300 env.obs_encoding=grid "model.overrides={...}"

The config is ``tune_configs/base.yaml`` with ``masking.mode=causal`` and ``env.obs_encoding=compact`` in front of the
overrides given (so those two can be overridden too). Data: the first ``data.num_demos`` bot demos of rollout actor 0's
seeds, as the fixed regime collects them. Training: ``BatchMaker.bucketed`` micro-batches of ``train.micro_batch_size``,
mean cross-entropy over the targets, the trainer's AdamW and schedule (``make_optimizer``) over ``STEPS`` steps, grad
clipping. Evaluation: greedy episodes on the sweep's evaluation seeds (``eval.final_episodes``), the trials' scorer.
Ends with ``RESULT probe_success <rate>``. ``--threads`` sets torch's threads (default 2); ``--abs-positions`` adds a
learned absolute position embedding to the token embeddings (not part of LLaDA2: a diagnostic only); ``--per-state N``
first prints how often the greedy policy picks the bot's action at every state of N held-out bot episodes, by the bot's
action and by the type of the cell in front of the agent (BabyAI only).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from anyorder_ray.config import load_config  # noqa: E402
from anyorder_ray.data.batching import BatchMaker, LocalSource  # noqa: E402
from anyorder_ray.data.encoding import IGNORE_INDEX, UnitEncoder  # noqa: E402
from anyorder_ray.data.seeds import eval_episode_seeds, heldout_trajectory_seeds, rollout_seed_range  # noqa: E402
from anyorder_ray.evaluation.episodes import run_episodes  # noqa: E402
from anyorder_ray.evaluation.scoring import ActionScorer, PolicyQuery  # noqa: E402
from anyorder_ray.evaluation.stats import wilson_interval  # noqa: E402
from anyorder_ray.models.factory import build_model, build_tokenizer  # noqa: E402
from anyorder_ray.training.optim import make_optimizer  # noqa: E402
from envs import collect_expert_trajectories, evaluation_env, make_world  # noqa: E402

BASE = os.path.join(os.path.dirname(__file__), "..", "..", "..", "tune_configs", "base.yaml")


def add_abs_positions(model: torch.nn.Module, length: int) -> None:
    emb = model.get_input_embeddings()
    model.abs_positions = torch.nn.Embedding(length, emb.weight.shape[1])
    torch.nn.init.normal_(model.abs_positions.weight, std=model.config.initializer_range)
    emb.register_forward_hook(lambda mod, inp, out: out + model.abs_positions.weight[: out.shape[1]])


def per_state(model, scorer: ActionScorer, cfg, episodes: int) -> None:
    """Agreement of the greedy policy with the bot at every state of ``episodes`` held-out bot episodes."""
    from minigrid.core.constants import IDX_TO_OBJECT

    from envs.babyai import parse_obs

    world = make_world(evaluation_env(cfg.env))
    data, _ = collect_expert_trajectories(world, heldout_trajectory_seeds(cfg.eval, episodes))
    queries, labels, fronts = [], [], []
    for trajectory in data:
        obs, acts = trajectory.observations, trajectory.actions
        for t, act in enumerate(acts):
            queries.append(PolicyQuery.at(trajectory, t))
            labels.append(act)
            image, _ = parse_obs(obs[t], cfg.env.obs_encoding)
            fronts.append(int(image[3, 5, 0]))  # the agent stands at (3, 6) facing up: (3, 5) is in front
    with torch.no_grad():
        log_probs = torch.cat([scorer.log_probs(model, queries[i : i + 64]) for i in range(0, len(queries), 64)])
    names = world.action_names
    picked = [names[i] for i in log_probs.argmax(-1).tolist()]
    groups: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for choice, label, front in zip(picked, labels, fronts, strict=True):
        for key in ("all states", f"bot: {label}", f"in front: {IDX_TO_OBJECT[front]}"):
            groups[key][0] += choice == label
            groups[key][1] += 1
    print(f"greedy policy vs the bot on {len(labels)} states of {len(data)} held-out episodes:")
    for key, (agree, n) in sorted(groups.items()):
        print(f"  {key:22s} {agree / n:.3f} of {n}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("steps", type=int)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--abs-positions", action="store_true")
    p.add_argument("--per-state", type=int, default=0, metavar="N", help="held-out bot episodes to check one by one")
    args = p.parse_intermixed_args()
    cfg = load_config(BASE, ["masking.mode=causal", "env.obs_encoding=compact", *args.overrides])
    torch.set_num_threads(args.threads)
    seeds = list(rollout_seed_range(cfg.rollout, 0))[: cfg.data.num_demos]
    data, _ = collect_expert_trajectories(make_world(cfg.env), seeds)
    tokenizer = build_tokenizer(cfg.model, cfg.env)
    encoder = UnitEncoder(tokenizer)
    model = build_model(cfg.model, tokenizer, seed=cfg.train.seed).train()
    if args.abs_positions:
        add_abs_positions(model, cfg.data.max_seq_len)
    optimizer, scheduler = make_optimizer(model, dataclasses.replace(cfg.train, max_steps=args.steps))
    seed = cfg.train.seed * 1000
    source = LocalSource(data, np.random.default_rng([seed, 0]))
    maker = BatchMaker(cfg.data, cfg.masking, encoder, tokenizer.pad_token_id, seed)
    start, smooth = time.time(), 0.0
    for step in range(args.steps):
        mb = maker.bucketed(source, cfg.train.micro_batch_size)
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        smooth = 0.98 * smooth + 0.02 * loss.item()
        if step % 200 == 0 or step == args.steps - 1:
            print(f"step {step} loss {smooth / (1 - 0.98 ** (step + 1)):.3f} ({time.time() - start:.0f} s)", flush=True)
    model.eval()
    world_cfg = evaluation_env(cfg.env)
    scorer = ActionScorer(encoder, make_world(world_cfg).action_names, cfg.history_steps(), cfg.data.max_seq_len,
                          cfg.masking.layout)  # fmt: skip
    if args.per_state:
        per_state(model, scorer, cfg, args.per_state)
    with torch.no_grad():
        seeds = eval_episode_seeds(cfg.eval, cfg.eval.final_episodes)
        play = lambda: make_world(world_cfg, expert=False)  # noqa: E731
        episodes = run_episodes(model, scorer, play, seeds, batch_envs=cfg.eval.batch_envs)
    wins, n = sum(e.success for e in episodes.results), len(episodes.results)
    low, high = wilson_interval(wins, n)
    print(f"success {wins}/{n} [{low:.3f}, {high:.3f}] after {args.steps} steps; overrides {args.overrides}"
          f"{' + absolute positions' if args.abs_positions else ''}", flush=True)  # fmt: skip
    print(f"RESULT probe_success {wins / n:.3f}", flush=True)


if __name__ == "__main__":
    main()
