"""Multi-node runs on this one machine with Ray's own test clusters (issue 15): the smoke sweep on a cluster that an
autoscaler grows and shrinks, and a trial that loses the node its training worker and rollout actor run on.

Both start their own cluster on free ports in a private temp dir and stop only the processes they started (never
``ray stop``, which would stop every Ray process of the user on the machine). The sweep runs as
``python -m anyorder_ray.sweep`` with ``RAY_ADDRESS`` set, as a job on a real cluster would, so this process stays
free of a Ray driver (the session's ``ray_local`` may be connected here). The cluster is read from its GCS directly.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import HANG_GUARD_S, free_port, free_side_port_flags, record_fault, stop_process_group, wait_for

from anyorder_ray.roles.process_setup import WITHOUT_DASHBOARD

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "tune_configs" / "smoke.yaml"
OBJECT_STORE_BYTES = 150 * 1024 * 1024
AUTH_MODE = "disabled"
"""Ray's token authentication, off for every process of these private loopback clusters. Stated explicitly: a local
``ray.init()`` earlier in this process (the session's ``ray_local``) sets ``RAY_AUTH_MODE=token`` here, which
processes started from here would inherit; a driver and a cluster whose modes differ do not work together."""


def _short_temp_dir(tag: str) -> Path:
    """A private Ray temp dir with a short path (Ray's socket paths have a length limit)."""
    path = Path("/tmp") / f"aoray-{tag}-{os.getpid()}"
    path.mkdir(exist_ok=True)
    return path


def _gcs_state(address: str) -> Any:
    """A reader of the cluster's GCS tables (nodes, actors) that needs no driver in this process; it is what
    ``ray.cluster_utils.Cluster.global_state`` is, for a cluster this process did not start itself."""
    from ray._private.state import GlobalState
    from ray._raylet import GcsClientOptions

    state = GlobalState()
    options = GcsClientOptions.create(address, None, allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False)
    state._initialize_global_state(options)
    return state


def _alive_nodes(state: Any) -> dict[str, dict[str, float]]:
    """Node id -> resources of every node the GCS holds alive."""
    return {n["NodeID"]: n["Resources"] for n in state.node_table() if n["Alive"]}


def _registered_nodes(state: Any) -> dict[str, dict[str, float]]:
    """``_alive_nodes``, or an empty dict while the GCS does not answer yet (a cluster starting up)."""
    from ray.exceptions import RaySystemError

    try:
        return _alive_nodes(state)
    except RaySystemError:
        return {}


def _actors(state: Any, class_name: str) -> list[dict[str, Any]]:
    return [a for a in state.actor_table(None).values() if a["ActorClassName"] == class_name]


def _start_sweep(address: str, log: Path, *args: str) -> subprocess.Popen:
    """``python -m anyorder_ray.sweep`` on the cluster at ``address`` (output to ``log``)."""
    env = dict(os.environ)
    env.update(RAY_ADDRESS=address, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE=AUTH_MODE)  # fmt: skip
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "anyorder_ray.sweep", "--config", str(SMOKE), *args],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip


def _finish(proc: subprocess.Popen, log: Path) -> str:
    """Wait for the sweep; its output, checked for exit status 0."""
    try:
        proc.wait(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert proc.returncode == 0, output[-6000:]
    return output


def _result_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "results.csv").open() as f:
        return list(csv.DictReader(f))


def _trial_log(run_dir: Path) -> list[dict[str, Any]]:
    logs = list((run_dir / "train").glob("train-*/metrics.jsonl"))
    if len(logs) != 1:
        return []
    return [json.loads(line) for line in logs[0].read_text().splitlines() if line.strip()]


# -- autoscaling -----------------------------------------------------------------------------------------------

WORKER_TYPE = "small"
WORKER_MARKER = "aoray_small_node"
"""A resource only nodes of ``WORKER_TYPE`` have: the fake provider starts each node with its type's resources."""


def _autoscaling_config(gcs_port: int, idle_timeout_minutes: float) -> dict[str, Any]:
    """A cluster config for Ray's fake multi-node provider: a 1-CPU head, and up to two 3-CPU workers.

    ``ray.cluster_utils.AutoscalingCluster`` builds the same from ``fake_multi_node/example.yaml``, but the Ray
    2.60 wheel does not ship that file (its constructor raises FileNotFoundError), and its ``start`` and
    ``shutdown`` run ``ray stop --force``. So the config is stated here in full, and ``gcs_address`` points the
    provider's nodes at this head instead of port 6379.
    """
    return {
        "cluster_name": "aoray-autoscaling-test",
        "max_workers": 2,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{gcs_port}",
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {
                "resources": {"CPU": 3, WORKER_MARKER: 1, "object_store_memory": OBJECT_STORE_BYTES},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@contextlib.contextmanager
def _autoscaling_head(temp_dir: Path) -> Iterator[str]:
    """A head started as ``AutoscalingCluster.start`` does (``RAY_FAKE_CLUSTER=1 ray start --head
    --autoscaling-config``), blocking, in its own process group; yields its GCS address. The autoscaler it runs
    starts the worker nodes as its own children, so stopping the group at the end stops every node."""
    port = free_port()
    config = temp_dir / "autoscaling.json"
    config.write_text(json.dumps(_autoscaling_config(port, idle_timeout_minutes=0.1)))
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_USAGE_STATS_ENABLED="0",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE=AUTH_MODE)  # fmt: skip
    ray_bin = Path(sys.executable).with_name("ray")
    with (temp_dir / "head.log").open("w") as log:
        head = subprocess.Popen(
            [str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
             f"--autoscaling-config={config}", f"--object-store-memory={OBJECT_STORE_BYTES}",
             f"--temp-dir={temp_dir}", "--include-dashboard=false", "--dashboard-port=0",  # as WITHOUT_DASHBOARD
             *free_side_port_flags()],  # fmt: skip
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop_process_group(head, grace_s=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


WORK_ON_ONE_CPU = ("train.cpus_per_worker=1", "rollout.num_cpus_per_actor=1", "eval.num_cpus_per_actor=1")
"""Every worker of a trial asks for a whole CPU, so none fits beside the trial functions on a 1-CPU head (each
uses 1 thread either way: ``train.torch_threads`` is 1, the eval actor's threads follow its share, rounded)."""

WORK_CLASSES = ("RayTrainWorker", "RolloutWorker", "EvalWorker")
"""Actor classes of a trial that do its work (Ray Train's workers, and ours)."""


@pytest.mark.slow
def test_autoscaler_adds_worker_nodes_for_the_sweep_and_removes_them_when_idle(tmp_path):
    """The head has one CPU, enough for the Tune trial functions (0.01 each) but for none of their workers, so the
    two-arm smoke sweep waits for the fake autoscaler to add nodes of the one worker type; the sweep then
    finishes (exit 0, every row ok) with all its workers on those nodes, and once they are idle the autoscaler
    removes them again until only the head is left.

    The trial functions must sit on the head: Ray Train pins a detached ``AutoscalingCoordinator`` actor (0 CPUs,
    never exits) to the node of the first trainer's controller, which runs beside its trial function. On a head
    without CPUs that lands on a worker node, which then never becomes idle and is never removed.
    """
    with _autoscaling_head(_short_temp_dir("as")) as address:
        state = _gcs_state(address)
        (head,) = wait_for(lambda: _registered_nodes(state), "the head to register")
        log = tmp_path / "sweep.log"
        proc = _start_sweep(address, log, "--name", "autoscale", f"train.output_dir={tmp_path}",
                            "sweep.arms=[{mode: causal}, {mode: any_order, mask_prob: 0.5}]",
                            "sweep.max_concurrent_trials=2", *WORK_ON_ONE_CPU)  # fmt: skip
        workers_seen: dict[str, dict[str, float]] = {}
        most_alive = 0
        while proc.poll() is None:  # watch the cluster while the sweep runs
            alive = _alive_nodes(state)
            workers_seen.update({node: res for node, res in alive.items() if node != head})
            most_alive = max(most_alive, len(alive) - 1)
            time.sleep(1)
        output = _finish(proc, log)
        assert "Waiting for the autoscaler" in output  # 1 CPU at start: the sweep's resource check only warned

        rows = _result_rows(tmp_path / "autoscale")
        assert sorted(r["arm"] for r in rows) == ["any_order@0.5", "causal"]
        assert all(r["status"] == "ok" for r in rows), rows
        # Every trial worked on nodes the autoscaler added: one or two, each of the configured worker type.
        assert 1 <= len(workers_seen) <= 2, workers_seen
        for resources in workers_seen.values():
            assert resources.get(WORKER_MARKER) == 1 and resources.get("CPU") == 3, resources
        placed = {cls: {a["Address"]["NodeID"] for a in _actors(state, cls)} for cls in WORK_CLASSES}
        for cls, nodes in placed.items():
            assert nodes and nodes <= set(workers_seen), (cls, nodes)
        buffers = {a["Address"]["NodeID"] for a in _actors(state, "TrajectoryBuffer")}
        print(f"worker nodes added: {len(workers_seen)}, at most {most_alive} alive at once; buffers on the head: "
              f"{buffers == {head}}")  # fmt: skip

        # Idle for idle_timeout_minutes (6 s): the autoscaler terminates them; the head stays.
        wait_for(lambda: set(_alive_nodes(state)) == {head}, "the idle worker nodes to be removed")
        dead = {n["NodeID"] for n in state.node_table() if not n["Alive"]}
        assert set(workers_seen) <= dead


# -- node loss -------------------------------------------------------------------------------------------------

CHECKPOINT_EVERY = 4
MAX_STEPS = 40


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A ``ray.cluster_utils.Cluster`` with a 1-CPU head on free ports in a private temp dir (no driver here).

    Torn down node by node with ``remove_node``: ``Cluster.shutdown`` would also reset this process's internal-KV
    client, which belongs to the session's ``ray_local`` if another test started it. The head wrote its address to
    Ray's default address file (what ``ray.init()`` without an address joins); it is removed if still ours.
    """
    from ray._common.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", AUTH_MODE)  # the nodes' processes start from here, with this environment
    temp_dir = _short_temp_dir("nl")
    head_args = dict(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES, gcs_server_port=free_port(),
                     dashboard_agent_listen_port=free_port(), **WITHOUT_DASHBOARD,
                     temp_dir=str(temp_dir))  # fmt: skip
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    try:
        yield cluster
    finally:
        for node in list(cluster.worker_nodes):
            cluster.remove_node(node, allow_graceful=False)
        address = cluster.address
        if cluster.head_node is not None:
            cluster.remove_node(cluster.head_node)
        address_file = Path(get_ray_address_file(None))
        if address_file.is_file() and address_file.read_text().strip() == address:
            address_file.unlink()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _add_node(cluster: Any, num_cpus: int) -> Any:
    return cluster.add_node(num_cpus=num_cpus, object_store_memory=OBJECT_STORE_BYTES,
                            temp_dir=cluster.head_node.get_temp_dir_path())  # fmt: skip


def _one(state: Any, class_name: str, *states: str) -> dict[str, Any] | None:
    """The one actor of ``class_name`` (None while there is none, or it is in none of ``states``)."""
    found = _actors(state, class_name)
    assert len(found) <= 1, found
    return found[0] if found and (not states or found[0]["State"] in states) else None


@pytest.mark.slow
def test_a_trial_survives_losing_the_node_of_its_training_worker_and_rollout_actor(cluster, tmp_path):
    """A trial's training worker and rollout actor run on a "victim" node; after the first checkpoint the victim's
    processes are killed (``Cluster.remove_node``, not graceful). The worker group restarts on a spare node and
    resumes from its checkpoint (``resumed_from_step`` > 0 in metrics.jsonl), the rollout actor is restarted on the
    spare node, and the sweep finishes (exit 0, status ok, every step trained).

    Placement without custom resources: the head (1 CPU) holds the trial function, the buffer (0 CPUs; it would
    restart from its journal, tested in test_fault_tolerance.py), the eval actor and Ray Train's controller; the
    rollout actor and the training worker ask for a whole CPU each, so they wait until the victim (2 CPUs) joins, and
    it is the only node they fit on until the spare is added.
    """
    state = cluster.global_state
    head = cluster.head_node.node_id
    run_dir = tmp_path / "nodeloss"
    log = tmp_path / "sweep.log"
    proc = _start_sweep(cluster.address, log, "--name", "nodeloss", f"train.output_dir={tmp_path}",
                        "sweep.arms=[{mode: causal}]", f"train.max_steps={MAX_STEPS}",
                        f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.report_every=2", "train.max_failures=2",
                        "train.cpus_per_worker=1", "rollout.num_cpus_per_actor=1", "rollout.max_restarts=2",
                        "eval.every_steps=20")  # fmt: skip
    try:
        # The trial started on the head: its eval actor runs there, its rollout actor waits for a node with a CPU.
        wait_for(lambda: _one(state, "EvalWorker", "ALIVE") and _one(state, "RolloutWorker"), "the trial's actors")
        assert _one(state, "EvalWorker")["Address"]["NodeID"] == head
        assert _one(state, "RolloutWorker", "ALIVE") is None
        victim = _add_node(cluster, num_cpus=2)
        rollout = wait_for(lambda: _one(state, "RolloutWorker", "ALIVE"), "the rollout actor to start")
        trainer = wait_for(lambda: _one(state, "RayTrainWorker", "ALIVE"), "the training worker to start")
        assert rollout["Address"]["NodeID"] == trainer["Address"]["NodeID"] == victim.node_id
        buffer = _one(state, "TrajectoryBuffer", "ALIVE")
        assert buffer is not None and buffer["Address"]["NodeID"] == head
        spare = _add_node(cluster, num_cpus=2)

        # Reports well past the first checkpoint: Ray Train has registered it by then (the second one too, likely).
        def past_first_checkpoint() -> list[dict[str, Any]]:
            records = _trial_log(run_dir)
            return records if any(r.get("train/step", 0) > 2 * CHECKPOINT_EVERY for r in records) else []

        before = wait_for(past_first_checkpoint, "reports past the first checkpoint")
        assert before[-1]["train/step"] < MAX_STEPS, "the trial ended before the node was lost: raise MAX_STEPS"
        cluster.remove_node(victim, allow_graceful=False)

        restarted: dict[str, Any] | None = None
        while proc.poll() is None:  # the restarted rollout actor, while the trial still runs
            restarted = restarted or _one(state, "RolloutWorker", "ALIVE")
            if restarted and restarted["NumRestarts"] == 0:
                restarted = None
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
    _finish(proc, log)

    (row,) = _result_rows(run_dir)
    assert row["status"] == "ok" and float(row["train_steps"]) == MAX_STEPS, row
    records = _trial_log(run_dir)
    resumed = [r["resumed_from_step"] for r in records if "resumed_from_step" in r]
    assert resumed and resumed[0] >= CHECKPOINT_EVERY, resumed  # from a checkpoint, not from step 0
    assert records[-1]["train/step"] == MAX_STEPS
    # The rollout actor was restarted once, on the spare node (seen alive there, or in its last record: the trial
    # kills it at the end); the training worker group started again there too.
    restarted = restarted or _one(state, "RolloutWorker")
    assert restarted["NumRestarts"] == 1 and restarted["Address"]["NodeID"] == spare.node_id, restarted
    trainers = {a["Address"]["NodeID"] for a in _actors(state, "RayTrainWorker")}
    assert trainers == {victim.node_id, spare.node_id}, trainers
    produced = [r["rollout/produced"] for r in records if "rollout/produced" in r]
    print(f"resumed from step {resumed}; rollout/produced before the loss {before[-1].get('rollout/produced')}, "
          f"after {produced[-1]} (all reports: {produced})")  # fmt: skip
    # No acknowledged trajectory lost: what the buffer had acknowledged before the loss is what it holds at the end,
    # and its journal on the run's storage holds exactly those trajectories.
    acknowledged = before[-1]["rollout/produced"]
    assert records[-1]["rollout/buffer_size"] == acknowledged > 0
    from anyorder_ray.roles.buffer import BufferJournal
    from anyorder_ray.roles.trial import BUFFER_JOURNAL
    from anyorder_ray.storage import Location

    (journal,) = (run_dir / "train").glob(f"train-*/{BUFFER_JOURNAL}")
    journaled = sorted(t.seed for r in BufferJournal(Location.parse(journal)).records() for t in r.trajectories)
    assert journaled == sorted(set(journaled)) and len(journaled) == acknowledged
    steps = [r["train/step"] for r in records if "train/step" in r]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    record_fault("node removed mid-trial", acknowledged, records[-1]["rollout/buffer_size"],
                 steps[restart - 1] - resumed[0])  # fmt: skip
