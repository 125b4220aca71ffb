"""Which pool serves a request: pure functions of the request's cost, the pools and their load.

Cost is megapixels x steps x (2 with true CFG) x images: proportional to transformer work. Each pool
declares the lowest cost it wants (``route_min_cost``); a request goes to the pool of its model with the
highest threshold not above its cost, so cheap requests fill small pools (most images per GPU under load)
and expensive ones get big pools (lowest latency). A pool that is saturated (as many requests outstanding
as it has ready replicas, each running one at a time) or unavailable yields to the pool nearest in size.
Load is the whole application's (see ``serve/state.py``), not one router replica's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rayxdit.config import PoolConfig
from rayxdit.limits import ResolvedRequest


def request_cost(req: ResolvedRequest, uses_cfg: bool) -> float:
    """Megapixels x steps x (2 when the model runs CFG for this request) x images."""
    cfg_factor = 2 if uses_cfg else 1
    return req.width * req.height / 1e6 * req.steps * cfg_factor * req.batch


def preferred_pool(pools: Sequence[PoolConfig], cost: float) -> PoolConfig:
    """The pool whose threshold is the highest not above ``cost`` (the cheapest pool if none is)."""
    eligible = [pool for pool in pools if pool.route_min_cost <= cost]
    if not eligible:
        return min(pools, key=lambda pool: pool.route_min_cost)
    return max(eligible, key=lambda pool: (pool.route_min_cost, pool.ranks))


def candidate_order(pools: Sequence[PoolConfig], cost: float) -> list[PoolConfig]:
    """The preferred pool first, then the others nearest in rank count (ties: the larger pool first)."""
    first = preferred_pool(pools, cost)
    rest = [pool for pool in pools if pool.name != first.name]
    rest.sort(key=lambda pool: (abs(pool.ranks - first.ranks), -pool.ranks))
    return [first, *rest]


@dataclass(frozen=True)
class PoolLoad:
    """One pool as the whole application sees it."""

    ready_replicas: int = 0
    """Replicas whose worker group is up (each runs one request at a time)."""
    outstanding: int = 0
    """Requests routed to the pool and not finished yet (running or queued), from every router replica."""

    @property
    def free(self) -> bool:
        return self.outstanding < self.ready_replicas


def choose_pool(
    pools: Sequence[PoolConfig],
    cost: float,
    loads: Mapping[str, PoolLoad],
    unavailable: frozenset[str] = frozenset(),
) -> list[PoolConfig]:
    """Pools to try, in order: available pools with a free ready replica by preference, then the others
    (their queues absorb the burst; a cold pool, with no ready replica, scales up for it), unavailable ones
    never."""
    order = [pool for pool in candidate_order(pools, cost) if pool.name not in unavailable]
    free = [pool for pool in order if loads.get(pool.name, PoolLoad()).free]
    busy = [pool for pool in order if pool not in free]
    return free + busy
