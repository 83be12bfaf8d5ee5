"""Behaviour parity: fixed-seed, fixed-step trials must train and score exactly as the recorded reference.

Runs ``python -m anyorder_ray.sweep`` (the public entry point, nothing internal) on a self-contained config:
the default sweep's model and data (width-128 tiny MoE, compact observations, 2-step windows, 1000 demos), a fixed
step count, and the whole demo set in the buffer before the first step (``min_buffer_size = num_demos``), so the
batches do not depend on how fast the rollout actor is. Three arms: causal, plain any-order (token mean) and
cut_focus with the unit-mean loss (the weighted path). Per arm it reads the ``train/loss`` of every report from the
trial's ``metrics.jsonl`` and the final success from ``results.csv``.

    python bench/behaviour_parity.py --record docs/results/behaviour_reference.json   # write the reference
    python bench/behaviour_parity.py                                                  # compare with it

Compare mode prints, per arm, whether every loss is bit-identical (``float.hex``) and whether the final success
is the same to the episode, then ``RESULT`` lines (1 = identical). ``--quick`` runs the causal arm for 10 steps and 8
episodes and checks only that the pipeline produces the sequences (no reference).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE = ROOT / "docs" / "results" / "behaviour_reference.json"

ARMS = (
    {"mode": "causal"},
    {"mode": "any_order", "mask_prob": 0.3},
    {"mode": "cut_focus", "mask_prob": 0.3, "loss_norm": "unit"},
)


def experiment(steps: int, demos: int, episodes: int, arms: tuple[dict, ...] = ARMS) -> dict:
    """A complete config (every section spelled out, no defaults relied on beyond the keys' own)."""
    return {
        "env": {"level": "BabyAI-GoToRedBallGrey-v0", "obs_encoding": "compact"},
        "data": {"max_seq_len": 256, "window_steps": 2, "regime": "fixed", "num_demos": demos,
                 "min_buffer_size": demos},
        "model": {"preset": "tiny", "overrides": {"hidden_size": 128, "intermediate_size": 512,
                                                   "moe_intermediate_size": 128, "num_attention_heads": 4,
                                                   "num_key_value_heads": 2, "head_dim": 32}},
        "train": {"lr": 2.0e-3, "lr_warmup_ratio": 0.05, "lr_decay_style": "cosine", "global_batch_size": 32,
                  "micro_batch_size": 32, "max_steps": steps, "torch_threads": 2, "report_every": 5,
                  "checkpoint_every": 0, "seed": 0},
        "rollout": {"num_actors": 1, "num_cpus_per_actor": 0.25},
        "eval": {"enabled": True, "num_cpus_per_actor": 0.5, "every_steps": 100000, "episodes": episodes,
                 "final_episodes": episodes, "heldout_trajectories": 32},
        "sweep": {"name": "parity", "arms": [dict(a) for a in arms], "seeds": [0], "max_concurrent_trials": 1},
    }  # fmt: skip


LABELS = {"causal": ARMS[0], "any_order@0.3": ARMS[1], "cut_focus@0.3+unit": ARMS[2]}
"""Each arm's label (how Tune's params name the arm since arms are resolved at load time; before, by its dict)."""


def arm_key(arm: dict | str) -> str:
    arm = LABELS[arm] if isinstance(arm, str) else arm
    return ",".join(f"{k}={arm[k]}" for k in sorted(arm))


def run(steps: int, demos: int, episodes: int, workdir: Path, arms: tuple[dict, ...] = ARMS) -> dict[str, dict]:
    """Run the sweep once; per arm: the reported losses (as float.hex) and the final successes/episodes."""
    config = workdir / "parity.yaml"
    config.write_text(yaml.safe_dump(experiment(steps, demos, episodes, arms), sort_keys=False))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "anyorder_ray.sweep", "--config", str(config), "--name", "parity",
           f"train.output_dir={workdir}"]  # fmt: skip
    print("[parity] " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, check=False)
    run_dir = workdir / "parity"
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"the sweep failed with exit status {proc.returncode}")
    trial_arm = _trial_arms(run_dir)
    out: dict[str, dict] = {}
    for log in sorted((run_dir / "train").glob("train-*/metrics.jsonl")):
        trial = log.parent.name.removeprefix("train-")
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        losses = [float(r["train/loss"]).hex() for r in records if "train/loss" in r]
        final = [r for r in records if r.get("eval/final")][-1]
        out[trial_arm[trial]] = {
            "losses": losses,
            "steps": int(final["train/step"]),
            "successes": round(float(final["eval/success_rate"]) * float(final["eval/episodes"])),
            "episodes": int(final["eval/episodes"]),
        }
    if set(out) != {arm_key(a) for a in arms}:
        raise SystemExit(f"expected one trial per arm {[arm_key(a) for a in arms]}, found {sorted(out)}")
    return out


def _trial_arms(run_dir: Path) -> dict[str, str]:
    """trial id -> arm key, from the first line of Tune's per-trial ``result.json`` (it names both)."""
    arms = {}
    for result in (run_dir / "tune").glob("*/result.json"):
        first = json.loads(result.read_text().splitlines()[0])
        arms[str(first["trial_id"])] = arm_key(first["config"]["arm"])
    return arms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--record", type=Path, default=None, help="write the reference here instead of comparing")
    ap.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    ap.add_argument("--quick", action="store_true", help="causal only, 10 steps, 8 episodes; no comparison")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args(argv)
    steps, demos, episodes = (10, 64, 8) if args.quick else (args.steps, 1000, 200)
    with tempfile.TemporaryDirectory(prefix="aoray-parity-") as tmp:
        got = run(steps, demos, episodes, Path(tmp), ARMS[:1] if args.quick else ARMS)
    if args.quick:
        for arm, r in got.items():
            print(f"[parity] {arm}: {len(r['losses'])} losses, {r['successes']}/{r['episodes']} successes")
        print(f"RESULT parity_quick_reports {min(len(r['losses']) for r in got.values())}")
        return 0
    if args.record is not None:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        record = {"commit": commit, "steps": steps, "demos": demos, "episodes": episodes, "arms": got}
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(record, indent=1) + "\n")
        print(f"[parity] reference of commit {commit} written to {args.record}")
        return 0
    ref = json.loads(args.reference.read_text())
    if (ref["steps"], ref["demos"], ref["episodes"]) != (steps, demos, episodes):
        raise SystemExit(f"the reference was recorded with steps/demos/episodes {ref['steps']}/{ref['demos']}/"
                         f"{ref['episodes']}, this run uses {steps}/{demos}/{episodes}")  # fmt: skip
    ok_all = True
    lines = []
    for arm, want in ref["arms"].items():
        have = got[arm]
        same_loss = have["losses"] == want["losses"]
        same_success = (have["successes"], have["episodes"]) == (want["successes"], want["episodes"])
        ok_all &= same_loss and same_success
        first_diff = next((i for i, (a, b) in enumerate(zip(have["losses"], want["losses"], strict=False)) if a != b),
                          None)  # fmt: skip
        print(
            f"[parity] {arm}: {len(have['losses'])} losses {'bit-identical' if same_loss else 'DIFFER'}"
            + (
                ""
                if first_diff is None
                else f" (first at report {first_diff}: "
                f"{float.fromhex(have['losses'][first_diff])} vs {float.fromhex(want['losses'][first_diff])})"
            )
            + f"; success {have['successes']}/{have['episodes']} vs reference {want['successes']}/{want['episodes']}"
        )
        name = arm.replace("=", "_").replace(",", "_").replace(".", "")
        lines += [f"RESULT parity_loss_identical_{name} {int(same_loss)} target ==1",
                  f"RESULT parity_success_identical_{name} {int(same_success)} target ==1"]  # fmt: skip
    print(f"[parity] reference from commit {ref['commit']}: {'IDENTICAL' if ok_all else 'CHANGED'}")
    print("\n".join(lines))
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
