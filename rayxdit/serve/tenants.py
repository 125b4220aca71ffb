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
