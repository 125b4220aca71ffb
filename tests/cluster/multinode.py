"""A real multi-node Ray cluster on this machine serving a rayxdit application, and a steady HTTP load on it.

``ray.cluster_utils.Cluster`` runs real raylets as nodes: a head (the HTTP proxy, as behind a cloud load
balancer that health-checks the proxies) and 2-GPU nodes (logical GPUs) added before the application, which
its replicas take, then spare nodes added after it (where replacements go).
"""

from __future__ import annotations

import base64
import io
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import ray
import requests
from PIL import Image
from ray import serve
from ray._private import ray_constants
from ray.cluster_utils import Cluster
from ray.core.generated import autoscaler_pb2
from ray.util.state import list_actors

from rayxdit.config import PoolConfig, ServeConfig
from rayxdit.serve.app import APP_NAME, build_app
from tests.helpers import free_port, leave_ray_with_serve, stop_ray_cluster

STARTS = 2
"""Tries at starting the cluster. A raylet that has not registered with the GCS 30 s after it started fails
its node's start (a limit hard-coded in Ray's ``node.py``); on a loaded 2-core CI machine one did. The
failed node's processes are orphans then, so a retry starts the whole cluster afresh. So does a head whose
dashboard died as it started (:class:`DashboardDied`)."""
NODE = {"num_cpus": 4, "num_gpus": 2}


def tiny_pool(**deployment_config) -> PoolConfig:
    """The pool these tests serve: tiny-flux on 2 (logical) GPUs of one node, health-checked every 2 s,
    ``deployment_config`` over that."""
    return PoolConfig(
        name="tiny-2",
        model="tiny-flux",
        parallel="ulysses=2",
        accelerator="gpu",
        cpus_per_rank=0.25,
        deployment_config={"num_replicas": 2, "health_check_period_s": 2, **deployment_config},
    )


class DashboardDied(RuntimeError):
    """The head's dashboard process exited as it started. Once in the suite (CI, 2026-12-06) it aborted
    (SIGABRT) before writing a line of its log; Ray logs that and goes on without one, and the state API
    (``list_actors``) then fails after 100 s of retries: a head without a dashboard is started afresh."""


@dataclass
class ServingCluster:
    cluster: Cluster
    nodes: dict[str, ray._private.node.Node]
    """The nodes by test name (A, B, C, ...)."""
    url: str

    def names(self) -> dict[str, str]:
        return {node.node_id: name for name, node in self.nodes.items()}

    def replica_nodes(self, pool: str) -> list[str]:
        """The node (by test name) of each living replica of ``pool``, sorted."""
        names = self.names()
        actors = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
        return sorted(names.get(a.node_id, "head") for a in actors if a.class_name.endswith(f":{pool}"))

    def give_notice(self, name: str, notice_s: float) -> None:
        """A preemption notice for node ``name`` (Ray's drain API with a deadline, as a cloud's spot reclaim
        reaches it through autoscaler v2): no new work goes there and Serve moves its replicas first."""
        accepted, why = ray._raylet.GcsClient(address=self.cluster.address).drain_node(
            self.nodes[name].node_id,
            autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
            "spot notice (test)",
            int((time.time() + notice_s) * 1000),
        )
        assert accepted, why

    def add(self, name: str) -> None:
        self.nodes[name] = self.cluster.add_node(**NODE)
        self.cluster.wait_for_nodes()


def _start(config: ServeConfig, first: list[str], spare: list[str], head: dict) -> ServingCluster:
    # A dashboard port of its own: a dashboard still going from an earlier cluster (a failed start's, another
    # module's) holds Ray's default 8265, and without a dashboard the state API (list_actors) fails.
    head = {"num_cpus": 4, "num_gpus": 0, "dashboard_port": free_port(), **head}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        if ray_constants.PROCESS_TYPE_DASHBOARD not in cluster.head_node.all_processes:
            raise DashboardDied("the head's dashboard did not start (Ray logged why above)")
        nodes = {name: cluster.add_node(**NODE) for name in first}
        ray.init(address=cluster.address, logging_level="warning")
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        for name in spare:
            nodes[name] = cluster.add_node(**NODE)
        cluster.wait_for_nodes()
        _wait_for_state_api()
        return ServingCluster(cluster, nodes, f"http://127.0.0.1:{port}")
    except BaseException:
        stop(cluster)
        raise


def _wait_for_state_api(timeout_s: float = 60) -> None:
    """Until the dashboard has registered in the GCS: the state API (list_actors) answers only then, and
    on a loaded machine the dashboard can come up after Serve's application ("Could not read 'dashboard'
    from GCS", seen once in the suite)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            list_actors(limit=1)
            return
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def stop(cluster: Cluster) -> None:
    """The whole cluster, also a node whose start failed: no graceful Serve shutdown first (it waits on every
    replica)."""
    gcs_port = int(cluster.address.rsplit(":", 1)[1])
    leave_ray_with_serve()
    cluster.shutdown()
    stop_ray_cluster(gcs_port)


@contextmanager
def serving_cluster(
    config: ServeConfig, first: list[str], spare: list[str], head: dict | None = None
) -> Iterator[ServingCluster]:
    """The application on nodes ``first`` (its replicas' places), then ``spare`` nodes added; stopped after.
    ``head``: more of the head's node arguments."""
    for attempt in range(1, STARTS + 1):
        try:
            started = _start(config, first, spare, head or {})
            break
        except Exception as error:
            if attempt == STARTS or not (
                isinstance(error, DashboardDied) or "timed out during startup" in str(error)
            ):
                raise
            warnings.warn(f"the cluster did not start ({error}); starting it afresh", stacklevel=1)
    try:
        yield started
    finally:
        stop(started.cluster)


@dataclass
class Load:
    """``clients`` threads each sending one image request after another, every answer kept."""

    url: str
    clients: int = 3
    tag: str = "load"
    answers: list[tuple[float, float, int, str]] = field(default_factory=list)
    """(began, ended, HTTP status or 0, what was wrong: empty when a PNG of the asked size came)."""
    stopping: threading.Event = field(default_factory=threading.Event)

    def _client(self, index: int) -> None:
        sent = 0
        while not self.stopping.is_set():
            size = ("64x64", "48x40")[sent % 2]
            body = {"prompt": f"{self.tag} {index}", "size": size, "steps": 10, "seed": 100 * index + sent}
            began = time.monotonic()
            try:
                response = requests.post(self.url + "/v1/images/generations", json=body, timeout=120)
                status, wrong = response.status_code, ""
                if status == 200:
                    png = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
                    if png.format != "PNG" or "x".join(map(str, png.size)) != size:
                        wrong = f"{png.format} {png.size}"
                else:
                    wrong = response.text[:300]
            except requests.RequestException as error:
                status, wrong = 0, repr(error)
            self.answers.append((began, time.monotonic(), status, wrong))
            sent += 1

    @contextmanager
    def running(self) -> Iterator[Load]:
        with ThreadPoolExecutor(self.clients) as threads:
            for index in range(self.clients):
                threads.submit(self._client, index)
            try:
                yield self
            finally:
                self.stopping.set()

    def lost(self, since: float = 0.0) -> list[tuple[float, float, int, str]]:
        """Answers that were not a PNG of the asked size (times relative to ``since``)."""
        return [
            (round(b - since, 1), round(e - since, 1), s, w) for b, e, s, w in self.answers if s != 200 or w
        ]
