"""What a GoToLocal policy gets wrong, by whether the mission's object is in view: the held-out bot's actions scored by
each final checkpoint of finished runs, split by (target visible in the current view?, the bot's action).

    python docs/results/gotolocal_window1/visible_target.py RUN [RUN ...] [--episodes 300] [--seed-start 3000000000]
    python docs/results/gotolocal_window1/visible_target.py --failures RUN/evaluations/NAME/episodes.csv

Bot episodes of the run's level are played from ``--seed-start`` (a range no training, evaluation or validation seed
uses); at every state the trial's own scorer (its history length and layout) scores the seven actions, and the table
gives, per group, the bot action's mean NLL and how often it is the policy's argmax. The groups that separate the seeds
which reach 90% from those that stall near 70%: turning (left / right) while the target is in view.

``--failures`` replays the failed episodes of an evaluation (``python -m anyorder_ray.evaluate``'s ``episodes.csv``:
episode seed and the actions taken) and counts those in which the mission's object was in view at some step, and
within the first 5 steps.
"""

from __future__ import annotations

import argparse
import collections
import csv
from pathlib import Path

import torch
import yaml

from anyorder_ray.data.encoding import UnitEncoder
from anyorder_ray.evaluate import finished_trials, last_checkpoint, resolve
from anyorder_ray.evaluation.scoring import ActionScorer, PolicyQuery
from anyorder_ray.models.factory import build_model_config, build_tokenizer
from anyorder_ray.roles.weights import load_policy_weights
from envs.babyai import ACTION_NAMES, BabyAIWorld


def target_in_view(world: BabyAIWorld) -> bool:
    """Whether an object the mission names (any that satisfies it) is drawn in the agent's 7x7 view."""
    from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX

    image = world.raw_obs["image"]
    wanted = [(OBJECT_TO_IDX[o.type], COLOR_TO_IDX[o.color]) for o in world.env.instrs.desc.obj_set]
    return any(((image[:, :, 0] == t) & (image[:, :, 1] == c)).any() for t, c in wanted)


def bot_states(level: str, seeds: range) -> list[list[tuple[PolicyQuery, str, bool]]]:
    """Per bot episode, every state as (policy query with the whole history, the bot's action, target in view)."""
    out = []
    for seed in seeds:
        world = BabyAIWorld(level)
        obs, mission = world.reset(seed)
        history: list[tuple[str, str]] = []
        steps = []
        while not world.done:
            action = world.expert_action()
            steps.append((PolicyQuery(mission, tuple(history), obs), action, target_in_view(world)))
            history.append((obs, action))
            obs = world.step(action).obs
        out.append(steps)
    return out


def failures_with_target_seen(
    episodes_csv: Path, level: str | None = None, max_steps: int | None = None
) -> dict[str, int]:
    """Replay the failed episodes of ``episodes_csv``: how many failed, how many of them ran out of steps (the level's
    cap), had the target in view at some step, and had it in view within their first 5 steps.

    The world played is the one the ``evaluation.yaml`` beside the CSV names (its ``env.level`` and
    ``env.max_episode_steps``), unless ``level`` is given."""
    if level is None:
        settings = episodes_csv.parent / "evaluation.yaml"
        if not settings.is_file():
            raise FileNotFoundError(f"{settings} (which names the level played) is missing: pass the level")
        env = yaml.safe_load(settings.read_text(encoding="utf-8"))["env"]
        level, max_steps = env["level"], env.get("max_episode_steps")
    out = {"failed": 0, "timeouts": 0, "target_seen": 0, "target_seen_within_5": 0}
    with episodes_csv.open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["success"] == "0"]
    for r in rows:
        world = BabyAIWorld(level, max_steps=max_steps, expert=False)
        world.reset(int(r["episode_seed"]))
        cap = world.env.max_steps
        first = 0 if target_in_view(world) else None
        actions = r["actions"].split(" | ") if r["actions"] else []
        for t, action in enumerate(actions, start=1):
            world.step(action)
            if first is None and target_in_view(world):
                first = t
        out["failed"] += 1
        out["timeouts"] += int(len(actions) == cap)
        out["target_seen"] += int(first is not None)
        out["target_seen_within_5"] += int(first is not None and first <= 5)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*")
    p.add_argument("--episodes", type=int, default=300)
    p.add_argument("--seed-start", type=int, default=3_000_000_000)
    p.add_argument("--failures", type=Path, help="an evaluation's episodes.csv: replay its failed episodes")
    args = p.parse_args()
    if args.failures is not None:
        print(" ".join(f"{k}={v}" for k, v in failures_with_target_seen(args.failures).items()))
        return
    if not args.runs:
        p.error("give run directories, or --failures EPISODES_CSV")
    torch.set_num_threads(1)
    states = None
    print("| run | trial | seed | group | bot action | states | NLL | argmax = bot |")
    print("|---|---|---|---|---|---|---|---|")
    for run_arg in args.runs:
        cfg, _, run = resolve(argparse.Namespace(run=run_arg, overrides=[]))
        if states is None:
            states = bot_states(cfg.env.level, range(args.seed_start, args.seed_start + args.episodes))
        for result in finished_trials(run):
            trial = cfg.trial(dict(result.config or {}))
            checkpoint = last_checkpoint(result, run)
            if checkpoint is None:
                continue
            tokenizer = build_tokenizer(trial.model, trial.env)
            config = build_model_config(trial.model, tokenizer)  # loaded as the eval actor loads a checkpoint
            model = load_policy_weights(None, checkpoint, config, torch.device("cpu"), state_dicts=False)
            scorer = ActionScorer(UnitEncoder(tokenizer), ACTION_NAMES, trial.history_steps(), trial.data.max_seq_len,
                                  trial.masking.layout)  # fmt: skip
            sums: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0, 0])
            for steps in states:
                scores = scorer.log_probs(model, [q for q, _, _ in steps])  # eval mode, no autograd
                for (_, action, visible), s in zip(steps, scores, strict=True):
                    k = ACTION_NAMES.index(action)
                    group = "target in view" if visible else "target not in view"
                    for key in ((group, "all"), (group, action)):
                        sums[key][0] -= float(s[k])
                        sums[key][1] += 1
                        sums[key][2] += int(int(s.argmax()) == k)
            trial_id = str((result.metrics or {}).get("trial_id", "?"))
            for (group, action), (nll, n, hits) in sorted(sums.items()):
                if n >= 20:
                    print(f"| {Path(run_arg).name} | {trial_id} | {trial.train.seed} | {group} | {action} | {n} | "
                          f"{nll / n:.3f} | {hits / n:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
