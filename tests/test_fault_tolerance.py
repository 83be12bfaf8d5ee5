"""Fault tolerance with real failures on a local Ray: a rollout actor, the eval actor and a training worker are
killed mid-run (SIGKILL of their process) and each must come back without losing or repeating anything.

Every test is marked slow and runs under a hard time limit (``_time_limit``), so a hang fails instead of
blocking the suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import HANG_GUARD_S, held_trajectories, record_fault, wait_for

from anyorder_ray.config import ExperimentConfig, load_config
from anyorder_ray.roles.buffer import BufferState
from anyorder_ray.training.recipe import TIMING_METRICS

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "tune_configs" / "smoke.yaml"


def _smoke(*overrides: str) -> ExperimentConfig:
    return load_config(SMOKE, list(overrides))


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    """Raise ``TimeoutError`` in the test if the block runs past ``seconds`` (a hang guard, not a measurement)."""

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"test exceeded its {seconds} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _pid(ray: Any, actor: Any) -> int:
    """The OS process of an actor (``__ray_call__`` runs a function on the actor instance, in its process)."""
    return ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=HANG_GUARD_S)


def test_a_batch_repeating_acknowledged_seeds_is_kept_once():
    """A producer that dies with an ``add`` in flight may have its restarted self redo those seeds first."""
    state = BufferState(capacity=100)
    state.add("a", 8, worker=0, next_seed=8)
    state.add("b", 8, worker=0, next_seed=16)
    assert state.add("b-from-the-dead-process", 8, worker=0, next_seed=16) is True  # producers go on
    state.add("c", 8, worker=1, next_seed=16)  # another worker's progress is its own
    assert [ref for ref, _, _ in state.snapshot()] == ["a", "b", "c"]
    assert (state.stats().repeated, state.stats().produced, state.resume_seed(0)) == (1, 24, 16)


@pytest.mark.slow
def test_killed_rollout_actor_restarts_resumes_and_loses_no_acknowledged_batch(ray_local):
    from anyorder_ray.roles.trial import make_buffer, make_rollout_actor

    ray = ray_local
    cfg = _smoke("data.regime=streaming", "data.buffer_capacity=100000", "rollout.episodes_per_batch=8",
                 "rollout.max_restarts=1")  # fmt: skip
    with _time_limit(HANG_GUARD_S):
        buffer, buffer_name = make_buffer(cfg)
        actor = make_rollout_actor(cfg, 0, buffer_name)  # the trial's options: max_restarts, max_task_retries=-1
        try:
            first_pid = _pid(ray, actor)  # queued before `run`, so it answers
            run = actor.run.remote()  # streaming: runs until the buffer says stop
            wait_for(lambda: ray.get(buffer.stats.remote()).batches >= 3, "three acknowledged batches")

            acknowledged = ray.get(buffer.snapshot.remote(), timeout=HANG_GUARD_S)
            contents = [ray.get(ref, timeout=HANG_GUARD_S) for ref, _, _ in acknowledged]
            os.kill(first_pid, signal.SIGKILL)
            at_kill = ray.get(buffer.stats.remote(), timeout=HANG_GUARD_S)
            resume_at_kill = ray.get(buffer.resume_seed.remote(0), timeout=HANG_GUARD_S)

            # The buffer keeps growing: at most one `add` of the dead process was in flight, so two more
            # batches mean the restarted actor is producing.
            wait_for(lambda: ray.get(buffer.stats.remote()).batches >= at_kill.batches + 2, "the restarted actor")
            ray.get(buffer.stop.remote(), timeout=HANG_GUARD_S)
            report = ray.get(run, timeout=HANG_GUARD_S)  # `run` was retried on the new process and finished there
            second_pid = _pid(ray, actor)
        finally:
            ray.kill(actor, no_restart=True)

        assert second_pid != first_pid  # a new process: the actor was restarted
        # The retried `run` started where the buffer said this worker left off, not at its seed range start.
        first_seed_after_restart = report.next_seed - report.episodes
        assert first_seed_after_restart >= resume_at_kill > cfg.rollout.seed_start
        assert report.trajectories > 0

        # Every batch acknowledged before the kill is still there, resolvable, with the same content.
        for (ref, start, count), before in zip(acknowledged, contents, strict=True):
            assert ray.get(ref, timeout=HANG_GUARD_S) == before
            assert (start, count) == (0, len(before))  # capacity is large: nothing evicted
        now = ray.get(buffer.snapshot.remote(), timeout=HANG_GUARD_S)
        assert now[: len(acknowledged)] == acknowledged  # same references, still held, in the same order
        held = held_trajectories(buffer)
        stats = ray.get(buffer.stats.remote(), timeout=HANG_GUARD_S)
        assert stats.size == len(held) > sum(len(c) for c in contents)
        seeds = [t.seed for t in held]
        assert len(set(seeds)) == len(seeds)  # no seed twice across the whole buffer
        before = {t.seed for batch in contents for t in batch}
        record_fault("rollout actor killed", at_kill.size, len(before & set(seeds)), None)
        # No seed skipped either (the bot solves every episode of this level in this range).
        assert seeds == list(range(cfg.rollout.seed_start, cfg.rollout.seed_start + len(seeds)))
        ray.kill(buffer, no_restart=True)


@pytest.mark.slow
def test_killed_buffer_actor_restarts_with_every_acknowledged_trajectory(ray_local, tmp_path):
    """SIGKILL the buffer while a rollout actor streams into it and a trainer's view reads it: the restarted buffer
    replays its journal (every acknowledged batch, in order), the producer goes on from its resume seed, and the
    trainer's next refresh sees the same trajectories first, then the new ones."""
    from anyorder_ray.roles.train_loop import BufferSource
    from anyorder_ray.roles.trial import make_buffer, make_rollout_actor
    from anyorder_ray.storage import Location

    ray = ray_local
    cfg = _smoke("data.regime=streaming", "data.buffer_capacity=100000", "rollout.episodes_per_batch=8",
                 "rollout.max_restarts=1")  # fmt: skip
    journal = Location.parse(tmp_path / "trajectories")
    with _time_limit(HANG_GUARD_S):
        buffer, buffer_name = make_buffer(cfg, journal)
        actor = make_rollout_actor(cfg, 0, buffer_name)
        try:
            run = actor.run.remote()
            wait_for(lambda: ray.get(buffer.stats.remote()).batches >= 3, "three acknowledged batches")
            view = BufferSource(buffer)
            before = [t.seed for t in held_trajectories(buffer)]
            view.refresh()
            old_pid = _pid(ray, buffer)
            os.kill(old_pid, signal.SIGKILL)
            # Calls retry on the restarted process: it answers once it has replayed the journal.
            replayed = ray.get(buffer.stats.remote(), timeout=HANG_GUARD_S).restored
            new_pid = _pid(ray, buffer)
            at_restart = ray.get(buffer.stats.remote(), timeout=HANG_GUARD_S)
            wait_for(lambda: ray.get(buffer.stats.remote()).batches >= at_restart.batches + 2, "new batches")
            ray.get(buffer.stop.remote(), timeout=HANG_GUARD_S)
            report = ray.get(run, timeout=HANG_GUARD_S)
            size = view.refresh()  # the trainer's view: old references died with the buffer, new ones fetched
        finally:
            ray.kill(actor, no_restart=True)
        after = [t.seed for t in held_trajectories(buffer)]
        files = len(journal.list())
        ray.kill(buffer, no_restart=True)

    record_fault("buffer actor killed (standalone)", len(before), len(set(before) & set(after)), None)
    assert new_pid != old_pid and replayed >= len(before) > 0  # acknowledged before the kill: all back
    assert after[: len(before)] == before  # in the same order, first
    assert len(after) > replayed and after == list(range(after[0], after[0] + len(after)))  # no seed twice or lost
    assert report.next_seed == after[-1] + 1
    assert size == len(after) == view.size
    assert files >= len(after) // cfg.rollout.episodes_per_batch  # one journal file per acknowledged batch


@pytest.mark.slow
def test_training_goes_on_when_the_buffer_actor_dies_mid_trial(ray_local, tmp_path):
    """A real TorchTrainer run on streaming data: the buffer is SIGKILLed after step 10; the trainer's next refresh
    (step 20) reads the restarted buffer, training runs to the end without a worker restart, and everything
    acknowledged before the kill is still held."""
    from helpers import KillProcessOnce

    from anyorder_ray.roles.trial import make_buffer, make_rollout_actor
    from anyorder_ray.storage import Location

    ray = ray_local
    cfg = _smoke("data.regime=streaming", "data.buffer_capacity=100000", "data.min_buffer_size=16",
                 "rollout.episodes_per_batch=8", "train.max_steps=44", "train.report_every=4",
                 "train.checkpoint_every=100", "train.cpus_per_worker=1", "eval.enabled=false")  # fmt: skip
    journal = Location.parse(tmp_path / "trajectories")
    marker = tmp_path / "buffer-killed.marker"
    with _time_limit(HANG_GUARD_S):
        buffer, buffer_name = make_buffer(cfg, journal)
        producer = make_rollout_actor(cfg, 0, buffer_name)
        producers = [producer.run.remote()]
        pid = _pid(ray, buffer)
        result = _train_run(cfg, buffer, producers, tmp_path / "run", kill=KillProcessOnce(pid, 10, str(marker)))
        ray.get(buffer.stop.remote(), timeout=HANG_GUARD_S)
        ray.get(producers, timeout=HANG_GUARD_S)
        ray.kill(producer, no_restart=True)
        replayed = ray.get(buffer.stats.remote(), timeout=HANG_GUARD_S).restored
        new_pid = _pid(ray, buffer)
        held = [t.seed for t in held_trajectories(buffer)]
        ray.kill(buffer, no_restart=True)

    assert marker.exists() and new_pid != pid  # the buffer really died and came back
    assert result.error is None
    log = _log(tmp_path / "run")
    assert [r["train/step"] for r in log] == list(range(4, 45, 4))  # every report, no worker restart
    assert not any("resumed_from_step" in r for r in log)
    produced = [r["rollout/produced"] for r in log]
    assert produced == sorted(produced) and produced[-1] > produced[2] > 0  # the counter survived the restart
    assert held == list(range(len(held))) and len(held) > replayed > 0  # all acknowledged kept, then more
    record_fault("buffer actor killed mid-trial", replayed, len(set(held) & set(range(replayed))), 0)


# -- eval actor ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("max_restarts", [1, 0])
def test_training_goes_on_while_the_eval_actor_dies(ray_local, max_restarts):
    """Kill the eval actor with an evaluation in flight, keep training: with a restart left the evaluation is
    retried on the new process and later ones arrive; without one the failures are counted, never raised."""
    from helpers import expert_trajectories

    from anyorder_ray.data.batching import BatchMaker
    from anyorder_ray.data.encoding import UnitEncoder
    from anyorder_ray.models.factory import build_model, build_tokenizer
    from anyorder_ray.roles.train_loop import EvalClient
    from anyorder_ray.roles.trial import make_evaluator
    from anyorder_ray.training.optim import make_optimizer
    from anyorder_ray.training.recipe import train_step

    ray = ray_local
    cfg = _smoke(f"eval.max_restarts={max_restarts}", "eval.episodes=4", "eval.heldout_trajectories=4")
    torch.set_num_threads(1)
    tokenizer = build_tokenizer(cfg.model, cfg.env)
    model = build_model(cfg.model, tokenizer, seed=0)
    optimizer, scheduler = make_optimizer(model, cfg.train)
    maker = BatchMaker(cfg.data, cfg.masking, UnitEncoder(tokenizer), tokenizer.pad_token_id, seed=0)
    batch = maker.micro_batch(expert_trajectories(cfg.env.level, range(8)))
    steps, kill_at, every = 12, 4, 2

    with _time_limit(HANG_GUARD_S):
        actor = make_evaluator(cfg)  # the trial's options: max_restarts from config, max_task_retries=-1
        client = EvalClient(actor, cfg.eval.episodes)
        first_pid = _pid(ray, actor)
        arrived: list[float] = []
        for step in range(1, steps + 1):
            train_step(model, optimizer, scheduler, [batch], cfg.train.max_grad_norm, torch.device("cpu"))
            if step % every == 0:
                client.submit(model, step)  # never waits: skipped while one is in flight
            if step == kill_at:
                assert client.pending is not None  # submitted just now: in flight
                os.kill(first_pid, signal.SIGKILL)
            latest = client.poll()  # never waits either
            if latest:
                arrived.append(latest["eval/step"])
        assert step == steps  # training ran every step while the actor was dead or restarting
        final = client.final(model, steps, cfg.eval.episodes, timeout=HANG_GUARD_S)

    if max_restarts:
        assert final["eval/step"] == steps  # evaluation after the restart still arrives
        assert client.failures == 0  # the interrupted evaluation was retried, not lost
        assert _pid(ray, actor) != first_pid
    else:
        assert client.failures >= 2  # the interrupted evaluation and the final one, both counted
        # No earlier evaluation stands in for the final one: it is reported as failed (the tables mark the row).
        assert final == {"eval/failed": 1.0} and all(s < kill_at for s in arrived)
    ray.kill(actor, no_restart=True)


# -- training worker -------------------------------------------------------------------------------------------


def test_a_misspelt_train_loop_config_key_is_refused():
    from anyorder_ray.roles.train_loop import LoopSettings

    with pytest.raises(ValueError, match=r"\['metric_log'\].*allowed.*metrics_log"):
        LoopSettings.from_dict({"cfg": _smoke(), "buffer": None, "metric_log": "/tmp/m.jsonl"})


def _train_run(cfg: ExperimentConfig, buffer: Any, producers: list, out: Path, kill: Any | None,
               evaluator: Any = None) -> Any:  # fmt: skip
    """One real TorchTrainer run of ``train_loop_per_worker`` (``cfg.train.num_workers`` gloo workers of
    ``cfg.train.cpus_per_worker`` CPUs), every checkpoint kept."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from anyorder_ray.roles.train_loop import METRICS_LOG, train_loop_per_worker

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg,
            "buffer": buffer,
            "producers": producers,
            "evaluator": evaluator,
            "metrics_log": str(out / METRICS_LOG),
            "after_step": kill,  # test hook: SIGKILL a worker once
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=False, resources_per_worker={"CPU": cfg.train.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=out.name,
            storage_path=str(out.parent),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
    )
    return trainer.fit()


def _log(out: Path) -> list[dict]:
    from anyorder_ray.roles.train_loop import METRICS_LOG

    return [json.loads(line) for line in (out / METRICS_LOG).read_text().splitlines()]


def _checkpoints(out: Path) -> dict[int, Path]:
    """Checkpoint folders of a run by step."""
    from anyorder_ray.training.checkpoint import load_training_state

    folders = [p.parent for p in out.rglob("training_state.pt")]
    by_step = {load_training_state(p).step: p for p in folders}
    assert len(by_step) == len(folders), f"two checkpoints of the same step in {out}"
    return by_step


def _assert_same(a: Any, b: Any, where: str) -> None:
    """Exact equality through nested dicts / lists / tuples of tensors, arrays and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    from anyorder_ray.training.checkpoint import load_training_state

    sa, sb = load_training_state(a), load_training_state(b)
    for part in ("step", "optimizer", "scheduler"):
        _assert_same(getattr(sa, part), getattr(sb, part), f"{a.name} {part}")
    _assert_same(sa.to_dict()["ranks"], sb.to_dict()["ranks"], f"{a.name} ranks")  # RNG streams, data position
    _assert_same(load_file(a / "model.safetensors"), load_file(b / "model.safetensors"), f"{a.name} weights")


@pytest.mark.slow
def test_killed_training_worker_resumes_exactly_from_its_last_checkpoint(ray_local, tmp_path):
    """SIGKILL the training worker after step 10 (last checkpoint: step 6). FailureConfig restarts it from that
    checkpoint, and from there on every report and every later checkpoint equals an uninterrupted run's."""
    from helpers import KillOnce

    from anyorder_ray.roles.trial import make_buffer, make_rollout_actor

    ray = ray_local
    # Fixed data, all of it present before step 0; CPU, one thread: the run is deterministic. Checkpoints at 6
    # and 12 fall mid-way through BatchMaker's pool of 8 pre-bucketed batches, so the pending ones matter.
    cfg = _smoke("data.num_demos=32", "data.min_buffer_size=32", "train.max_steps=18", "train.report_every=3",
                 "train.checkpoint_every=6", "train.cpus_per_worker=1", "train.torch_threads=1",
                 "train.max_failures=1", "eval.enabled=false", "rollout.num_actors=1",
                 "data.bucket_pool_batches=8")  # fmt: skip
    with _time_limit(HANG_GUARD_S):
        buffer, buffer_name = make_buffer(cfg)
        producer = make_rollout_actor(cfg, 0, buffer_name)
        producers = [producer.run.remote()]
        ray.get(producers, timeout=HANG_GUARD_S)  # the fixed budget is full: the producer stopped
        ray.kill(producer, no_restart=True)  # the buffer owns the data; both runs read the same 32 demos

        plain, killed = tmp_path / "plain", tmp_path / "killed"
        marker = tmp_path / "killed.marker"
        plain_result = _train_run(cfg, buffer, producers, plain, kill=None)
        killed_result = _train_run(cfg, buffer, producers, killed, kill=KillOnce(step=10, marker=str(marker)))
        ray.kill(buffer, no_restart=True)

    assert plain_result.error is None and killed_result.error is None
    assert marker.exists()  # the worker really was killed (once)

    plain_log, killed_log = _log(plain), _log(killed)
    assert [r["train/step"] for r in plain_log] == [3, 6, 9, 12, 15, 18]
    # Reports up to 9, the kill after step 10, then the restarted group resumes at the step-6 checkpoint (not
    # at 0: step 3 is not reported again) and reports 9 again, then the rest.
    assert [r.get("train/step", r.get("resumed_from_step")) for r in killed_log] == [3, 6, 9, 6, 9, 12, 15, 18]
    assert killed_log[3] == {"resumed_from_step": 6}
    record_fault("training worker killed", cfg.data.num_demos, cfg.data.num_demos, 10 - 6)  # killed after 10, from 6
    by_step = {r["train/step"]: r for r in plain_log}
    for record in killed_log[:3] + killed_log[4:]:
        expected = by_step[record["train/step"]]
        assert record.keys() == expected.keys()
        for key in record.keys() - TIMING_METRICS:  # everything but wall-clock measurements
            # Loss, LR (the schedule's position), grad norm, token counts: the curve continues, exactly.
            assert record[key] == expected[key], (record["train/step"], key)

    # The restored state was the saved one: the checkpoints the resumed run wrote (12, 18) hold the same weights,
    # optimizer state, LR-schedule position, RNG states, step and data position as the uninterrupted run's.
    plain_ckpts, killed_ckpts = _checkpoints(plain), _checkpoints(killed)
    assert sorted(plain_ckpts) == sorted(killed_ckpts) == [6, 12, 18]
    for step in (6, 12, 18):
        _assert_same_checkpoint(plain_ckpts[step], killed_ckpts[step])
    from anyorder_ray.training.checkpoint import load_training_state

    at_restore = load_training_state(killed_ckpts[6])
    assert at_restore.scheduler["last_epoch"] == 6
    assert len(at_restore.rank(0).pending) == 2  # 8 pooled batches, 6 used: 2 pending
    assert killed_result.checkpoint is not None
    assert load_training_state(Path(killed_result.checkpoint.path)).step == 18
