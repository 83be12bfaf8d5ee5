"""End to end: the smoke sweep through `python -m anyorder_ray.sweep`, and through `ray job submit` on a
real local head started (and stopped) by the test. Bounded in time; run last (marked slow)."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import HANG_GUARD_S, free_port, free_side_port_flags, stop_process_group

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "tune_configs" / "smoke.yaml"
TEXTWORLD_SMOKE = ROOT / "tune_configs" / "textworld_smoke.yaml"
ARMS = {"causal", "prefix", "any_order@0.5"}


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    # This interpreter's directory first: a `ray job submit -- python ...` entrypoint then runs the Python the tests
    # run (as an activated virtualenv would make it), whatever else PATH names.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", **extra)
    return env


def _check_smoke_results(run_dir: Path, arms: set[str] = ARMS) -> None:
    from anyorder_ray.models.llada2_moe import LLaDA2MoeModelLM
    from anyorder_ray.training.checkpoint import load_training_state

    with (run_dir / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["arm"] for r in rows} == arms and len(rows) == len(arms)  # a trial per arm
    for r in rows:
        assert r["status"] == "ok", r
        for key in ("success", "success_low", "success_high", "world_model_nll", "action_nll", "train_tokens"):
            assert math.isfinite(float(r[key])), (key, r)
        assert 0.0 <= float(r["success_low"]) <= float(r["success"]) <= float(r["success_high"]) <= 1.0
        assert float(r["episodes"]) >= 16 and float(r["train_steps"]) == 12
        ckpt = Path(r["checkpoint"])
        model = LLaDA2MoeModelLM.from_pretrained(ckpt)  # HF format, loadable
        assert model.config.num_hidden_layers == 2
        assert load_training_state(ckpt).step == 12
    md = (run_dir / "results.md").read_text()
    assert all(arm in md for arm in arms)
    for png in ("success_vs_step.png", "final_per_arm.png"):
        assert (run_dir / png).stat().st_size > 1000
    events = list((run_dir / "tune").rglob("events.out.tfevents.*"))
    assert len(events) >= len(arms)  # TensorBoard logs per trial


@pytest.mark.slow
def test_smoke_sweep_end_to_end(tmp_path):
    cmd = [sys.executable, "-m", "anyorder_ray.sweep", "--config", str(SMOKE), "--name", "smoke-test",
           "--num-cpus", "2", f"train.output_dir={tmp_path}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run_dir = tmp_path / "smoke-test"
    assert f"[sweep] run directory: {run_dir}" in proc.stdout
    assert "| causal |" in proc.stdout  # the table is printed
    # Restartable actors get plain-value constructor arguments, and Ray Train's preemption watcher (restartable, given
    # its workers' handles) is off: Ray logs no "restart can fail" ERROR line at all.
    assert "has constructor arguments in the object store" not in proc.stdout + proc.stderr
    assert "Reporting training result" not in proc.stdout + proc.stderr  # Ray Train's per-report INFO line is off
    _check_smoke_results(run_dir)


@pytest.mark.slow
def test_smoke_sweep_on_s3_storage_and_resumed_from_its_uri(s3_server):
    """The run folder on a real S3 API (moto's server on loopback): the tables, checkpoints, metrics logs and buffer
    journals land in the bucket and read back from it; ``--resume <uri>`` of the finished run restores it from there."""
    bucket = "sweeps"
    s3_server.client().create_bucket(Bucket=bucket)
    root = s3_server.uri(bucket, "team/runs")
    env = _env(**s3_server.env)
    cmd = [sys.executable, "-m", "anyorder_ray.sweep", "--config", str(SMOKE), "--name", "s3", "--num-cpus", "2",
           f"sweep.storage_path={root}", "sweep.arms=[{mode: any_order, mask_prob: 0.5}]"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run = s3_server.uri(bucket, "team/runs/s3")
    assert f"[sweep] run directory: {run}" in proc.stdout
    assert f"[sweep] results: {s3_server.uri(bucket, 'team/runs/s3/results.md')}" in proc.stdout

    keys = s3_server.keys(bucket)
    body = s3_server.client().get_object(Bucket=bucket, Key="team/runs/s3/results.csv")["Body"].read().decode()
    (row,) = list(csv.DictReader(body.splitlines()))
    assert row["status"] == "ok" and row["arm"] == "any_order@0.5" and float(row["train_steps"]) == 12
    for name in ("experiment.yaml", "environment.jsonl", "results.md", "summary.md", "success_vs_step.png"):
        assert f"team/runs/s3/{name}" in keys
    (trial,) = {k.split("/")[4] for k in keys if k.startswith("team/runs/s3/train/train-")}
    trial_keys = [k for k in keys if k.startswith(f"team/runs/s3/train/{trial}/")]
    assert any(k.endswith("checkpoint_000012/model.safetensors") for k in trial_keys)
    log = s3_server.client().get_object(Bucket=bucket, Key=f"team/runs/s3/train/{trial}/metrics.jsonl")
    steps = [json.loads(line)["train/step"] for line in log["Body"].read().decode().splitlines()]
    assert steps == [4, 8, 12]
    # The fixed regime's 48 demos, acknowledged in batches of 16: three journal files.
    assert len([k for k in trial_keys if "/trajectories/" in k and k.endswith(".pkl")]) == 3
    assert not any("runtime_resources" in k for k in keys)

    resume = [sys.executable, "-m", "anyorder_ray.sweep", "--resume", run, "--num-cpus", "2"]
    again = subprocess.run(resume, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "| any_order@0.5 |" in again.stdout  # the finished trial, restored from the bucket
    log = s3_server.client().get_object(Bucket=bucket, Key=f"team/runs/s3/train/{trial}/metrics.jsonl")
    assert [json.loads(line)["train/step"] for line in log["Body"].read().decode().splitlines()] == steps  # not rerun


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("textworld") is None, reason="textworld is not installed")
def test_textworld_smoke_sweep_end_to_end(tmp_path, request):
    """The whole pipeline on TextWorld, unchanged: rollout actors play generated games with the expert, the trainer
    trains every arm on multi-token commands, the eval actor plays the held-out games with the same scorer and
    reports success and NLLs. The games are generated up front into pytest's cache folder, once (the actors of
    concurrent trials would otherwise generate each missing game side by side; a game is a function of its level,
    split and index, so a cached one is the game the sweep would generate); with pytest's cache plugin off
    (``-p no:cacheprovider``) into the test's own folder."""
    from anyorder_ray.config import load_config
    from envs import evaluation_env, make_world

    cache = getattr(request.config, "cache", None)
    games = cache.mkdir("textworld_smoke_games") if cache is not None else tmp_path / "games"
    env = dataclasses.replace(load_config(TEXTWORLD_SMOKE).env, game_dir=str(games))
    for cfg in (env, evaluation_env(env)):
        world = make_world(cfg, expert=False)
        for seed in range(env.num_games):
            world.reset(seed)  # generates the seed's game unless it is in the cache
    cmd = [sys.executable, "-m", "anyorder_ray.sweep", "--config", str(TEXTWORLD_SMOKE), "--name", "tw",
           "--num-cpus", "2", f"train.output_dir={tmp_path}", f"env.game_dir={games}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with (tmp_path / "tw" / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["arm"] for r in rows} == ARMS and len(rows) == len(ARMS)
    for r in rows:
        assert r["status"] == "ok", r
        for key in ("success", "success_low", "success_high", "world_model_nll", "world_model_nll_per_obs",
                    "action_nll", "train_tokens"):  # fmt: skip
            assert math.isfinite(float(r[key])), (key, r)
        assert float(r["episodes"]) == 8 and float(r["train_steps"]) == 12
        assert float(r["action_nll"]) > 0 and float(r["world_model_nll"]) > 0
    # Nothing but the prepared pools was played: the training games and the held-out games.
    played = sorted((p.parent.name, p.name) for p in games.rglob("game_*.z8"))
    n = env.num_games
    assert played == sorted((split, f"game_{i:06d}.z8") for split in ("heldout", "train") for i in range(n))

    # The finished run played again by `python -m anyorder_ray.evaluate`: in its own world it reproduces the sweep's
    # final evaluation from the checkpoints alone; with env.split=train it plays the training games instead.
    evaluate = [sys.executable, "-m", "anyorder_ray.evaluate", str(tmp_path / "tw"), "--threads", "2"]
    proc = subprocess.run(evaluate, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with (tmp_path / "tw" / "evaluations" / "own-world" / "results.csv").open() as f:
        again = {r["trial"]: r for r in csv.DictReader(f)}
    assert again.keys() == {r["trial"] for r in rows}
    for r in rows:
        a = again[r["trial"]]
        assert (a["status"], a["episodes"], a["success"], a["checkpoint"]) == ("ok", r["episodes"], r["success"],
                                                                               r["checkpoint"]), (a, r)  # fmt: skip
        for key in ("world_model_nll", "action_nll"):
            assert float(a[key]) == pytest.approx(float(r[key]), rel=1e-4), (key, a, r)
    proc = subprocess.run(evaluate + ["env.split=train", "eval.final_episodes=4"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=HANG_GUARD_S)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    folder = tmp_path / "tw" / "evaluations" / "split-train_final_episodes-4"
    with (folder / "results.csv").open() as f:
        on_train = list(csv.DictReader(f))
    assert len(on_train) == len(ARMS) and all(r["status"] == "ok" and float(r["episodes"]) == 4 for r in on_train)
    assert "split: train" in (folder / "evaluation.yaml").read_text()
    with (folder / "episodes.csv").open() as f:
        episodes = list(csv.DictReader(f))
    assert len(episodes) == 4 * len(ARMS) and {e["trial"] for e in episodes} == {r["trial"] for r in rows}
    for r in on_train:  # each trial's episodes add up to its row
        mine = [e for e in episodes if e["trial"] == r["trial"]]
        assert sum(int(e["success"]) for e in mine) / 4 == float(r["success"]) and all(e["actions"] for e in mine)
    assert sorted(p.parent.name for p in games.rglob("game_*.z8")) == sorted(s for s, _ in played)  # no new game


@pytest.mark.slow
def test_smoke_sweep_through_ray_job_submit(tmp_path):
    ray_bin = Path(sys.executable).with_name("ray")
    # Every port of the head is chosen free (free_side_port_flags: another Ray on this machine holds the defaults).
    port, dash = free_port(), free_port()
    temp_dir = Path("/tmp") / f"aoray-head-{os.getpid()}"  # short: Ray's socket paths have a length limit
    # The job's driver inherits the head's environment: its default storage root (instead of ~/anyorder_ray).
    home = tmp_path / "home"
    env = _env(RAY_AUTH_MODE="disabled", ANYORDER_RAY_HOME=str(home))
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         "--object-store-memory=300000000", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--temp-dir={temp_dir}", "--include-dashboard=true", *free_side_port_flags()],  # fmt: skip
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while True:
            probe = subprocess.run([str(ray_bin), "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True, timeout=HANG_GUARD_S)  # fmt: skip
            if probe.returncode == 0:
                break
            assert head.poll() is None, head.stdout.read()
            assert time.time() < deadline, probe.stderr
            time.sleep(2)
        cmd = [str(ray_bin), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--", "python",
               "-m", "anyorder_ray.sweep", "--config", "tune_configs/smoke.yaml", "--name", "job",
               "sweep.arms=[{mode: causal}]"]  # one arm: the job path, not the arms, is under test  # fmt: skip
        # The head's job agent comes up some seconds after the dashboard answers (longer on a busy machine).
        agent_deadline = time.time() + 180
        while True:
            submit = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=ROOT)
            if "No available agent" not in submit.stderr + submit.stdout or time.time() > agent_deadline:
                break
            time.sleep(3)
        assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
        assert "succeeded" in submit.stdout
        assert "has constructor arguments in the object store" not in submit.stdout + submit.stderr
        # The config's relative train.output_dir ("runs") would be inside the job's unpacked working directory,
        # which Ray deletes: the run goes under the home root instead, and the last lines say where.
        run_dir = home / "runs" / "job"
        assert "[sweep] note: running as a Ray job: the job's working directory is deleted" in submit.stdout
        assert f"[sweep] results: {run_dir / 'results.md'}" in submit.stdout
        _check_smoke_results(run_dir, {"causal"})
    finally:
        stop_process_group(head, grace_s=HANG_GUARD_S)  # only the head this test started


@pytest.mark.slow
def test_time_budget_sweep_trains_the_planned_steps_with_the_any_order_levers(tmp_path):
    """``train.time_budget_s``: the step count is planned from the measured rate (whatever it comes to on this
    machine) and the trial trains exactly that many steps; the levers of issue 5 run end to end."""
    arm = "[{mode: action_focus, mask_prob: 0.3, loss_norm: unit, act_weight: 2.0, causal_prob: 0.25}]"
    cmd = [sys.executable, "-m", "anyorder_ray.sweep", "--config", str(SMOKE), "--name", "budget", "--num-cpus", "2",
           f"train.output_dir={tmp_path}", "train.time_budget_s=5", "train.max_steps=100000", f"sweep.arms={arm}",
           "env.obs_encoding=compact", "sweep.seeds=[0, 1]"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "[train] time budget 5 s:" in proc.stdout + proc.stderr
    with (tmp_path / "budget" / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["arm"] for r in rows] == ["action_focus@0.3+q0.25+unit+act2"] * 2
    for r in rows:
        metrics = [json.loads(line) for line in Path(r["checkpoint"]).parent.joinpath("metrics.jsonl")
                   .read_text().splitlines()]  # fmt: skip
        planned = metrics[-1]["train/planned_steps"]
        assert 30 < planned < 100000 and float(r["train_steps"]) == planned  # stopped at its own plan
        assert math.isfinite(metrics[-1]["eval/world_model_nll_per_obs"])
    summary = (tmp_path / "budget" / "summary.md").read_text()
    assert "| action_focus@0.3+q0.25+unit+act2 | 2 |" in summary


@pytest.mark.slow
def test_two_ddp_workers_train_the_moe_model(tmp_path):
    """DDP over 2 gloo workers: an expert that receives no token on one rank still gets a (zero) gradient there,
    so the all-reduce lines up (without it the backward fails on the first step)."""
    cmd = [sys.executable, "-m", "anyorder_ray.sweep", "--config", str(SMOKE), "--name", "ddp2", "--num-cpus", "2",
           f"train.output_dir={tmp_path}", "train.num_workers=2", "train.micro_batch_size=4",
           "train.cpus_per_worker=0.5", "sweep.arms=[{mode: any_order, mask_prob: 0.5}]"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with (tmp_path / "ddp2" / "results.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"] == "ok" and float(row["train_steps"]) == 12


def _trial_log(run_dir: Path) -> list[dict]:
    (log,) = list((run_dir / "train").glob("train-*/metrics.jsonl"))
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.slow
def test_a_compute_budget_trains_and_scores_the_same_on_a_quiet_and_a_loaded_machine(tmp_path):
    """The same config and seed, once alone and once next to a process that keeps a core busy: the same planned
    steps, the same losses at every report and the same final success, to the episode (only speeds differ)."""
    args = ["--config", str(SMOKE), "--num-cpus", "2", f"train.output_dir={tmp_path}", "train.token_budget=9000",
            "train.max_steps=1000", "sweep.arms=[{mode: cut_focus, mask_prob: 0.3, loss_norm: unit}]",
            "eval.concurrent=false"]  # fmt: skip
    logs = {}
    for name in ("quiet", "loaded"):
        burner = None
        if name == "loaded":
            burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            cmd = [sys.executable, "-m", "anyorder_ray.sweep", "--name", name, *args]
            proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=HANG_GUARD_S)
        finally:
            if burner is not None:
                burner.kill()
                burner.wait()
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        # Its one worker prints the plan once, and the driver shows it once (Ray Train's print patch, off, showed
        # every worker line twice).
        lines = (proc.stdout + proc.stderr).splitlines()
        assert len([line for line in lines if "[train] budget 9e+03 tokens:" in line]) == 1
        logs[name] = _trial_log(tmp_path / name)
    quiet, loaded = logs["quiet"], logs["loaded"]
    planned = quiet[-1]["train/planned_steps"]
    assert 5 <= planned < 1000 and quiet[-1]["train/step"] == planned
    deterministic = ("train/step", "train/loss", "train/grad_norm", "train/lr", "train/total_tokens",
                     "train/total_flops", "train/planned_steps")  # fmt: skip
    assert [[r[k] for k in deterministic] for r in loaded] == [[r[k] for k in deterministic] for r in quiet]
    final = ("eval/success_rate", "eval/episodes", "eval/world_model_nll", "eval/action_nll")
    assert [loaded[-1][k] for k in final] == [quiet[-1][k] for k in final]
    assert quiet[-1]["eval/final"] == loaded[-1]["eval/final"] == 1
    # eval.concurrent=false: the trainer waited for its evaluations (every 4 steps) and says how long.
    assert quiet[-1]["train/eval_wait_s"] > 0 and any("eval/success_rate" in r for r in quiet[:-1])
