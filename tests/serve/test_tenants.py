"""Tenant limits: the pure decision, the shared state that counts for every router replica, and the
configuration of keys and tenants (over HTTP: tests/serve/test_serve.py)."""

from __future__ import annotations

import hashlib
import time

import pytest
from pydantic import ValidationError

from rayxdit.config import PoolConfig, RouterConfig, ServeConfig, TenantLimits
from rayxdit.serve import state as state_module
from rayxdit.serve.state import AppState
from rayxdit.serve.tenants import QUOTA_WINDOW_S, RATE_WINDOW_S, limit_refusal
from tests.serve.test_state import Sync


def test_each_limit_refuses_with_its_code_and_the_wait_until_it_would_admit():
    rate = TenantLimits(requests_per_minute=3)
    assert limit_refusal(rate, [10.0, 20.0], 0, [], 30.0) is None
    # Three within the minute: the next is admitted once the oldest of them leaves it (at 70).
    assert limit_refusal(rate, [10.0, 20.0, 25.0], 0, [], 30.0) == ("rate_limited", 40.0)
    assert limit_refusal(rate, [10.0, 20.0, 25.0], 0, [], 70.5) is None  # the first has left the window
    # Older admissions do not count; with five in the window, three must leave: the third oldest decides.
    assert limit_refusal(rate, [0.0, 50.0, 52.0, 54.0, 56.0, 58.0], 0, [], 100.0) == ("rate_limited", 14.0)

    concurrent = TenantLimits(max_concurrent=2)
    assert limit_refusal(concurrent, [], 1, [], 0.0) is None
    assert limit_refusal(concurrent, [], 2, [], 0.0) == ("concurrency_limited", None)

    quota = TenantLimits(gpu_seconds_per_hour=100.0)
    spent = [(0.0, 60.0), (1000.0, 30.0), (2000.0, 20.0)]  # 110 GPU-seconds within the hour at 3000
    # Under the limit again once the first 60 leave the window (at 3600), not before.
    assert limit_refusal(quota, [], 0, spent, 3000.0) == ("quota_exceeded", QUOTA_WINDOW_S - 3000.0)
    assert limit_refusal(quota, [], 0, spent, QUOTA_WINDOW_S + 1) is None
    assert limit_refusal(TenantLimits(), [0.0] * 1000, 1000, [(0.0, 1e9)], 1.0) is None  # no limits


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(state_module.time, "monotonic", lambda: now[0])
    return now


POOL = PoolConfig(name="p", model="m", model_name="m", parallel="ulysses=2", route_min_cost=0)


def app_with(*keys) -> Sync:
    app = Sync(AppState(ServeConfig(pools=[POOL], router=RouterConfig(api_keys=list(keys)))))
    app.report("p", "replica", ready=True)
    return app


def test_the_state_counts_each_tenant_apart_and_a_failover_is_not_counted_again(clock):
    app = app_with(
        {"key": "metered-key", "tenant": "metered", "requests_per_minute": 2},
        "free-key",  # a plain string: a tenant of its own, no limits
    )
    later = time.time() + 600

    def route(ticket: str, tenant: str | None, retry: bool = False) -> dict:
        return app.route("m", 1.0, ticket, later, [], tenant, retry)

    assert route("a#0", "metered")["pool"] == "p"
    app.finish("a#0")
    assert route("a#1", "metered", retry=True)["pool"] == "p"  # the same request failing over: not counted
    app.finish("a#1")
    assert route("b#0", "metered")["pool"] == "p"
    refused = route("c#0", "metered")
    assert refused == {"pool": None, "limited": "rate_limited", "retry_after_s": RATE_WINDOW_S}
    assert route("d#0", "key-other")["pool"] == "p" and route("e#0", None)["pool"] == "p"  # others: unlimited
    clock[0] += RATE_WINDOW_S
    assert route("c#0", "metered")["pool"] == "p"  # the minute has passed


def test_concurrency_counts_requests_in_flight_and_quota_the_gpu_seconds_of_finished_ones(clock):
    app = app_with(
        {"key": "k1-secret", "tenant": "team", "max_concurrent": 2, "gpu_seconds_per_hour": 50},
        {
            "key_sha256": hashlib.sha256(b"k2-secret").hexdigest(),
            "tenant": "team",
            "max_concurrent": 2,
            "gpu_seconds_per_hour": 50,
        },
    )
    later = time.time() + 600
    assert app.route("m", 1.0, "a#0", later, [], "team")["pool"] == "p"
    assert app.route("m", 1.0, "b#0", later, [], "team")["pool"] == "p"
    assert app.route("m", 1.0, "c#0", later, [], "team")["limited"] == "concurrency_limited"
    app.finish("a#0", engine_s=10.0)  # 2 ranks x 10 s
    app.finish("b#0", engine_s=5.0)  # 2 x 5 s: 30 GPU-seconds so far
    assert app.route("m", 1.0, "c#0", later, [], "team")["pool"] == "p"
    app.finish("c#0", engine_s=10.0)  # 50: the hour's quota is used
    refused = app.route("m", 1.0, "d#0", later, [], "team")
    assert refused["limited"] == "quota_exceeded" and refused["retry_after_s"] == QUOTA_WINDOW_S
    # A reservation that lapsed (its router died) no longer counts as in flight.
    app2 = app_with({"key": "k3-secret", "tenant": "solo", "max_concurrent": 1})
    assert app2.route("m", 1.0, "x#0", later, [], "solo")["pool"] == "p"
    assert app2.route("m", 1.0, "y#0", later, [], "solo")["limited"] == "concurrency_limited"
    clock[0] += state_module.LEASE_S + 1
    assert app2.route("m", 1.0, "y#0", later, [], "solo")["pool"] == "p"


def test_keys_name_their_tenant_and_a_tenants_keys_must_agree_on_its_limits():
    router = RouterConfig(
        api_keys=[
            "plain-key",
            {"key": "sk-one", "tenant": "acme", "requests_per_minute": 10},
            {
                "key_sha256": hashlib.sha256(b"sk-two").hexdigest(),
                "tenant": "acme",
                "requests_per_minute": 10,
            },
        ]
    )
    keys = router.keys()
    assert keys[hashlib.sha256(b"sk-two").hexdigest()].tenant_name == "acme"
    plain = keys[hashlib.sha256(b"plain-key").hexdigest()]
    assert plain.tenant_name.startswith("key-") and plain.limits() == TenantLimits()
    assert router.tenant_limits() == {"acme": TenantLimits(requests_per_minute=10)}
    with pytest.raises(ValidationError, match="declare different limits"):
        RouterConfig(
            api_keys=[{"key": "a-key", "tenant": "t", "max_concurrent": 1}, {"key": "b-key", "tenant": "t"}]
        )
    with pytest.raises(ValidationError, match="listed twice"):
        RouterConfig(api_keys=["same-key", {"key": "same-key", "tenant": "t"}])
    with pytest.raises(ValidationError, match="exactly one of"):
        RouterConfig(api_keys=[{"tenant": "t"}])
    with pytest.raises(ValidationError):
        RouterConfig(api_keys=[{"key": "k", "requests_per_minute": 0}])
