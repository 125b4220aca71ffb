"""The elastic decisions as pure functions: where a request goes (earliest completion, admission) and how
many replicas each pool gets within the shared budget."""

from __future__ import annotations

import heapq
import random
import statistics

import pytest

from rayxdit.models.families import FLUX
from rayxdit.serve.policies import ROUTING_POLICIES
from rayxdit.serve.routing import (
    PoolLoad,
    PoolSpec,
    ServiceFit,
    Slacks,
    completion_estimate,
    retry_after,
    route,
    sample_cost,
    service_rates,
    waiting_time,
)
from rayxdit.serve.sizing import PoolDemand, plan_replicas

SMALL, MEDIUM, BIG = (
    PoolSpec(f"p{n}", "flux", n, route_min_cost=c, startup_s=60) for n, c in ((2, 0), (4, 40), (8, 100))
)
POOLS = [SMALL, MEDIUM, BIG]
# Seconds per megapixel-step of Flux.1-dev on H200 (1024px, 28 steps = 29.4 MP-steps), encode and decode
# included: measured on 2 GPUs (2.371 + 0.153 s), 4 and 8 by the measured 1->2 GPU speedup (1.576x) per
# doubling, as benchmarks/simulate_fleet.py extrapolates: small replicas do the most work per GPU.
RATES = {"p2": 2.524 / 29.4, "p4": (2.371 / 1.576 + 0.153) / 29.4, "p8": (2.371 / 1.576**2 + 0.153) / 29.4}


def loads(**per_pool: PoolLoad) -> dict[str, PoolLoad]:
    return {
        name: PoolLoad(**{**vars(load), "seconds_per_cost": load.seconds_per_cost or RATES[name]})
        for name, load in per_pool.items()
    }


def test_an_idle_fleet_sends_a_request_where_it_finishes_first_and_ties_go_to_the_smaller_pool():
    idle = loads(p2=PoolLoad(1), p4=PoolLoad(1), p8=PoolLoad(1))
    order = route(POOLS, 29.4, idle)
    assert [pool.name for pool, _ in order] == ["p8", "p4", "p2"]
    assert order[0][1] == pytest.approx(29.4 * RATES["p8"])
    same_speed = {name: PoolLoad(1, seconds_per_cost=0.05) for name in RATES}
    assert route(POOLS, 29.4, same_speed)[0][0].name == "p2"


def test_queued_work_moves_requests_to_the_pool_that_finishes_them_first():
    busy_big = loads(p2=PoolLoad(1), p4=PoolLoad(1), p8=PoolLoad(1, outstanding=3, outstanding_cost=3 * 29.4))
    assert route(POOLS, 29.4, busy_big)[0][0].name == "p4"
    # n=3 on c=1: the running one is half done: 2.5 requests ahead of it
    assert completion_estimate(BIG, busy_big["p8"], 29.4, RATES["p8"]) == pytest.approx(
        29.4 * RATES["p8"] * 3.5
    )


def test_line_priced_routing_leaves_a_fast_pools_line_to_the_large_requests():
    """Under ``routing.policy: line_priced``, a 1024px request that a busy 4-GPU pool would finish 0.2 s
    sooner than an idle 2-GPU replica, behind requests dearer on average than it, takes the idle replica:
    its wait there is charged twice (``routing.line_price``); ``finish_first`` sends it into the line. A
    2048px request, for which the 4-GPU replicas save 4.6 s, still joins their line, and so does a 1024px one
    behind 1024px ones. Sabotage check: without the charge the first goes to the 4-GPU pool and this fails."""
    line_priced = ROUTING_POLICIES["line_priced"]
    image, large = 29.4, sample_cost(4.194304, 28, False, FLUX.limits.attention_cost_per_megapixel)
    running = [image, image, 2 * image, large]  # four 4-GPU replicas busy, a 2048px image among them
    busy_fast = loads(p2=PoolLoad(1), p4=PoolLoad(4, outstanding=4, outstanding_cost=sum(running)))
    order = line_priced([SMALL, MEDIUM], image, busy_fast)
    assert [pool.name for pool, _ in order] == ["p2", "p4"]
    assert route([SMALL, MEDIUM], image, busy_fast)[0][0].name == "p4"  # finish_first: into the line
    estimates = {pool.name: estimate for pool, estimate in order}
    assert estimates["p4"] < estimates["p2"]  # the estimates themselves are unchanged: admission reads them
    assert line_priced([SMALL, MEDIUM], large, busy_fast)[0][0].name == "p4"
    alike = loads(p2=PoolLoad(1), p4=PoolLoad(4, outstanding=4, outstanding_cost=4 * image))
    assert line_priced([SMALL, MEDIUM], image, alike)[0][0].name == "p4"


def estimate_errors(replicas: int, utilization: float, arrivals: int = 20000) -> list[float]:
    """``replicas`` replicas of one pool serving one line first come first served, Poisson arrivals at
    ``utilization``, a denoising mix (70% one unit, 20% two (true CFG), 10% 4.6 (2048 px), one second a
    unit, no randomness in a request's time): for each arrival that finds every replica busy, its
    completion estimate from what the application's state knows (requests outstanding and their cost) less
    the time it really took."""
    rng = random.Random(1)
    costs = [1.0] * 7 + [2.0] * 2 + [4.6]
    rate = utilization * replicas / statistics.mean(costs)
    free_at, outstanding, now, errors = [0.0] * replicas, [], 0.0, []
    for _ in range(arrivals):
        now += rng.expovariate(rate)
        outstanding = [(finish, cost) for finish, cost in outstanding if finish > now]
        cost = rng.choice(costs)
        load = PoolLoad(
            replicas, outstanding=len(outstanding), outstanding_cost=sum(c for _, c in outstanding)
        )
        estimate = completion_estimate(SMALL, load, cost, 1.0)
        finish = max(now, heapq.heappop(free_at)) + cost
        heapq.heappush(free_at, finish)
        if load.outstanding >= replicas:
            errors.append(estimate - (finish - now))
        outstanding.append((finish, cost))
    return errors


@pytest.mark.parametrize("replicas", [2, 4, 8])
def test_the_wait_for_a_busy_pool_is_the_nearest_end_of_a_running_request_then_the_line(replicas):
    """A line of replicas frees its first one when the running request nearest its end finishes, not when
    an average one does. Read as "each running request half done", four replicas' estimates ran 0.95 s long
    in the median (a mean request takes 1.56 s here), and admission refused requests that would have made
    their deadlines (the fleet simulator's one-node all-2-GPU fleet at 60% load: 97.3% good, 98.8% with
    this). Sabotage check: with ``n - c/2`` requests ahead spread over the replicas again, the median error
    is 0.6-1.1 s and this fails."""
    for utilization in (0.6, 0.8):
        errors = estimate_errors(replicas, utilization)
        assert abs(statistics.median(errors)) <= 0.25 * 1.56, (utilization, statistics.median(errors))


def test_a_cold_pool_counts_its_start_up_and_half_of_it_while_one_starts():
    cold = loads(p2=PoolLoad(1), p8=PoolLoad(0))
    assert [pool.name for pool, _ in route([SMALL, BIG], 29.4, cold)] == ["p2", "p8"]
    assert completion_estimate(BIG, cold["p8"], 29.4, 0.025) == pytest.approx(60 + 29.4 * 0.025)
    starting = PoolLoad(0, starting_replicas=1, startup_s=20)
    assert completion_estimate(BIG, starting, 29.4, 0.025) == pytest.approx(10 + 29.4 * 0.025)


def test_a_cold_pool_the_budget_has_no_room_for_comes_last():
    """On a full node, a long queue at the 2-GPU pool must not send requests to a cold 8-GPU pool: its
    replica could not start until the small ones drained (the fleet simulator showed replicas thrashing)."""
    queued = loads(p2=PoolLoad(4, outstanding=200, outstanding_cost=200 * 29.4), p8=PoolLoad(0))
    assert route([SMALL, BIG], 29.4, queued)[0][0].name == "p8"  # the budget is not known: no limit
    assert [pool.name for pool, _ in route([SMALL, BIG], 29.4, queued, free_ranks=0)] == ["p2", "p8"]
    assert route([SMALL, BIG], 29.4, queued, free_ranks=8)[0][0].name == "p8"  # room for it
    starting = {**queued, "p8": PoolLoad(0, starting_replicas=1, seconds_per_cost=RATES["p8"])}
    assert route([SMALL, BIG], 29.4, starting, free_ranks=0)[0][0].name == "p8"  # its replica holds ranks
    unmeasured = {"p2": PoolLoad(1, outstanding=3), "p8": PoolLoad(0)}
    assert route([SMALL, BIG], 500.0, unmeasured, free_ranks=2)[0][0].name == "p2"  # thresholds too


def test_rates_are_measured_else_extrapolated_by_gpus_else_thresholds_decide():
    only_small = {"p2": PoolLoad(1, seconds_per_cost=0.08)}
    rates = service_rates(POOLS, only_small)
    assert rates["p2"] == 0.08 and rates["p8"] == pytest.approx(0.08 * (2 / 8) ** 0.85)
    prior = [SMALL, PoolSpec("p8", "flux", 8, route_min_cost=100, seconds_per_cost=0.03)]
    assert service_rates(prior, {})["p2"] == pytest.approx(0.03 * 4**0.85)
    # Nothing measured, no prior: the thresholds route, free pools first.
    order = route(POOLS, 50.0, {"p4": PoolLoad(1, outstanding=1), "p2": PoolLoad(1), "p8": PoolLoad(1)})
    assert [(pool.name, estimate) for pool, estimate in order] == [("p2", None), ("p8", None), ("p4", None)]


def test_admission_refuses_what_cannot_finish_before_its_deadline():
    assert retry_after(10.0, 30.0) is None and retry_after(None, 0.0) is None
    assert retry_after(42.2, 30.0) == 13.0
    # typical_wait: a wait beyond the typical arrival's slack is refused however lenient the request.
    assert retry_after(10.0, 30.0, waiting_s=6.0, typical_slack_s=4.5) == 2.0
    assert retry_after(10.0, 30.0, waiting_s=4.0, typical_slack_s=4.5) is None
    assert retry_after(10.0, 30.0, cost=9.0, trusted_cost=8.0, waiting_s=60.0, typical_slack_s=0.0) is None
    assert retry_after(42.2, 30.0, waiting_s=6.0, typical_slack_s=4.5) == 13.0  # the larger overrun


def test_the_typical_slack_is_the_median_of_the_servable_arrivals_of_the_window():
    slacks = Slacks(window_s=60.0)
    assert slacks.typical(0.0) is None
    for at, slack in enumerate([5.0, 1.0, 9.0, -3.0, 4.0]):  # a timeout shorter than the service: ignored
        slacks.add(float(at), slack)
    assert slacks.typical(5.0) == 5.0  # of 1, 4, 5, 9
    assert slacks.typical(61.5) == 9.0  # 5 and 1 left the window: 4, 9
    assert slacks.typical(200.0) is None


def test_the_wait_for_a_replica_leaves_out_the_service_and_a_cold_pools_start_up():
    spec = PoolSpec("p2", "flux", 2)
    busy = PoolLoad(1, outstanding=3, outstanding_cost=3.0, overhead_s=0.5)
    estimate = completion_estimate(spec, busy, 1.0, 2.0)
    assert waiting_time(spec, busy, 1.0, estimate, {"p2": 2.0}) == pytest.approx(estimate - 2.5)
    cold = PoolLoad(0, outstanding=1, outstanding_cost=1.0)
    assert waiting_time(spec, cold, 1.0, completion_estimate(spec, cold, 1.0, 2.0), {"p2": 2.0}) == 0.0
    assert waiting_time(spec, busy, 1.0, None, None) == 0.0


def demand(spec: PoolSpec, replicas: int, outstanding: float, min_replicas=0, max_replicas=4, queued=None):
    """Requests beyond the pool's replicas wait for it (unless ``queued`` says otherwise)."""
    return PoolDemand(
        spec,
        replicas=replicas,
        outstanding=outstanding,
        queued=max(0.0, outstanding - replicas) if queued is None else queued,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        seconds_per_cost=RATES[spec.name],
        mean_cost=29.4,
    )


def ranks_used(plan: dict[str, int]) -> int:
    return sum(count * int(name[1:]) for name, count in plan.items())


def test_light_load_gets_the_largest_replica_the_budget_holds():
    plan = plan_replicas([demand(SMALL, 0, 0.4), demand(MEDIUM, 0, 0), demand(BIG, 0, 0, max_replicas=1)], 8)
    assert plan == {"p2": 0, "p4": 0, "p8": 1}
    two = plan_replicas([demand(SMALL, 0, 0), demand(MEDIUM, 0, 2), demand(BIG, 0, 0, max_replicas=1)], 8)
    assert two == {"p2": 0, "p4": 2, "p8": 0}


def test_a_burst_of_cheap_requests_moves_gpus_from_the_8_gpu_pool_to_2_gpu_pools():
    before = plan_replicas(
        [demand(SMALL, 0, 0), demand(MEDIUM, 0, 0), demand(BIG, 1, 0.5, max_replicas=1)], 8
    )
    assert before == {"p2": 0, "p4": 0, "p8": 1}
    # Ten requests arrive; the big replica's one finished: its GPUs go to as many small replicas as fit.
    burst = plan_replicas([demand(SMALL, 0, 10), demand(MEDIUM, 0, 0), demand(BIG, 1, 0, max_replicas=1)], 8)
    assert burst == {"p2": 4, "p4": 0, "p8": 0} and ranks_used(burst) == 8


def test_a_large_replica_with_a_queue_is_kept_until_the_queue_is_absorbed():
    queued = plan_replicas([demand(SMALL, 0, 0), demand(MEDIUM, 0, 0), demand(BIG, 1, 3, max_replicas=1)], 8)
    assert queued == {"p2": 0, "p4": 0, "p8": 1}
    # Only running its own request, no queue: its GPUs may go (Serve lets the request finish first).
    running = plan_replicas([demand(SMALL, 0, 6), demand(MEDIUM, 0, 0), demand(BIG, 1, 1, max_replicas=1)], 8)
    assert running["p8"] == 0 and running["p2"] == 4


def test_a_queued_large_replica_that_blocks_the_demand_goes_anyway():
    """A full node, a lone 8-GPU replica under a growing queue: keeping it would keep out the small replicas
    that serve the demand; it goes, and the routers re-route its queue."""
    overloaded = plan_replicas(
        [demand(SMALL, 0, 6), demand(MEDIUM, 0, 0), demand(BIG, 1, 4, max_replicas=1)], 8
    )
    assert overloaded == {"p2": 4, "p4": 0, "p8": 0}


def test_light_load_on_a_small_replica_moves_to_the_largest_that_fits():
    plan = plan_replicas([demand(SMALL, 1, 0.4), demand(MEDIUM, 0, 0), demand(BIG, 0, 0, max_replicas=1)], 8)
    assert plan == {"p2": 0, "p4": 0, "p8": 1}


def test_idle_returns_the_gpus_down_to_the_minimums():
    idle = plan_replicas([demand(SMALL, 4, 0, min_replicas=1), demand(MEDIUM, 0, 0), demand(BIG, 1, 0)], 64)
    assert idle == {"p2": 1, "p4": 0, "p8": 0}


@pytest.mark.parametrize("budget", [2, 6, 8, 14, 24, 64])
@pytest.mark.parametrize("load", [0, 0.3, 1, 3, 7, 40])
def test_the_budget_is_never_exceeded_and_bounds_hold(budget, load):
    pools = [
        demand(SMALL, 1, load * 0.6, min_replicas=1, max_replicas=8),
        demand(MEDIUM, 2, load * 0.3, max_replicas=4),
        demand(BIG, 0, load * 0.1, max_replicas=2),
    ]
    plan = plan_replicas(pools, budget)
    assert ranks_used(plan) <= max(budget, 2)  # the minimum (one 2-GPU replica) alone may exceed it
    for pool in pools:
        assert pool.min_replicas <= plan[pool.spec.name] <= pool.max_replicas


def test_two_models_share_the_budget_by_their_queues():
    other = PoolSpec("q2", "sdxl", 2)
    plan = plan_replicas(
        [
            demand(SMALL, 0, 3),
            PoolDemand(other, 0, 1, 1, 0, 4, seconds_per_cost=0.2, mean_cost=10.0),
            demand(BIG, 0, 0, max_replicas=1),
        ],
        8,
    )
    assert plan["q2"] >= 1 and plan["p2"] >= 2 and plan["p2"] * 2 + plan["q2"] * 2 + plan["p8"] * 8 <= 8


def test_service_time_is_fitted_as_overhead_plus_rate_and_the_newest_samples_weigh_most():
    fit = ServiceFit(forget=1.0)
    assert fit.fitted is None
    fit.add(10.0, 12.0)
    assert fit.fitted == (0.0, 1.2)  # one cost seen: proportional
    fit.add(1.0, 3.0)
    overhead, rate = fit.fitted
    assert overhead == pytest.approx(2.0) and rate == pytest.approx(1.0)
    assert fit.mean_cost == pytest.approx((0.99 * 10 + 1) / 1.99)
    # The mean cost of the mix looks at about a hundred requests: ten large ones after 90 small ones move it
    # to about a third of the way, not (as the fit's ten-sample memory would) most of the way.
    mix = ServiceFit()
    for cost in [1.0] * 90 + [4.0] * 10:
        mix.add(cost, cost)
    assert 1.3 < mix.mean_cost < 1.6
    forgetting = ServiceFit(forget=0.5)
    for _ in range(20):
        forgetting.add(10.0, 30.0)  # an old, slow regime...
    for _ in range(20):
        forgetting.add(10.0, 10.0)  # ...replaced by a fast one
    assert forgetting.fitted[1] == pytest.approx(1.0, rel=1e-4)


def test_near_equal_plans_do_not_flap():
    """One 8-GPU replica, demand between one and two requests: two 4-GPU replicas would be about as good,
    not 15% better, so the replica in place stays (every change costs start-ups)."""
    steady = plan_replicas(
        [demand(SMALL, 0, 0), demand(MEDIUM, 0, 0), demand(BIG, 1, 1.6, max_replicas=1, queued=0)], 8
    )
    assert steady == {"p2": 0, "p4": 0, "p8": 1}
    fresh = plan_replicas([demand(SMALL, 0, 0), demand(MEDIUM, 0, 1.6), demand(BIG, 0, 0, max_replicas=1)], 8)
    assert fresh == {"p2": 0, "p4": 2, "p8": 0}, "without a replica in place, the ideal plan"


def test_the_adapter_keeps_a_pools_measurements_after_its_replicas_are_gone():
    """Serve's contexts carry no metric of a pool without replicas: an 8-GPU pool given back must still be
    priced at the speed and start-up its replicas measured, not at its configured prior (180 s here)."""
    from ray.serve._private.common import DeploymentID
    from ray.serve.config import AutoscalingContext

    from rayxdit.serve.elastic import ElasticPolicy

    app = {
        "pools": [
            {"name": "p2", "model": "tiny-flux", "parallel": "ulysses=2", "startup_s": 180.0},
            {"name": "p8", "model": "tiny-flux", "parallel": "ulysses=4,ring=2", "startup_s": 180.0},
        ],
        "elastic": {"budget_ranks": 8},
    }

    def contexts(p8_replicas: int, p8_metrics: dict) -> dict:
        found = {}
        for name, replicas, metrics in (("p2", 1, {}), ("p8", p8_replicas, p8_metrics)):
            deployment = DeploymentID(name=name, app_name="rayxdit")
            found[deployment] = AutoscalingContext(
                deployment_id=deployment,
                deployment_name=name,
                app_name="rayxdit",
                current_num_replicas=replicas,
                target_num_replicas=replicas,
                running_replicas=[],
                total_num_requests=0.0,
                total_queued_requests=0.0,
                aggregated_metrics=metrics,
                raw_metrics=None,
                capacity_adjusted_min_replicas=0,
                capacity_adjusted_max_replicas=4,
                policy_state={},
                last_scale_up_time=None,
                last_scale_down_time=None,
                current_time=None,
                config=None,
            )
        return found

    policy = ElasticPolicy(app)
    measured = {"seconds_per_cost": 0.03, "overhead_s": 0.2, "mean_cost": 30.0, "startup_s": 35.0}
    policy(contexts(1, {name: {"replica-1": value} for name, value in measured.items()}))
    policy(contexts(0, {}))  # its replica gone: nothing reported
    p2, p8 = sorted(policy.last_demands, key=lambda demand: demand.spec.ranks)
    assert (p8.seconds_per_cost, p8.overhead_s, p8.mean_cost, p8.startup_s) == (0.03, 0.2, 30.0, 35.0)
    assert (p2.seconds_per_cost, p2.startup_s) == (None, 180.0)  # never measured: its prior
    # A new report replaces what was kept; a replica still starting (0: not measured yet) does not.
    policy(contexts(1, {"seconds_per_cost": {"replica-2": 0.02}, "startup_s": {"replica-2": 0.0}}))
    _, p8 = sorted(policy.last_demands, key=lambda demand: demand.spec.ranks)
    assert (p8.seconds_per_cost, p8.startup_s) == (0.02, 35.0)
