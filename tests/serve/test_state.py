"""The application's shared state as plain objects (the Serve deployment wraps this class unchanged)."""

from __future__ import annotations

import pytest

from rayxdit.config import PoolConfig, RouterConfig, ServeConfig
from rayxdit.serve import state as state_module
from rayxdit.serve.state import AppState, ImageStore

POOLS = [
    PoolConfig(name="small", model="m", model_name="m", parallel="ulysses=2", route_min_cost=0),
    PoolConfig(
        name="big",
        model="m",
        model_name="m",
        parallel="ulysses=4",
        route_min_cost=100,
        deployment_config={"autoscaling_config": {"min_replicas": 0}},
    ),
]


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(state_module.time, "monotonic", lambda: now[0])
    return now


def test_images_expire_and_the_oldest_go_first_beyond_the_byte_budget(clock):
    store = ImageStore(ttl_s=10, max_bytes=10)
    first, second = store.put(b"aaaa"), store.put(b"bbbb")
    assert store.get(first) == b"aaaa" and store.bytes == 8
    third = store.put(b"cccc")  # 12 bytes > 10: the oldest goes
    assert store.get(first) is None and store.get(second) == b"bbbb" and store.get(third) == b"cccc"
    assert store.put(b"x" * 11) is None  # larger than the whole budget
    clock[0] += 11
    assert store.get(second) is None and store.bytes == 0


def test_load_is_shared_admitted_at_once_and_recovers_from_lost_routers(clock):
    app = AppState(ServeConfig(pools=POOLS, router=RouterConfig()))
    app.report("small", "replica-a", ready=True)
    # Two routers, one request each: the second sees the first's reservation and goes elsewhere.
    assert app.route("m", 1.0, "r1", hold_s=60, exclude=[]) == "small"
    assert app.loads()["small"].outstanding == 1
    assert app.route("m", 1.0, "r2", hold_s=60, exclude=[]) == "small"  # nothing is free: preference
    assert app.route("m", 1.0, "r3", hold_s=60, exclude=["small"]) == "big"
    assert app.route("m", 1.0, "r4", hold_s=60, exclude=["small", "big"]) is None
    app.finish("r1")
    assert app.loads()["small"].outstanding == 1
    clock[0] += 61  # r2's router died without finishing it: the reservation expires
    assert app.loads()["small"].outstanding == 0
    clock[0] += state_module.STALE_AFTER_S  # the replica stopped reporting: gone
    assert app.loads()["small"].ready_replicas == 0


def test_readiness_needs_a_ready_replica_unless_every_pool_scales_from_zero(clock):
    app = AppState(ServeConfig(pools=POOLS))
    assert app.readiness()["ready"] is False
    app.report("small", "replica-a", ready=False)  # up, but its worker group is being rebuilt
    assert app.readiness()["ready"] is False
    app.report("small", "replica-a", ready=True)
    assert app.readiness() == {
        "ready": True,
        "models": {"m": True},
        "pools": {
            "small": {"ready_replicas": 1, "outstanding": 0},
            "big": {"ready_replicas": 0, "outstanding": 0},
        },
    }
    cold = AppState(ServeConfig(pools=[POOLS[1]]))
    assert cold.readiness()["ready"] is True  # its only pool starts at zero: the first request starts it
