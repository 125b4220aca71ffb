"""What a pool's ranks hold, and which requests they cannot: pure functions of plain data.

A pool declares its memory per rank once it is up: the memory a rank may use (``capacity``: its GPU's, or
the pool's ``memory_gib`` cap), what its weights and buffers take before any request (``resident``), and
what a request adds on top, measured (``peak - resident`` of its warm-up, then of every request it serves).
A request's activations grow with its **work** (``ResolvedRequest.work``), megapixels x frames x images
(latent tokens and the VAE's pixels are both proportional to it; an image's CFG branches run one after the
other); the pool keeps the largest measured cost per unit of work, so its estimate of a larger request errs
on the side of refusing.

A request whose work would take a rank past :data:`HEADROOM` of its capacity is refused before any GPU
work (400 ``request_too_large``, naming the largest this model's pools hold), where an attempt would have
ended in an out-of-memory error. A pool whose ranks ran out of memory on a request anyway (507
``out_of_memory``, at once, as before) learns from it: no request as large is sent there again. A pool that has measured nothing yet (CPU ranks, which have no
allocator statistics, or before its first request) refuses nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

HEADROOM = 0.92
"""Of a rank's capacity, what requests may be planned to use: the caching allocator's fragmentation and the
kernels' workspaces are not in a peak measured by ``max_memory_allocated``."""


@dataclass(frozen=True)
class MemoryProfile:
    """One pool replica's memory per rank, in GiB (the most any of its ranks holds)."""

    capacity_gib: float
    """What one rank may use: its GPU's memory, or the pool's ``memory_gib`` cap."""
    resident_gib: float
    """Weights and buffers before any request."""
    gib_per_work: float = 0.0
    """Activations per unit of work (:func:`rayxdit.limits.request_work`), the largest measured (0: nothing
    measured yet)."""
    measured_work: float = 0.0
    """The largest request measured so far."""

    @property
    def max_work(self) -> float:
        """The largest request this replica's ranks hold (inf when nothing is measured yet)."""
        if self.gib_per_work <= 0:
            return math.inf
        return max(HEADROOM * self.capacity_gib - self.resident_gib, 0.0) / self.gib_per_work

    def with_reports(self, reports: Iterable[dict[str, float] | None]) -> MemoryProfile:
        """With what each rank reported of its last request (``work`` and ``peak_gib``; ranks that made none,
        or report None, add nothing)."""
        profile = self
        for report in reports:
            if report is not None and report.get("work"):
                profile = profile.measured(report["work"], report["peak_gib"])
        return profile

    def measured(self, work: float, peak_gib: float) -> MemoryProfile:
        """With a request of ``work`` that peaked at ``peak_gib`` on a rank."""
        if work <= 0:
            return self
        rate = max(peak_gib - self.resident_gib, 0.0) / work
        return replace(
            self, gib_per_work=max(self.gib_per_work, rate), measured_work=max(self.measured_work, work)
        )

    def describe(self) -> dict[str, Any]:
        """For ``GET /v1/models`` and logs: the profile with its derived limit (None: unlimited)."""
        limit = self.max_work
        return {
            **asdict(self),
            "max_megapixels": round(limit, 3) if math.isfinite(limit) else None,
        }

    @classmethod
    def of(cls, described: dict[str, Any]) -> MemoryProfile:
        """The inverse of :meth:`describe` (profiles travel between actors as plain dicts)."""
        return cls(
            capacity_gib=described["capacity_gib"],
            resident_gib=described["resident_gib"],
            gib_per_work=described["gib_per_work"],
            measured_work=described["measured_work"],
        )


def profile_at_start(ranks: Iterable[dict[str, float] | None]) -> MemoryProfile | None:
    """A replica's profile from each rank's report after its start and warm-up (``capacity_gib``,
    ``resident_gib`` and ``peak_gib`` with the ``work`` of its largest warm-up, or None for a rank with no
    allocator statistics): the tightest capacity, the most resident, the largest rate."""
    reports = list(ranks)
    if not reports or any(report is None for report in reports):
        return None
    return MemoryProfile(
        capacity_gib=min(report["capacity_gib"] for report in reports),
        resident_gib=max(report["resident_gib"] for report in reports),
    ).with_reports(reports)


OUT_OF_MEMORY_MARGIN = 0.99
"""A request just below one that ran out of memory may still fit; one of the same size is not tried again."""


def pool_limit(profiles: Iterable[MemoryProfile], failed_work: float = math.inf) -> float:
    """The largest request every replica of a pool holds: what their measurements allow, and below the
    smallest request that ran out of memory there (``failed_work``). inf: nothing measured, nothing failed."""
    measured = min((profile.max_work for profile in profiles), default=math.inf)
    return min(measured, failed_work * OUT_OF_MEMORY_MARGIN)


def too_large(work: float, limits: dict[str, float]) -> bool:
    """Whether no pool of a model holds a request of ``work`` (``limits``: each pool's :func:`pool_limit`)."""
    return bool(limits) and all(work > limit for limit in limits.values())
