"""The sweep CLI on bad input (clear error, exit 2, nothing written) and `--resume` after the driver is killed.

The fast tests call `sweep.main` in-process: every failure they provoke happens before Ray starts. The slow ones
run the CLI in a subprocess with its own Ray temp folder and a marker in its environment, so every Ray process
it started (raylet, GCS, workers) can be found and stopped by id afterwards, never other people's.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import HANG_GUARD_S, fails_before_reporting_for_prefix, record_fault

from anyorder_ray import sweep
from anyorder_ray.config import load_config

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "tune_configs" / "smoke.yaml"
ARMS = {"causal", "prefix", "any_order@0.5"}


def _smoke_args(out: Path, *overrides: str) -> list[str]:
    return ["--config", str(SMOKE), "--name", "run", f"train.output_dir={out}", *overrides]


# ----------------------------------------------------------------------------------------- bad input, fast


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("env.level=GoToRedBal", ["env.level", "unknown BabyAI level 'GoToRedBal'", "BabyAI-GoToRedBall-v0"]),
        ("env.level=BabyAI-Nowhere-v0", ["env.level", "unknown BabyAI level 'BabyAI-Nowhere-v0'"]),
        ("env.obs_encoding=pixels", ["env.obs_encoding 'pixels' is unknown; allowed: grid"]),
        ("train.mx_steps=3", ["unknown key train.mx_steps (did you mean 'max_steps'?)"]),
        ("masking.mask_prob=0", ["mask_prob must be in (0, 1]"]),
        ("masking.mode=sideways", ["mode 'sideways' is unknown"]),
        ("train.lr=fast", ["train.lr = 'fast' has the wrong type; expected float"]),
    ],
)
def test_config_errors_exit_2_before_anything_is_written(tmp_path, capsys, override, expected):
    out = tmp_path / "runs"
    assert sweep.main(_smoke_args(out, override)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    for fragment in expected:
        assert fragment in err, err
    assert not out.exists()  # no half-created run directory (nor its parent)


def test_options_may_come_between_the_overrides():
    args = sweep.parse_args(["train.output_dir=/x", "--name", "n", "sweep.seeds=[1]", "--num-cpus", "2", "a.b=c"])
    assert (args.name, args.num_cpus) == ("n", 2)
    assert args.overrides == ["train.output_dir=/x", "sweep.seeds=[1]", "a.b=c"]


def test_missing_config_file_is_named(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert sweep.main(["--config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"cannot read config file {missing}" in err
    assert list(tmp_path.iterdir()) == []


def test_an_existing_run_directory_is_left_alone(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.csv").write_text("keep me\n")
    assert sweep.main(_smoke_args(tmp_path)) == 2
    assert "already exists: pick another --name, or --resume it" in capsys.readouterr().err
    assert [p.name for p in run_dir.iterdir()] == ["results.csv"]
    assert (run_dir / "results.csv").read_text() == "keep me\n"


def test_resume_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    assert sweep.main(["--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--resume {tmp_path}: no experiment.yaml there, so it is not a sweep run directory" in err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_resume_of_a_run_stopped_before_tune_started(tmp_path, capsys):
    shutil.copy(SMOKE, tmp_path / sweep.RUN_CONFIG_FILE)
    assert sweep.main(["--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no Tune experiment state" in err and f"--config {tmp_path / sweep.RUN_CONFIG_FILE}" in err
    assert [p.name for p in tmp_path.iterdir()] == [sweep.RUN_CONFIG_FILE]


def test_resume_refuses_a_tune_state_cut_off_mid_write(tmp_path, capsys):
    """A driver killed while Tune copied its search-algorithm state leaves an empty file (seen in CI): restoring it
    starts a sweep without its trials and writes tables that silently lack them. --resume refuses, naming it."""
    shutil.copy(SMOKE, tmp_path / sweep.RUN_CONFIG_FILE)
    tune_dir = tmp_path / "tune"
    tune_dir.mkdir()
    (tune_dir / "tuner.pkl").write_bytes(b"x")  # what Tuner.can_restore looks for
    (tune_dir / "experiment_state-2026-12-02_11-05-39.json").write_text(json.dumps({"trial_data": []}))
    (tune_dir / "basic-variant-state-2026-12-02_11-05-39.json").write_bytes(b"")
    assert sweep.damaged_tune_state(tune_dir) == ["basic-variant-state-2026-12-02_11-05-39.json"]
    before = sorted(p.name for p in tune_dir.iterdir())
    assert sweep.main(["--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "basic-variant-state-2026-12-02_11-05-39.json" in err and "empty or unreadable" in err
    assert f"--config {tmp_path / sweep.RUN_CONFIG_FILE} --name" in err
    assert sorted(p.name for p in tune_dir.iterdir()) == before  # nothing touched


def test_a_sweep_table_missing_a_trial_of_the_grid_is_named():
    cfg = load_config(SMOKE)
    labels = [arm.label() for arm in cfg.arms()]
    rows = [{"arm": label, "seed": seed} for label in labels for seed in cfg.sweep.seeds]
    assert sweep.missing_trials(rows, cfg) == []
    assert sweep.missing_trials(rows[1:], cfg) == [f"{rows[0]['arm']} seed {rows[0]['seed']}"]


def test_resume_takes_no_overrides_or_other_config(tmp_path, capsys):
    shutil.copy(SMOKE, tmp_path / sweep.RUN_CONFIG_FILE)
    assert sweep.main(["--resume", str(tmp_path), "train.max_steps=3"]) == 2
    assert "it takes no train.max_steps=3" in capsys.readouterr().err
    assert sweep.main(["--resume", str(tmp_path), "--config", str(SMOKE)]) == 2
    assert "it takes no --config" in capsys.readouterr().err


def test_tables_reads_a_run_only_and_names_what_is_missing(tmp_path, capsys):
    """``--tables`` takes a run folder alone; a folder that is not a run, or a run whose Tune state does not exist
    yet, is refused (exit 2) and nothing is written."""
    assert sweep.main(["--tables", str(tmp_path), "--num-cpus", "2", "train.max_steps=3"]) == 2
    assert "--tables only reads a run; it takes no --num-cpus, train.max_steps=3" in capsys.readouterr().err
    assert sweep.main(["--tables", str(tmp_path)]) == 2
    assert f"--tables {tmp_path}: no experiment.yaml there" in capsys.readouterr().err
    shutil.copy(SMOKE, tmp_path / sweep.RUN_CONFIG_FILE)
    assert sweep.main(["--tables", str(tmp_path)]) == 2
    assert "experiment_state" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == [sweep.RUN_CONFIG_FILE]


def test_resource_problems_name_the_keys_to_lower():
    cfg = load_config(SMOKE, ["train.num_workers=4", "train.global_batch_size=32"])
    (cpu,) = sweep.resource_problems(cfg, have_cpus=2, have_gpus=0)
    assert "one trial needs 2.41 CPUs but the cluster has 2" in cpu
    assert "train.num_workers x train.cpus_per_worker = 4 x 0.5 = 2" in cpu
    assert "rollout.num_actors x rollout.num_cpus_per_actor = 1 x 0.2 = 0.2" in cpu
    assert "sweep.trial_cpus = 0.01" in cpu
    assert sweep.resource_problems(cfg, have_cpus=2.41, have_gpus=0) == []

    gpu_cfg = cfg.replace(train=dataclasses.replace(cfg.train, use_gpu=True, num_workers=2, global_batch_size=16))
    (gpu,) = sweep.resource_problems(gpu_cfg, have_cpus=8, have_gpus=1)
    assert "one trial needs 2 GPU(s) (train.use_gpu=True with train.num_workers=2" in gpu
    assert "but the cluster has 1" in gpu and "set train.use_gpu=false, lower train.num_workers" in gpu
    assert sweep.resource_problems(gpu_cfg, have_cpus=8, have_gpus=2) == []
    # Eval actors' GPU shares count too.
    eval_gpu = gpu_cfg.replace(eval=dataclasses.replace(gpu_cfg.eval, num_gpus_per_actor=0.5))
    (problem,) = sweep.resource_problems(eval_gpu, have_cpus=8, have_gpus=2)
    assert "needs 2.5 GPU(s)" in problem and "eval.enabled x eval.num_gpus_per_actor = 0.5" in problem


# ----------------------------------------------------------------------------------- subprocess helpers


@dataclasses.dataclass
class _RayScope:
    """Environment for one CLI subprocess: an isolated Ray temp folder and a marker every child inherits."""

    env: dict[str, str]
    temp_dir: Path
    tag: str

    def leftover_pids(self) -> list[int]:
        """Processes (ours, still alive) whose environment or command line carries this scope's marker."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                environ = (proc / "environ").read_bytes()
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:  # gone, or not ours
                continue
            if self.tag.encode() in environ or str(self.temp_dir).encode() in cmdline:
                pids.append(int(proc.name))
        return pids

    def kill_leftovers(self) -> list[int]:
        """SIGKILL what is left of the Ray this scope's CLI started (by pid); returns the pids it killed."""
        pids = self.leftover_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids


@pytest.fixture
def ray_scope() -> Iterator[_RayScope]:
    tag = uuid.uuid4().hex[:12]
    temp_dir = Path("/tmp") / f"aoray-cli-{tag}"  # short: Ray's socket paths have a length limit
    temp_dir.mkdir()
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", RAY_TMPDIR=str(temp_dir), AORAY_TEST_SCOPE=tag)
    scope = _RayScope(env, temp_dir, tag)
    try:
        yield scope
    finally:
        scope.kill_leftovers()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _journals(run_dir: Path) -> dict[str, list[tuple[int, int | None, list[int]]]]:
    """Each trial's buffer journal as (worker, next seed, the trajectories' seeds) records, in order."""
    from anyorder_ray.roles.buffer import BufferJournal
    from anyorder_ray.roles.trial import BUFFER_JOURNAL
    from anyorder_ray.storage import Location

    return {
        folder.name: [
            (r.worker, r.next_seed, [t.seed for t in r.trajectories])
            for r in BufferJournal(Location.parse(folder / BUFFER_JOURNAL)).records()
        ]  # fmt: skip
        for folder in sorted((run_dir / "train").glob("train-*"))
    }


def _has_reported(run_dir: Path, trial: str) -> bool:
    log = run_dir / "train" / f"train-{trial}" / "metrics.jsonl"
    return log.exists() and '"train/step"' in log.read_text()


def _trajectories(records: list[tuple[int, int | None, list[int]]]) -> int:
    return sum(len(seeds) for _, _, seeds in records)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "anyorder_ray.sweep", "--num-cpus", "2", *args]


def _run(cmd: list[str], scope: _RayScope, timeout: float) -> subprocess.CompletedProcess:
    """Run the CLI in its own process group; on timeout kill the whole group and fail."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=scope.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# ------------------------------------------------------------------------------- resources, slow (Ray)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.num_workers=4", "train.global_batch_size=32"],
         ["one trial needs 2.41 CPUs but the cluster has 2", "train.num_workers x train.cpus_per_worker = 4 x 0.5"]),
        (["train.use_gpu=true"], ["one trial needs 1 GPU(s) (train.use_gpu=True with train.num_workers=1",
                                  "cluster has 0"]),
    ],
    ids=["cpu", "gpu"],
)  # fmt: skip
def test_a_trial_bigger_than_the_local_cluster_fails_fast(tmp_path, ray_scope, overrides, expected):
    out = tmp_path / "runs"
    proc = _run(_cli(*_smoke_args(out, *overrides)), ray_scope, timeout=HANG_GUARD_S)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    for fragment in expected:
        assert fragment in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()  # refused before the run directory was created


_STOP_THE_FIRST_RAYLET = """
import os, signal, threading, time
import psutil
import ray
from anyorder_ray.sweep import init_ray

stopped = []

def stop_the_first_raylet():
    while not stopped:
        for child in psutil.Process().children(recursive=True):
            try:
                if os.path.basename(child.cmdline()[0]) == "raylet":
                    child.send_signal(signal.SIGSTOP)
                    stopped.append(child.pid)
                    return
            except (psutil.Error, IndexError):
                pass
        time.sleep(0.05)

threading.Thread(target=stop_the_first_raylet, daemon=True).start()
init_ray(2)
gone = not psutil.pid_exists(stopped[0]) or psutil.Process(stopped[0]).status() == psutil.STATUS_ZOMBIE
print("CPUS", ray.cluster_resources()["CPU"], "STOPPED_RAYLET_GONE", gone, flush=True)
ray.shutdown()
"""


@pytest.mark.slow
def test_a_local_ray_whose_raylet_never_registers_is_stopped_and_started_again(ray_scope):
    """The first raylet the sweep's ``init_ray`` starts is frozen (SIGSTOP) as soon as it exists, as a busy machine
    may delay it: Ray gives up after its fixed 30 s, and the sweep stops what that start left running (the frozen
    raylet among it) and starts a local Ray again, which comes up with the asked-for CPUs."""
    proc = _run([sys.executable, "-c", _STOP_THE_FIRST_RAYLET], ray_scope, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CPUS 2.0 STOPPED_RAYLET_GONE True" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the local Ray did not start" in proc.stderr and "starting it again (2 of 3)" in proc.stderr


@pytest.mark.slow
def test_tables_labels_a_trial_that_failed_before_reporting_with_its_own_arm(tmp_path, ray_local, capsys):
    """Tune's ``ResultGrid`` gives a trial that never reported no config; ``--tables`` takes it from the experiment
    state, so the failed trial's row is its own arm, not the defaults' (``any_order@0.5``, a real arm here)."""
    from ray import tune
    from ray.tune import ExperimentAnalysis, ResultGrid

    shutil.copy(SMOKE, tmp_path / sweep.RUN_CONFIG_FILE)
    cfg = load_config(SMOKE)
    tune.Tuner(
        fails_before_reporting_for_prefix,
        param_space={"arm": tune.grid_search([arm.label() for arm in cfg.arms()]), "seed": tune.grid_search([0])},
        run_config=tune.RunConfig(name="tune", storage_path=str(tmp_path), verbose=0),
    ).fit()
    read_back = ResultGrid(ExperimentAnalysis(str(tmp_path / "tune")))  # what --tables reads
    assert sum(1 for result in read_back if result.config is None) == 1  # what made the defaults' arm appear

    assert sweep.main(["--tables", str(tmp_path)]) == 0
    with (tmp_path / "results.csv").open() as f:
        rows = {r["arm"]: r["status"] for r in csv.DictReader(f)}
    assert rows == {"causal": "ok", "prefix": "error", "any_order@0.5": "ok"}
    assert "not started" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------- --resume, slow


def _trial_states(tune_dir: Path) -> dict[str, str]:
    """trial id -> status from Tune's newest experiment state snapshot ({} until there is one)."""
    # One snapshot file per driver session, named by its start time; a resumed session copies the old one
    # back too (so modification times do not tell them apart), the names do.
    snapshots = sorted(tune_dir.glob("experiment_state-*.json"))
    if not snapshots:
        return {}
    try:
        state = json.loads(snapshots[-1].read_text())
    except (OSError, json.JSONDecodeError):  # caught mid-rewrite
        return {}
    trials = (json.loads(trial_json) for trial_json, _ in state["trial_data"])
    return {t["trial_id"]: t["status"] for t in trials}


def _trial_dir(tune_dir: Path, trial_id: str) -> Path:
    (path,) = [p for p in tune_dir.iterdir() if p.is_dir() and trial_id in p.name]
    return path


# Two arms, one trial at a time: the driver is killed once the first finished and the second trained a little, so
# the resume has one finished trial to leave alone and one to finish.
RESUME_ARMS = {"causal", "prefix"}
RESUME_ARMS_OVERRIDE = "sweep.arms=[{mode: causal}, {mode: prefix}]"


def _reported_final(result_json: bytes) -> bool:
    """Whether a trial's ``result.json`` (one JSON object per report) ends with the final evaluation."""
    lines = result_json.decode().strip().splitlines()
    return bool(lines) and bool(json.loads(lines[-1]).get("eval/final"))


@pytest.mark.slow
def test_resume_after_the_driver_is_killed_finishes_only_the_unfinished_trials(tmp_path, ray_scope):
    out = tmp_path / "runs"
    run_dir, tune_dir = out / "run", out / "run" / "tune"
    log = (tmp_path / "first.log").open("w")
    driver = subprocess.Popen(
        _cli(*_smoke_args(out, "sweep.max_concurrent_trials=1", RESUME_ARMS_OVERRIDE)), cwd=ROOT, env=ray_scope.env,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        # Wait for one trial finished (as Tune's state on disk records it) and the next one training: it reported,
        # so its buffer has acknowledged data and it is mid-way through its steps when the driver dies.
        deadline = time.monotonic() + HANG_GUARD_S  # a hang guard, not a timing check
        while True:
            states = _trial_states(tune_dir)
            done = [t for t, s in states.items() if s == "TERMINATED"]
            running = [t for t, s in states.items() if s == "RUNNING"]
            if done and any(_has_reported(run_dir, t) for t in running):
                break
            assert "ERROR" not in states.values(), (tmp_path / "first.log").read_text()[-4000:]
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.monotonic() < deadline, (states, (tmp_path / "first.log").read_text()[-4000:])
            time.sleep(0.2)
        # One finished trial, or two when the second finished before its first report was seen.
        finished = {t: (_trial_dir(tune_dir, t) / "result.json").read_bytes() for t in done}
        assert all(_reported_final(result) for result in finished.values())
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything in its process group
        driver.wait(timeout=HANG_GUARD_S)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        log.close()
    # The killed driver's local Ray is gone (or is stopped here): the resumed run starts a fresh one.
    ray_scope.kill_leftovers()
    assert sorted(_trial_states(tune_dir).values()) != ["TERMINATED"] * len(RESUME_ARMS)  # really interrupted
    acknowledged = _journals(run_dir)  # what every trial's buffer had acknowledged when it died

    # --tables of the interrupted run (no Ray): the finished trials with their final results, an unfinished one that
    # reported marked partial; --resume below rewrites the tables.
    tables = _run([sys.executable, "-m", "anyorder_ray.sweep", "--tables", str(run_dir)], ray_scope, HANG_GUARD_S)
    assert tables.returncode == 0, tables.stdout[-4000:] + tables.stderr[-4000:]
    with (run_dir / "results.csv").open() as f:
        interrupted = {r["trial"]: r for r in csv.DictReader(f)}
    assert set(interrupted) >= set(finished)
    for trial, row in interrupted.items():
        assert row["arm"] in RESUME_ARMS, row  # no row for a trial still pending (Tune gives it no config)
        done_before = trial in finished
        assert row["status"] == ("ok" if done_before else "partial"), row
        assert done_before or ("partial (no final evaluation yet" in tables.stdout and row["arm"] in tables.stdout)

    damaged = sweep.damaged_tune_state(tune_dir)
    proc = _run(_cli("--resume", str(run_dir)), ray_scope, timeout=HANG_GUARD_S)
    if damaged:  # the kill landed while Tune copied its state files (a race no test can schedule)
        assert proc.returncode == 2 and damaged[0] in proc.stderr, proc.stdout[-4000:] + proc.stderr[-4000:]
        pytest.skip(f"the kill cut off Tune's {damaged}: --resume refused it; the resume itself did not run this time")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"[sweep] run directory: {run_dir}" in proc.stdout

    with (run_dir / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["arm"] for r in rows) == sorted(RESUME_ARMS)  # one row per arm, none duplicated
    assert all(r["status"] == "ok" and float(r["train_steps"]) == 12 for r in rows), rows
    states = _trial_states(tune_dir)
    assert len(states) == len(RESUME_ARMS) and set(states.values()) == {"TERMINATED"}
    # Every trajectory acknowledged before the kill is kept: a rerun trial's buffer replayed its journal (the same
    # records first) and its producer went on from the resume seed, so each trial holds exactly its 48 demos.
    after = _journals(run_dir)
    for trial, records in acknowledged.items():
        assert after[trial][: len(records)] == records, trial
    for trial, records in acknowledged.items():  # the rerun trial's reports say how many its buffer restored
        if records and trial.removeprefix("train-") not in finished:
            log = [json.loads(line) for line in (run_dir / "train" / trial / "metrics.jsonl").read_text().splitlines()]
            assert log[-1]["rollout/restored"] == _trajectories(records), trial
            # Reported steps done again: from the step it resumed at (0 without a checkpoint) to the last one
            # reported before the kill.
            steps = [r["train/step"] for r in log if "train/step" in r]
            restart = next((i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]), None)
            resumed_from = next((r["resumed_from_step"] for r in log if "resumed_from_step" in r), 0)
            repeated = steps[restart - 1] - resumed_from if restart is not None else 0
            kept = _trajectories(after[trial][: len(records)])
            record_fault("driver killed, sweep --resumed", _trajectories(records), kept, repeated)
    assert [_trajectories(records) for records in after.values()] == [48] * len(RESUME_ARMS)
    # The trials that had finished were not run again: their reported results are byte for byte the same.
    for trial, result in finished.items():
        assert (_trial_dir(tune_dir, trial) / "result.json").read_bytes() == result
    for trial in set(states) - set(finished):
        assert _reported_final((_trial_dir(tune_dir, trial) / "result.json").read_bytes())
    # What each start was made with: the first run's record and the resume's, in that order.
    records = [json.loads(line) for line in (run_dir / "environment.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records] == ["start", "resume"]
