"""One real two-node Ray cluster for the whole test session (started by the first test that
asks for it, shut down at the end): a head with 2 CPUs and a second node with 1 CPU and a
``side`` resource, on this machine (``ray.cluster_utils.Cluster``). Sharing it keeps the Ray
tests inside CI's time on a 2-core machine (a start costs 20-50 s there)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any


def two_node_cluster() -> Iterator[Any]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import cluster_utils

    from mlbridge._backends import ray as ray_backend

    c = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False},
    )
    try:
        c.side = c.add_node(num_cpus=1, resources={"side": 1})
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False, namespace="mlbridge")
        ray_backend.configure(c.address)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
