"""DAgger throughput: what acting with the policy costs the rollout actors, and what the policy actors cost the trainer.

(a) Rollout: episodes/s of one rollout actor running the bot alone (the expert regimes) vs one running the policy
(``data.regime: dagger`` with beta 0: every executed action is the policy's, the bot labels every state) on BabyAI
GoToLocal, with the default ``tiny`` LLaDA2 (random-init weights, published on the trial's ``PolicyBoard``: throughput
does not depend on what the weights learnt, only on the episode lengths, and a random policy plays every episode to the
level's step limit, the slowest case). Both are the trial's own actors (``roles.trial.make_rollout_actor``, 1 CPU
each, one torch thread), timed one after the other by their ``RolloutReport`` (``run(max_batches=...)`` after a
warm-up batch that loads the weights). The policy actor's inference FLOPs (``rollout/inference_flops``, the trainer's
FLOP accounting) are printed with it.

(b) Trainer: training tokens/s of a short real trial (``roles.trial.start_actors`` + a TorchTrainer running
``train_loop_per_worker``, one worker of 1 CPU, the smoke preset's settings with the default tiny model) in the fixed
regime (imitation: the rollout actor stops once the demo set is in the buffer) and in the dagger regime (the rollout
actor, 0.9 CPU, plays the policy from the first published weights on, every 2 steps a new version), equal training
steps. Tokens/s is ``train/total_tokens / train/elapsed_s`` of the last report (start-up and the wait for the demo set
excluded). On this 2-core machine the actor and the trainer each hold a core on paper; what they really share (memory
bandwidth, Ray's own processes, the other users of the machine) is what the ratio measures.

Run: ``python bench/dagger_throughput.py`` (full, ~4 minutes) or ``--quick`` (~2.5 minutes on the shared 2-core
machine, not the usual one: the actors' and two TorchTrainers' start-ups are most of it, the timed work ~15 s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import Result, init_local_ray, load_average, print_results

from anyorder_ray.config import ExperimentConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
LEVEL = "BabyAI-GoToLocal-v0"


def _config(*overrides: str) -> ExperimentConfig:
    """The smoke preset on GoToLocal with the default tiny model (no size overrides), evaluation off."""
    cfg = load_config(ROOT / "tune_configs" / "smoke.yaml", [f"env.level={LEVEL}", "eval.enabled=false",
                      "rollout.max_restarts=0", "train.checkpoint_every=0", "train.cpus_per_worker=1",
                      "rollout.num_cpus_per_actor=0.9", *overrides])  # fmt: skip
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, overrides={}))


def rollout_rates(batches: int, bot_episodes: int, policy_episodes: int) -> dict[str, float]:
    """(a): episodes/s of a bot-only and of a policy-driven (beta 0) rollout actor (``batches`` timed batches of
    ``bot_episodes`` / ``policy_episodes`` each), and the latter's inference FLOPs per episode."""
    import ray

    from anyorder_ray.models.factory import build_model, build_tokenizer
    from anyorder_ray.roles.trial import make_board, make_buffer, make_rollout_actor

    cfg = _config("data.regime=streaming", "data.buffer_capacity=100000", "rollout.num_actors=2",
                  "rollout.num_cpus_per_actor=1", f"rollout.episodes_per_batch={policy_episodes}",
                  f"rollout.batch_envs={policy_episodes}", "rollout.beta_start=0", "rollout.beta_end=0")  # fmt: skip
    # The bot's batches are larger (its episodes take milliseconds): the same batching otherwise.
    bot_cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, episodes_per_batch=bot_episodes))
    buffer, buffer_name = make_buffer(cfg)  # streaming: takes every batch, expert or on-policy
    board, board_name = make_board(cfg)
    model = build_model(cfg.model, build_tokenizer(cfg.model, cfg.env), seed=0)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ray.get(board.publish.remote([ray.put(weights)], 1, 100))  # version 1: beta(1) = 0
    bot = make_rollout_actor(bot_cfg, 0, buffer_name)
    policy = make_rollout_actor(cfg, 1, buffer_name, board_name)
    rates: dict[str, float] = {}
    try:
        for name, actor in (("bot", bot), ("policy", policy)):
            ray.get(actor.run.remote(max_batches=1))  # warm-up: imports, level generation, the weights loaded
            report = ray.get(actor.run.remote(max_batches=batches))
            rates[name] = report.episodes / report.seconds
            print(f"[rollout] {name}: {report.episodes} episodes ({report.trajectories} trajectories) in "
                  f"{report.seconds:.1f} s: {rates[name]:.2f} episodes/s, policy version {report.policy_version}, "
                  f"{report.inference_flops:.3g} inference FLOPs ({load_average()})", flush=True)  # fmt: skip
            if name == "policy":
                rates["policy_flops_per_s"] = report.inference_flops / report.seconds
                rates["policy_flops_per_episode"] = report.inference_flops / report.episodes
    finally:
        for actor in (bot, policy, board, buffer):
            ray.kill(actor, no_restart=True)
    return rates


def trial_rate(cfg: ExperimentConfig, out: Path) -> dict[str, float]:
    """(b): one short real trial; the last report's metrics (tokens/s from its totals)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from anyorder_ray.roles.train_loop import METRICS_LOG, train_loop_per_worker
    from anyorder_ray.roles.trial import start_actors
    from anyorder_ray.storage import Location

    start = time.perf_counter()
    actors = start_actors(cfg)
    try:
        TorchTrainer(
            train_loop_per_worker,
            train_loop_config=actors.loop_config(cfg, Location.parse(out / METRICS_LOG)),
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
            run_config=RunConfig(name=out.name, storage_path=str(out.parent)),
        ).fit()
    finally:
        actors.stop()
    last = json.loads((out / METRICS_LOG).read_text().splitlines()[-1])
    last["tokens_per_s"] = last["train/total_tokens"] / last["train/elapsed_s"]
    print(f"[trial] {cfg.data.regime}: {last['train/step']} steps, {last['train/total_tokens']} tokens in "
          f"{last['train/elapsed_s']:.1f} s: {last['tokens_per_s']:.0f} tokens/s; on-policy fraction "
          f"{last.get('rollout/onpolicy_fraction', 0):.2f}, inference {last.get('rollout/inference_flops', 0):.3g} "
          f"FLOPs, training {last['train/total_flops']:.3g} FLOPs; {time.perf_counter() - start:.0f} s with start-up "
          f"({load_average()})", flush=True)  # fmt: skip
    return last


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer episodes and steps (about a minute)")
    args = parser.parse_args(argv)
    batches, bot_episodes, policy_episodes, steps = (1, 32, 4, 8) if args.quick else (4, 128, 8, 80)
    demos = 16 if args.quick else 48
    print(f"dagger throughput on {LEVEL}: {batches} timed batch(es) of {bot_episodes} (bot) / {policy_episodes} "
          f"(policy) episodes, {steps} training steps per trial ({load_average()})", flush=True)  # fmt: skip
    import ray

    init_local_ray(num_cpus=2, object_store_mb=256)
    try:
        start = time.perf_counter()
        rates = rollout_rates(batches, bot_episodes, policy_episodes)
        print(f"[rollout] {time.perf_counter() - start:.0f} s with start-up", flush=True)
        common = (f"train.max_steps={steps}", f"train.report_every={steps // 4}", f"data.num_demos={demos}")
        with tempfile.TemporaryDirectory(prefix="aoray-dagger-bench-") as tmp:
            fixed = trial_rate(_config("data.regime=fixed", *common), Path(tmp) / "fixed")
            # Small batches (4 episodes, in lockstep) so that on-policy batches reach the buffer during a short trial.
            dagger = trial_rate(_config("data.regime=dagger", "rollout.weights_every_steps=2", "rollout.beta_start=0",
                                        "rollout.beta_end=0", "rollout.idle_poll_s=0.1", "rollout.episodes_per_batch=4",
                                        "rollout.batch_envs=4", *common), Path(tmp) / "dagger")  # fmt: skip
    finally:
        ray.shutdown()
    time.sleep(1.0)
    ratio = rates["policy"] / rates["bot"]
    train_ratio = dagger["tokens_per_s"] / fixed["tokens_per_s"]
    share = dagger["rollout/inference_flops"] / dagger["compute/total_flops"]
    print(
        f"rollout: the policy actor plays {ratio:.3f}x the bot-only actor's episodes/s "
        f"({rates['policy']:.2f} vs {rates['bot']:.1f})"
    )
    print(f"trainer: {train_ratio:.3f}x the tokens/s with a policy actor beside it "
          f"({dagger['tokens_per_s']:.0f} vs {fixed['tokens_per_s']:.0f}); the actor's inference is {share:.1%} of "
          "the dagger trial's total FLOPs")  # fmt: skip
    results = [
        Result("dagger_rollout_bot_episodes_per_s", rates["bot"]),
        Result("dagger_rollout_policy_episodes_per_s", rates["policy"]),
        Result("dagger_rollout_policy_vs_bot", ratio),
        Result("dagger_rollout_policy_flops_per_episode", rates["policy_flops_per_episode"]),
        Result("dagger_train_tokens_per_s_fixed", fixed["tokens_per_s"]),
        Result("dagger_train_tokens_per_s_dagger", dagger["tokens_per_s"]),
        Result("dagger_train_tokens_per_s_ratio", train_ratio),
        Result("dagger_inference_share_of_total_flops", share),
    ]
    print_results(results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
