"""Every Ray worker of a sweep finds its own cluster by address, whatever other Ray runs on the machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import ray
from helpers import free_port, free_side_port_flags, stop_process_group, wait_for
from ray._private import ray_constants
from ray.experimental import internal_kv


@ray.remote(num_cpus=0)
def _address_seen_by_a_worker() -> tuple[str | None, str]:
    import os

    from ray._private.services import canonicalize_bootstrap_address_or_die

    # What Ray's state API (and so Ray Train's placement-group cleaner) resolves "no address given" to in a worker.
    return os.environ.get("RAY_ADDRESS"), canonicalize_bootstrap_address_or_die(None)


@pytest.mark.slow
def test_a_worker_resolves_the_cluster_it_belongs_to(ray_local):
    """The session's Ray keeps its address file in its own temp dir, so Ray's lookup without RAY_ADDRESS finds
    ``/tmp/ray``'s latest cluster or none: the setup hook must have pinned RAY_ADDRESS to this one's GCS."""
    own = ray.get_runtime_context().gcs_address
    pinned, resolved = ray.get(_address_seen_by_a_worker.remote())
    assert pinned == own and resolved == own


@ray.remote(num_cpus=0)
def _liveness_seen_by_a_worker(actor_id: str) -> bool | str:
    from ray.train.v2._internal.state.util import is_actor_alive
    from ray.util.state.exception import RayStateApiException

    # The question Ray Train's placement-group cleaner asks every second (it runs in a worker of the same job, so with
    # the same runtime env); "unknown" is what it keeps waiting on, a falsy answer makes it remove the trial's group.
    try:
        return bool(is_actor_alive(actor_id, timeout=30))
    except RayStateApiException:
        return "unknown"


@ray.remote(num_cpus=0)
class _Live:
    def actor_id(self) -> str:
        return ray.get_runtime_context().get_actor_id()


@pytest.mark.slow
def test_a_worker_never_asks_another_rays_dashboard_whether_its_actors_live(ray_local, tmp_path):
    """Another Ray on this machine with its dashboard at the address the session's Ray wrote for its own (Ray writes
    the default ``127.0.0.1:8265`` even without a dashboard, where a sweep's dashboard usually listens): asked about
    a live actor of the session's Ray, a worker's state API must not answer "dead" from the other cluster. Without
    ``WITHOUT_DASHBOARD`` the other Ray answers "no such actor" and this fails."""
    written = internal_kv._internal_kv_get(
        ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD
    )
    port = int(written.decode().rsplit(":", 1)[1]) or free_port()  # port 0: nothing can listen there; any port then
    temp_dir = Path("/tmp") / f"aoray-other-{os.getpid()}"  # short: Ray's socket paths have a length limit
    # Without token auth, as a sweep's own Ray may run (the job-submit test's does): its dashboard answers anyone.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_USAGE_STATS_ENABLED": "0",
                                                                          "RAY_AUTH_MODE": "disabled"}  # fmt: skip
    ray_bin = Path(sys.executable).with_name("ray")
    with (tmp_path / "other.log").open("w") as log:
        other = subprocess.Popen(
            [str(ray_bin), "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=0",
             "--object-store-memory=80000000", f"--temp-dir={temp_dir}", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={port}", *free_side_port_flags()],  # fmt: skip
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:

        def other_dashboard_answers() -> bool:
            assert other.poll() is None, (tmp_path / "other.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v0/actors", timeout=30) as reply:
                    return reply.status == 200
            except urllib.error.HTTPError as refused:
                raise AssertionError(f"the other Ray's dashboard refused the probe: {refused}") from refused
            except OSError:
                return False

        wait_for(other_dashboard_answers, "the other Ray's dashboard", poll_s=1.0)
        live = _Live.remote()
        actor_id = ray.get(live.actor_id.remote())
        assert ray.get(_liveness_seen_by_a_worker.remote(actor_id)) in (True, "unknown")
    finally:
        stop_process_group(other, grace_s=120)
        shutil.rmtree(temp_dir, ignore_errors=True)
