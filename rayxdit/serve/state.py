"""The application's shared state: one Serve replica that every router and pool replica reaches by handle.

Router replicas are interchangeable, so what a later request needs lives here, not in one of them:

- **Load.** Pool replicas report every second whether they are starting or ready (and how long their
  start took); routers ask here which pool takes a request, and the choice (the pure ``routing.route`` over
  the whole application's load: where it finishes first) is admitted here at once, so two routers cannot
  both see the same free replica. A request no pool can finish before its deadline is refused here, with
  the wait after which it could. A reservation is a lease: the router renews it while it waits for the
  pool (every two seconds; :meth:`AppState.renew`), and it ends when the router reports the request
  finished, however it ended (with the engine's time when it ran: each pool's seconds per cost unit are
  learned from them), or ``router.lease_s`` (15 s) after its last renewal if that router died.
- **Images** made with ``response_format=url``: kept for a TTL within a byte budget, retrievable through any
  router replica.
- **Jobs** (videos, background images; ``rayxdit.serve.jobs``): their status, progress (pushed by the pool
  replica running them, from rank 0's step counter), cancellation and results, kept for a TTL within a
  byte budget, seen alike by every router replica.

- **Usage**: each tenant's requests and GPU-seconds per pool, the GPU time each pool's replicas held (ready
  or starting), and limited tenants' rate and quota windows (``serve/tenants.py``).

If this replica restarts, routing recovers within a heartbeat (reservations come back with the routers' next
renewals). Images, jobs and usage are written through to the state's journal (``serve/durable.py``): with
``state.redis_url`` the new replica reads them back and loses nothing but the GPU time held while no state
replica ran; without it (the embedded default) they are lost (clients get 404, a job's driver stops it, usage
starts again from zero).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
import uuid
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from rayxdit.config import PoolConfig, RouterConfig, ServeConfig, TenantLimits
from rayxdit.serve import metrics
from rayxdit.serve.batches import LineStore
from rayxdit.serve.budget import BudgetCache
from rayxdit.serve.durable import (
    Item,
    Journal,
    MemoryJournal,
    cluster_journal,
    open_journal,
    wall_offset,
)
from rayxdit.serve.fairness import LINE_POLICIES, WaitingLine
from rayxdit.serve.files import FileStore
from rayxdit.serve.jobs import JobStore
from rayxdit.serve.memory import MemoryProfile, pool_limit, too_large
from rayxdit.serve.policies import routing_policy
from rayxdit.serve.quarantine import QuarantineBook, node_is_alive
from rayxdit.serve.routing import (
    PoolLoad,
    PoolSpec,
    ServiceFit,
    Slacks,
    admit,
    idle_pools,
    service_rates,
    service_time,
)
from rayxdit.serve.sizing import ArrivalCosts, arrival_rate
from rayxdit.serve.tenants import (
    ANONYMOUS,
    QUOTA_WINDOW_S,
    RATE_WINDOW_S,
    Held,
    UsageMinute,
    UsageWindows,
    Used,
    attributed_usage,
    count_held,
    count_used,
    has_limits,
    limit_refusal,
    no_usage,
    usage_buckets,
    usage_by_pool,
    usage_from_json,
)

logger = logging.getLogger("ray.serve")
HEARTBEAT_S = 1.0
"""How often pool replicas report."""
STALE_AFTER_S = 5.0
"""A replica not heard from for this long is gone (scaled down, or dead)."""
STATE_DEPLOYMENT = "state"
"""The name of the application's state deployment."""
ARRIVALS_METRIC, ARRIVAL_COST_METRIC, QUIET_METRIC, COUNTED_METRIC, WAITING_METRIC = (
    "arrivals_per_s",
    "arrival_cost",
    "quiet_s",
    "counted_s",
    "waiting",
)
"""The state's custom autoscaling metrics, one of each per model (``arrivals_per_s.<model>``: arrivals per
second over the last ``sizing.ARRIVALS_WINDOW_S``, refused ones too; ``arrival_cost.<model>``: their mean
cost over ``sizing.ARRIVAL_COST_WINDOW_S``; ``quiet_s.<model>``: seconds since its last arrival;
``counted_s.<model>``: how long it has counted them, its uptime), and one per pool with a line in the state
(``routing.queue_policy`` fair_share, shortest_first; ``waiting.<pool>``: requests waiting in its line)."""
GAUGE_REFRESH_S = 1.0
"""Gauges are set again at least this often (on the replicas' heartbeats): Ray's metrics agent drops a
gauge not set for two report intervals."""
USAGE_SPACE = "usage"
"""The journal's space of usage: ``totals`` (requests and GPU-seconds per tenant and pool, GPUs held per
pool), ``minute:<start>`` (the same counts for one wall-clock minute, kept ``state.usage_kept_days``) and
``tenant:<name>`` (a limited tenant's rate and quota windows)."""
USAGE_SAVE_S = 1.0
"""Held GPU-seconds reach the journal at least this often (a restart loses at most this much of them)."""
FINISHED_CLAIM_S = 600.0
"""How long a finished attempt's report is remembered as counted (a report sent again comes within the
router's STATE_RESTART_S)."""


def _usage_rows(used: Used, held: Held, tenant: str | None, by_pool: bool) -> dict[str, Any]:
    """Every tenant's usage rows, or only ``tenant``'s (an empty row if it used nothing)."""
    rows: dict[str, Any] = usage_by_pool(used, held) if by_pool else attributed_usage(used, held)
    if tenant is None:
        return rows
    return {tenant: rows.get(tenant, {} if by_pool else no_usage())}


@dataclass
class _Replica:
    ready: bool
    seen: float
    memory: MemoryProfile | None = None


@dataclass
class _Reservation:
    pool: str
    cost: float
    expires: float
    tenant: str = ANONYMOUS
    metered: bool = False
    """Whether its tenant has limits (then its requests in flight and GPU-seconds are counted)."""
    background: bool = False
    """A batch's line: it gives its replica up to an online request that would wait (preempted)."""


@dataclass
class _TenantUse:
    """A limited tenant's recent use (what ``tenants.limit_refusal`` reads)."""

    admitted: deque[float] = field(default_factory=deque)
    """When its requests were admitted, within the last RATE_WINDOW_S."""
    spent: deque[tuple[float, float]] = field(default_factory=deque)
    """(when, GPU-seconds) of its finished requests, within the last QUOTA_WINDOW_S."""

    def trim(self, now: float) -> None:
        while self.admitted and self.admitted[0] <= now - RATE_WINDOW_S:
            self.admitted.popleft()
        while self.spent and self.spent[0][0] <= now - QUOTA_WINDOW_S:
            self.spent.popleft()


class ImageStore:
    """Bytes by id, each kept ``ttl_s`` seconds, oldest evicted first beyond ``max_bytes``; written through to
    ``journal`` and read back from it (``durable``)."""

    SPACE = "images"

    def __init__(self, ttl_s: float, max_bytes: int, journal: Journal | None = None):
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.journal = journal or MemoryJournal()
        self.items: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self.bytes = 0
        now = time.monotonic()
        kept = self.journal.load(self.SPACE)
        for key, (data, left_s) in sorted(kept.items(), key=lambda item: item[1][1]):  # oldest first
            self.items[key] = (data, now + min(left_s, ttl_s))
            self.bytes += len(data)
        self._evict(now)

    def _evict(self, now: float, room: int = 0) -> None:
        while self.items and (next(iter(self.items.values()))[1] < now or self.bytes + room > self.max_bytes):
            key, (data, _) = self.items.popitem(last=False)
            self.bytes -= len(data)
            self.journal.drop(self.SPACE, key)

    def put(self, data: bytes, now: float | None = None) -> str | None:
        """Store ``data``; None if it alone exceeds the budget."""
        now = time.monotonic() if now is None else now
        if len(data) > self.max_bytes:
            return None
        self._evict(now, len(data))
        key = uuid.uuid4().hex
        self.items[key] = (data, now + self.ttl_s)
        self.bytes += len(data)
        self.journal.save(self.SPACE, key, data, self.ttl_s)
        return key

    def get(self, key: str, now: float | None = None) -> bytes | None:
        now = time.monotonic() if now is None else now
        self._evict(now)
        entry = self.items.get(key)
        return None if entry is None else entry[0]


class AppState:
    """Deployed once per application (one replica); see the module docstring. Every method is ``async``
    without awaiting anything: Serve runs them one at a time on the replica's event loop (it would run
    plain methods concurrently in threads), so a routing decision and its admission are atomic."""

    def __init__(self, config: ServeConfig):
        self.pools: dict[str, PoolConfig] = {pool.name: pool for pool in config.pools}
        self.specs: dict[str, list[PoolSpec]] = defaultdict(list)
        for pool in config.pools:
            self.specs[pool.served_model_name].append(PoolSpec.of(pool))
        self.replicas: dict[str, dict[str, _Replica]] = defaultdict(dict)
        self.reservations: dict[str, _Reservation] = {}
        self.started = time.monotonic()
        self.last_arrival: dict[str, float] = {}
        self.arrived: dict[str, deque[float]] = defaultdict(deque)
        """When each model's requests of the last ``sizing.ARRIVALS_WINDOW_S`` arrived (refused ones too)."""
        self.arrival_costs: dict[str, ArrivalCosts] = defaultdict(ArrivalCosts)
        """The mean cost of each model's arrivals (refused ones too) over sizing.ARRIVAL_COST_WINDOW_S."""
        self.finished: OrderedDict[str, float] = OrderedDict()
        """Tickets finished within the last lease (when): a renewal or a routing call already on its way
        when its request finished (or its client left) must not bring the reservation back."""
        self.fits: dict[str, ServiceFit] = defaultdict(ServiceFit)
        self.startups: dict[str, float] = {}
        self.failed_work: dict[str, float] = {}
        """Per pool, the smallest request (megapixels x frames x images) that ran out of its ranks' memory."""
        self.published: dict[str, tuple[int, int, int]] = {}
        self.published_at = -math.inf
        self.route_policy = routing_policy(config.routing.policy)
        self.typical_wait = config.routing.admission == "typical_wait"
        """Whether admission also refuses what would wait longer than the typical request can
        (``routing.retry_after``)."""
        self.slacks: dict[str, Slacks] = defaultdict(Slacks)
        """How long each model's arriving requests could wait and make their deadlines (typical_wait)."""
        # Cold pools that the shared budget has no room for are routed to last (routing.route): only an
        # elastic application shares a budget; pools that scale on their own compete in Serve's placement.
        self.budget = (
            BudgetCache(config.elastic.budget_ranks, [pool.accelerator for pool in config.pools])
            if config.elastic is not None
            else None
        )
        queue_policy = config.routing.queue_policy
        self.gated = queue_policy in LINE_POLICIES
        """Whether requests wait for a pool's replicas here, in its line (else in Serve's queues)."""
        self.lines: dict[str, WaitingLine] = defaultdict(lambda: WaitingLine(queue_policy))
        """Each pool's requests waiting for a replica (gated only)."""
        self.let_in: dict[str, set[str]] = defaultdict(set)
        """Each pool's tickets let through to its replicas, at most one per ready replica (gated only)."""
        self.preempted: set[str] = set()
        """Batch lines preempted by online requests, until their drivers release them."""
        self.preemptions: dict[str, asyncio.Future] = {}
        """Drivers waiting to hear that their batch line is preempted (``wait_preempted``)."""
        self.turns: dict[str, asyncio.Future] = {}
        """Routers waiting for a ticket's turn (``wait_turn``)."""
        router: RouterConfig = config.router
        self.lease_s = router.lease_s
        """A reservation not renewed for this long is dropped: its router died (routers renew every 2 s)."""
        self.tenant_use: dict[str, _TenantUse] = defaultdict(_TenantUse)
        """Limited tenants' recent use (the router sends each request's tenant and its limits)."""
        self.used: dict[str, dict[str, tuple[int, float]]] = defaultdict(dict)
        """tenant -> pool -> (requests finished, their GPU-seconds), since ``since``."""
        self.held: dict[str, tuple[float, float]] = defaultdict(lambda: (0.0, 0.0))
        """pool -> (GPU-seconds its replicas were ready, were starting), from their heartbeats."""
        self.windows = UsageWindows(config.state.usage_kept_days * 86400)
        """The same counts minute by minute, for usage by time window."""
        self.since = time.time()
        """Since when usage is counted (the wall-clock time): this replica's start, or with a durable journal
        the first start of the application's state."""
        self.journal = open_journal(config.state.resolved_redis_url(), config.state.key_prefix)
        self.usage_saved_at = -math.inf
        self._restore_usage()
        self.images = ImageStore(router.image_ttl_s, router.max_stored_bytes, self.journal)
        self.jobs = JobStore(router.job_ttl_s, router.max_job_bytes, router.job_lease_s, self.journal)
        self.files = FileStore(router.job_ttl_s, router.max_job_bytes, journal=self.journal)
        self.batch_lines = LineStore(router.job_ttl_s, self.journal)
        # In Ray's GCS, not the journal: node ids mean something to this cluster only, and the records must
        # outlive this replica also without a Redis (draining a node moves the replicas on it, this one too).
        self.quarantine = QuarantineBook(config.quarantine, cluster_journal(config.state.key_prefix))

    # ----- load -----------------------------------------------------------------------------------------
    async def report(
        self,
        pool: str,
        replica: str,
        ready: bool,
        startup_s: float | None = None,
        memory: dict[str, Any] | None = None,
    ) -> None:
        """A pool replica's heartbeat: starting (``ready`` False) or ready, once up how long its start took,
        and what its ranks' memory holds (:meth:`MemoryProfile.describe`; None: not measured, CPU ranks)."""
        now = time.monotonic()
        previous = self.replicas[pool].get(replica)
        if previous is not None:  # the GPUs were held since its last heartbeat (a silence counts as gone)
            seconds = min(now - previous.seen, STALE_AFTER_S)
            held = seconds * self.pools[pool].ranks
            count_held(self.held, pool, held if previous.ready else 0.0, 0.0 if previous.ready else held)
            wall = time.time()
            self.windows.add_held(wall - seconds, wall, pool, self.pools[pool].ranks, previous.ready)
        self.replicas[pool][replica] = _Replica(ready, now, MemoryProfile.of(memory) if memory else None)
        if now - self.usage_saved_at >= USAGE_SAVE_S:
            self._save_usage(now)
        if startup_s is not None:
            self.startups[pool] = startup_s
        if ready and self.gated:
            self._let_in(pool)
        if time.monotonic() - self.published_at >= GAUGE_REFRESH_S:  # gauges fade unless set again
            self.published_at = time.monotonic()
            self.published.clear()
            self._loads()
            self.quarantine.publish()

    # ----- failing hardware (serve/quarantine.py) ---------------------------------------------------------
    async def group_failed(
        self, node: str, gpus: list[str], pool: str, cause: str, faults: list[str]
    ) -> dict[str, Any] | None:
        """A pool replica's worker group failed on ``node`` (or its GPUs report ``faults``): the node's
        quarantine record when it is out of service (now or already), else None."""
        record = self.quarantine.failed(node, gpus, pool, cause, faults)
        return None if record is None else dataclasses.asdict(record)

    async def quarantined(self) -> list[dict[str, Any]]:
        """Nodes out of service, oldest first, each with ``alive``: still a live (drained) Ray node."""
        return [{**record, "alive": node_is_alive(record["node"])} for record in self.quarantine.listing()]

    async def return_node(self, node: str) -> dict[str, Any] | None:
        """Forget ``node``'s quarantine (``rayxdit quarantine return``): its record (None: it had none),
        with ``alive``: still a live Ray node, drained until its Ray restarts (Ray cannot undrain)."""
        record = self.quarantine.give_back(node)
        return None if record is None else {**dataclasses.asdict(record), "alive": node_is_alive(node)}

    async def loads(self) -> dict[str, PoolLoad]:
        """Every pool's replicas, outstanding requests and learned rates, as of now."""
        return self._loads()

    def _trusted_cost(self, name: str) -> float:
        """Up to which request cost ``name``'s estimate may refuse a request: its own measurements' reach;
        a configured prior is trusted; an extrapolation from the model's measured pools, as far as they."""
        if name in self.fits and self.fits[name].weight:
            return self.fits[name].trusted_cost
        if self.pools[name].seconds_per_cost:
            return math.inf
        model = self.pools[name].served_model_name
        reaches = [
            self.fits[spec.name].trusted_cost
            for spec in self.specs[model]
            if spec.name in self.fits and self.fits[spec.name].weight
        ]
        return min(reaches) if reaches else math.inf

    def _loads(self) -> dict[str, PoolLoad]:
        now = time.monotonic()
        for replicas in self.replicas.values():
            for name in [name for name, seen in replicas.items() if now - seen.seen > STALE_AFTER_S]:
                del replicas[name]
        for ticket in [ticket for ticket, held in self.reservations.items() if held.expires < now]:
            self._leave(self.reservations.pop(ticket).pool, ticket)
        outstanding: dict[str, list[float]] = defaultdict(list)
        for held in self.reservations.values():
            outstanding[held.pool].append(held.cost)
        loads = {}
        for name in self.pools:
            ready = sum(r.ready for r in self.replicas[name].values())
            overhead, rate = self.fits[name].fitted or (0.0, None)
            loads[name] = PoolLoad(
                ready_replicas=ready,
                starting_replicas=len(self.replicas[name]) - ready,
                outstanding=len(outstanding[name]),
                outstanding_cost=sum(outstanding[name]),
                seconds_per_cost=rate,
                overhead_s=overhead,
                startup_s=self.startups.get(name),
                trusted_cost=self._trusted_cost(name),
                max_work=self._max_work(name),
            )
        self._publish(loads)
        return loads

    def _max_work(self, pool: str) -> float:
        profiles = [r.memory for r in self.replicas[pool].values() if r.memory is not None]
        return pool_limit(profiles, self.failed_work.get(pool, math.inf))

    async def out_of_memory(self, pool: str, work: float) -> None:
        """A request of ``work`` ran out of ``pool``'s ranks' memory: none as large goes there again."""
        self.failed_work[pool] = min(self.failed_work.get(pool, math.inf), work)

    async def memory(self) -> dict[str, dict[str, Any]]:
        """Each pool's memory per rank, for ``GET /v1/models``: its tightest replica's profile
        (:meth:`MemoryProfile.describe`, or None while none measured) and ``max_megapixels``, the largest
        request (megapixels x frames x images) it takes (None: unlimited)."""
        described = {}
        for name in self.pools:
            profiles = [r.memory for r in self.replicas[name].values() if r.memory is not None]
            tightest = min(profiles, key=lambda profile: profile.max_work, default=None)
            limit = self._max_work(name)
            described[name] = {
                "per_rank": tightest.describe() if tightest is not None else None,
                "max_megapixels": round(limit, 3) if math.isfinite(limit) else None,
            }
        return described

    def _publish(self, loads: dict[str, PoolLoad]) -> None:
        """The application-wide gauges of each pool (only what changed: this runs per routing decision)."""
        for name, load in loads.items():
            values = (load.outstanding, load.ready_replicas, load.starting_replicas)
            if self.published.get(name) == values:
                continue
            self.published[name] = values
            metrics.set_gauge("rayxdit_pool_outstanding", load.outstanding, pool=name)
            metrics.set_gauge("rayxdit_pool_replicas", load.ready_replicas, pool=name, state="ready")
            metrics.set_gauge("rayxdit_pool_replicas", load.starting_replicas, pool=name, state="starting")

    async def route(
        self,
        model: str,
        cost: float,
        ticket: str,
        deadline: float,
        exclude: list[str],
        tenant: str | None = None,
        limits: TenantLimits | None = None,
        retry: bool = False,
        background: bool = False,
        work: float = 0.0,
    ) -> dict[str, Any]:
        """Where the request goes: ``{"pool", "estimate_s"}``, admitted at once under ``ticket`` (one per
        routing attempt of a request; a lease of ``router.lease_s``, renewed by the router); or ``{"pool": None,
        "retry_after_s"}`` when no pool can finish it before ``deadline`` (seconds since the epoch), or
        ``{"pool": None}`` when every pool of ``model`` is excluded (full or down) or the ticket is already
        finished (its client left while this call was on its way, and the router's release came first), or
        ``{"pool": None, "limited": code, "retry_after_s"}`` when ``tenant`` is over one of its ``limits``
        (``tenants.limit_refusal``; a ``retry`` after a failover is not counted again).

        A ``background`` request (a batch's line) goes only to a pool with a ready replica that nothing else
        runs on or waits for (:func:`~rayxdit.serve.routing.idle_pools`), else ``{"pool": None, "busy":
        True}``: online requests never wait behind more than the one batch line a replica runs, and batch
        lines are no arrivals to the autoscaling policies (they fill capacity that would idle).

        A request of ``work`` (megapixels x frames x images) goes only to pools whose ranks hold it
        (:mod:`rayxdit.serve.memory`); when none of the model's does, ``{"pool": None, "too_large":
        largest}``, the largest work any of them holds."""
        now = time.monotonic()
        if self._finished_lately(ticket, now):
            return {"pool": None, "retry_after_s": None}
        loads = self._loads()
        specs = self.specs[model]
        holds = {spec.name: loads[spec.name].max_work for spec in specs}
        if too_large(work, holds):
            return {"pool": None, "too_large": max(holds.values())}
        exclude = [*exclude, *(name for name, largest in holds.items() if work > largest)]
        if background:
            specs = idle_pools(specs, loads)
            if not specs:
                return {"pool": None, "busy": True}
        else:
            self.arrived[model].append(now)
            self.arrival_costs[model].add(now, cost)
            self.last_arrival[model] = now
        tenant = tenant or ANONYMOUS
        counted = has_limits(limits)
        if counted and not retry:
            use = self.tenant_use[tenant]
            use.trim(now)
            in_flight = sum(held.metered and held.tenant == tenant for held in self.reservations.values())
            refused = limit_refusal(limits, use.admitted, in_flight, use.spent, now)
            if refused is not None:
                code, wait = refused
                return {"pool": None, "limited": code, "retry_after_s": wait}
        weight = limits.weight if limits is not None else 1.0
        seen = self._as_seen_by(tenant, cost, weight, loads) if self.gated else loads
        order = self.route_policy(specs, cost, seen, frozenset(exclude), self._free_ranks(loads))
        if not order:
            return {"pool": None, "retry_after_s": None}
        time_left = deadline - time.time()
        rates, typical = None, None
        if self.typical_wait and not background:
            rates = service_rates(specs, seen)
            first, _ = order[0]
            if rates is not None and not retry:  # a failover's retry is the same arrival, counted once
                self.slacks[model].add(now, time_left - service_time(first, seen[first.name], cost, rates))
            typical = self.slacks[model].typical(now)
        trusted = {name: load.trusted_cost for name, load in loads.items()}
        pool, estimate, wait, waiting = admit(order, seen, cost, time_left, trusted, rates, typical)
        if wait is not None:
            refused = {"pool": None, "retry_after_s": wait, "estimate_s": estimate}
            if estimate <= time_left:  # it would make its deadline: the line is what refused it
                refused.update(overloaded=True, waiting_s=waiting, typical_wait_s=typical)
            return refused
        self.reservations[ticket] = _Reservation(
            pool.name, cost, now + self.lease_s, tenant, counted, background
        )
        if counted and not retry:
            self.tenant_use[tenant].admitted.append(now)
            self._save_tenant_use(tenant, now)
        load = loads[pool.name]
        if not background:
            self._preempt_for(pool.name, load.ready_replicas)
        decision = {
            "pool": pool.name,
            "estimate_s": estimate,
            "warm": load.ready_replicas + load.starting_replicas > 0,
        }
        if self.gated:  # it waits in the pool's line; its router asks for its turn (wait_turn)
            self.lines[pool.name].push(ticket, tenant, cost, weight)
            self._let_in(pool.name)
            decision["let_in"] = ticket in self.let_in[pool.name]
        return decision

    # ----- background work (a batch's lines) ---------------------------------------------------------------
    def _preempt_for(self, pool: str, ready: int) -> None:
        """An online request was admitted to ``pool``: while its online requests outnumber the replicas that
        no batch line holds, the newest batch line there is preempted (the least work lost): its driver
        stops it at the ranks' next step boundary and runs it again later (same seed: the same image), and
        the online request takes the replica. So an online request waits behind a batch line for one step,
        not for the line."""
        held = [(ticket, r) for ticket, r in self.reservations.items() if r.pool == pool]
        lines = [ticket for ticket, r in held if r.background and ticket not in self.preempted]
        online = sum(not r.background for _, r in held)
        while lines and online > ready - len(lines):
            ticket = lines.pop()
            self.preempted.add(ticket)
            metrics.inc("rayxdit_batch_preemptions", pool=pool)
            waiter = self.preemptions.pop(ticket, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(True)

    async def wait_preempted(self, ticket: str, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the batch line ``ticket`` to be preempted; whether it was."""
        if ticket not in self.preempted and ticket in self.reservations:
            waiter = self.preemptions.get(ticket)
            if waiter is None or waiter.done():
                waiter = self.preemptions[ticket] = asyncio.get_running_loop().create_future()
            await asyncio.wait({waiter}, timeout=max(0.0, timeout_s))
        return ticket in self.preempted

    def _as_seen_by(
        self, tenant: str, cost: float, weight: float, loads: dict[str, PoolLoad]
    ) -> dict[str, PoolLoad]:
        """Each pool's load as a request of ``tenant`` costing ``cost`` meets it in the fair lines: the requests running, and
        of those waiting only the ones that would start before it (``WaitingLine.ahead_of``): where it
        finishes first, and whether it can before its deadline, depend on those alone."""
        seen = {}
        for name, load in loads.items():
            running = [self.reservations[t].cost for t in self.let_in[name] if t in self.reservations]
            ahead, ahead_cost = self.lines[name].ahead_of(tenant, cost, weight)
            seen[name] = dataclasses.replace(
                load, outstanding=len(running) + ahead, outstanding_cost=sum(running) + ahead_cost
            )
        return seen

    def _free_ranks(self, loads: dict[str, PoolLoad]) -> float:
        """Ranks of the shared budget that no replica (ready or starting) holds."""
        if self.budget is None:
            return math.inf
        held = sum(
            (load.ready_replicas + load.starting_replicas) * self.pools[name].ranks
            for name, load in loads.items()
        )
        return self.budget() - held

    async def renew(
        self, ticket: str, pool: str, cost: float, tenant: str | None = None, metered: bool = False
    ) -> bool:
        """A router still waits for ``ticket`` on ``pool``: its reservation lives another lease (made
        anew if this replica restarted meanwhile). Returns whether ``pool`` has no replica left, not even a
        starting one (its waiting requests should move). ``tenant``: whose it is; ``metered``: whether that
        tenant has limits."""
        now = time.monotonic()
        if not self._finished_lately(ticket, now):
            self.reservations[ticket] = _Reservation(
                pool, cost, now + self.lease_s, tenant or ANONYMOUS, metered
            )
            if self.gated:  # it is on the pool's replicas (also after this replica restarted)
                self.let_in[pool].add(ticket)
        return self.gone_now(pool)

    def _finished_lately(self, ticket: str, now: float) -> bool:
        """Whether ``ticket`` finished within the last lease (its late routing call or renewal must not
        admit it again). Older is a new attempt that happens to reuse a key: as new, never refused for good
        (``finished`` is trimmed only as requests finish, and none may finish meanwhile)."""
        return self.finished.get(ticket, -math.inf) >= now - self.lease_s

    # ----- the line (routing.queue_policy fair_share, shortest_first) -------------------------------------
    def _let_in(self, pool: str) -> None:
        """Let the next waiting requests through to ``pool``, one per ready replica not taken."""
        now = time.monotonic()
        ready = sum(r.ready and now - r.seen <= STALE_AFTER_S for r in self.replicas[pool].values())
        line, taken = self.lines[pool], self.let_in[pool]
        while line and len(taken) < ready:
            ticket = line.pop()
            taken.add(ticket)
            turn = self.turns.pop(ticket, None)
            if turn is not None and not turn.done():
                turn.set_result(True)

    def _leave(self, pool: str, ticket: str) -> None:
        """``ticket`` no longer waits for nor runs on ``pool``: the next one may go in."""
        if not self.gated:
            return
        self.lines[pool].remove(ticket)
        self.let_in[pool].discard(ticket)
        turn = self.turns.pop(ticket, None)
        if turn is not None and not turn.done():
            turn.set_result(False)
        self._let_in(pool)

    async def wait_turn(self, ticket: str, pool: str, timeout_s: float) -> str:
        """Wait up to ``timeout_s`` for ``ticket``'s turn on ``pool`` (renewing its reservation): ``go`` (call
        the pool now), ``wait`` (ask again), ``gone`` (the pool has no replica left, not even a starting one)
        or ``lost`` (this replica does not know the ticket: it restarted, or the lease lapsed; route again)."""
        if ticket in self.let_in[pool]:
            return "go"
        held = self.reservations.get(ticket)
        if held is None or ticket not in self.lines[pool]:
            return "lost"
        held.expires = time.monotonic() + self.lease_s
        turn = self.turns.get(ticket)
        if turn is None:
            turn = self.turns[ticket] = asyncio.get_running_loop().create_future()
        await asyncio.wait({turn}, timeout=max(0.0, timeout_s))
        if ticket in self.let_in[pool]:
            return "go"
        if ticket not in self.lines[pool]:
            return "lost"
        return "gone" if self.gone_now(pool) else "wait"

    def gone_now(self, pool: str) -> bool:
        """Whether ``pool`` has no replica left, not even a starting one. Never within STALE_AFTER_S of
        this replica's start: a state replica that restarted knows no replica until their next heartbeats
        reach it (through handles that learn of it a moment later), and a pool it has not heard of yet is
        unknown, not gone (calling it gone would take back the requests waiting on its replicas)."""
        now = time.monotonic()
        if now - self.started <= STALE_AFTER_S:
            return False
        return not any(now - seen.seen <= STALE_AFTER_S for seen in self.replicas[pool].values())

    async def finish(
        self,
        ticket: str,
        engine_s: float | None = None,
        gpu_seconds: float | None = None,
        pool: str | None = None,
        tenant: str | None = None,
        metered: bool = False,
    ) -> None:
        """The request's attempt ``ticket`` left its pool (or was abandoned while it was routed);
        ``engine_s`` (the engine's encode + denoise + decode time) teaches the pool's rate, and
        ``gpu_seconds`` (the response's: ranks x engine time) is its tenant's use. ``pool``, ``tenant`` and
        ``metered`` say whose it was when this replica did not admit it (it restarted meanwhile); a report
        sent again (its first call died with the previous replica) counts once."""
        held = self.reservations.pop(ticket, None)
        self.preempted.discard(ticket)
        waiter = self.preemptions.pop(ticket, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(False)
        now = time.monotonic()
        self.finished[ticket] = now
        self.finished.move_to_end(ticket)
        left = held.pool if held is not None else pool
        if left is not None and left in self.pools:
            self._leave(left, ticket)
        while self.finished and next(iter(self.finished.values())) < now - self.lease_s:
            self.finished.popitem(last=False)
        if held is None and pool is not None and pool in self.pools:
            held = _Reservation(pool, 0.0, now, tenant or ANONYMOUS, metered)
        if held is None or not engine_s:
            return
        if gpu_seconds:
            self._count_finished(ticket, held, gpu_seconds, now)
        if held.cost > 0:
            self.fits[held.pool].add(held.cost, engine_s)

    def _count_finished(self, ticket: str, held: _Reservation, gpu_seconds: float, now: float) -> None:
        """Count the finished attempt ``ticket`` in its tenant's usage, unless it was counted before (its
        report sent again after the replica that counted it died). The counts go to the journal with the
        ticket's claim, in one step: a replica killed midway has counted it for good or not at all (saved
        after the claim, its count was lost when the replica died between the two)."""
        wall = time.time()
        count_used(self.used, held.tenant, held.pool, 1, gpu_seconds)
        self.windows.add_request(wall, held.tenant, held.pool, gpu_seconds)
        if held.metered:
            self.tenant_use[held.tenant].spent.append((now, gpu_seconds))
        saving = self._usage_items(now, held.tenant if held.metered else None)
        if self.journal.claim("finished", ticket, FINISHED_CLAIM_S, saving):
            self.usage_saved_at = now
            self.windows.changed.clear()
            return
        count_used(self.used, held.tenant, held.pool, -1, -gpu_seconds)  # counted before: undone
        self.windows.add_request(wall, held.tenant, held.pool, -gpu_seconds, requests=-1)
        if held.metered:  # the entry appended above (trimming only drops the oldest)
            self.tenant_use[held.tenant].spent.pop()

    # ----- usage in the journal ---------------------------------------------------------------------------
    def _save_usage(self, now: float) -> None:
        """Usage totals through to the journal (with heartbeats at most every USAGE_SAVE_S: the held
        GPU-seconds grow with every one; a counted request saves them with its claim)."""
        for space, key, value, ttl_s in self._usage_items(now):
            self.journal.save(space, key, value, ttl_s)
        self.usage_saved_at = now
        self.windows.changed.clear()

    def _usage_items(self, now: float, tenant: str | None = None) -> list[Item]:
        """What the journal keeps of the usage totals and the minutes changed since they were last saved
        (and of limited ``tenant``'s windows); none without a durable journal."""
        self.windows.trim(time.time())
        if not self.journal.durable:
            return []
        totals = {"since": self.since, "used": self.used, "held": self.held}
        items: list[Item] = [(USAGE_SPACE, "totals", json.dumps(totals).encode(), None)]
        for start in self.windows.changed:
            minute = self.windows.minutes[start].to_json()
            items.append((USAGE_SPACE, f"minute:{start}", minute, self.windows.kept_s))
        if tenant is not None:
            items.append(self._tenant_use_item(tenant, now))
        return items

    def _save_tenant_use(self, tenant: str, now: float) -> None:
        """A limited tenant's windows through to the journal, so that a restart neither resets its rate nor
        its quota."""
        if self.journal.durable:
            self.journal.save(*self._tenant_use_item(tenant, now))

    def _tenant_use_item(self, tenant: str, now: float) -> Item:
        """What the journal keeps of a limited tenant's windows (as wall-clock times: monotonic clocks differ
        between hosts)."""
        use = self.tenant_use[tenant]
        use.trim(now)
        wall = wall_offset(now)
        windows = {
            "admitted": [wall + t for t in use.admitted],
            "spent": [[wall + t, seconds] for t, seconds in use.spent],
        }
        return (USAGE_SPACE, f"tenant:{tenant}", json.dumps(windows).encode(), QUOTA_WINDOW_S)

    def _restore_usage(self) -> None:
        kept = self.journal.load(USAGE_SPACE)
        now = time.monotonic()
        mono = -wall_offset(now)  # wall-clock time + mono = monotonic time
        for key, (value, _) in kept.items():
            data = json.loads(value)
            if key == "totals":
                self.since = data["since"]
                used, held = usage_from_json(data)
                self.used.update(used)
                self.held.update(held)
            elif key.startswith("minute:"):
                self.windows.minutes[int(key.removeprefix("minute:"))] = UsageMinute.from_json(value)
            elif key.startswith("tenant:"):
                use = self.tenant_use[key.removeprefix("tenant:")]
                use.admitted.extend(mono + t for t in data["admitted"])
                use.spent.extend((mono + t, seconds) for t, seconds in data["spent"])
                use.trim(now)
        if kept:
            logger.info("usage since %s read back from the state's journal", time.ctime(self.since))

    async def usage(self, tenant: str | None = None, by_pool: bool = False) -> dict[str, Any]:
        """What each tenant cost since ``since`` (``tenants.attributed_usage``), or only ``tenant``'s; with
        ``by_pool``, pool by pool (``tenants.usage_by_pool``)."""
        return _usage_rows(self.used, dict(self.held), tenant, by_pool)

    async def usage_windows(
        self, start: int, end: int, width: int | None, tenant: str | None = None, by_pool: bool = False
    ) -> list[dict[str, Any]]:
        """:meth:`usage` over time buckets from ``start`` to ``end`` (``tenants.usage_buckets``): each
        bucket's idle and start-up time attributed to the tenants that used its pools in it. Minutes older
        than ``state.usage_kept_days`` count nothing."""
        buckets = []
        for at, upto in usage_buckets(start, end, width):
            used, held = self.windows.window(at, upto)
            buckets.append(
                {"start_time": at, "end_time": upto, "tenants": _usage_rows(used, held, tenant, by_pool)}
            )
        return buckets

    async def usage_since(self) -> float:
        """Since when usage is counted (seconds since the epoch)."""
        return self.since

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's hook: each model's arrivals per second and their mean cost, refused requests included
        (which the pools alone cannot see: what they finish is what routing, admission and deadlines let
        through, the large requests more than the small ones under an overload), and seconds since its
        last arrival; the sizing policy reads them."""
        now = time.monotonic()
        rates = {}
        for model in self.specs:
            rates[f"{ARRIVALS_METRIC}.{model}"] = arrival_rate(self.arrived[model], now)
            rates[f"{COUNTED_METRIC}.{model}"] = now - self.started
            if (mean_cost := self.arrival_costs[model].mean(now)) is not None:
                rates[f"{ARRIVAL_COST_METRIC}.{model}"] = mean_cost
            last = self.last_arrival.get(model)
            rates[f"{QUIET_METRIC}.{model}"] = now - last if last is not None else now - self.started
        if self.gated:
            for pool in self.pools:
                rates[f"{WAITING_METRIC}.{pool}"] = float(len(self.lines[pool]))
        return rates

    async def readiness(self) -> dict[str, Any]:
        """Per served model: whether it can take a request now. A model is ready when one of its pools has
        a ready replica, or when all its pools scale from zero (the first request starts one). With each
        pool's replicas, outstanding requests and learned rates (the router shows those to API keys only)."""
        loads = self._loads()
        models = {}
        for model, specs in self.specs.items():
            warm = any(loads[spec.name].ready_replicas for spec in specs)
            models[model] = warm or all(self.pools[spec.name].min_replicas == 0 for spec in specs)
        return {
            "ready": all(models.values()),
            "models": models,
            "pools": {  # JSON: an unbounded trust (no measurement yet) is null
                name: {k: (None if v == math.inf else v) for k, v in vars(load).items()}
                for name, load in loads.items()
            },
        }

    # ----- images -----------------------------------------------------------------------------------------
    async def put_image(self, data: bytes) -> str | None:
        return self.images.put(data)

    async def get_image(self, key: str) -> bytes | None:
        return self.images.get(key)

    # ----- jobs (see rayxdit.serve.jobs for their life cycle) ---------------------------------------------
    async def create_job(self, kind: str, owner: str, model: str, fields: dict[str, Any]) -> dict[str, Any]:
        return self.jobs.create(kind, owner, model, fields)

    async def renew_job(self, job_id: str, driver: str | None = None) -> str | None:
        return self.jobs.renew(job_id, driver=driver)

    async def job_progress(self, job_id: str, step: int, steps: int) -> None:
        self.jobs.progress(job_id, step, steps)

    async def complete_job(
        self, job_id: str, content: list[bytes], result: dict[str, Any] | None = None
    ) -> bool:
        return self.jobs.complete(job_id, content, result)

    async def store_completed_job(
        self,
        kind: str,
        owner: str,
        model: str,
        fields: dict[str, Any],
        content: list[bytes],
        result: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A job made elsewhere (a batch's video line), stored completed at once: its object (``failed``,
        with why, when its result exceeds the store)."""
        job = self.jobs.create(kind, owner, model, fields)
        self.jobs.complete(job["id"], content, result)
        return self.jobs.get(job["id"], owner, kind)

    async def update_job(self, job_id: str, fields: dict[str, Any]) -> bool:
        return self.jobs.update_fields(job_id, fields)

    async def fail_job(self, job_id: str, code: str, message: str) -> None:
        self.jobs.fail(job_id, code, message)

    async def cancel_job(self, job_id: str, owner: str, kind: str) -> dict[str, Any] | None:
        return self.jobs.cancel(job_id, owner, kind)

    async def get_job(self, job_id: str, owner: str, kind: str) -> dict[str, Any] | None:
        return self.jobs.get(job_id, owner, kind)

    async def job_content(
        self, job_id: str, owner: str, kind: str
    ) -> tuple[dict[str, Any], list[bytes]] | None:
        return self.jobs.content(job_id, owner, kind)

    async def list_jobs(self, owner: str, kind: str, limit: int = 100) -> list[dict[str, Any]]:
        return self.jobs.list(owner, kind, limit)

    # ----- files (see rayxdit.serve.files) -------------------------------------------------------------------
    async def create_file(
        self, owner: str, purpose: str, filename: str, content: bytes
    ) -> dict[str, Any] | None:
        return self.files.create(owner, purpose, filename, content)

    async def get_file(self, file_id: str, owner: str) -> dict[str, Any] | None:
        return self.files.get(file_id, owner)

    async def file_content(self, file_id: str, owner: str) -> bytes | None:
        return self.files.content(file_id, owner)

    async def delete_file(self, file_id: str, owner: str) -> bool:
        return self.files.delete(file_id, owner)

    async def list_files(self, owner: str, purpose: str | None = None) -> list[dict[str, Any]]:
        return self.files.list(owner, purpose)

    # ----- batches (see rayxdit.serve.batch_driver) ---------------------------------------------------------
    async def record_batch_line(self, batch_id: str, index: int, ok: bool, line: bytes) -> None:
        self.batch_lines.record(batch_id, index, ok, line)

    async def answered_batch_lines(self, batch_id: str) -> dict[int, tuple[bool, bytes]]:
        return self.batch_lines.answered(batch_id)

    async def drop_batch_lines(self, batch_id: str) -> None:
        self.batch_lines.drop(batch_id)

    async def orphaned_batches(self) -> list[str]:
        return self.jobs.orphans()

    async def adopt_batch(
        self, batch_id: str, driver: str | None = None
    ) -> tuple[dict[str, Any], str] | None:
        return self.jobs.adopt(batch_id, driver=driver)
