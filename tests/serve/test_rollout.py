"""A rollout from version 1 to version 2 of a model through HTTP, under a steady load, on a full GPU budget.

Two logical GPUs, both taken: one 1-GPU replica of ``fox`` version 1 (tiny-flux) and one of version 2 (the
same with a LoRA fused at load: its images differ). The config is deployed again at each step, as an operator
would: a 5% canary, then 50%, then version 2 alone (version 1's pool removed, version 2 on both GPUs).

What holds:
- no request fails at any step (each answers 200 with a PNG of its size);
- over 200 unpinned requests at the canary step, version 2 answers within 5 points of 5%;
- a request pinned to a version is answered by it, with that version's image (version 2's equals the image
  of an unpinned request of the same body that version 2 answered; version 1's differs);
- a new weight restarts no pool replica (the weights are the router's ``user_config``); at the end version
  1's pool is gone, version 2 on both GPUs;
- ``GET /v1/models`` lists both versions with their shares, and a version that does not exist is a 400.
"""

from __future__ import annotations

import base64
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from ray import serve
from ray.util.state import list_actors

from rayxdit.config import PoolConfig, ServeConfig
from rayxdit.runtime.ray_start import init_ray
from rayxdit.serve.app import APP_NAME
from rayxdit.serve.app import deploy as deploy_config
from tests.helpers import free_port, leave_ray_with_serve
from tests.lora_files import lora_source

pytestmark = pytest.mark.slow
FAST = {"health_check_period_s": 2, "graceful_shutdown_wait_loop_s": 0.5, "graceful_shutdown_timeout_s": 30}


def pools(v1_weight: float | None, v2_weight: float, v2_replicas: int = 1) -> list[PoolConfig]:
    common = dict(
        model="tiny-flux", model_name="fox", parallel="single", accelerator="gpu", cpus_per_rank=0.5
    )
    v2 = PoolConfig(
        name="fox-v2",
        model_version="2",
        traffic_weight=v2_weight,
        loras=[f"{lora_source()}/tiny-flux/ink.safetensors:1.0"],
        deployment_config={**FAST, "num_replicas": v2_replicas},
        **common,
    )
    if v1_weight is None:
        return [v2]
    v1 = PoolConfig(
        name="fox-v1",
        model_version="1",
        traffic_weight=v1_weight,
        deployment_config={**FAST, "num_replicas": 1},
        **common,
    )
    return [v1, v2]


def deploy(v1_weight: float | None, v2_weight: float, v2_replicas: int = 1) -> None:
    """The config deployed as ``rayxdit serve`` and ``serve deploy`` do (Serve's config path)."""
    deploy_config(ServeConfig(pools=pools(v1_weight, v2_weight, v2_replicas), elastic=None), timeout_s=300)


@pytest.fixture(scope="module")
def url():
    init_ray(num_cpus=8, num_gpus=2, logging_level="warning")
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(95, 5)
        yield f"http://127.0.0.1:{port}"
    finally:
        leave_ray_with_serve()


def generate(url: str, body: dict) -> tuple[int, dict]:
    response = requests.post(url + "/v1/images/generations", json=body, timeout=300)
    return response.status_code, response.json()


class Load:
    """Unpinned requests, one after another on each of ``clients`` threads, every answer kept."""

    def __init__(self, url: str, clients: int = 3):
        self.url, self.clients = url, clients
        self.answers: list[tuple[int, str, str]] = []  # status, version, what was wrong
        self.stopping = threading.Event()

    def _client(self, index: int) -> None:
        sent = 0
        while not self.stopping.is_set():
            body = {"model": "fox", "prompt": f"load {index}", "size": "32x32", "steps": 4, "seed": sent}
            try:
                status, answer = generate(self.url, body)
                version = answer.get("rayxdit", {}).get("model_version", "") if status == 200 else ""
                self.answers.append((status, version, "" if status == 200 else str(answer)[:300]))
            except requests.RequestException as error:
                self.answers.append((0, "", repr(error)))
            sent += 1

    def __enter__(self) -> Load:
        self.threads = ThreadPoolExecutor(self.clients)
        for index in range(self.clients):
            self.threads.submit(self._client, index)
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.threads.shutdown(wait=True)


def replica_actors() -> dict[str, set[str]]:
    """The living replica actors of each pool."""
    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
    found: dict[str, set[str]] = {"fox-v1": set(), "fox-v2": set()}
    for actor in actors:
        for pool in found:
            if actor.class_name.endswith(f":{pool}"):
                found[pool].add(actor.actor_id)
    return found


def test_a_canary_then_a_full_rollout_under_load_fails_no_request(url):
    listed = requests.get(url + "/v1/models", timeout=30).json()["data"][0]
    assert [(v["version"], v["traffic_share"], v["pools"]) for v in listed["versions"]] == [
        ("1", 0.95, ["fox-v1"]),
        ("2", 0.05, ["fox-v2"]),
    ]
    status, answer = generate(url, {"model": "fox", "model_version": "3", "prompt": "x", "size": "32x32"})
    assert status == 400 and answer["error"]["param"] == "model_version", answer

    # Pinned requests go to their version; the two versions' images differ, and an unpinned request that
    # version 2 answered has version 2's image.
    body = {"model": "fox", "prompt": "a fox", "size": "32x32", "steps": 4, "seed": 7}
    pinned = {}
    for version in ("1", "2"):
        status, answer = generate(url, {**body, "model_version": version})
        assert status == 200 and answer["rayxdit"]["model_version"] == version, answer
        pinned[version] = base64.b64decode(answer["data"][0]["b64_json"])
    assert pinned["1"] != pinned["2"]

    # The canary: 200 unpinned requests, 4 at a time.
    with ThreadPoolExecutor(4) as clients:
        canary = list(clients.map(lambda i: generate(url, {**body, "prompt": f"canary {i}"}), range(200)))
    assert all(status == 200 for status, _ in canary), [a for s, a in canary if s != 200][:3]
    shares = Counter(answer["rayxdit"]["model_version"] for _, answer in canary)
    assert abs(shares["2"] / 200 - 0.05) <= 0.05, shares
    by_v2 = next(i for i, (_, answer) in enumerate(canary) if answer["rayxdit"]["model_version"] == "2")
    status, pinned_again = generate(url, {**body, "prompt": f"canary {by_v2}", "model_version": "2"})
    assert status == 200
    assert base64.b64decode(pinned_again["data"][0]["b64_json"]) == base64.b64decode(
        canary[by_v2][1]["data"][0]["b64_json"]
    )

    before = replica_actors()
    with Load(url) as load:
        time.sleep(3)
        deploy(50, 50)  # a new weight: no pool replica restarts
        time.sleep(3)
        assert replica_actors() == before
        shares_at_half = Counter(version for _, version, _ in load.answers[-30:])
        deploy(0, 100)  # version 1 takes no more requests
        time.sleep(3)
        assert replica_actors() == before
        # Version 2 alone, on both GPUs: version 1's pool goes. A new pool list is new application args:
        # Serve restarts every replica (its code version hashes the args), rolling.
        deploy(None, 100, v2_replicas=2)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (
            replica_actors()["fox-v1"] or len(replica_actors()["fox-v2"]) < 2
        ):
            time.sleep(1)
        time.sleep(3)
    after = replica_actors()
    failed = [answer for answer in load.answers if answer[0] != 200]
    print(
        f"{len(load.answers)} requests during the rollout; canary {dict(shares)}; at 50%: {dict(shares_at_half)}"
    )
    assert not failed, f"{len(failed)} of {len(load.answers)} failed: {failed[:5]}"
    assert not after["fox-v1"] and len(after["fox-v2"]) == 2, after
    assert "fox-v1" not in serve.status().applications[APP_NAME].deployments
    assert {version for _, version, _ in load.answers[-10:]} == {"2"}
    listed = requests.get(url + "/v1/models", timeout=30).json()["data"][0]
    assert [(v["version"], v["traffic_share"]) for v in listed["versions"]] == [("2", 1.0)]
