"""The cost_aware sizing policy as plain functions and one stateful object (serve/layouts.py)."""

from __future__ import annotations

import math

import pytest

from rayxdit.serve.layouts import (
    DWELL_STARTUPS,
    IDLE_S,
    CostAwarePolicy,
    best_layout,
    best_move,
    erlang_c,
    layouts,
    response_time,
    toward,
    transition_cost,
)
from rayxdit.serve.routing import PoolSpec
from rayxdit.serve.sizing import PoolDemand

SECONDS = {"p2": 2.5, "p4": 1.6, "p8": 1.0}
"""A typical request on each pool: 8 GPUs are 2.5x as fast as 2, so they serve 0.62x as much per GPU."""


def pools(replicas=(1, 0, 0), throughput=0.0, arrivals=None, startup_s=60.0) -> list[PoolDemand]:
    return [
        PoolDemand(
            PoolSpec(f"p{gpus}", "flux", gpus, startup_s=startup_s),
            replicas=count,
            outstanding=0.0,
            max_replicas=8 // gpus,
            seconds_per_cost=SECONDS[f"p{gpus}"],  # mean cost 1: these are the typical request's seconds
            mean_cost=1.0,
            throughput=throughput,
            startup_s=startup_s,
            arrivals=arrivals,
        )
        for gpus, count in zip((2, 4, 8), replicas, strict=True)
    ]


def test_erlang_c_matches_the_textbook_values():
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: the chance to wait is the utilization
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    assert erlang_c(4, 0.0) == 0.0 and erlang_c(4, 4.0) == 1.0


def test_light_load_gets_the_fastest_replica_and_heavy_load_the_most_capacity():
    members = pools()
    assert best_layout(members, SECONDS, arrivals=0.1, ranks=8) == {"p2": 0, "p4": 0, "p8": 1}
    heavy = best_layout(members, SECONDS, arrivals=1.2, ranks=8)
    assert heavy == {"p2": 4, "p4": 0, "p8": 0}  # 1.6/s capacity: anything larger is beyond 85% busy
    assert response_time({"p8": 1}, SECONDS, 1.2) == math.inf
    assert best_layout(members, SECONDS, arrivals=0.0, ranks=8) == {"p2": 0, "p4": 0, "p8": 0}


def test_a_change_that_must_wait_for_gpus_costs_the_start_up():
    members = pools()
    # Room to start the new replica beside the old ones: nothing waits.
    assert transition_cost({"p2": 1}, {"p2": 1, "p8": 1}, members, SECONDS, 0.2, free_ranks=8) == 0
    # A full budget: the 2-GPU replicas go first and the demand waits out the start-up.
    full = transition_cost({"p2": 4, "p8": 0}, {"p2": 0, "p8": 1}, members, SECONDS, 0.2, free_ranks=0)
    assert full > 0.2 * 60 * 60 / 2 * 0.99


def test_the_policy_holds_its_decision_while_serve_applies_it_and_returns_gpus_when_idle():
    policy = CostAwarePolicy()
    first = policy(pools((1, 0, 0), arrivals=0.25), budget=8, now=0.0)
    assert first == {"p2": 0, "p4": 0, "p8": 1}  # light load, a change that pays
    # Serve still reports the old target (its upscale delay): the policy keeps to its own decision.
    assert policy(pools((1, 0, 0), arrivals=0.25), budget=8, now=2.0) == first
    # Heavier load within the dwell after a change: held, unless the layout cannot carry it.
    assert policy(pools((0, 0, 1), arrivals=0.5), budget=8, now=30.0) == first
    # An overload is met within a minute (the demand estimate rises with a 20 s time constant).
    plans = [policy(pools((0, 0, 1), arrivals=2.0), budget=8, now=32.0 + 2 * tick) for tick in range(30)]
    assert plans[-1] == {"p2": 4, "p4": 0, "p8": 0} and plans[0] == first
    # No arrival and nothing outstanding for IDLE_S: the replicas go back, dwell or not.
    for now in (100.0, 100.0 + IDLE_S / 2, 101.0 + IDLE_S):
        plan = policy(pools((4, 0, 0), arrivals=0.0), budget=8, now=now)
    assert plan == {"p2": 0, "p4": 0, "p8": 0}


def test_a_slow_alternation_changes_the_layout_once_per_phase():
    policy = CostAwarePolicy()
    changes, plan, now = 0, None, 0.0
    for phase in range(4):
        rate = 0.15 if phase % 2 == 0 else 1.1
        for _ in range(int(1800 / 2)):
            current = plan or {"p2": 1, "p4": 0, "p8": 0}
            replicas = tuple(current[name] for name in ("p2", "p4", "p8"))
            new = policy(pools(replicas, arrivals=rate), budget=8, now=now)
            changes += plan is not None and new != plan
            plan, now = new, now + 2.0
    assert changes <= 4, f"{changes} changes over 4 phases"
    assert now > DWELL_STARTUPS * 60


def fleet(replicas: dict[str, int], arrivals: float | None = None, budget: int = 64) -> list[PoolDemand]:
    return [
        PoolDemand(
            PoolSpec(name, "flux", gpus, startup_s=60.0),
            replicas=replicas.get(name, 0),
            outstanding=0.0,
            max_replicas=budget // gpus,
            seconds_per_cost=SECONDS[name],
            mean_cost=1.0,
            startup_s=60.0,
            arrivals=arrivals,
        )
        for name, gpus in (("p2", 2), ("p4", 4), ("p8", 8))
    ]


def test_a_full_fleet_moves_part_of_the_way_when_swapping_everything_would_stall_the_demand():
    """64 GPUs as 2-GPU replicas at a light 1.6 requests/s: one 8-GPU replica each would serve it faster,
    but swapping all of them at once leaves the demand waiting out a start-up; turning some 2-GPU replicas
    into 8-GPU ones while the rest carry the load pays at once."""
    current = {"p2": 32, "p4": 0, "p8": 0}
    members = fleet(current)
    target = best_layout(members, SECONDS, arrivals=1.6, ranks=64)
    assert target["p8"] >= 6 and target["p2"] == 0
    direct = 1.6 * (response_time(current, SECONDS, 1.6) - response_time(target, SECONDS, 1.6)) * 600
    assert direct < transition_cost(current, target, members, SECONDS, 1.6, free_ranks=0)
    move, net = best_move(current, target, layouts(members, 64), members, SECONDS, 1.6, free_ranks=0)
    assert net > 0 and toward(current, target, move)
    assert 0 < move["p8"] < target["p8"] and 0 < move["p2"] < 32
    # What stays carries the demand below MAX_UTILIZATION: nothing waits for the new replicas.
    staying = {"p2": move["p2"]}
    assert response_time(staying, SECONDS, 1.6) < math.inf
    # The policy takes the step, then (after the dwell) goes on toward the best layout.
    policy = CostAwarePolicy()
    policy.changed_at["flux"] = -math.inf
    first = policy(fleet(current, arrivals=1.6), budget=64, now=0.0)
    assert first != current and first["p8"] > 0


def test_a_layout_near_max_utilization_is_not_left_at_once():
    """Sixteen 4-GPU replicas at 88% of their capacity: no longer a candidate (above MAX_UTILIZATION), but
    their queue does not grow, so they are changed only if a change pays, within the dwell rules; at 100%
    they are left at once."""
    current = {"p2": 0, "p4": 16, "p8": 0}
    capacity = 16 / SECONDS["p4"]
    assert response_time(current, SECONDS, 0.88 * capacity) == math.inf
    assert response_time(current, SECONDS, 0.88 * capacity, limit=1.0) < math.inf
    policy = CostAwarePolicy()
    policy.changed_at["flux"] = 0.0  # a change was just made: within the dwell
    assert policy(fleet(current, arrivals=0.88 * capacity), budget=64, now=10.0) == current
    policy.demand.clear()
    assert policy(fleet(current, arrivals=1.05 * capacity), budget=64, now=12.0) != current


def test_reports_without_samples_leave_the_plan_whole():
    """Serve hands a custom metric with no sample in its window as NaN (seen at shutdown): the policy must
    plan from what it knows, not turn every estimate into NaN and fail the controller's loop."""
    policy = CostAwarePolicy()
    policy(pools((1, 0, 0), arrivals=0.25), budget=8, now=0.0)
    nan = float("nan")
    broken = [
        PoolDemand(
            pool.spec,
            pool.replicas,
            nan,
            nan,
            0,
            pool.max_replicas,
            pool.seconds_per_cost,
            0.0,
            pool.mean_cost,
            nan,
            pool.startup_s,
            nan,
            nan,
        )
        for pool in pools((1, 0, 0))
    ]
    plan = policy(broken, budget=8, now=2.0)
    assert all(isinstance(count, int) and count >= 0 for count in plan.values()), plan


def test_an_unbounded_budget_is_bounded_by_the_pools_maximums():
    """CPU pools have no accelerator to count: the budget is infinite (``rayxdit serve``'s default) and the
    plan stays within what the pools may hold."""
    policy = CostAwarePolicy()
    plan = policy(pools((1, 0, 0), arrivals=0.5), budget=math.inf, now=0.0)
    assert all(isinstance(count, int) for count in plan.values())
    assert plan["p2"] <= 4 and plan["p4"] <= 2 and plan["p8"] <= 1 and any(plan.values())
