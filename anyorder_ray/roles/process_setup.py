"""What every Ray worker process of a sweep runs first (the job's ``worker_process_setup_hook``): kept to the standard
library and the already-imported ``ray``, since every worker pays for it at start-up."""

from __future__ import annotations

import os

SETUP_HOOK = "anyorder_ray.roles.process_setup.pin_ray_address"
"""The hook's import path, as ``runtime_env["worker_process_setup_hook"]`` takes it."""

WITHOUT_DASHBOARD = {"include_dashboard": False, "dashboard_port": 0}
"""``ray.init`` arguments for a local Ray without a dashboard (the tests', the benches').

Ray's state API finds a cluster's dashboard through the address the cluster wrote at start-up, and a cluster without
a dashboard still writes one: the default ``127.0.0.1:8265``. Another Ray's dashboard on this machine (a sweep's)
usually listens there, so Ray Train's placement-group cleaner, asking whether this cluster's trial controller lives,
got "no such actor" from the other cluster and removed the placement group of a healthy trial. Port 0 is an address
nothing listens on: the state API fails as "unavailable", which the cleaner takes as "unknown" and keeps waiting.
"""


def pin_ray_address() -> None:
    """Set ``RAY_ADDRESS`` to the GCS of the cluster this worker belongs to.

    Code in a worker that finds "its" cluster by address (Ray's state API, used by Ray Train's placement-group cleaner
    to ask whether the trial's controller is alive) otherwise looks in ``/tmp/ray/ray_current_cluster``: the cluster
    started last on the machine, not necessarily this one. With two Rays on one machine (two local sweeps, or a sweep
    beside the tests' own Ray) a cleaner then asked the other cluster, did not find its controller there, took it for
    dead and removed the placement group of a healthy trial, whose training workers died with it.
    """
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
