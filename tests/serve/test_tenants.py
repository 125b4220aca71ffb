"""Tenant limits: the pure decision, the shared state that counts for every router replica, and the
configuration of keys and tenants (over HTTP: tests/serve/test_serve.py)."""

from __future__ import annotations

import hashlib
import time

import pytest
import requests
import yaml
from pydantic import ValidationError

from rayxdit.config import ConfigError, PoolConfig, RouterConfig, ServeConfig, TenantLimits, keys_by_digest
from rayxdit.serve import keys as keys_module
from rayxdit.serve import state as state_module
from rayxdit.serve.keys import KeyRing
from rayxdit.serve.state import AppState
from rayxdit.serve.tenants import (
    ANONYMOUS,
    MINUTE_S,
    QUOTA_WINDOW_S,
    RATE_WINDOW_S,
    UNATTRIBUTED,
    UsageMinute,
    UsageQueryError,
    UsageWindows,
    attributed_usage,
    limit_refusal,
    rows_by_model,
    usage_by_pool,
    usage_window_query,
)
from tests.serve.test_ingress import ingress_alone
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


def ready_app() -> Sync:
    app = Sync(AppState(ServeConfig(pools=[POOL])))
    app.report("p", "replica", ready=True)
    return app


def test_the_state_counts_each_tenant_apart_and_a_failover_is_not_counted_again(clock):
    app = ready_app()
    later = time.time() + 600
    two_a_minute = TenantLimits(requests_per_minute=2)

    def route(ticket: str, tenant: str | None, limits=two_a_minute, retry: bool = False) -> dict:
        return app.route("m", 1.0, ticket, later, [], tenant, limits, retry)

    assert route("a#0", "metered")["pool"] == "p"
    app.finish("a#0")
    assert route("a#1", "metered", retry=True)["pool"] == "p"  # the same request failing over: not counted
    app.finish("a#1")
    assert route("b#0", "metered")["pool"] == "p"
    refused = route("c#0", "metered")
    assert refused == {"pool": None, "limited": "rate_limited", "retry_after_s": RATE_WINDOW_S}
    assert route("d#0", "other")["pool"] == "p"  # another tenant counts apart
    assert route("e#0", "free", None)["pool"] == "p" and route("f#0", None, None)["pool"] == "p"
    clock[0] += RATE_WINDOW_S
    assert route("c#0", "metered")["pool"] == "p"  # the minute has passed


def test_concurrency_counts_requests_in_flight_and_quota_the_gpu_seconds_of_finished_ones(clock):
    app = ready_app()
    later = time.time() + 600
    team = TenantLimits(max_concurrent=2, gpu_seconds_per_hour=50)

    def route(ticket: str, tenant: str = "team", limits: TenantLimits = team) -> dict:
        return app.route("m", 1.0, ticket, later, [], tenant, limits, False)

    assert route("a#0")["pool"] == "p" and route("b#0")["pool"] == "p"
    assert route("c#0")["limited"] == "concurrency_limited"
    app.finish("a#0", engine_s=10.0, gpu_seconds=20.0)  # 2 ranks x 10 s
    app.finish("b#0", engine_s=5.0, gpu_seconds=10.0)  # 30 GPU-seconds so far
    assert route("c#0")["pool"] == "p"
    app.finish("c#0", engine_s=10.0, gpu_seconds=20.0)  # 50: the hour's quota is used
    refused = route("d#0")
    assert refused["limited"] == "quota_exceeded" and refused["retry_after_s"] == QUOTA_WINDOW_S
    # A reservation that lapsed (its router died) no longer counts as in flight.
    solo = TenantLimits(max_concurrent=1)
    assert route("x#0", "solo", solo)["pool"] == "p"
    assert route("y#0", "solo", solo)["limited"] == "concurrency_limited"
    clock[0] += app.state.lease_s + 1
    assert route("y#0", "solo", solo)["pool"] == "p"


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
    keys = keys_by_digest(router.api_keys)
    assert keys[hashlib.sha256(b"sk-two").hexdigest()].tenant_name == "acme"
    plain = keys[hashlib.sha256(b"plain-key").hexdigest()]
    assert plain.tenant_name.startswith("key-") and plain.limits() == TenantLimits()
    assert keys[hashlib.sha256(b"sk-one").hexdigest()].limits() == TenantLimits(requests_per_minute=10)
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


def test_keys_in_a_file_are_reloaded_while_serving_and_a_bad_edit_locks_nobody_out(tmp_path, monkeypatch):
    """A router whose keys live in a file (a mounted secret): over real HTTP, a key added to the file works
    and a removed one gets 401 within KEYS_CHECK_S; a file that no longer parses leaves the keys as they
    were; one that is bad at start fails the replica with the reason."""
    monkeypatch.setattr(keys_module, "KEYS_CHECK_S", 0.2)  # the tests' clock; production checks every 2 s
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump(["first-key", {"key": "team-key", "tenant": "team"}]))
    tiny = PoolConfig(name="tiny", model="tiny-flux", parallel="ulysses=2", accelerator="cpu")
    config = ServeConfig(pools=[tiny], router=RouterConfig(api_keys_file=str(keys_file)))

    def models(url: str, key: str | None) -> int:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return requests.get(url + "/v1/models", headers=headers, timeout=30).status_code

    def until(url: str, key: str, status: int) -> float:
        began = time.monotonic()
        while models(url, key) != status:
            assert time.monotonic() - began < 10, f"{key}: not {status} after 10 s"
            time.sleep(0.05)
        return time.monotonic() - began

    with ingress_alone(config) as url:
        assert models(url, "first-key") == 200 and models(url, "team-key") == 200
        assert models(url, None) == 401 and models(url, "new-key") == 401
        keys_file.write_text(yaml.safe_dump(["new-key", {"key": "team-key", "tenant": "team"}]))
        assert until(url, "new-key", 200) < 10 and until(url, "first-key", 401) < 10
        keys_file.write_text("- [unclosed")  # a bad edit: the keys stay as they were
        time.sleep(0.5)
        assert models(url, "new-key") == 200 and models(url, "first-key") == 401
        keys_file.write_text("[]")  # an empty file: nobody gets in (a keys file always asks for a key)
        until(url, "new-key", 401)
    keys_file.write_text(yaml.safe_dump([{"key": "k", "tenant": "t", "requests_per_minute": 0}]))
    with pytest.raises(ConfigError, match="api_keys_file"):
        KeyRing(config.router)


def test_idle_and_start_up_time_is_shared_in_proportion_to_use_and_nothing_is_lost():
    used = {"a": {"small": (3, 30.0)}, "b": {"small": (1, 10.0), "big": (2, 80.0)}}
    held = {"small": (100.0, 20.0), "big": (80.0, 40.0), "cold": (5.0, 15.0)}
    usage = attributed_usage(used, held)
    # small: 60 idle (100 held ready - 40 used), 20 starting; a used 3/4 of it, b 1/4.
    assert usage["a"] == pytest.approx(
        {
            "requests": 3,
            "gpu_seconds": 30,
            "idle_gpu_seconds": 45,
            "startup_gpu_seconds": 15,
            "total_gpu_seconds": 90,
        }
    )
    # b: a quarter of small's (15 idle, 5 start-up) and all of big's (0 idle: fully used, 40 start-up).
    assert usage["b"]["idle_gpu_seconds"] == pytest.approx(15) and usage["b"]["startup_gpu_seconds"] == 45
    assert usage[UNATTRIBUTED] == pytest.approx(
        {
            "requests": 0,
            "gpu_seconds": 0,
            "idle_gpu_seconds": 5,
            "startup_gpu_seconds": 15,
            "total_gpu_seconds": 20,
        }
    )
    # Every held GPU-second is someone's: requests, idle or start-up.
    assert sum(row["total_gpu_seconds"] for row in usage.values()) == pytest.approx(
        sum(ready + starting for ready, starting in held.values())
    )


def test_the_state_integrates_held_time_from_heartbeats_and_attributes_it(clock):
    app = Sync(AppState(ServeConfig(pools=[POOL])))  # 2 ranks
    app.report("p", "r1", ready=False)
    for _ in range(10):  # 10 s starting
        clock[0] += 1
        app.report("p", "r1", ready=False)
    for _ in range(20):  # then 20 s ready
        clock[0] += 1
        app.report("p", "r1", ready=True)
    later = time.time() + 600
    assert app.route("m", 1.0, "a#0", later, [], "a", None, False)["pool"] == "p"
    app.finish("a#0", engine_s=5.0, gpu_seconds=10.0)
    assert app.route("m", 1.0, "b#0", later, [], None, None, False)["pool"] == "p"
    app.finish("b#0", engine_s=2.5, gpu_seconds=5.0)
    usage = app.usage()
    # Held: starting 10 s x 2 ranks = 20 (the first ready heartbeat closes the last starting second...)
    starting = sum(row["startup_gpu_seconds"] for row in usage.values())
    idle = sum(row["idle_gpu_seconds"] for row in usage.values())
    assert starting + idle + 15.0 == pytest.approx(60.0), usage  # 30 s x 2 ranks held in all
    assert usage["a"]["gpu_seconds"] == 10 and usage[ANONYMOUS]["gpu_seconds"] == 5
    assert usage["a"]["idle_gpu_seconds"] == pytest.approx(2 * usage[ANONYMOUS]["idle_gpu_seconds"])
    assert app.usage("a") == {"a": usage["a"]} and app.usage("nobody")["nobody"]["requests"] == 0


def test_keys_from_an_environment_variable_join_the_configs_and_a_missing_one_fails_the_start(monkeypatch):
    monkeypatch.setenv("RAYXDIT_TEST_KEYS", '["env-key", {"key": "env-team-key", "tenant": "team"}]')
    ring = KeyRing(RouterConfig(api_keys=["written-key"], api_keys_env="RAYXDIT_TEST_KEYS"))
    assert ring.lookup("env-key") is not None and ring.lookup("written-key") is not None
    assert ring.lookup("env-team-key").tenant_name == "team" and ring.lookup("other") is None
    monkeypatch.setenv("RAYXDIT_TEST_KEYS", "[]")
    assert KeyRing(RouterConfig(api_keys_env="RAYXDIT_TEST_KEYS")).required  # empty, yet keys are asked for
    for text in ("{not: a list}", '["dup", "dup"]'):
        monkeypatch.setenv("RAYXDIT_TEST_KEYS", text)
        with pytest.raises(ConfigError, match="RAYXDIT_TEST_KEYS"):
            KeyRing(RouterConfig(api_keys_env="RAYXDIT_TEST_KEYS"))
    monkeypatch.delenv("RAYXDIT_TEST_KEYS")
    with pytest.raises(ConfigError, match="not set"):
        KeyRing(RouterConfig(api_keys_env="RAYXDIT_TEST_KEYS"))


def test_usage_pool_by_pool_sums_to_each_tenants_usage():
    used = {"a": {"small": (3, 30.0)}, "b": {"small": (1, 10.0), "big": (2, 80.0)}}
    held = {"small": (100.0, 20.0), "big": (80.0, 40.0), "cold": (5.0, 15.0)}
    totals, by_pool = attributed_usage(used, held), usage_by_pool(used, held)
    assert set(by_pool["b"]) == {"small", "big"} and set(by_pool[UNATTRIBUTED]) == {"cold"}
    for tenant, row in totals.items():
        for key, value in row.items():
            assert sum(pool[key] for pool in by_pool[tenant].values()) == pytest.approx(value), (tenant, key)
    assert by_pool["a"]["small"]["idle_gpu_seconds"] == pytest.approx(45)


def test_usage_windows_split_held_time_at_minutes_and_sum_to_what_they_counted():
    windows = UsageWindows(kept_s=3600)
    windows.add_held(90.0, 150.0, "p", 2, ready=True)  # 30 s in minute 60, 30 s in minute 120
    windows.add_held(170.0, 185.0, "p", 2, ready=False)  # 10 s in minute 120, 5 s in minute 180
    windows.add_request(100.0, "a", "p", 8.0)
    windows.add_request(130.0, "b", "p", 4.0)
    assert windows.minutes[60].held == {"p": (60.0, 0.0)}
    assert windows.minutes[120].held == {"p": (60.0, 20.0)} and windows.minutes[180].held == {
        "p": (0.0, 10.0)
    }
    used, held = windows.window(60, 240)
    assert used == {"a": {"p": (1, 8.0)}, "b": {"p": (1, 4.0)}} and held == {"p": (120.0, 30.0)}
    used, held = windows.window(120, 180)  # one minute: b's request and the time held in it
    assert used == {"b": {"p": (1, 4.0)}} and held == {"p": (60.0, 20.0)}
    assert UsageMinute.from_json(windows.minutes[120].to_json()) == windows.minutes[120]
    assert windows.changed == {60, 120, 180}
    windows.trim(now=60 + 3600 + 2 * MINUTE_S)  # minute 60 is past what is kept
    assert sorted(windows.minutes) == [120, 180] and windows.changed == {120, 180}


def test_a_usage_window_is_widened_to_whole_minutes_and_a_bad_one_names_its_parameter():
    assert usage_window_query(125.0, 250.0, None, now=1000.0) == (120, 300, None)
    assert usage_window_query(0.0, None, "1m", now=150.0) == (0, 180, 60)  # end: now
    assert usage_window_query(0.0, 86400.0, "1h", now=0.0) == (0, 86400, 3600)
    for query, param in (
        ((None, 100.0, None), "start_time"),
        ((200.0, 100.0, None), "end_time"),
        ((0.0, 100.0, "1w"), "bucket_width"),
        ((0.0, 2 * 86400.0, "1m"), "bucket_width"),  # 2880 buckets of a minute: too many
    ):
        with pytest.raises(UsageQueryError) as error:
            usage_window_query(*query, now=0.0)
        assert error.value.param == param, (query, str(error.value))


def test_the_state_counts_usage_by_minute_as_it_counts_the_totals(clock, monkeypatch):
    """Held time from heartbeats and finished requests, counted minute by minute on the wall clock: a window
    over everything equals the totals, the minutes' buckets sum to them, and a bucket before the requests
    shares its idle time with nobody (unattributed)."""
    wall = [60 * 1000 + 30.0]  # half a minute in: the heartbeats straddle minutes
    monkeypatch.setattr(state_module.time, "time", lambda: wall[0] + clock[0] - 1000.0)
    app = Sync(AppState(ServeConfig(pools=[POOL])))  # 2 ranks
    app.report("p", "r1", ready=False)
    for second in range(100):  # 10 s starting, then ready
        clock[0] += 1
        app.report("p", "r1", ready=second >= 10)
    later = time.time() + 600
    for ticket, tenant, seconds in (("a#0", "a", 10.0), ("b#0", None, 5.0), ("a#1", "a", 6.0)):
        assert app.route("m", 1.0, ticket, later, [], tenant, None, False)["pool"] == "p"
        app.finish(ticket, engine_s=seconds / 2, gpu_seconds=seconds)
    clock[0] += 1
    app.report("p", "r1", ready=True)
    totals = app.usage()
    (everything,) = app.usage_windows(60 * 999, 60 * 1003, None)
    assert everything["tenants"].keys() == totals.keys()
    for tenant, row in totals.items():
        assert everything["tenants"][tenant] == pytest.approx(row), tenant
    buckets = app.usage_windows(60 * 999, 60 * 1003, 60)
    assert [(b["start_time"], b["end_time"]) for b in buckets] == [
        (60 * m, 60 * m + 60) for m in range(999, 1003)
    ]
    summed: dict = {}
    for bucket in buckets:
        for tenant, row in bucket["tenants"].items():
            for key, value in row.items():
                summed.setdefault(tenant, {}).setdefault(key, 0.0)
                summed[tenant][key] += value
    for tenant in ("a", ANONYMOUS):  # what the requests used lands whole in the minute they finished
        assert summed[tenant]["gpu_seconds"] == pytest.approx(totals[tenant]["gpu_seconds"])
        assert summed[tenant]["requests"] == totals[tenant]["requests"]
    held = sum(row["total_gpu_seconds"] for bucket in buckets for row in bucket["tenants"].values())
    assert held == pytest.approx(sum(row["total_gpu_seconds"] for row in totals.values()))  # 101 s x 2
    # Minute 1000 held 30 s of the pool (2 ranks): 11 s starting (the first ready heartbeat closes the
    # last starting second), 19 s ready, and no request: nobody's to share.
    assert buckets[0]["tenants"] == {} and list(buckets[1]["tenants"]) == [UNATTRIBUTED]
    first = buckets[1]["tenants"][UNATTRIBUTED]
    assert (first["startup_gpu_seconds"], first["idle_gpu_seconds"]) == pytest.approx((22.0, 38.0))
    assert list(app.usage_windows(60 * 999, 60 * 1003, None, "a")[0]["tenants"]) == ["a"]


def test_usage_model_by_model_sums_each_models_pools():
    by_pool = usage_by_pool(
        {"a": {"small": (3, 30.0), "big": (1, 40.0)}}, {"small": (50.0, 0.0), "big": (60.0, 0.0)}
    )
    by_model = rows_by_model(by_pool, {"small": "flux", "big": "flux"}.get)
    assert by_model["a"]["flux"]["requests"] == 4
    assert by_model["a"]["flux"]["total_gpu_seconds"] == pytest.approx(110.0)
