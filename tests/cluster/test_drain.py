"""A node drained mid-load through Ray's drain API, as a spot notice drains it, on a real multi-node cluster.

``ray.cluster_utils.Cluster`` runs real raylets as nodes on this machine: a head (the HTTP proxy, as behind a
cloud load balancer that health-checks the proxies) and 2-GPU nodes A and B (logical GPUs), one replica of a
2-rank tiny-flux pool on each, and a spare node C (the capacity a replacement starts on). Under a steady load
B gets a preemption notice with a 30 s deadline (``GcsClient.drain_node``, the call autoscaler v2 and the
cloud launchers make), and is killed at the deadline.

What holds (Serve's own migration of replicas off draining nodes, and the router's re-routing):
- no request is lost: every one answers 200 with a PNG of its size, also those running when the notice came
  and when the node died;
- the replica on B keeps serving until its replacement on C runs, or until the node's deadline less the
  pool's ``graceful_shutdown_timeout_s`` (what its longest request needs to finish), whichever comes first:
  till then the pool has two replicas taking traffic. (With the default, the pool's ``request_timeout_s``,
  longer than any notice, Serve stops B's replica at the notice and the pool serves on one until C's is up.)
- the replacement runs on C, and none on B.
"""

from __future__ import annotations

import time

import pytest
from ray import serve

from rayxdit.config import ServeConfig
from rayxdit.serve.app import APP_NAME
from tests.cluster.multinode import Load, serving_cluster, tiny_pool

pytestmark = pytest.mark.slow
NOTICE_S = 30
"""The preemption notice: GCP gives 30 s, AWS 120 s."""
GRACE_S = 8
"""The pool's ``graceful_shutdown_timeout_s``."""
POOL = tiny_pool(
    # Its longest request takes a few seconds here: a draining replica may serve until this long before the
    # node goes (Serve stops it then, or as soon as its replacement runs).
    graceful_shutdown_timeout_s=GRACE_S,
    graceful_shutdown_wait_loop_s=0.5,
)


def serving_replicas() -> int:
    """Replicas taking traffic: running, or running on a draining node until their replacement is up."""
    states = serve.status().applications[APP_NAME].deployments[POOL.name].replica_states
    return states.get("RUNNING", 0) + states.get("PENDING_MIGRATION", 0)


@pytest.fixture(scope="module")
def cluster():
    with serving_cluster(ServeConfig(pools=[POOL], elastic=None), first=["A", "B"], spare=["C"]) as started:
        yield started


def test_a_node_drained_on_notice_loses_no_request_and_its_replica_moves_first(cluster):
    assert cluster.replica_nodes(POOL.name) == ["A", "B"]
    serving: list[tuple[float, int]] = []  # seconds after the notice, replicas taking traffic
    with Load(cluster.url, tag="spot").running() as load:
        time.sleep(3)
        notice = time.monotonic()
        cluster.give_notice("B", NOTICE_S)
        while time.monotonic() < notice + NOTICE_S:
            serving.append((time.monotonic() - notice, serving_replicas()))
            time.sleep(0.5)
        cluster.cluster.remove_node(cluster.nodes["B"], allow_graceful=False)  # preempted at the deadline
        killed = time.monotonic()
        time.sleep(3)

    answers = load.answers
    print(f"{len(answers)} requests, {sum(notice <= b < killed for b, *_ in answers)} sent during the notice")
    lost = load.lost(notice)
    assert not lost, f"{len(lost)} of {len(answers)} requests lost (began, ended after the notice): {lost}"
    assert sum(notice <= began < killed for began, *_ in answers) >= 10, "too little load during the notice"
    assert any(began < notice < ended for began, ended, *_ in answers), "nothing was in flight at the notice"
    # Until its replacement runs, or until it must stop to finish its request before the node goes (a
    # second of slack: Serve's control loop), B's replica serves: two replicas throughout.
    serving = [(round(at, 1), n) for at, n in serving]
    before_stop = [(at, n) for at, n in serving if at < NOTICE_S - GRACE_S - 1]
    assert min(n for _, n in before_stop) >= 2, f"fewer than two replicas served before B's stop: {serving}"
    assert cluster.replica_nodes(POOL.name) == ["A", "C"]


def test_the_clusters_own_actors_live_on_the_head_not_on_gpu_nodes(cluster):
    """The compile-artifact store (detached, asked for first from a GPU node), the state and the routers: an
    actor keeps its node busy for Ray's autoscaler, so none may hold a GPU node that could otherwise go."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from ray.util.state import get_actor

    from rayxdit.runtime.compile_artifacts import artifact_store

    @ray.remote(num_cpus=0)
    def ask() -> str:
        return artifact_store()._actor_id.hex()

    @ray.remote(num_cpus=3)
    class Busy:  # the head over half used: Ray's default placement looks beyond it then
        def ready(self) -> bool:
            return True

    head = ray.get_runtime_context().get_node_id()  # this driver's: the head's
    busy = Busy.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
    ray.get(busy.ready.remote(), timeout=60)
    on_a = NodeAffinitySchedulingStrategy(cluster.nodes["A"].node_id, soft=False)
    try:
        store = ray.get(ask.options(scheduling_strategy=on_a).remote(), timeout=60)
    finally:
        ray.kill(busy)
    deadline = time.monotonic() + 60
    while (actor := get_actor(store)) is None or actor.state != "ALIVE":
        assert time.monotonic() < deadline, f"the store never came up: {actor}"
        time.sleep(0.5)
    assert cluster.names().get(actor.node_id, "head") == "head"
    assert cluster.replica_nodes("state") == ["head"]  # Serve spread it onto node B before
    assert set(cluster.replica_nodes("router")) == {"head"}
