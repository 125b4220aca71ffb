"""The decisions' tables: every routing, queue and autoscaling policy by the name an application's config gives
it (the queue policies, ``fifo`` and ``fair_share``: ``serve/fairness.py``).

A policy is a pure function of plain data (``serve/routing.py``, ``serve/sizing.py``), unit-tested alone.
The application's state routes with ``ROUTING_POLICIES[config.routing.policy]``, Serve's autoscaling hook
sizes the pools with ``AUTOSCALING_POLICIES[config.elastic.policy]`` (``serve/elastic.py``), and the fleet simulator
(``benchmarks/simulate_fleet.py``) runs the same entries: a new policy is one function and one line here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rayxdit.config import ELASTIC_DELAYS, ConfigError, ServeConfig
from rayxdit.serve.fairness import FIFO, QUEUE_POLICIES
from rayxdit.serve.layouts import CostAwarePolicy
from rayxdit.serve.routing import PoolLoad, PoolSpec, route, threshold_order
from rayxdit.serve.sizing import PoolDemand, plan_replicas

RoutingPolicy = Callable[
    [Sequence[PoolSpec], float, Mapping[str, PoolLoad], frozenset, float], list[tuple[PoolSpec, float | None]]
]
"""``(pools of the model, request cost, loads, excluded pool names, free ranks of the shared budget)`` ->
the pools to try, best first, each with its completion estimate (None where it has none)."""

AutoscalingPolicy = Callable[[Sequence[PoolDemand], float, float], dict[str, int]]
"""``(every pool's demand, the budget of ranks, now in seconds)`` -> replicas per pool name. Made fresh per
application by its table entry's factory (a policy may remember past decisions)."""


def by_thresholds(
    pools: Sequence[PoolSpec],
    cost: float,
    loads: Mapping[str, PoolLoad],
    exclude: frozenset = frozenset(),
    free_ranks: float = math.inf,
) -> list[tuple[PoolSpec, float | None]]:
    """Static routing by the pools' configured ``route_min_cost`` thresholds, whatever is measured: cheap
    requests to small pools, expensive ones to big pools, free pools first."""
    candidates = [pool for pool in pools if pool.name not in exclude]
    return [(pool, None) for pool in threshold_order(candidates, cost, loads)]


ROUTING_POLICIES: dict[str, RoutingPolicy] = {
    "finish_first": route,
    "line_priced": functools.partial(route, price_lines=True),  # finish_first plus routing.line_price
    "thresholds": by_thresholds,
}
"""Routing policies by name (``routing.policy`` in the application's config)."""


def _load_aware(**options: Any) -> AutoscalingPolicy:
    if options:
        raise ConfigError(f"elastic.policy_options: load_aware takes none ({', '.join(options)} given)")
    return lambda demands, budget, now: plan_replicas(demands, budget)


AUTOSCALING_POLICIES: dict[str, Callable[..., AutoscalingPolicy]] = {
    "cost_aware": CostAwarePolicy,
    "load_aware": _load_aware,
}
"""Autoscaling policies by name (``elastic.policy`` in the application's config), each a factory of the
policy one application runs, called with the config's ``elastic.policy_options``."""


def routing_policy(name: str) -> RoutingPolicy:
    if name not in ROUTING_POLICIES:
        raise ConfigError(f"routing.policy '{name}' is not one of {', '.join(ROUTING_POLICIES)}")
    return ROUTING_POLICIES[name]


def autoscaling_policy(name: str, options: Mapping[str, Any] | None = None) -> AutoscalingPolicy:
    if name not in AUTOSCALING_POLICIES:
        raise ConfigError(f"elastic.policy '{name}' is not one of {', '.join(AUTOSCALING_POLICIES)}")
    try:
        return AUTOSCALING_POLICIES[name](**(options or {}))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"elastic.policy_options for {name}: {error}") from None


def check_queue_policy(config: ServeConfig) -> None:
    """Refuse an unknown queue policy, and one whose line the state keeps (``fair_share``,
    ``shortest_first``) where Serve sizes a pool on its own: the requests waiting in the state's line are
    invisible to Serve's per-pool autoscaling (the elastic policy reads them from the state)."""
    name = config.routing.queue_policy
    if name not in QUEUE_POLICIES:
        raise ConfigError(f"routing.queue_policy '{name}' is not one of {', '.join(QUEUE_POLICIES)}")
    if name == FIFO or config.elastic is not None:
        return
    for pool in config.pools:
        bounds = pool.serve_options().get("autoscaling_config", {})
        if bounds.get("min_replicas") != bounds.get("max_replicas"):
            raise ConfigError(
                f"routing.queue_policy {name} holds waiting requests in the application's state, where "
                f"Serve's own autoscaling of pool {pool.name} cannot see them: use the elastic policy, or give "
                "the pool a fixed size (min_replicas = max_replicas)"
            )


def delayed_swaps(config: ServeConfig) -> list[str]:
    """One line per pool of an elastic application whose ``deployment_config`` sets a Serve delay (the
    default there is none: ``config.ELASTIC_DELAYS``): Serve holds each of the policy's decisions that
    long, and a swap's new replicas wait for the GPUs of the replicas it removes."""
    if config.elastic is None:
        return []
    lines = []
    for pool in config.pools:
        autoscaling = pool.deployment_config.get("autoscaling_config") or {}
        delays = {key: autoscaling[key] for key in ELASTIC_DELAYS if autoscaling.get(key)}
        if delays:
            given = ", ".join(f"{key} {value}" for key, value in delays.items())
            lines.append(
                f"pool {pool.name}: {given} delays each elastic decision that long (a swap's new replicas "
                "wait for the GPUs of the ones it removes, and the policy holds its layouts on its own: "
                "elastic.policy_options dwell_startups); leave them out unless Serve must lag the policy"
            )
    return lines


def check_policies(config: ServeConfig) -> None:
    """Refuse (ConfigError, one line) an application whose config names a policy no table holds."""
    routing_policy(config.routing.policy)
    check_queue_policy(config)
    if config.elastic is not None:
        autoscaling_policy(config.elastic.policy, config.elastic.policy_options)
