"""A node whose GPUs keep failing is taken out of service, on a real multi-node cluster under load.

Nodes A and B (2 logical GPUs each) run one replica each of a 2-rank tiny-flux pool; C is spare. From some
point on, every rank process on B is killed as soon as it exists (a GPU failing every request, and every
rebuild on it). With ``quarantine.failures: 2``:

- no request is lost: every one answers 200 with a PNG of its size (the failing replica's requests are
  routed again, never run on B again);
- B is drained, its replica exits, and the replacement runs on C (and none on B);
- ``rayxdit quarantine list`` names B, its GPUs and why; the gauges show B out of service;
- ``rayxdit quarantine return B`` forgets it; B, its Ray restarted, takes work again: with C gone, the
  replacement of C's replica runs there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from rayxdit.cli import serve_replicas_on
from rayxdit.config import QuarantineConfig, ServeConfig
from tests.cluster.multinode import Load, ServingCluster, serving_cluster, tiny_pool

pytestmark = pytest.mark.slow
POOL = tiny_pool(graceful_shutdown_timeout_s=5)
CONFIG = ServeConfig(pools=[POOL], elastic=None, quarantine=QuarantineConfig(failures=2, window_s=300))


@pytest.fixture(scope="module")
def cluster():
    fast_metrics = {"_system_config": {"metrics_report_interval_ms": 1000}}
    with serving_cluster(CONFIG, first=["A", "B"], spare=["C"], head=fast_metrics) as started:
        yield started


def rank_processes(node) -> list[psutil.Process]:
    """The rank processes on ``node``: children of its fork server (``rayxdit.runtime.forked``)."""
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    ranks = []
    for process in raylet.children(recursive=True):
        try:
            if "rayxdit.runtime.forked" in " ".join(process.parent().cmdline()):
                ranks.append(process)
        except psutil.Error:
            continue
    return ranks


def failing_gpus(node, stop: threading.Event, killed: list[int]) -> None:
    """Kill every rank process on ``node`` as soon as it exists, until ``stop``."""
    while not stop.is_set():
        for process in rank_processes(node):
            try:
                process.kill()
                killed.append(process.pid)
            except psutil.Error:
                pass
        stop.wait(0.2)


def rayxdit_quarantine(cluster: ServingCluster, *args: str) -> str:
    """``rayxdit quarantine ARGS`` against the cluster, as an operator runs it; its output."""
    command = [sys.executable, "-m", "rayxdit.cli", "quarantine", *args, "--address", cluster.cluster.address]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def scrape(cluster: ServingCluster) -> dict[tuple[str, frozenset], float]:
    """Every node's Prometheus endpoint, rayxdit's samples summed over nodes."""
    samples: dict[tuple[str, frozenset], float] = {}
    for node in [cluster.cluster.head_node, *cluster.cluster.worker_nodes]:
        try:
            text = requests.get(f"http://127.0.0.1:{node.metrics_export_port}/metrics", timeout=10).text
        except requests.RequestException:
            continue
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if "rayxdit_" in sample.name:
                    key = (sample.name, frozenset(sample.labels.items()))
                    samples[key] = samples.get(key, 0.0) + sample.value
    return samples


def quarantine_gauges(cluster: ServingCluster, node: str) -> dict[tuple[str, str], float]:
    """The quarantine's gauges once both are exported (else empty): (name, node label) -> value."""
    gauges = {
        (name, dict(labels).get("node", "")): value
        for (name, labels), value in scrape(cluster).items()
        if name in ("ray_rayxdit_node_quarantined", "ray_rayxdit_quarantined_nodes")
    }
    both = ("ray_rayxdit_node_quarantined", node) in gauges and (
        "ray_rayxdit_quarantined_nodes",
        "",
    ) in gauges
    return gauges if both else {}


def wait_for(what, timeout_s: float, every_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(every_s)
    return what()


def test_a_node_failing_every_request_leaves_service_loses_nothing_and_comes_back(cluster):
    assert cluster.replica_nodes(POOL.name) == ["A", "B"]
    b = cluster.nodes["B"].node_id
    assert "no node is out of service" in rayxdit_quarantine(cluster, "list")
    assert serve_replicas_on(b) >= 1  # what `list` counts on a drained node: B's pool replica, at least
    stop_failing, killed = threading.Event(), []
    failing = threading.Thread(target=failing_gpus, args=(cluster.nodes["B"], stop_failing, killed))
    with Load(cluster.url, tag="quarantine").running() as load:
        time.sleep(2)
        began = time.monotonic()
        failing.start()
        try:
            listed = wait_for(lambda: json.loads(rayxdit_quarantine(cluster, "list", "--json")), 90)
            assert [record["node"] for record in listed] == [b], listed
            quarantined_after = time.monotonic() - began
            moved = wait_for(lambda: cluster.replica_nodes(POOL.name) == ["A", "C"], 120)
            assert moved, cluster.replica_nodes(POOL.name)
            # The state's gauges (its counters may have gone with its process: the drain moved it if on B).
            gauges_while_out = wait_for(lambda: quarantine_gauges(cluster, b), 30)
            time.sleep(2)
        finally:
            stop_failing.set()
            failing.join()
        moved_after = time.monotonic() - began
        # Serve moves every replica off the drained node (the router's and the state's too, if there); as an
        # operator does, wait for `list` to show none left before restarting B's Ray (it would fail theirs).
        left_b = wait_for(
            lambda: json.loads(rayxdit_quarantine(cluster, "list", "--json"))[0]["replicas"] == 0, 120, 2.0
        )
        assert left_b, rayxdit_quarantine(cluster, "list")
        # B returned: Ray cannot undrain, so its Ray restarts (as an operator would, the GPU reset).
        returned = rayxdit_quarantine(cluster, "return", b)
        assert "returned" in returned and "restart Ray on it" in returned, returned
        assert "no node is out of service" in rayxdit_quarantine(cluster, "list")
        cluster.cluster.remove_node(cluster.nodes.pop("B"))
        cluster.add("B")  # B again, its Ray restarted
        # C reclaimed with notice (as a spot node is), so only B is free: Serve moves C's replicas (the pool's
        # onto B; a router's, if there, anywhere) before it goes. Killed without notice, a router replica on
        # it would fail its requests in flight (a documented 5xx), which is not what this test is about.
        c = cluster.nodes["C"].node_id
        cluster.give_notice("C", 120)
        assert wait_for(lambda: serve_replicas_on(c) == 0, 120), "Serve left replicas on the reclaimed node"
        cluster.cluster.remove_node(cluster.nodes.pop("C"), allow_graceful=False)
        back = wait_for(lambda: cluster.replica_nodes(POOL.name) == ["A", "B"], 120)
        assert back, cluster.replica_nodes(POOL.name)
        time.sleep(2)

    record = listed[0]
    print(
        f"{len(load.answers)} requests; {len(killed)} ranks killed on B; out of service after "
        f"{quarantined_after:.1f} s, replica on C after {moved_after:.1f} s: {record['reason']}"
    )
    assert killed, "no rank was ever killed on B: the fault never happened"
    assert record["drained"] and record["alive"] and record["pools"] == [POOL.name]
    assert len(record["gpus"]) == 2 and record["reason"].startswith("2 group failures"), record
    lost = load.lost(began)
    assert not lost, (
        f"{len(lost)} of {len(load.answers)} requests lost (began, ended after the fault): {lost}"
    )
    assert sum(b >= began for b, *_ in load.answers) >= 10, "too little load while B failed"
    assert gauges_while_out[("ray_rayxdit_node_quarantined", b)] == 1, gauges_while_out
    assert gauges_while_out[("ray_rayxdit_quarantined_nodes", "")] == 1, gauges_while_out
