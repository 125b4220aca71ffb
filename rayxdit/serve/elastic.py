"""The application's autoscaling policy as Serve 2.60 calls it: a thin adapter from Serve's per-deployment
contexts to the pure sizing policy the application's config names (``elastic.policy``, from
``serve/policies.py``'s table), within the shared budget of ranks.

Serve instantiates :class:`ElasticPolicy` once with ``policy_kwargs`` (the application's own args) when
the application's config sets ``autoscaling_policy: {policy_function: "rayxdit.serve.elastic:ElasticPolicy"}``
(``rayxdit serve`` and the shipped configs do), and calls it every autoscaling tick; Serve then applies each
pool's own ``upscale_delay_s``/``downscale_delay_s`` and bounds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

from rayxdit.config import ElasticConfig, ServeConfig
from rayxdit.serve.budget import BudgetCache
from rayxdit.serve.policies import autoscaling_policy
from rayxdit.serve.routing import PoolSpec
from rayxdit.serve.sizing import LastMeasured, PoolDemand
from rayxdit.serve.state import (
    ARRIVAL_COST_METRIC,
    ARRIVALS_METRIC,
    COUNTED_METRIC,
    QUIET_METRIC,
    STATE_DEPLOYMENT,
    WAITING_METRIC,
)

logger = logging.getLogger("ray.serve")

MEASURED_METRICS = ("seconds_per_cost", "overhead_s", "mean_cost", "startup_s")
"""A pool replica's custom metrics that measure its pool (0: not yet), kept after its replicas are gone."""


class ElasticPolicy:
    """The application-level ``autoscaling_policy`` of a rayxdit application (Serve 2.60 instantiates it
    once with ``policy_kwargs`` and calls it every autoscaling tick with every deployment's context).

    ``app``: the application's own args (the ``ServeConfig``), from which it knows every pool's size (also
    of pools with no replica), the sizing policy (``elastic.policy``) and the budget
    (``elastic.budget_ranks``; default: the GPUs the cluster has now: set it on autoscaling clusters). Pools
    report their measured rate, mean request cost and start-up as custom autoscaling metrics, which it
    keeps for a pool whose replicas are gone (:class:`~rayxdit.serve.sizing.LastMeasured`); the router and
    state deployments keep their fixed size."""

    def __init__(self, app: dict[str, Any]):
        config = ServeConfig.model_validate(app)
        self.specs = {pool.name: PoolSpec.of(pool) for pool in config.pools}
        self.accelerators = {pool.name: pool.accelerator for pool in config.pools}
        self.budget = BudgetCache(
            config.elastic.budget_ranks if config.elastic else None, self.accelerators.values()
        )
        elastic = config.elastic or ElasticConfig()
        self.policy = autoscaling_policy(elastic.policy, elastic.policy_options)
        self.policy_name = elastic.policy
        self.last_plan: dict[str, int] | None = None
        self.measured = LastMeasured()
        self.last_demands: list[PoolDemand] = []
        """What the policy was handed at the last tick (for logs and tests)."""

    def __call__(self, contexts: dict[Any, Any]) -> tuple[dict[Any, int], dict[Any, dict]]:
        reported = state_metrics(contexts)
        demands = []
        for deployment, context in contexts.items():
            spec = self.specs.get(deployment.name)
            if spec is None:
                continue
            metrics = context.aggregated_metrics or {}
            # With a line in the state (routing.queue_policy fair_share, shortest_first) requests wait
            # there, not at Serve.
            held_back = reported[WAITING_METRIC].get(spec.name, 0.0)
            measured = self.measured.fill(
                spec.name, {name: _mean_of(metrics.get(name)) for name in MEASURED_METRICS}
            )
            demands.append(
                PoolDemand(
                    spec,
                    context.target_num_replicas,
                    _count(context.total_num_requests) + held_back,
                    _count(context.total_queued_requests) + held_back,
                    context.capacity_adjusted_min_replicas,
                    context.capacity_adjusted_max_replicas,
                    measured["seconds_per_cost"],
                    measured["overhead_s"] or 0.0,
                    measured["mean_cost"],
                    _sum_of(metrics.get("requests_per_s")),
                    measured["startup_s"] or spec.startup_s,
                    reported[ARRIVALS_METRIC].get(spec.model),
                    reported[QUIET_METRIC].get(spec.model),
                    reported[ARRIVAL_COST_METRIC].get(spec.model),
                    # Not reported yet: no count to trust (the policy sizes by the queue meanwhile).
                    reported[COUNTED_METRIC].get(spec.model, 0.0),
                )
            )
        self.last_demands = demands
        budget = self.budget()
        try:
            plan = self.policy(demands, budget, time.monotonic())
        except Exception:  # a policy's bug must not stop Serve's control loop: keep the replicas in place
            logger.exception(
                "elastic policy %s failed on %s within %s ranks", self.policy_name, demands, budget
            )
            plan = {d.spec.name: d.replicas for d in demands}
        if plan != self.last_plan:
            demand = {d.spec.name: round(d.outstanding, 2) for d in demands}
            logger.info("elastic plan %s within %s ranks (outstanding %s)", plan, budget, demand)
            self.last_plan = plan
        decisions = {
            deployment: plan.get(deployment.name, context.target_num_replicas)
            for deployment, context in contexts.items()
        }
        return decisions, {}


def state_metrics(contexts: Mapping[Any, Any]) -> dict[str, dict[str, float]]:
    """The application's state's custom autoscaling metrics by name: per model its arrivals per second
    (``ARRIVALS_METRIC``), their mean cost (``ARRIVAL_COST_METRIC``), the seconds since its last
    arrival (``QUIET_METRIC``) and how long it has counted them (``COUNTED_METRIC``), per pool the requests
    waiting in its line (``WAITING_METRIC``); each empty before the state has reported."""
    names = (ARRIVALS_METRIC, ARRIVAL_COST_METRIC, QUIET_METRIC, COUNTED_METRIC, WAITING_METRIC)
    found: dict[str, dict[str, float]] = {name: {} for name in names}
    for deployment, context in contexts.items():
        if deployment.name != STATE_DEPLOYMENT:
            continue
        for name, per_replica in (context.aggregated_metrics or {}).items():
            metric, _, model = name.partition(".")
            values = [value for value in (per_replica or {}).values() if _finite(value)]
            if metric in found and values:
                found[metric][model] = max(values)
    return found


def _finite(value: Any) -> bool:
    """Serve hands a metric with no sample in its window as NaN: such a value says nothing."""
    return isinstance(value, int | float) and math.isfinite(value)


def _sum_of(per_replica: Mapping[Any, float] | None) -> float:
    return sum(value for value in (per_replica or {}).values() if _finite(value))


def _count(value: Any) -> float:
    return float(value) if _finite(value) else 0.0


def _mean_of(per_replica: Mapping[Any, float] | None) -> float | None:
    """The mean of the replicas' positive reports (0 means "not measured yet")."""
    values = [value for value in (per_replica or {}).values() if _finite(value) and value > 0]
    return sum(values) / len(values) if values else None
