"""The waiting line's order: weighted fair share across tenants (start-time fair queuing), shortest first
and first come first served; pure, as the state and the fleet simulator use it."""

from __future__ import annotations

import time

import pytest

from rayxdit.config import ConfigError, PoolConfig, RoutingConfig, ServeConfig, TenantLimits
from rayxdit.serve import state as state_module
from rayxdit.serve.fairness import FAIR_SHARE, FIFO, SHORTEST_FIRST, WaitingLine
from rayxdit.serve.policies import check_policies
from rayxdit.serve.state import AppState
from rayxdit.serve.tenants import has_limits
from tests.serve.test_state import Sync


def drain(line: WaitingLine) -> list:
    order = []
    while (key := line.pop()) is not None:
        order.append(key)
    return order


def test_a_flooding_tenant_cannot_push_a_light_one_back_and_equal_weights_share_evenly():
    line = WaitingLine(FAIR_SHARE)
    for n in range(8):  # tenant A floods: 8 requests at once
        line.push(f"a{n}", "a", cost=1.0)
    line.push("b0", "b", cost=1.0)  # B's one request arrives after all of A's
    order = drain(line)
    assert order.index("b0") <= 1, order  # it goes next to A's first, not behind all eight
    # Both flooding: they alternate, whoever arrived first.
    for n in range(6):
        line.push(f"a{n}", "a", cost=1.0)
    for n in range(6):
        line.push(f"b{n}", "b", cost=1.0)
    order = drain(line)
    assert [key[0] for key in order[2:10]] in (list("abababab"), list("babababa")), order


@pytest.mark.parametrize("burst", [0, 2])
def test_shares_follow_weights_and_costs_in_gpu_seconds(burst):
    """GPU time 2:1:1 => requests 2:1:1/3. Without credit (plain start-time fair queuing) from the first
    request on; with it, each tenant's first ``burst`` requests may go early, and no more."""
    line = WaitingLine(FAIR_SHARE, burst=burst)
    for n in range(90):
        line.push(f"a{n}", "a", cost=1.0, weight=2.0)  # twice B's weight
        line.push(f"b{n}", "b", cost=1.0, weight=1.0)
        line.push(f"c{n}", "c", cost=3.0, weight=1.0)  # requests 3x as large as B's
    order = drain(line)
    for first, expected in ((30, {"a": 18, "b": 9, "c": 3}), (90, {"a": 54, "b": 27, "c": 9})):
        counts = {tenant: sum(key[0] == tenant for key in order[:first]) for tenant in "abc"}
        off = {tenant: abs(counts[tenant] - expected[tenant]) for tenant in "abc"}
        assert max(off.values()) <= 1 + burst, (first, counts)


def test_an_idle_tenant_saves_only_a_bounded_credit_and_a_lone_tenant_gets_everything():
    for burst in (0, 2):
        line = WaitingLine(FAIR_SHARE, burst=burst)
        for n in range(10):  # A alone for a while: all of it goes to A, in order
            line.push(f"a{n}", "a", cost=1.0)
        assert drain(line) == [f"a{n}" for n in range(10)]
        # B was idle all along: arriving now it starts at most `burst` requests before the line's virtual
        # time (not ten requests ahead), then they alternate.
        for n in range(6):
            line.push(f"a{10 + n}", "a", cost=1.0)
            line.push(f"b{n}", "b", cost=1.0)
        tenants = "".join(key[0] for key in drain(line))
        assert tenants == "b" * burst + "ba" * (6 - burst) + "a" * burst, (burst, tenants)


def test_a_light_tenants_burst_goes_as_it_would_alone_while_another_floods():
    """B (under its share) sends three requests a moment apart while A keeps eight waiting: all three go
    before A's next, as they would with the pool to itself; without the credit they alternate with A's."""
    for burst, expected in ((2, "bbbaaa"), (0, "bababa")):
        line = WaitingLine(FAIR_SHARE, burst=burst)
        for n in range(8):
            line.push(f"a{n}", "a", cost=1.0)
        for n in range(8, 28):  # A in steady state: one of its eight goes in, its client sends the next
            line.pop()
            line.push(f"a{n}", "a", cost=1.0)
        line.pop()  # A's request in service when B's burst comes
        for n in range(3):
            line.push(f"b{n}", "b", cost=1.0)
        assert "".join(key[0] for key in drain(line))[:6] == expected, burst


def test_first_come_first_served_and_removal():
    line = WaitingLine(FIFO)
    for n in range(5):
        line.push(f"a{n}", "a", cost=1.0)
    line.push("b0", "b", cost=1.0)
    assert line.remove("a2") and not line.remove("a2") and "a2" not in line and len(line) == 5
    assert line.waiting_by_tenant() == {"a": 4, "b": 1}
    assert drain(line) == ["a0", "a1", "a3", "a4", "b0"]
    with pytest.raises(ValueError, match="not one of fifo, fair_share"):
        WaitingLine("lottery")


# ----- the state's fair line (routing.queue_policy fair_share) -------------------------------------------
POOL = PoolConfig(
    name="p",
    model="m",
    model_name="m",
    parallel="ulysses=2",
    route_min_cost=0,
    deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
)
FAIR = ServeConfig(pools=[POOL], routing=RoutingConfig(queue_policy="fair_share"), elastic=None)


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(state_module.time, "monotonic", lambda: now[0])
    return now


def routed(app: Sync, ticket: str, tenant: str, weight: float = 1.0) -> dict:
    later = time.time() + 3600
    return app.route("m", 1.0, ticket, later, [], tenant, TenantLimits(weight=weight), False)


def test_the_state_lets_requests_in_one_per_ready_replica_in_fair_order(clock):
    app = Sync(AppState(FAIR))
    app.report("p", "r1", ready=True)
    assert routed(app, "a0#0", "a")["let_in"] is True  # a free replica: in at once
    for n in range(1, 5):
        assert routed(app, f"a{n}#0", "a")["let_in"] is False  # the replica is taken: they wait
    assert routed(app, "b0#0", "b")["let_in"] is False
    assert app.wait_turn("b0#0", "p", 0) == "wait"
    app.finish("a0#0", engine_s=1.0, gpu_seconds=2.0)
    # B's one request goes before A's four that came first (A had its turn).
    assert app.wait_turn("b0#0", "p", 0) == "go" and app.wait_turn("a1#0", "p", 0) == "wait"
    app.report("p", "r2", ready=True)  # a second replica: the next in line goes in
    assert app.wait_turn("a1#0", "p", 0) == "go" and app.wait_turn("a2#0", "p", 0) == "wait"
    assert app.state.record_autoscaling_stats()["waiting.p"] == 3.0  # what the elastic policy adds to demand
    # A client that leaves while it waits leaves the line; one whose router died lapses out of it.
    app.finish("a2#0")
    clock[0] += app.state.lease_s + 1
    app.report("p", "r1", ready=True)
    app.report("p", "r2", ready=True)
    assert app.wait_turn("a3#0", "p", 0) == "lost"
    # A restarted state knows no ticket: the router routes the request again.
    assert Sync(AppState(FAIR)).wait_turn("a4#0", "p", 0) == "lost"


def test_a_waiting_request_learns_that_its_pool_is_gone(clock):
    app = Sync(AppState(FAIR))
    app.report("p", "r1", ready=True)
    routed(app, "a0#0", "a")
    assert routed(app, "a1#0", "a")["let_in"] is False
    clock[0] += state_module.STALE_AFTER_S + 1  # the replica stopped reporting (scaled down, died)
    assert app.wait_turn("a1#0", "p", 0) == "gone"


def test_fair_share_is_refused_where_serve_sizes_a_pool_on_its_own():
    scaling = POOL.model_copy(
        update={"deployment_config": {"autoscaling_config": {"min_replicas": 0, "max_replicas": 2}}}
    )
    with pytest.raises(ConfigError, match=r"fair_share holds waiting requests.*pool p"):
        check_policies(
            ServeConfig(pools=[scaling], routing=RoutingConfig(queue_policy="fair_share"), elastic=None)
        )
    check_policies(ServeConfig(pools=[scaling], routing=RoutingConfig(queue_policy="fair_share")))  # elastic
    with pytest.raises(ConfigError, match="'lottery' is not one of fifo, fair_share"):
        check_policies(ServeConfig(pools=[POOL], routing=RoutingConfig(queue_policy="lottery")))
    assert not has_limits(TenantLimits(weight=3.0))  # a weight is a share, not a limit


def busy_pool(policy: str, cost: float) -> Sync:
    """A state under ``policy`` whose pool has one replica, measured at 10 s per cost unit, running one of
    tenant A's ten requests of ``cost`` while the other nine wait."""
    app = Sync(AppState(FAIR.model_copy(update={"routing": RoutingConfig(queue_policy=policy)})))
    app.report("p", "r1", ready=True)
    for n in range(3):  # the pool's rate: 10 s per cost unit
        routed(app, f"m{n}#0", "a")
        app.finish(f"m{n}#0", engine_s=10.0, gpu_seconds=20.0)
    for n in range(10):
        assert (
            app.route("m", cost, f"a{n}#0", time.time() + 3600, [], "a", TenantLimits(), False)["pool"] == "p"
        )
    return app


@pytest.mark.parametrize("policy", ["fifo", "fair_share"])
def test_admission_counts_only_the_work_a_request_waits_for(clock, policy):
    """A's ten requests wait for the pool's one replica (10 s each, measured). B's request, with a 35 s
    deadline: first come first served it would wait for all ten and is refused at once (429); in the fair
    line it waits for the one running and at most one of A's, and is admitted."""
    app = busy_pool(policy, cost=1.0)
    decision = app.route("m", 1.0, "b0#0", time.time() + 35, [], "b", TenantLimits(), False)
    if policy == "fair_share":
        assert decision["pool"] == "p" and decision["estimate_s"] <= 30, decision
    else:
        assert decision["pool"] is None and decision["retry_after_s"] > 0, decision


def test_a_light_tenant_waits_only_for_the_request_in_service_while_another_keeps_eight_in_flight(clock):
    """The load test's pattern against the state alone: A keeps 8 requests in the system of one replica
    (each finished one replaced at once), B sends one every third service. B always goes in at the next
    completion: it waits for the request in service and nothing else."""
    app = Sync(AppState(FAIR))
    app.report("p", "r1", ready=True)
    sent = iter(range(10_000))

    def send(tenant: str) -> str:
        ticket = f"{tenant}{next(sent)}#0"
        routed(app, ticket, tenant)
        return ticket

    for _ in range(8):
        send("a")
    (running,) = app.state.let_in["p"]
    b_waits, b_arrived = [], {}
    for service in range(120):
        if service % 3 == 1:
            b_arrived[send("b")] = service
        app.finish(running, engine_s=1.0, gpu_seconds=1.0)
        if running.startswith("a"):
            send("a")  # A's client sends its next at once
        (running,) = app.state.let_in["p"]
        if running in b_arrived:
            b_waits.append(service - b_arrived.pop(running))
    assert len(b_waits) == 40 and set(b_waits) == {0}, b_waits


def test_shortest_first_starts_the_cheapest_and_counts_only_what_costs_no_more():
    line = WaitingLine(SHORTEST_FIRST)
    for key, cost in (("large", 5.0), ("small", 1.0), ("mid", 2.0), ("small-later", 1.0), ("cfg", 2.0)):
        line.push(key, "anyone", cost)
    assert line.ahead_of("b", 1.0) == (2, 2.0)  # the two small ones: a new small one waits for them only
    assert line.ahead_of("b", 4.0) == (4, 6.0)  # a large one waits for all but the larger one
    assert drain(line) == ["small", "small-later", "mid", "cfg", "large"]  # ties: the earlier arrival


def test_in_an_overload_shortest_first_admits_the_small_request_fifo_would_refuse_and_refuses_a_large_one(
    clock,
):
    """One replica at 10 s per cost unit, ten requests of cost 3 waiting (300 s of work). A small request
    (cost 0.5) with a 40 s deadline: first come first served it would wait for all of them (refused, 429);
    shortest first it waits for the one running only, is admitted and goes in at the next completion. A
    request of cost 4 with a 200 s deadline waits for all ten there: refused at once, not let go late."""
    app = busy_pool(SHORTEST_FIRST, cost=3.0)
    small = app.route("m", 0.5, "b0#0", time.time() + 40, [], "b", TenantLimits(), False)
    assert small["pool"] == "p" and small["let_in"] is False, small
    large = app.route("m", 4.0, "c0#0", time.time() + 200, [], "c", TenantLimits(), False)
    assert large["pool"] is None and large["retry_after_s"] > 0, large
    (running,) = app.state.let_in["p"]
    app.finish(running, engine_s=30.0, gpu_seconds=60.0)
    assert app.wait_turn("b0#0", "p", 0) == "go"
    fifo = busy_pool(FIFO, cost=3.0)
    assert fifo.route("m", 0.5, "b0#0", time.time() + 40, [], "b", TenantLimits(), False)["pool"] is None
