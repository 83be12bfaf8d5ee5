"""Every Ray worker of a sweep finds its own cluster by address, whatever other Ray runs on the machine."""

from __future__ import annotations

import pytest
import ray


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
