"""Tenant limits: whether a tenant's next request is over one of its limits, and for how long.

Pure: the shared state (``serve/state.py``) keeps each tenant's recent admissions, its requests in flight
and the GPU-seconds its finished requests used, and asks :func:`limit_refusal` before it routes a request,
so that every router replica applies the same counts. A refused request gets 429 before any GPU work, with
``Retry-After`` and a ``code`` naming the limit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rayxdit.config import TenantLimits

RATE_WINDOW_S = 60.0
"""``requests_per_minute`` counts admissions over this sliding window."""
QUOTA_WINDOW_S = 3600.0
"""``gpu_seconds_per_hour`` counts GPU-seconds over this sliding window."""
MINUTE_S = 60
"""Usage by time window is counted a wall-clock minute at a time: the finest window a caller can ask for."""
BUCKET_WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}
"""The widths of ``GET /v1/usage``'s time buckets (those of OpenAI's usage API)."""
MAX_BUCKETS = 1440
"""The most buckets one ``GET /v1/usage`` answers with (a day of minutes, as OpenAI's usage API allows)."""


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


Used = dict[str, dict[str, tuple[int, float]]]
"""tenant -> pool -> (requests finished, their GPU-seconds)."""
Held = dict[str, tuple[float, float]]
"""pool -> (GPU-seconds its replicas were ready, GPU-seconds they were starting)."""


def count_used(used: Used, tenant: str, pool: str, requests: int, gpu_seconds: float) -> None:
    """Add ``requests`` of ``tenant`` on ``pool`` and their GPU-seconds to ``used``."""
    row = used.setdefault(tenant, {})
    total_requests, total_seconds = row.get(pool, (0, 0.0))
    row[pool] = (total_requests + requests, total_seconds + gpu_seconds)


def count_held(held: Held, pool: str, ready_s: float, starting_s: float) -> None:
    """Add GPU-seconds ``pool`` held ready and starting to ``held``."""
    total_ready, total_starting = held.get(pool, (0.0, 0.0))
    held[pool] = (total_ready + ready_s, total_starting + starting_s)


def usage_from_json(data: dict) -> tuple[Used, Held]:
    """``used`` and ``held`` as a journal's JSON holds them (lists for tuples)."""
    used = {t: {p: (int(n), float(s)) for p, (n, s) in pools.items()} for t, pools in data["used"].items()}
    held = {pool: (float(ready), float(starting)) for pool, (ready, starting) in data["held"].items()}
    return used, held


@dataclass
class UsageMinute:
    """What one wall-clock minute counted: requests finished in it, GPU time its pools held in it."""

    used: Used = field(default_factory=dict)
    held: Held = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps({"used": self.used, "held": self.held}).encode()

    @classmethod
    def from_json(cls, text: bytes | str) -> UsageMinute:
        return cls(*usage_from_json(json.loads(text)))


class UsageWindows:
    """Usage minute by minute (minutes of the wall clock, so that windows mean the same on every host and
    across restarts), kept ``kept_s``: the same counts as the totals, for ``GET /v1/usage``'s time windows.
    ``changed``: the minutes changed since the owner last wrote them to its journal."""

    def __init__(self, kept_s: float):
        self.kept_s = kept_s
        self.minutes: dict[int, UsageMinute] = {}
        self.changed: set[int] = set()

    def _minute(self, at: float) -> UsageMinute:
        start = int(at // MINUTE_S) * MINUTE_S
        self.changed.add(start)
        return self.minutes.setdefault(start, UsageMinute())

    def add_request(self, at: float, tenant: str, pool: str, gpu_seconds: float, requests: int = 1) -> None:
        """A request of ``tenant`` finished on ``pool`` at ``at`` (seconds since the epoch); -1 request and
        minus its GPU-seconds take it back."""
        count_used(self._minute(at).used, tenant, pool, requests, gpu_seconds)

    def add_held(self, start: float, end: float, pool: str, gpus: int, ready: bool) -> None:
        """``pool`` held ``gpus`` from ``start`` to ``end`` (seconds since the epoch), ready or starting;
        split at the minutes' boundaries."""
        at = start
        while at < end:
            upto = min(end, (math.floor(at / MINUTE_S) + 1) * MINUTE_S)
            held = (upto - at) * gpus
            count_held(self._minute(at).held, pool, held if ready else 0.0, 0.0 if ready else held)
            at = upto

    def trim(self, now: float) -> None:
        """Forget the minutes older than ``kept_s`` (their journal entries expire on their own)."""
        for start in [start for start in self.minutes if start < now - self.kept_s - MINUTE_S]:
            del self.minutes[start]
            self.changed.discard(start)

    def window(self, start: float, end: float) -> tuple[Used, Held]:
        """What the minutes from ``start`` up to ``end`` counted, summed (minute-aligned bounds)."""
        used: Used = {}
        held: Held = {}
        for at, minute in self.minutes.items():
            if not start <= at < end:
                continue
            for tenant, pools in minute.used.items():
                for pool, (requests, seconds) in pools.items():
                    count_used(used, tenant, pool, requests, seconds)
            for pool, (ready, starting) in minute.held.items():
                count_held(held, pool, ready, starting)
        return used, held


def usage_buckets(start: int, end: int, width: int | None) -> list[tuple[int, int]]:
    """The time buckets of a usage query from ``start`` to ``end`` (minute-aligned, ``start`` < ``end``):
    ``width`` seconds each from ``start`` (the last one cut at ``end``), or one bucket when None."""
    if width is None:
        return [(start, end)]
    return [(at, min(at + width, end)) for at in range(start, end, width)]


class UsageQueryError(ValueError):
    """A time window ``GET /v1/usage`` cannot answer: ``param`` names the query parameter at fault."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def usage_window_query(
    start_time: float | None, end_time: float | None, bucket_width: str | None, now: float
) -> tuple[int, int, int | None]:
    """``GET /v1/usage``'s time window checked: ``(start, end, width_s)`` with the bounds widened to whole
    minutes (``end``: ``now`` if not given; width None: one bucket). Raises :class:`UsageQueryError`."""
    if start_time is None:
        raise UsageQueryError(
            "start_time", "start_time (seconds since the epoch) is needed with end_time or bucket_width"
        )
    end_time = now if end_time is None else end_time
    if end_time <= start_time:
        raise UsageQueryError(
            "end_time", f"end_time ({end_time:.0f}) must come after start_time ({start_time:.0f})"
        )
    start = int(start_time // MINUTE_S) * MINUTE_S
    end = math.ceil(end_time / MINUTE_S) * MINUTE_S
    width = None if bucket_width is None else BUCKET_WIDTHS.get(bucket_width)
    if bucket_width is not None and width is None:
        raise UsageQueryError(
            "bucket_width", f"bucket_width {bucket_width!r} is not one of {', '.join(BUCKET_WIDTHS)}"
        )
    if width is not None and (count := math.ceil((end - start) / width)) > MAX_BUCKETS:
        raise UsageQueryError(
            "bucket_width",
            f"{count} buckets of {bucket_width}: at most {MAX_BUCKETS} per query (a wider bucket_width or a "
            "shorter window)",
        )
    return start, end, width


def rows_by_model(by_pool: dict[str, dict[str, dict[str, float]]], model_of: Callable[[str], str]):
    """``usage_by_pool``'s rows summed model by model: tenant -> model -> row."""
    by_model: dict[str, dict[str, dict[str, float]]] = {}
    for tenant, pools in by_pool.items():
        for pool, row in pools.items():
            total = by_model.setdefault(tenant, {}).setdefault(model_of(pool), no_usage())
            for key, value in row.items():
                total[key] += value
    return by_model
