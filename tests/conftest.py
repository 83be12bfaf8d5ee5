"""Shared fixtures: a small, isolated local Ray for the tests that need one; slow tests run last."""

from __future__ import annotations

import os
import tempfile

import pytest

# Before any Ray import in this process: no usage stats, no token auth for the local test cluster.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Before torch is imported: OpenMP threads sleep at barriers instead of spinning, which on a 2-core machine shared
# with another busy process keeps a 2-thread step from running 40-100x slower (anyorder_ray.roles.trial.local_env_vars).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Ray then uses loopback as the node address: every Ray process of the tests binds and talks on 127.0.0.1 only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# A Ray process whose GCS does not answer for this long exits (Ray's default: 60 s). On 2 cores shared with another
# busy process, the session's GCS once went unanswered for 60 s while alive, and the core worker then ended the pytest
# process itself, mid-suite and with no summary. Every Ray process of the tests (and of the sweeps they start)
# inherits this; a GCS that really died still fails the test, through HANG_GUARD_S at the latest.
os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", "600")


def pytest_collection_modifyitems(config, items):
    # Quick unit tests first, slow end-to-end ones last (stable order inside each group).
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small tensors gain nothing from a second intra-op thread, and on a shared 2-core machine threads that
    spin-wait for a busy core make small ops many times slower. Restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs and a 256 MiB object store, in its own temp dir; shut down at the end."""
    import ray

    from anyorder_ray.roles.process_setup import SETUP_HOOK, WITHOUT_DASHBOARD

    if ray.is_initialized():
        yield ray
        return
    tmp = tempfile.mkdtemp(prefix="aoray-test-")
    ray.init(
        address="local",  # a new instance, never one an earlier `ray start` left running
        num_cpus=2,
        object_store_memory=256 * 1024 * 1024,
        **WITHOUT_DASHBOARD,  # its dashboard address is one nothing listens on, never another Ray's
        _temp_dir=tmp,
        log_to_driver=False,
        # Each worker pins RAY_ADDRESS to this cluster: Ray Train's placement-group cleaner otherwise asks the Ray
        # started last on the machine (a sweep's) whether this trial's controller lives (roles.process_setup).
        runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}, "worker_process_setup_hook": SETUP_HOOK},
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server) on loopback for the whole session; stopped at the end."""
    from helpers import S3Server

    server = S3Server()
    try:
        yield server
    finally:
        server.stop()
