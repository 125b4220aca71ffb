"""Tenant limits: whether a tenant's next request is over one of its limits, and for how long.

Pure: the shared state (``serve/state.py``) keeps each tenant's recent admissions, its requests in flight
and the GPU-seconds its finished requests used, and asks :func:`limit_refusal` before it routes a request,
so that every router replica applies the same counts. A refused request gets 429 before any GPU work, with
``Retry-After`` and a ``code`` naming the limit.
"""

from __future__ import annotations

from collections.abc import Sequence

from rayxdit.config import TenantLimits

RATE_WINDOW_S = 60.0
"""``requests_per_minute`` counts admissions over this sliding window."""
QUOTA_WINDOW_S = 3600.0
"""``gpu_seconds_per_hour`` counts GPU-seconds over this sliding window."""


def has_limits(limits: TenantLimits | None) -> bool:
    """Whether a tenant with ``limits`` has any (then its requests are counted against them)."""
    return limits is not None and any(
        limit is not None
        for limit in (limits.requests_per_minute, limits.max_concurrent, limits.gpu_seconds_per_hour)
    )


def limit_refusal(
    limits: TenantLimits,
    admitted: Sequence[float],
    in_flight: int,
    spent: Sequence[tuple[float, float]],
    now: float,
) -> tuple[str, float | None] | None:
    """``(code, retry_after_s)`` when a request of a tenant with ``limits`` must be refused now, else None.

    ``admitted``: when its requests were admitted (oldest first); ``in_flight``: its requests admitted and
    not finished; ``spent``: ``(when, gpu_seconds)`` of its finished requests (oldest first). Codes:
    ``rate_limited`` (retry when the oldest admission of the window leaves it), ``concurrency_limited``
    (retry when one finishes: unknown here, None), ``quota_exceeded`` (retry when enough GPU-seconds have
    left the window)."""
    if limits.max_concurrent is not None and in_flight >= limits.max_concurrent:
        return "concurrency_limited", None
    if limits.requests_per_minute is not None:
        recent = [at for at in admitted if at > now - RATE_WINDOW_S]
        if len(recent) >= limits.requests_per_minute:
            # The window holds one fewer once the first of those that must leave has left.
            leaving = recent[len(recent) - limits.requests_per_minute]
            return "rate_limited", max(0.0, leaving + RATE_WINDOW_S - now)
    if limits.gpu_seconds_per_hour is not None:
        recent_spend = [(at, seconds) for at, seconds in spent if at > now - QUOTA_WINDOW_S]
        total = sum(seconds for _, seconds in recent_spend)
        if total >= limits.gpu_seconds_per_hour:
            for at, seconds in recent_spend:  # the oldest leave first
                total -= seconds
                if total < limits.gpu_seconds_per_hour:
                    return "quota_exceeded", max(0.0, at + QUOTA_WINDOW_S - now)
    return None


ANONYMOUS = "anonymous"
"""The tenant of requests made without API keys."""
UNATTRIBUTED = "unattributed"
"""Where the held GPU-seconds of pools that no tenant used go (an admin sees them)."""


def no_usage() -> dict[str, float]:
    """A tenant's usage row before it used anything."""
    return {
        "requests": 0,
        "gpu_seconds": 0.0,
        "idle_gpu_seconds": 0.0,
        "startup_gpu_seconds": 0.0,
        "total_gpu_seconds": 0.0,
    }


def attributed_usage(
    used: dict[str, dict[str, tuple[int, float]]], held: dict[str, tuple[float, float]]
) -> dict[str, dict[str, float]]:
    """What each tenant cost: its requests' GPU-seconds and, pool by pool, a share of the pool's idle and
    start-up GPU-seconds in proportion to its use of the pool.

    ``used``: tenant -> pool -> (requests, GPU-seconds of its finished requests); ``held``: pool ->
    (GPU-seconds its replicas were ready, GPU-seconds they were starting). A pool's idle time is what its
    ready replicas held beyond the requests' GPU-seconds. The pools nobody used go to ``UNATTRIBUTED``, so
    that the idle and start-up shares of all entries sum to the pools' idle and start-up GPU-seconds."""
    totals: dict[str, float] = {}
    for pools in used.values():
        for pool, (_, seconds) in pools.items():
            totals[pool] = totals.get(pool, 0.0) + seconds
    usage: dict[str, dict[str, float]] = {}

    def entry(tenant: str) -> dict[str, float]:
        return usage.setdefault(tenant, no_usage())

    for tenant, pools in used.items():
        for pool, (requests, seconds) in pools.items():
            row = entry(tenant)
            row["requests"] += requests
            row["gpu_seconds"] += seconds
            ready, starting = held.get(pool, (0.0, 0.0))
            if totals[pool] > 0:
                share = seconds / totals[pool]
                row["idle_gpu_seconds"] += max(0.0, ready - totals[pool]) * share
                row["startup_gpu_seconds"] += starting * share
    for pool, (ready, starting) in held.items():
        if totals.get(pool, 0.0) <= 0 and ready + starting > 0:
            row = entry(UNATTRIBUTED)
            row["idle_gpu_seconds"] += ready
            row["startup_gpu_seconds"] += starting
    for row in usage.values():
        row["total_gpu_seconds"] = row["gpu_seconds"] + row["idle_gpu_seconds"] + row["startup_gpu_seconds"]
    return usage


def usage_by_pool(
    used: dict[str, dict[str, tuple[int, float]]], held: dict[str, tuple[float, float]]
) -> dict[str, dict[str, dict[str, float]]]:
    """``attributed_usage`` pool by pool: tenant -> pool -> its row there (a pool's idle and start-up time is
    shared among its own users, so each tenant's rows sum to its row of ``attributed_usage``)."""
    by_pool: dict[str, dict[str, dict[str, float]]] = {}
    for pool in {pool for pools in used.values() for pool in pools} | set(held):
        users = {tenant: {pool: pools[pool]} for tenant, pools in used.items() if pool in pools}
        for tenant, row in attributed_usage(users, {pool: held[pool]} if pool in held else {}).items():
            by_pool.setdefault(tenant, {})[pool] = row
    return by_pool
