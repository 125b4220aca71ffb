"""One autoscaling policy for the whole application: every pool's replica count decided together, within
one budget of ranks (GPUs).

The principle: every request that wants to run should have a replica, and spare ranks buy speed.

1. **Busy replicas stay.** A pool keeps at least as many replicas as it has requests running or queued
   (so a large replica is only given up once the small ones have absorbed its queue), and at least its
   ``min_replicas``.
2. **Concurrency first.** Each model wants as many replicas as it has requests outstanding (averaged by
   Serve over the look-back window; at least one while it has any traffic). Missing replicas are added in
   the pool that does the most work per rank (the smallest, by measurement), for as many requests as the
   budget allows: under heavy load, many small replicas, the most images per GPU.
3. **Then latency.** Spare ranks upgrade planned replicas to larger pools, best gain per extra rank first
   (the time a typical request saves, from each pool's measured seconds per cost unit): under light load a
   single request gets the largest replica the budget holds, the lowest latency.
4. **Idle returns it all**: no traffic, no replicas beyond the minimums.

``plan_replicas`` is a pure function (the fleet simulator calls it too); :class:`ElasticPolicy` is the thin
adapter Serve 2.60 calls as the application's ``autoscaling_policy``, after which Serve applies each pool's
own ``upscale_delay_s``/``downscale_delay_s`` and bounds.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rayxdit.serve.routing import SCALING_EXPONENT, PoolLoad, PoolSpec, service_rates

EPSILON = 1e-6
logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class PoolDemand:
    """One pool at one autoscaling decision."""

    spec: PoolSpec
    replicas: int
    """The current target."""
    outstanding: float
    """Requests running or queued at the pool (Serve's total_num_requests, averaged over its look-back)."""
    min_replicas: int = 0
    max_replicas: int = 1
    seconds_per_cost: float | None = None
    """Measured service rate (None: not measured yet)."""
    overhead_s: float = 0.0
    """Measured fixed part of a request's service time."""
    mean_cost: float | None = None
    """Measured mean cost of the pool's recent requests."""


def _typical_seconds(pools: Sequence[PoolDemand]) -> dict[str, float]:
    """Each pool's service time of a typical request of its model: its rate (measured, else extrapolated,
    else relative to one rank) times the model's mean request cost (1 if unmeasured)."""
    specs = [pool.spec for pool in pools]
    loads = {pool.spec.name: PoolLoad(seconds_per_cost=pool.seconds_per_cost) for pool in pools}
    rates = service_rates(specs, loads) or {s.name: s.ranks**-SCALING_EXPONENT for s in specs}
    costs: dict[str, list[float]] = defaultdict(list)
    for pool in pools:
        if pool.mean_cost:
            costs[pool.spec.model].append(pool.mean_cost)
    mean_cost = {model: sum(values) / len(values) for model, values in costs.items()}
    return {
        pool.spec.name: pool.overhead_s + rates[pool.spec.name] * mean_cost.get(pool.spec.model, 1.0)
        for pool in pools
    }


def plan_replicas(pools: Sequence[PoolDemand], budget: float) -> dict[str, int]:
    """Replicas per pool (by pool name) for ``budget`` ranks; never more ranks than ``budget`` unless the
    pools' minimums alone exceed it (then exactly the minimums)."""
    by_name = {pool.spec.name: pool for pool in pools}
    kept = {name: min(pool.replicas, math.ceil(pool.outstanding - EPSILON)) for name, pool in by_name.items()}
    assign = dict(kept)  # replicas serving requests: the kept busy ones, then planned ones

    def ranks(plan: Mapping[str, int]) -> int:
        return sum(
            max(by_name[name].min_replicas, count) * by_name[name].spec.ranks for name, count in plan.items()
        )

    while ranks(assign) > budget:  # the budget shrank below the busy replicas: largest ones go first
        busy = [name for name in assign if assign[name] > by_name[name].min_replicas and assign[name] > 0]
        if not busy:
            break
        assign[max(busy, key=lambda name: by_name[name].spec.ranks)] -= 1
    kept = dict(assign)
    seconds = _typical_seconds(pools)
    models: dict[str, list[PoolDemand]] = defaultdict(list)
    for pool in pools:
        models[pool.spec.model].append(pool)

    # Concurrency: one replica per outstanding request, in each model's most efficient pool with room.
    need = {}
    for model, members in models.items():
        wanted = math.ceil(sum(pool.outstanding for pool in members) - EPSILON)
        if wanted == 0 and any(pool.outstanding > EPSILON for pool in members):
            wanted = 1
        need[model] = max(0, wanted - sum(kept[pool.spec.name] for pool in members))
    planned: dict[str, list[str]] = defaultdict(list)  # model -> pools of its planned (movable) replicas
    while any(need.values()):
        model = max(need, key=lambda m: need[m])
        options = sorted(
            (pool for pool in models[model] if assign[pool.spec.name] < pool.max_replicas),
            key=lambda pool: (seconds[pool.spec.name] * pool.spec.ranks, pool.spec.ranks),
        )
        placed = False
        for pool in options:
            trial = {**assign, pool.spec.name: assign[pool.spec.name] + 1}
            if ranks(trial) <= budget:
                assign, placed = trial, True
                planned[model].append(pool.spec.name)
                break
        need[model] = need[model] - 1 if placed else 0

    # Latency: move planned replicas to larger pools while the budget allows, best gain per rank first.
    while True:
        best = None
        for model, names in planned.items():
            for index, source in enumerate(names):
                for target in models[model]:
                    name = target.spec.name
                    if target.spec.ranks <= by_name[source].spec.ranks or assign[name] >= target.max_replicas:
                        continue
                    trial = {**assign, source: assign[source] - 1, name: assign[name] + 1}
                    extra = ranks(trial) - ranks(assign)
                    gain = seconds[source] - seconds[name]
                    if ranks(trial) > budget or gain <= 0:
                        continue
                    score = math.inf if extra <= 0 else gain / extra
                    if best is None or score > best[0]:
                        best = (score, model, index, name, trial)
        if best is None:
            break
        _, model, index, name, assign = best
        planned[model][index] = name
    return {
        name: min(by_name[name].max_replicas, max(by_name[name].min_replicas, count))
        for name, count in assign.items()
    }


class ElasticPolicy:
    """The application-level ``autoscaling_policy`` of a rayxdit application (Serve 2.60 instantiates it
    once with ``policy_kwargs`` and calls it every autoscaling tick with every deployment's context).

    ``app``: the application's own args (the ``ServeConfig``), from which it knows every pool's size (also
    of pools with no replica) and the budget (``elastic.budget_ranks``; default: the most GPUs an
    autoscaler that published its node types may reach, else the GPUs the cluster has now: set it on
    autoscaling clusters). Pools report their measured rate and mean request cost as custom
    autoscaling metrics; the router and state deployments keep their fixed size."""

    def __init__(self, app: dict[str, Any]):
        from rayxdit.config import ServeConfig

        config = ServeConfig.model_validate(app)
        self.specs = {pool.name: PoolSpec.of(pool) for pool in config.pools}
        self.accelerators = {pool.name: pool.accelerator for pool in config.pools}
        self.budget_ranks = config.elastic.budget_ranks if config.elastic else None
        self.last_plan: dict[str, int] | None = None

    def budget(self) -> float:
        if self.budget_ranks is not None:
            return float(self.budget_ranks)
        import ray

        if all(kind == "cpu" for kind in self.accelerators.values()):
            return float("inf")  # CPU pools: Serve's placement decides; nothing to share
        try:  # with an autoscaler: the most GPUs the cluster may have
            from ray._private.state import state

            most = state.get_max_resources_from_cluster_config()
            if most and most.get("GPU"):
                return float(most["GPU"])
        except Exception:
            pass
        return float(ray.cluster_resources().get("GPU", 0.0))

    def __call__(self, contexts: dict[Any, Any]) -> tuple[dict[Any, int], dict[Any, dict]]:
        demands = []
        for deployment, context in contexts.items():
            spec = self.specs.get(deployment.name)
            if spec is None:
                continue
            metrics = context.aggregated_metrics or {}
            demands.append(
                PoolDemand(
                    spec,
                    context.target_num_replicas,
                    float(context.total_num_requests or 0.0),
                    context.capacity_adjusted_min_replicas,
                    context.capacity_adjusted_max_replicas,
                    _mean_of(metrics.get("seconds_per_cost")),
                    _mean_of(metrics.get("overhead_s")) or 0.0,
                    _mean_of(metrics.get("mean_cost")),
                )
            )
        budget = self.budget()
        plan = plan_replicas(demands, budget)
        if plan != self.last_plan:
            demand = {d.spec.name: round(d.outstanding, 2) for d in demands}
            logger.info("elastic plan %s within %s ranks (outstanding %s)", plan, budget, demand)
            self.last_plan = plan
        decisions = {
            deployment: plan.get(deployment.name, context.target_num_replicas)
            for deployment, context in contexts.items()
        }
        return decisions, {}


def _mean_of(per_replica: Mapping[Any, float] | None) -> float | None:
    """The mean of the replicas' positive reports (0 means "not measured yet")."""
    values = [value for value in (per_replica or {}).values() if value and value > 0]
    return sum(values) / len(values) if values else None
