"""The application's shared state as plain objects (the Serve deployment wraps this class unchanged)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from rayxdit.config import PoolConfig, RouterConfig, RoutingConfig, ServeConfig
from rayxdit.serve import sizing
from rayxdit.serve import state as state_module
from rayxdit.serve.dispatch import refusal
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


class Sync:
    """The state's async methods, called one at a time as Serve calls them."""

    def __init__(self, state: AppState):
        self.state = state

    def __getattr__(self, name: str):
        method = getattr(self.state, name)
        return lambda *args, **kwargs: asyncio.run(method(*args, **kwargs))


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
    app = Sync(AppState(ServeConfig(pools=POOLS, router=RouterConfig())))
    app.report("small", "replica-a", ready=True)
    later = time.time() + 600

    def pool_for(request_id, exclude=()):
        return app.route("m", 1.0, request_id, later, list(exclude))["pool"]

    # Nothing measured: the thresholds decide, free pools first. Two routers, one request each: the second
    # sees the first's reservation.
    assert pool_for("r1") == "small"
    assert app.loads()["small"].outstanding == 1
    assert pool_for("r2") == "small"  # nothing is free: preference
    assert pool_for("r3", exclude=["small"]) == "big"
    assert app.route("m", 1.0, "r4", later, ["small", "big"]) == {"pool": None, "retry_after_s": None}
    app.finish("r1")
    assert app.loads()["small"].outstanding == 1
    clock[0] += app.state.lease_s - 1  # r2's router renews its lease while it waits...
    app.renew("r2", "small", 1.0)
    clock[0] += app.state.lease_s - 1
    assert app.loads()["small"].outstanding == 1  # r2, renewed
    clock[0] += 2  # ...then dies: nobody renews, the reservation lapses
    assert app.loads()["small"].outstanding == 0
    clock[0] += state_module.STALE_AFTER_S  # the replica stopped reporting: gone
    assert app.loads()["small"].ready_replicas == 0


def test_rates_are_learned_from_finished_requests_and_admission_refuses_what_cannot_finish(clock):
    app = Sync(AppState(ServeConfig(pools=POOLS)))
    app.report("small", "a", ready=True)
    app.report("big", "b", ready=True, startup_s=30.0)
    later = time.time() + 600
    assert app.route("m", 10.0, "r1", later, [])["estimate_s"] is None  # thresholds until measured
    app.finish("r1", engine_s=20.0)  # 2 s per cost unit on the small pool
    assert app.loads()["small"].seconds_per_cost == 2.0 and app.loads()["big"].startup_s == 30.0
    # The big pool is extrapolated from it by GPU count (4 vs 2 ranks): it finishes first.
    decision = app.route("m", 10.0, "r2", later, [])
    assert decision["pool"] == "big" and decision["estimate_s"] == pytest.approx(20.0 * 0.5**0.85)
    app.finish("r2", engine_s=15.0)
    assert app.loads()["big"].seconds_per_cost == 1.5
    app.finish("r2", engine_s=100.0)  # finished twice (a retry): learned once
    assert app.loads()["big"].seconds_per_cost == 1.5
    refused = app.route("m", 30.0, "r3", time.time() + 30, [])
    assert refused["pool"] is None and refused["retry_after_s"] in (15.0, 16.0)  # 45 s expected, 30 s left
    assert app.loads()["big"].outstanding == 0  # a refused request holds nothing
    # Ten times the largest cost measured is an extrapolation: never a reason to refuse (small requests are
    # mostly overhead; taken proportionally they would make this one look far slower than it is).
    admitted = app.route("m", 100.0, "r4", time.time() + 30, [])
    assert admitted["pool"] == "big" and admitted["estimate_s"] == pytest.approx(150.0)


@pytest.mark.parametrize("admission", ["typical_wait", "deadline"])
def test_a_lenient_request_is_refused_behind_a_line_the_typical_request_could_not_wait_out(clock, admission):
    """``routing.admission: typical_wait`` (the default): once the line is longer than the model's typical
    arrival could wait and still make its deadline, a request with all the time in the world is refused too
    (429 with Retry-After), so that in an overload the line does not fill with lenient requests while every
    typical one is refused. ``deadline`` admits it (it would make its own deadline)."""
    app = Sync(AppState(ServeConfig(pools=POOLS[:1], routing=RoutingConfig(admission=admission))))
    app.report("small", "a", ready=True)
    app.route("m", 1.0, "probe", time.time() + 600, [])
    app.finish("probe", engine_s=2.0)  # 2 s per cost unit
    # Typical requests: 2 s of service with 6 s to their deadline, so each could wait 4 s. The fourth
    # would wait 5 s behind the three admitted on the one replica: refused by its own deadline.
    decisions = [app.route("m", 1.0, f"t{i}", time.time() + 6, []) for i in range(4)]
    assert [decision["pool"] for decision in decisions] == ["small", "small", "small", None]
    lenient = app.route("m", 1.0, "lenient", time.time() + 600, [])  # would wait 5 s, finish in 7 s
    if admission == "typical_wait":
        # 5 s of wait against the typical 4 s (a hair less: their deadlines are counted from the clock)
        assert lenient["pool"] is None and lenient["retry_after_s"] in (1.0, 2.0), lenient
        assert lenient["estimate_s"] == pytest.approx(7.0) and lenient["overloaded"]
        error = refusal("m", lenient, "lenient")
        assert (
            error.status == 429
            and error.code == "overloaded"
            and error.retry_after == lenient["retry_after_s"]
        )
        assert "would wait 5 s for a replica, longer than its typical request can (4 s)" in str(error), error
        assert app.loads()["small"].outstanding == 3  # it holds nothing
    else:
        assert lenient["pool"] == "small" and app.loads()["small"].outstanding == 4
    # A cold pool's wait is a start-up: only the request's own deadline judges it.
    app.report("small", "a", ready=False)
    clock[0] += app.state.lease_s + state_module.STALE_AFTER_S
    assert app.route("m", 1.0, "cold", time.time() + 600, [])["pool"] == "small"


def test_readiness_needs_a_ready_replica_unless_every_pool_scales_from_zero(clock):
    app = Sync(AppState(ServeConfig(pools=POOLS)))
    assert app.readiness()["ready"] is False
    app.report("small", "replica-a", ready=False)  # up, but its worker group is being rebuilt
    assert app.readiness()["ready"] is False
    app.report("small", "replica-a", ready=True)
    readiness = app.readiness()
    assert readiness["ready"] is True and readiness["models"] == {"m": True}
    json.dumps(readiness, allow_nan=False)  # /readyz answers it as JSON (an infinity there was a 500)
    assert (
        readiness["pools"]["small"]["ready_replicas"] == 1
        and readiness["pools"]["big"]["ready_replicas"] == 0
    )
    cold = Sync(AppState(ServeConfig(pools=[POOLS[1]])))
    assert cold.readiness()["ready"] is True  # its only pool starts at zero: the first request starts it


def test_a_pool_left_without_replicas_is_gone_so_its_waiting_requests_move(clock):
    app = Sync(AppState(ServeConfig(pools=POOLS)))
    later = time.time() + 600
    cold = app.route("m", 1.0, "r1", later, [])
    assert cold["pool"] == "small" and cold["warm"] is False  # routed to a cold pool: it will start
    app.report("small", "a", ready=True)
    warm = app.route("m", 1.0, "r2", later, [])
    assert warm["warm"] is True and app.renew("r2", "small", 1.0) is False
    clock[0] += state_module.STALE_AFTER_S + 1  # its replica stopped reporting (scaled down, died)
    assert app.renew("r2", "small", 1.0) is True and app.renew("r1", "big", 1.0) is True


def test_a_restarted_state_calls_no_pool_gone_before_it_could_hear_its_replicas(clock):
    """A new state replica knows no replica: the renewals of requests waiting on a pool's replicas through
    the restart must not hear "gone" before that pool's heartbeats could reach it (it would take them back
    and refuse them with a 429); a pool still silent after STALE_AFTER_S is gone."""
    app = Sync(AppState(ServeConfig(pools=POOLS)))
    assert app.renew("r1", "small", 1.0) is False
    assert app.wait_turn("r1", "small", 0.0) != "gone"
    clock[0] += state_module.STALE_AFTER_S / 2
    assert app.renew("r1", "small", 1.0) is False
    clock[0] += state_module.STALE_AFTER_S
    assert app.renew("r1", "small", 1.0) is True


def test_a_lease_renewed_after_a_state_restart_counts_the_request_again(clock):
    """The state replica restarted (its reservations lost): the next renewal of a request still waiting
    makes its reservation anew, so admission sees it again within one renewal."""
    app = Sync(AppState(ServeConfig(pools=POOLS)))
    app.report("small", "a", ready=True)
    assert app.loads()["small"].outstanding == 0
    app.renew("r1", "small", 2.0)
    assert app.loads()["small"].outstanding == 1 and app.loads()["small"].outstanding_cost == 2.0
    app.finish("r1")
    assert app.loads()["small"].outstanding == 0
    app.renew("r1", "small", 2.0)  # a renewal already on its way when r1 finished
    assert app.loads()["small"].outstanding == 0, "a finished request came back"


def test_a_request_abandoned_while_it_was_routed_is_never_counted(clock):
    """The client left while the routing call was on its way: the router releases the attempt's ticket at
    once, and the two calls may reach the state in either order. Either way nothing stays outstanding (a
    phantom would hold capacity for the lease (15 s), steering routing and admission meanwhile)."""
    app = Sync(AppState(ServeConfig(pools=POOLS)))
    app.report("small", "a", ready=True)
    later = time.time() + 600
    assert app.route("m", 1.0, "r1#0", later, [])["pool"] == "small"  # routed, then released
    app.finish("r1#0")
    assert app.loads()["small"].outstanding == 0
    app.finish("r2#0")  # released first...
    assert app.route("m", 1.0, "r2#0", later, []) == {
        "pool": None,
        "retry_after_s": None,
    }  # ...never admitted
    assert app.loads()["small"].outstanding == 0
    # A failover is a new attempt with a ticket of its own: it is admitted after the first one finished.
    assert app.route("m", 1.0, "r2#1", later, ["big"])["pool"] == "small"
    assert app.loads()["small"].outstanding == 1


def test_a_key_finished_over_a_lease_ago_is_a_new_attempt_even_when_nothing_else_finishes(clock):
    """A late routing call or renewal of a finished ticket is refused for one lease; after that the key is
    a new attempt (a batch line run again by the driver that adopted its batch): refusing it for as long
    as no other request finishes (which trims the finished keys) left that line waiting for ever."""
    app = Sync(AppState(ServeConfig(pools=POOLS)))
    app.report("small", "a", ready=True)
    later = time.time() + 600
    assert app.route("m", 1.0, "line-3#0", later, [], background=True)["pool"] == "small"
    app.finish("line-3#0")
    clock[0] += app.state.lease_s / 2
    assert app.route("m", 1.0, "line-3#0", later, [], background=True)["pool"] is None  # a late call
    app.renew("line-3#0", "small", 1.0)
    assert app.loads()["small"].outstanding == 0
    clock[0] += app.state.lease_s / 2 + 1
    app.report("small", "a", ready=True)
    assert app.route("m", 1.0, "line-3#0", later, [], background=True)["pool"] == "small"
    assert app.loads()["small"].outstanding == 1


def test_the_state_reports_arrivals_over_a_whole_window_how_long_it_counted_and_their_mean_cost(clock):
    """The sizing policy reads the arrival rate, how long it was counted and the arrivals' mean cost from
    the state. A state replica up for 2 s that saw 3 requests reports them over a whole window, not 1.5/s
    (a count over a second is noise, and the policy keeps the busiest demand of an hour), and that it has
    counted 2 s (the policy trusts a rate from a whole window on); the mean cost is over every arrival of
    the window, refused ones too, not what the pools finished (under an overload, what admission and
    deadlines let through)."""
    app = Sync(AppState(ServeConfig(pools=POOLS)))
    clock[0] += 2.0
    later = time.time() + 600
    for ticket, cost in (("a", 1.0), ("b", 1.0), ("c", 4.0)):
        app.route("m", cost, ticket, later, [])
    stats = app.state.record_autoscaling_stats()
    assert stats["arrivals_per_s.m"] == pytest.approx(3 / sizing.ARRIVALS_WINDOW_S)
    assert stats["counted_s.m"] == pytest.approx(2.0, abs=0.5)
    assert stats["arrival_cost.m"] == pytest.approx(2.0)
    clock[0] += sizing.ARRIVALS_WINDOW_S * 10  # long after: the rate falls to 0, the cost is kept
    app.route("m", 1.0, "d", later + 9999, [])
    stats = app.state.record_autoscaling_stats()
    assert stats["arrivals_per_s.m"] == pytest.approx(1 / sizing.ARRIVALS_WINDOW_S)
    assert stats["counted_s.m"] >= sizing.ARRIVALS_WINDOW_S
    assert stats["arrival_cost.m"] == pytest.approx(7.0 / 4)


@pytest.mark.parametrize("policy", ["line_priced", "finish_first"])
def test_the_state_routes_by_the_configured_policy_and_line_priced_is_the_default(clock, policy):
    """The state routes with ``ROUTING_POLICIES[routing.policy]``; the default, ``line_priced``, sends a
    cheap request to an idle slow replica rather than into a fast pool's line of dearer requests, which
    ``finish_first`` joins (it finishes there a little sooner). Its estimate is the pool's own either way."""
    config = (
        ServeConfig(pools=POOLS)
        if policy == "line_priced"
        else ServeConfig(pools=POOLS, routing=RoutingConfig(policy=policy))
    )
    assert config.routing.policy == policy
    app = Sync(AppState(config))
    app.report("small", "a", ready=True)
    app.report("big", "b", ready=True)
    later = time.time() + 600
    app.route("m", 1.0, "probe-small", later, ["big"])
    app.finish("probe-small", engine_s=2.0)  # 2 s per cost unit
    app.route("m", 1.0, "probe-big", later, ["small"])
    app.finish("probe-big", engine_s=0.2)  # 0.2 s per cost unit: ten times as fast
    assert app.route("m", 10.0, "dear", later, [])["pool"] == "big"  # 2 s there, 20 s on the small one
    cheap = app.route("m", 1.0, "cheap", later, [])
    # On the big pool: a wait for the dear one, then 0.2 s, under the small pool's 2 s; charged that wait
    # again (cheaper than the line's mean of 10), over it.
    assert cheap["pool"] == ("small" if policy == "line_priced" else "big"), cheap
