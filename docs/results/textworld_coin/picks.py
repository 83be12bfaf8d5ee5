"""Which commands each trial's final checkpoint picks, greedily as the evaluator does, on the first N held-out games.

Run: python docs/results/textworld_coin/picks.py <run folder> [N]  (the run folder of a textworld_coin sweep).
Prints per trial: games won, the verbs of the chosen commands, and whether the first command is the expert's.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import sys

import torch

from anyorder_ray.config import load_config
from anyorder_ray.evaluation.scoring import PolicyQuery
from anyorder_ray.roles.evaluator import EvalWorker
from envs import evaluation_env, make_world


def main() -> None:
    run, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20
    torch.set_num_threads(1)
    cfg = load_config(f"{run}/experiment.yaml")
    eval_cfg = dataclasses.replace(cfg.eval, heldout_trajectories=1)
    world = make_world(evaluation_env(cfg.env))
    for trial in sorted(glob.glob(f"{run}/train/train-*")):
        checkpoint = sorted(glob.glob(f"{trial}/checkpoint_0*"))[-1]
        worker = EvalWorker(cfg.env, eval_cfg, cfg.model, cfg.history_steps(), cfg.data.max_seq_len)
        worker._load(checkpoint)
        verbs, first_is_expert, wins = collections.Counter(), collections.Counter(), 0
        for s in range(n):
            obs, mission = world.reset(eval_cfg.seed_start + s)
            history: list[tuple[str, str]] = []
            while not world.done:
                query = PolicyQuery(mission, tuple(history), obs)
                action = worker._scorer.act(worker._model, [query], [world.valid_actions()])[0]
                verbs[action.split()[0]] += 1
                if not history:
                    first_is_expert[action == world.expert_action()] += 1
                history.append((obs, action))
                obs = world.step(action).obs
            wins += world.success
        print(trial.rsplit("/", 1)[-1], checkpoint.rsplit("/", 1)[-1], f"won {wins}/{n}", "verbs", dict(verbs),
              "first command = expert's", dict(first_is_expert), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
