"""Helpers shared by the tests: a BabyAI world config, expert trajectories and the world tokenizer through the
environment registry (as the library reaches them), and the fault-injection hook for training workers."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import ray
import ray.cloudpickle

from anyorder_ray.data.tokenization import build_world_tokenizer
from envs import EnvConfig, Trajectory, collect_expert_trajectories, make_world, world_vocabulary

HANG_GUARD_S = 1800
"""The one time limit of the tests: a guard against a hang, far above what any test takes on a slow or loaded machine
(the whole suite runs in well under this on 2 busy cores), so no verdict depends on how fast the machine is."""

# Ray workers cannot import this module (tests/ is not a package on their path): ship it by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def results_script(*parts: str) -> ModuleType:
    """The analysis script ``docs/results/<parts...>`` imported as a module (such scripts are not in a package)."""
    path = Path(__file__).resolve().parents[1].joinpath("docs", "results", *parts)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def babyai(level: str = "BabyAI-GoToRedBallGrey-v0", **kwargs) -> EnvConfig:
    return EnvConfig(world="babyai", level=level, **kwargs)


def expert_trajectories(level: str, seeds: Iterable[int], **env_kwargs) -> list[Trajectory]:
    """Successful expert trajectories of ``level`` for ``seeds`` (failed episodes dropped)."""
    trajectories, _ = collect_expert_trajectories(make_world(babyai(level, **env_kwargs)), seeds)
    return trajectories


def world_tokenizer(env: EnvConfig | None = None):
    """The word-level tokenizer of ``env``'s world (BabyAI by default)."""
    return build_world_tokenizer(world_vocabulary(env or babyai()))


FAULT_FIGURES_ENV = "AORAY_FAULT_FIGURES"
"""When set (``bench/fault_figures.py`` sets it), the fault-injection tests append what they measured to this file."""


def record_fault(fault: str, acknowledged: int, available: int, steps_repeated: int | None) -> None:
    """One line of the fault figures: trajectories acknowledged before the fault, those of them available after the
    recovery (equal when nothing was lost), and training steps done again after the restart (None: no training)."""
    path = os.environ.get(FAULT_FIGURES_ENV)
    if not path:
        return
    import json

    record = {"fault": fault, "acknowledged": acknowledged, "available": available, "steps_repeated": steps_repeated}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


@dataclass(frozen=True)
class KillOnce:
    """Fault injection: SIGKILL the worker process of ``rank`` once, right after step ``step`` (pass it as the train
    loop's ``after_step``).

    ``marker`` is a file created just before the kill; the restarted worker group finds it and goes on. It
    simulates a crashed training worker from inside, at a chosen step.
    """

    step: int
    marker: str
    rank: int = 0

    def __call__(self, step: int, rank: int) -> None:
        if step != self.step or rank != self.rank or os.path.exists(self.marker):
            return
        Path(self.marker).write_text(f"killed pid {os.getpid()} after step {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class KillProcessOnce:
    """Fault injection from inside training: after step ``step`` rank 0 SIGKILLs process ``pid`` (an actor of the
    trial, say) once; ``marker`` records it."""

    pid: int
    step: int
    marker: str

    def __call__(self, step: int, rank: int) -> None:
        if step != self.step or rank != 0 or os.path.exists(self.marker):
            return
        Path(self.marker).write_text(f"killed pid {self.pid} after step {step}\n")
        os.kill(self.pid, signal.SIGKILL)


def free_port() -> int:
    """A TCP port free on loopback now (the OS picks it), for a Ray process started beside the session's."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_side_port_flags() -> list[str]:
    """``ray start --head`` flags that put the head's side services (dashboard agent and its gRPC, runtime-env agent,
    metrics export, Ray client server) on ports free now: another Ray on this machine (the session's ``ray_local``,
    say) holds the defaults, and a head whose dashboard agent cannot bind its port answers "No available agent"."""
    services = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                "metrics-export-port", "ray-client-server-port")  # fmt: skip
    return [f"--{service}={free_port()}" for service in services]


def stop_process_group(leader: subprocess.Popen, grace_s: float) -> None:
    """Stop the process group ``leader`` leads (started with ``start_new_session=True``), e.g. a ``ray start --block``
    head and every process it started, and only those (not ``ray stop``, which stops every Ray of the user on the
    machine): SIGTERM, up to ``grace_s`` for the leader to exit, then SIGKILL for what is left of the group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        leader.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):  # what ignored SIGTERM (or was still starting)
        os.killpg(leader.pid, signal.SIGKILL)


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = HANG_GUARD_S, poll_s: float = 0.1) -> Any:
    """Poll ``condition`` until it returns something truthy, which is returned (the bound is a hang guard, not a
    timing check)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def held_trajectories(buffer: Any) -> list[Trajectory]:
    """Every trajectory a ``TrajectoryBuffer`` actor holds, in buffer order."""
    out: list[Trajectory] = []
    for ref, start, count in ray.get(buffer.snapshot.remote(), timeout=HANG_GUARD_S):
        out += ray.get(ref, timeout=HANG_GUARD_S)[start : start + count]
    return out


def fit_one_worker(loop: dict, out: Path, max_failures: int = 0, callbacks: list | None = None) -> Any:
    """One real TorchTrainer run of ``train_loop_per_worker`` with ``loop`` as its config, on one worker of 1 CPU,
    stored under ``out``, its worker group restarted up to ``max_failures`` times, with Ray Train ``callbacks``;
    returns Ray Train's ``Result`` (a failed run raises ``ray.train.TrainingFailedError``)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from anyorder_ray.roles.train_loop import train_loop_per_worker

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name=out.name,
            storage_path=str(out.parent),
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=callbacks,
        ),
    ).fit()


def fails_before_reporting_for_prefix(config: dict) -> None:
    """A Tune trainable standing in for a sweep's trials (``--tables`` tests): the prefix arm fails before its first
    report, the others report a final evaluation."""
    from ray import tune

    if config["arm"] == "prefix":
        raise RuntimeError("this trial fails before it reports")
    tune.report({"train/step": 3, "eval/success_rate": 0.5, "eval/episodes": 8, "eval/final": 1})


@dataclass(frozen=True)
class WaitForOnPolicyData:
    """Test hook (the train loop's ``after_step``): after step ``step`` rank 0 waits until ``buffer`` (the trial's
    ``TrajectoryBuffer`` actor) holds on-policy trajectories, so that a short dagger run is sure to train on some
    (the wait is a synchronisation, not a measurement: it ends when the data is there, whatever the machine's speed)."""

    buffer: object
    step: int

    def __call__(self, step: int, rank: int) -> None:
        if step == self.step and rank == 0:
            wait_for(lambda: ray.get(self.buffer.stats.remote()).onpolicy, "an on-policy trajectory in the buffer")


@dataclass(frozen=True)
class SlowSteps:
    """Test hook (the train loop's ``after_step``): rank 0 sleeps ``seconds`` after every step, so the rollout actors
    get that far ahead of training (what a trial under ``rollout.sync`` trains on must not depend on it)."""

    seconds: float

    def __call__(self, step: int, rank: int) -> None:
        if rank == 0:
            time.sleep(self.seconds)


@dataclass(frozen=True)
class KillActorOnce:
    """Fault injection from inside training: after step ``step`` rank 0 kills ``actor`` for good
    (``ray.kill(no_restart=True)``: as if its restarts were used up) and waits until its running task ``runs[0]`` has
    failed, so the trainer's next refresh is sure to find it dead."""

    actor: object
    runs: list  # the actor's ``run`` reference, nested in a list so it stays a reference
    step: int

    def __call__(self, step: int, rank: int) -> None:
        if step != self.step or rank != 0:
            return
        ray.kill(self.actor, no_restart=True)
        ready, _ = ray.wait(list(self.runs), timeout=HANG_GUARD_S)
        if not ready:
            raise TimeoutError("the killed actor's run never failed")


@dataclass(frozen=True)
class WaitForRejections:
    """Test hook: after step ``step`` rank 0 waits until the ``PolicyBoard`` counts ``count`` publications rejected
    in a row (a synchronisation, not a measurement)."""

    board: object
    step: int
    count: int

    def __call__(self, step: int, rank: int) -> None:
        if step == self.step and rank == 0:
            wait_for(lambda: ray.get(self.board.rejected_in_a_row.remote())[0] >= self.count,
                     f"the board to count {self.count} rejections in a row")  # fmt: skip


class S3Server:
    """A real S3 API on loopback: moto's standalone server in a subprocess (``moto[server]`` from PyPI).

    ``enforce_auth``: IAM policies are enforced after the first few (setup) requests, so a user with a read-only
    policy really cannot write. ``uri`` builds the storage URI pyarrow (and so Ray) reads; ``env`` holds the
    credentials a process needs (moto accepts any keys when auth is not enforced)."""

    def __init__(self, enforce_auth: bool = False) -> None:
        import socket
        import subprocess
        import time
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = dict(os.environ)
        if enforce_auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "4"  # create bucket, user, policy, key; then IAM is enforced
        code = "import sys; from moto.server import main; sys.exit(main(sys.argv[1:]))"
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, "-H", "127.0.0.1", "-p", str(self.port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        deadline = time.monotonic() + HANG_GUARD_S  # a hang guard, not a timing check
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2)  # noqa: S310 (loopback)
                break
            except OSError:
                assert self.process.poll() is None, "moto_server exited at start"
                assert time.monotonic() < deadline, "moto_server did not answer"
                time.sleep(0.2)

    def client(self, service: str = "s3", **credentials: str):
        import boto3

        keys = {
            "aws_access_key_id": self.env["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": self.env["AWS_SECRET_ACCESS_KEY"],
        }
        keys.update(credentials)
        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1", **keys)

    def uri(self, bucket: str, prefix: str = "") -> str:
        path = f"{bucket}/{prefix}".rstrip("/")
        return f"s3://{path}?endpoint_override=127.0.0.1:{self.port}&scheme=http&region=us-east-1"

    def keys(self, bucket: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=HANG_GUARD_S)
