"""The order in which requests waiting for a pool's replicas start: first come first served, or a weighted
fair share across tenants. Plain data, no Ray: the application's state orders each pool's waiting requests
with a :class:`WaitingLine`, and the fleet simulator orders its pools' queues with the same class.

**Fair share** is start-time fair queuing (Goyal, Vin and Cheng, SIGCOMM 1996) over each tenant's requests,
the cost of a request being its GPU-seconds as the router estimates them (its cost units; one pool's ranks
are the same for all). A request that arrives gets a start tag, the larger of the line's virtual time and
its tenant's last finish tag, and a finish tag, its start tag plus its cost divided by the tenant's weight;
the waiting request with the smallest start tag goes next (ties: the earlier arrival), and the virtual time
becomes its start tag. So, while tenants have work waiting, each gets GPU time in proportion to its weight
whatever it sends, and a tenant alone gets all of it: no replica idles while anyone waits. With one tenant
the order is the order of arrival.

A tenant that was below its share comes back with a bounded credit: its start tag may lie up to
``burst`` of its own requests (their cost over its weight) before the virtual time, never before its own
last finish tag. Plain start-time fair queuing saves no credit at all, so a light tenant's two requests a
moment apart alternate with a flooding tenant's (its second waits for one of the flood's besides its
first), where alone the second waits for the first only: its tail latency grows under a flood although
it sends less than its share. With the credit, a burst of up to ``burst + 1`` requests from a tenant under its share goes
as it would alone; a tenant at or above its share keeps its finish tags ahead of the virtual time and gets
nothing from it, so shares under a sustained load are unchanged, and what a returning tenant can take
ahead of the others is bounded by ``burst`` requests.

**First come first served** (``fifo``) orders by arrival alone.

**Shortest first** (``shortest_first``) starts the cheapest waiting request first (ties: the earlier
arrival), whoever sent it. Under an overload it keeps the most requests within their deadlines: a
request's deadline grows with its cost, so a large request waits behind the small ones it would otherwise
make late, and admission, which counts only what would start before a request, refuses at once the large
ones that could not make it, where first come first served lets the large requests crowd out the small
ones. A large request can wait until its deadline (then it leaves the line with a 504) for as long as
smaller ones keep coming; below saturation the line is short and the order hardly matters.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Hashable
from dataclasses import dataclass, field

FIFO, FAIR_SHARE, SHORTEST_FIRST = "fifo", "fair_share", "shortest_first"
QUEUE_POLICIES = (FIFO, FAIR_SHARE, SHORTEST_FIRST)
"""The queue policies by name (``routing.queue_policy``)."""
LINE_POLICIES = (FAIR_SHARE, SHORTEST_FIRST)
"""The queue policies whose order the application's state keeps: requests wait in its line, not in Serve's
queues (``fifo`` leaves the order to Serve's queues)."""
BURST_REQUESTS = 2.0
"""A tenant under its share may start this many of its requests ahead of the line's virtual time."""


@dataclass(order=True)
class _Entry:
    start: float
    arrival: int
    key: Hashable = field(compare=False)
    tenant: str = field(compare=False)
    cost: float = field(compare=False, default=0.0)


@dataclass
class WaitingLine:
    """The requests waiting for one pool, in the order of ``policy``. ``key``: whatever identifies a request
    to the caller (a routing ticket, a simulated request)."""

    policy: str = FAIR_SHARE
    burst: float = BURST_REQUESTS
    """How many of its own requests a tenant under its share may start ahead of the virtual time."""
    virtual: float = 0.0
    """The start tag of the request let in last."""
    finish_tags: dict[str, float] = field(default_factory=dict)
    """Each tenant's last finish tag (a tenant's requests start one after the other in virtual time)."""
    _heap: list[_Entry] = field(default_factory=list)
    _entries: dict[Hashable, _Entry] = field(default_factory=dict)
    _arrivals: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        if self.policy not in QUEUE_POLICIES:
            raise ValueError(f"queue policy '{self.policy}' is not one of {', '.join(QUEUE_POLICIES)}")

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def push(self, key: Hashable, tenant: str, cost: float, weight: float = 1.0) -> float:
        """Add a waiting request of ``tenant`` (its ``weight``, > 0) costing ``cost``; its start tag."""
        arrival = next(self._arrivals)
        if self.policy == FIFO:
            start = float(arrival)
        elif self.policy == SHORTEST_FIRST:
            start = max(cost, 0.0)
        else:
            start = self._start_tag(tenant, cost, weight)
            self.finish_tags[tenant] = start + max(cost, 0.0) / weight
        entry = _Entry(start, arrival, key, tenant, cost)
        self._entries[key] = entry
        heapq.heappush(self._heap, entry)
        return start

    def _start_tag(self, tenant: str, cost: float, weight: float) -> float:
        """The start tag a request of ``tenant`` costing ``cost`` gets now (fair share)."""
        credit = self.burst * max(cost, 0.0) / weight
        return max(self.virtual - credit, self.finish_tags.get(tenant, -math.inf))

    def pop(self) -> Hashable | None:
        """The request to start next (removed from the line), None if none waits."""
        while self._heap:
            entry = heapq.heappop(self._heap)
            if self._entries.get(entry.key) is entry:
                del self._entries[entry.key]
                self.virtual = max(self.virtual, entry.start) if self.policy == FAIR_SHARE else self.virtual
                return entry.key
        return None

    def remove(self, key: Hashable) -> bool:
        """Take a request out of the line (its client left, its deadline passed); whether it waited. Its
        tenant keeps its finish tag: what a tenant sends and withdraws still counted against its share."""
        return self._entries.pop(key, None) is not None

    def ahead_of(self, tenant: str, cost: float, weight: float = 1.0) -> tuple[int, float]:
        """The requests (how many, their cost) that would start before one of ``tenant`` costing ``cost``
        sent now: what its wait depends on. In fair order those of every tenant up to the start tag it would
        get (a tenant flooding the line is ahead of a newcomer by at most about one request); shortest first:
        those costing no more; first come first served: all of them."""
        if self.policy == FIFO:
            return len(self._entries), sum(entry.cost for entry in self._entries.values())
        start = max(cost, 0.0) if self.policy == SHORTEST_FIRST else self._start_tag(tenant, cost, weight)
        ahead = [entry for entry in self._entries.values() if entry.start <= start]
        return len(ahead), sum(entry.cost for entry in ahead)

    def waiting_by_tenant(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry in self._entries.values():
            counts[entry.tenant] = counts.get(entry.tenant, 0) + 1
        return counts
