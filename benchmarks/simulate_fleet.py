"""A discrete-event simulation of a rayxdit fleet, to compare pool layouts and policies at loads no test can
reach, in every scaling scenario the measurements allow.

It calls the production decisions unchanged, by name from the tables the application uses
(``rayxdit.serve.policies``): a routing policy (``line_priced``: where a request finishes first, from
loads built as the application's state builds them, service times learned online with ``ServiceFit``, a
request cheaper than the mean of a pool's line charged its wait there twice; ``finish_first``: the same
without that charge; ``thresholds``: the configured cost thresholds), admission (``routing.retry_after``: a request that would
miss its deadline, or with ``typical_wait`` (the default, as in production) wait for a replica longer than the
typical arrival can, is refused at once, 429, and counts as not good) and, for elastic fleets, a sizing policy
(``cost_aware``, or the older ``load_aware`` for comparison). The rest is a model of the machinery around
them, and says so:

- **Service times** per (GPUs, resolution) for Flux.1-dev, 28 steps, compiled: the single-GPU H200 times
  measured (``benchmarks/results/flux-dev-2xh200.json``) divided by a *scenario*'s speedup, since no 4- or
  8-GPU run exists yet: ``compounded`` (our measured 1->2 GPU speedup, 1.576x at 1024px and 1.780x at
  2048px, compounded for 4 and 8), ``xdit-h100`` (xDiT's published H100 figures: 1 GPU 4.30 s, Ring-2
  2.60 s, Ulysses-4 1.63 s; 8 GPUs: its 2->4 step again), ``seeds`` (1.7x, 3.4x, 5.8x on 2, 4, 8 GPUs). A
  request of other steps scales per step; true CFG runs both branches (no cfg axis in these pools); text
  encoding and VAE decoding add the measured ``OVERHEAD_S``.
- **Clients** want an answer within ``SLO_FACTOR`` times their request's single-GPU time and send that as
  the request's ``timeout``: a request that ends within it is *good*; one refused by admission is not.
- **Replicas** run one request at a time; a pool's queue is ordered by the queue policy the application's
  state uses (``rayxdit.serve.fairness.WaitingLine``: first come first served, ``fair_share`` across the
  requests' tenants (``benchmarks/simulate_tenants.py``), or ``shortest_first``: ``--queue-policies``); a
  request still waiting at its deadline leaves it, as the router's 504 does (``--no-expire-at-deadline``:
  it waits on); a new replica waits for free GPUs, then starts before it serves: ``--startup-s`` on a
  *cold* node (one the model has not run on: a new VM's boot, the model stack's import, the checkpoint's
  read, a compile), or, with ``--warm-startup-s``, that on a *warm* node (one that has run the model: its
  host copy of the weights and fork server in place) for a pool that has started a replica before (its
  compile artifacts in the cluster's store). Nodes are 8 GPUs and fill in order; the policy prices a
  pool's start at the mean of its replicas' measured start-ups, as the application's does. A removed
  replica first finishes its request.
- **Serve's autoscaler around the policy**: a tick every ``TICK_S``, outstanding requests averaged over
  ``LOOK_BACK_S``, and each pool's target moved by Serve's delay logic (:func:`serve_delay`): an elastic
  application's pools have none (``config.ELASTIC_DELAYS``: the policy is the hysteresis); ``--serve-delays-s``
  gives others.

Fleets of 8 and 64 GPUs; open-loop Poisson arrivals at 20% to 120% of capacity (the fleet as 2-GPU replicas,
its most images per GPU in the measured scenario, on the request mix), and four shapes of varying load:
``alternating`` (20% and 80%, 30 minutes each), ``diurnal`` (a day's swing from 10% to 90% and back,
compressed to the window), ``burst`` (30%, with ten minutes at 110%).

- static layouts: ``all-2gpu``, ``all-4gpu``, ``all-8gpu`` (least-loaded routing within one pool), ``static
  thresholds`` (per 8 GPUs one 4-GPU and two 2-GPU replicas, routed by cost thresholds);
- ``elastic`` (cost_aware) and ``elastic load_aware``: pools of 2, 4 and 8 GPUs sized within the shared
  budget, routed where they finish first.

Under a varying load each comparison row also gives the **oracle bound** of the p50 (``oracle_p50_s``,
:func:`oracle_p50`): the lowest p50 a schedule of the static layouts reaches when it may switch layout every
``ORACLE_WINDOW_S`` for free, knowing what is coming, while the run's good fraction stays within 0.01 of
the best static layout's. No policy that resizes beats it, so where it is above 0.7x the best static p50
(``p50_bar_within_oracle`` false) the p50 bar is out of reach of resizing itself. Under the stepped loads
(``alternating``, ``burst``) the elastic fleet also runs as ``elastic rise-known``: its policy told each step
up at the first tick after it (where the real one counts arrivals for 20 s and smooths the count), nothing
of what comes next. Where even that misses the goodput bar (``goodput_bar_within_rise_known`` false), the
requests are lost to the start-ups from the layout the light load was served with, not to a rise seen late.

    python benchmarks/simulate_fleet.py --out benchmarks/results/simulate-fleet-warm-nodes.json
    python benchmarks/simulate_fleet.py --every-start-cold --out benchmarks/results/simulate-fleet.json
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import heapq
import json
import math
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import source_commit  # noqa: E402
from rayxdit.config import ELASTIC_DELAYS  # noqa: E402
from rayxdit.models.families import FLUX_ATTENTION_COST  # noqa: E402
from rayxdit.serve.fairness import FIFO, QUEUE_POLICIES, WaitingLine  # noqa: E402
from rayxdit.serve.policies import ROUTING_POLICIES, autoscaling_policy  # noqa: E402
from rayxdit.serve.routing import (  # noqa: E402
    ADMISSIONS,
    PoolLoad,
    PoolSpec,
    ServiceFit,
    Slacks,
    admit,
    completion_estimate,
    sample_cost,
    service_rates,
    service_time,
)
from rayxdit.serve.sizing import ArrivalCosts, LastMeasured, PoolDemand, arrival_rate  # noqa: E402

STEPS = 28
SINGLE_GPU_S = {
    # resolution: (seconds of the 28-step transformer loop on one H200, compiled; where it comes from)
    1024: (3.736, "measured: benchmarks/results/flux-dev-2xh200.json, single GPU compiled"),
    2048: (19.831, "measured: benchmarks/results/flux-dev-2xh200.json, single GPU compiled"),
}
SCENARIOS = {
    # name: ({resolution: {gpus: speedup over one GPU}}, where the speedups come from)
    "compounded": (
        {
            1024: {1: 1.0, 2: 1.576, 4: 1.576**2, 8: 1.576**3},
            2048: {1: 1.0, 2: 1.780, 4: 1.780**2, 8: 1.780**3},
        },
        "our measured 1->2 GPU speedup (benchmarks/results/flux-dev-2xh200.json: 1.576x at 1024px, "
        "1.780x at 2048px, rayxdit ulysses=2) compounded for 4 and 8 GPUs",
    ),
    "xdit-h100": (
        {
            res: {1: 1.0, 2: 4.30 / 2.60, 4: 4.30 / 1.63, 8: 4.30 / 1.63 * (2.60 / 1.63)}
            for res in (1024, 2048)
        },
        "xDiT's published H100 figures (Flux.1-dev 1024px 28 steps, compiled: 1 GPU 4.30 s, Ring-2 2.60 s, "
        "Ulysses-4 1.63 s); 8 GPUs: the 2->4 step again (not published); the same at 2048px",
    ),
    "seeds": (
        {res: {1: 1.0, 2: 1.7, 4: 3.4, 8: 5.8} for res in (1024, 2048)},
        "the seeds' figures: 1.7x, 3.4x, 5.8x on 2, 4, 8 GPUs, at both resolutions",
    ),
}
OVERHEAD_S = {
    1024: (0.153, "measured: benchmarks/results/serve-flux-dev-2xh200.json, encode 0.045 + decode 0.108"),
    2048: (0.477, "extrapolated: encode 0.045 + decode 0.108 x 4 (four times the pixels)"),
}
MIX = [  # (weight, resolution, steps, true CFG)
    (0.7, 1024, 28, False),
    (0.1, 2048, 28, False),
    (0.2, 1024, 28, True),
]
SLO_FACTOR = 2.0
"""A request is good if it ends within twice its time on one GPU (compiled); its client sends that as its
``timeout``, so admission refuses it at once when no pool can finish it in time."""
TICK_S, LOOK_BACK_S = 2.0, 30.0
UPSCALE_DELAY_S, DOWNSCALE_DELAY_S = ELASTIC_DELAYS["upscale_delay_s"], ELASTIC_DELAYS["downscale_delay_s"]
"""Serve's delays on the elastic policy's decisions: an elastic application's defaults (none; until
2026-12-06 the simulator took 5 and 30 s, and held a decision that changed within them back again)."""
POOL_SIZES = (2, 4, 8)
MODEL = "flux"
"""The one model every simulated pool serves."""
THRESHOLDS = {2: 0.0, 4: 45.0, 8: 100.0}
"""As in serve_configs/flux-dev-8gpu.yaml."""
NODE_GPUS = 8
"""GPUs per node (``cluster/aws-p5.yaml``'s p5.48xlarge): a fleet of 64 GPUs is eight nodes."""
WARM_STARTUP_S = 20.0
"""``--warm-startup-s``'s default: a replica's start on a node that has run the model, for a pool whose
compile artifacts exist. Measured for a 1-GPU Flux.1-dev replica from Serve's creation to ready: 8.5-9.1 s
(H200, ``serve-restart-hostcopy-overlap-flux-dev-1xh200.json``) and 9.3-9.9 s (H100 on a slow host,
``serve-restart-export-flux-dev-1xh100.json``); 2-, 4- and 8-GPU replicas add a process group's rendezvous
and as many ranks reading the host copy at once, unmeasured (no multi-GPU machine lent): about twice the
1-GPU figure stands for them."""


def service_s(scenario: str, gpus: int, resolution: int, steps: int, cfg: bool) -> float:
    speedup = SCENARIOS[scenario][0][resolution][gpus]
    loop = SINGLE_GPU_S[resolution][0] / speedup * steps / STEPS
    return loop * (2 if cfg else 1) + OVERHEAD_S[resolution][0]


def cost_of(resolution: int, steps: int, cfg: bool) -> float:
    """What the router prices a request at (Flux's attention term included), as production does."""
    return sample_cost(resolution * resolution / 1e6, steps, cfg, FLUX_ATTENTION_COST)


ELASTIC_ROUTING = "line_priced"
"""The elastic fleets' routing policy unless ``--elastic-routing`` names another."""


@dataclass(eq=False)
class Request:
    arrival: float
    resolution: int
    steps: int
    cfg: bool
    tenant: str = "default"
    start: float = -1.0
    end: float = -1.0
    shed: bool = False
    expired: bool = False
    """Still waiting at its deadline: it left the line then (the router answers 504), not good."""
    pool: str = ""
    cost: float = field(init=False)
    """What the router prices it at (fixed at arrival; a 64-GPU run reads it millions of times)."""
    slo: float = field(init=False)
    """The seconds its client gives it: ``SLO_FACTOR`` x its single-GPU time."""

    def __post_init__(self) -> None:
        self.cost = cost_of(self.resolution, self.steps, self.cfg)
        self.slo = SLO_FACTOR * service_s("compounded", 1, self.resolution, self.steps, self.cfg)


@dataclass
class Replica:
    pool: str
    gpus: int
    ready_at: float = math.inf  # inf while waiting for GPUs
    request: Request | None = None
    draining: bool = False
    startup_s: float | None = None  # how long its start took (None while waiting for GPUs)


@dataclass
class Pool:
    spec: PoolSpec
    min_replicas: int
    max_replicas: int
    replicas: list[Replica] = field(default_factory=list)
    queue: WaitingLine = field(default_factory=lambda: WaitingLine(FIFO))
    fit: ServiceFit = field(default_factory=ServiceFit)
    demand: float = 0.0  # outstanding requests, averaged over LOOK_BACK_S
    waiting: float = 0.0  # of those, queued for a replica, averaged likewise
    finished: deque = field(default_factory=deque)  # completion times, for the request rate
    decision: int = 0
    """Serve's target (its ``target_num_replicas``): the policy's last decision once Serve's delay let it."""
    wanted: tuple[int, float] | None = None
    """The direction (+1 up, -1 down) the policy has wanted the target moved in, and since when (Serve's
    delay counts from then)."""

    queue_cost: float = 0.0

    def enqueue(self, request: Request) -> None:
        self.queue.push(request, request.tenant, request.cost)
        self.queue_cost += request.cost
        request.pool = self.spec.name

    def withdraw(self, request: Request) -> bool:
        """Take a waiting request out of the line (its deadline passed); whether it waited here."""
        if not self.queue.remove(request):
            return False
        self.queue_cost -= request.cost
        return True

    def dequeue(self) -> Request:
        request = self.queue.pop()
        self.queue_cost -= request.cost
        return request

    def outstanding(self, tenant: str | None = None, cost: float = 0.0) -> tuple[int, float]:
        """Requests queued or running, and their total cost (kept incrementally: queues get long); for a
        request of ``tenant`` costing ``cost`` in a fair line, only those queued that would start before it
        (as the state counts them)."""
        running = [r.request for r in self.replicas if r.request is not None]
        if tenant is not None and self.queue.policy != FIFO:
            ahead, ahead_cost = self.queue.ahead_of(tenant, cost)
            return ahead + len(running), ahead_cost + sum(r.cost for r in running)
        return len(self.queue) + len(running), self.queue_cost + sum(r.cost for r in running)


def serve_delay(
    desired: int,
    target: int,
    wanted: tuple[int, float] | None,
    now: float,
    upscale_s: float,
    downscale_s: float,
) -> tuple[int, tuple[int, float] | None]:
    """Serve's target after a policy's decision at ``now``, and (direction, since when) a change of it has
    been wanted (``ray.serve.autoscaling_policy._apply_delay_logic``, which the tests hold this to): a change
    applies once the policy has wanted the target moved the same way for that direction's delay, to the
    number it wants then; a scale-down stops at one replica on its way to zero."""
    if desired == target:
        return target, None
    direction = 1 if desired > target else -1
    if direction < 0 and target > 1:
        desired = max(1, desired)
    if wanted is None or wanted[0] != direction:
        wanted = (direction, now)
    if now - wanted[1] + 1e-6 >= (upscale_s if direction > 0 else downscale_s):
        return desired, None
    return target, wanted


class Fleet:
    """One simulation: pools, replicas, queues, the clock."""

    def __init__(
        self,
        policy: str,
        budget: int,
        startup_s: float,
        seed: int,
        scenario: str = "compounded",
        queue_policy: str = FIFO,
        expire_at_deadline: bool = True,
        policy_options: dict | None = None,
        admission: str = ADMISSIONS[0],
        elastic_routing: str = ELASTIC_ROUTING,
        warm_startup_s: float | None = None,
        serve_delays_s: tuple[float, float] = (UPSCALE_DELAY_S, DOWNSCALE_DELAY_S),
    ):
        self.policy, self.budget, self.startup_s, self.scenario = policy, budget, startup_s, scenario
        self.upscale_delay_s, self.downscale_delay_s = serve_delays_s
        """Serve's delays on the sizing policy's decisions (:func:`serve_delay`)."""
        self.warm_startup_s = warm_startup_s
        """A start on a warm node, for a pool started before (None: every start takes ``startup_s``)."""
        self.warm_gpus = 0
        """GPUs of the nodes the model has run on (nodes fill in order)."""
        self.started_pools: set[str] = set()
        """Pools with a replica that finished its start: their compile artifacts are in the store."""
        self.measured = LastMeasured()
        """What each pool's replicas last reported of their start-up, as the application keeps it."""
        self.queue_policy = queue_policy
        self.admission = admission
        """``routing.admission``: ``typical_wait`` (the default) or ``deadline``."""
        self.slacks = Slacks()  # the arrivals' slack, as the application's state keeps it
        self.expire_at_deadline = expire_at_deadline
        """Whether a request still waiting at its deadline leaves the line (production's 504)."""
        self.gpu_seconds_by_tenant: dict[str, float] = {}
        self.rng = random.Random(seed)
        self.now = 0.0
        self.events: list = []
        self.seq = 0
        self.done: list[Request] = []
        self.gpu_seconds: dict[str, float] = {}
        self.replica_starts = 0
        # GPUs held by replicas (starting or ready), integrated over `counted_span`.
        self.held_gpu_seconds = 0.0
        self.held_since = 0.0
        self.counted_span = (0.0, math.inf)  # the span whose arrivals are counted (after the warm-up)
        self.arrived: deque[float] = deque()  # arrival times of the last minute
        self.arrival_costs = ArrivalCosts()  # their mean cost, as the application's state keeps it
        self.pools: dict[str, Pool] = {}
        self.told_rate: Callable[[float], float] | None = None
        """``RISE_KNOWN``: the load's rate over time, told to the policy at each step up."""
        layout, routing, sizing = LAYOUTS[policy]
        self.routing = ROUTING_POLICIES[elastic_routing if sizing else routing]
        # The options an application's elastic.policy_options would give the elastic fleet's policy.
        options = policy_options if sizing == "cost_aware" else None
        self.sizing = autoscaling_policy(sizing, options) if sizing else None
        if layout:
            self._static({gpus: count * budget // 8 for gpus, count in layout.items()})
        else:  # elastic: every size, sized by the policy, one 2-GPU replica to start
            for gpus in POOL_SIZES:
                self._pool(gpus, 0, budget // gpus, startup_s)
            self._add_replica(self.pools["p2"], ready_at=0.0)
            self.pools["p2"].decision = 1
            self._push(TICK_S, "tick", None)

    def _pool(self, gpus: int, minimum: int, maximum: int, startup: float) -> Pool:
        spec = PoolSpec(f"p{gpus}", MODEL, gpus, route_min_cost=THRESHOLDS[gpus], startup_s=startup)
        pool = self.pools[spec.name] = Pool(spec, minimum, maximum, queue=WaitingLine(self.queue_policy))
        return pool

    def _static(self, replicas: dict[int, int]) -> None:
        for gpus, count in replicas.items():
            pool = self._pool(gpus, count, count, self.startup_s)
            for _ in range(count):
                self._add_replica(pool, ready_at=0.0)
            pool.decision = count

    # ----- events ---------------------------------------------------------------------------------------
    def _push(self, at: float, kind: str, data) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, data))

    def run(self, requests: list[Request], until: float) -> None:
        for request in requests:
            self._push(request.arrival, "arrival", request)
        while self.events:
            at, _, kind, data = heapq.heappop(self.events)
            if at > until:
                break
            self.now = at
            getattr(self, f"_on_{kind}")(data)

    def _on_arrival(self, request: Request) -> None:
        self.arrived.append(self.now)
        self.arrival_costs.add(self.now, request.cost)
        pool = self._admitted(request)
        if pool is None:
            request.shed = True
            return
        pool.enqueue(request)
        if self.expire_at_deadline:
            self._push(request.arrival + request.slo, "deadline", request)
        self._dispatch(pool)

    def _on_deadline(self, request: Request) -> None:
        """A request still waiting at its deadline leaves the line, as the router answers 504 then (one
        running runs on here: the ranks would stop at the next step boundary, freeing the replica a little
        earlier than this model does)."""
        if request.start < 0 and self.pools[request.pool].withdraw(request):
            request.expired = True

    def _admitted(self, request: Request) -> Pool | None:
        """Routing and admission as the application's state does them (``routing.admit`` over the routing
        order), or None: refused. Every fleet's admission compares completion estimates from the fleet's
        learned rates, whichever policy routed it (a static fleet's thresholds included), with the time the
        client gives the request, and with ``typical_wait`` also its wait against the typical arrival's
        slack; only within the reach of the pool's measurements (``trusted_cost``)."""
        specs = [pool.spec for pool in self.pools.values()]
        loads = self._loads(request.tenant, request.cost)
        order = self.routing(specs, request.cost, loads, frozenset(), self.budget - self._gpus_held())
        rates = service_rates(specs, loads)
        if rates is None:
            return self.pools[order[0][0].name]
        # A policy that routes by thresholds estimates nothing: admission estimates what it routed.
        order = [
            (spec, completion_estimate(spec, loads[spec.name], request.cost, rates[spec.name]))
            if estimate is None
            else (spec, estimate)
            for spec, estimate in order
        ]
        typical = None
        if self.admission == "typical_wait":
            first = order[0][0]
            self.slacks.add(
                self.now, request.slo - service_time(first, loads[first.name], request.cost, rates)
            )
            typical = self.slacks.typical(self.now)
        trusted = {name: self._trusted(pool) for name, pool in self.pools.items()}
        spec, _, refused, _ = admit(order, loads, request.cost, request.slo, trusted, rates, typical)
        return None if refused is not None else self.pools[spec.name]

    def _trusted(self, pool: Pool) -> float:
        measured = [p.fit.trusted_cost for p in self.pools.values() if p.fit.weight]
        return pool.fit.trusted_cost if pool.fit.weight else (min(measured) if measured else math.inf)

    def _on_done(self, replica: Replica) -> None:
        request = replica.request
        request.end = self.now
        self.done.append(request)
        pool = self.pools[replica.pool]
        pool.fit.add(request.cost, request.end - request.start)
        pool.finished.append(self.now)
        replica.request = None
        if replica.draining:
            self._account_held()
            pool.replicas.remove(replica)
            self._start_waiting()
            self._reroute_if_gone(pool)
        self._dispatch(pool)

    def _on_ready(self, replica: Replica) -> None:
        pool = self.pools[replica.pool]
        if replica in pool.replicas:
            self._started(pool)
            self._dispatch(pool)

    def _started(self, pool: Pool) -> None:
        """A replica of ``pool`` is up: its pool's compile artifacts exist and its node is warm."""
        self.started_pools.add(pool.spec.name)
        held = self._gpus_held()
        self.warm_gpus = max(self.warm_gpus, min(self.budget, -(-held // NODE_GPUS) * NODE_GPUS))

    def _measured_startup(self, pool: Pool) -> float | None:
        """The pool's start-up as the application reads it at a tick: the mean its running replicas report
        (a removed or draining one reports nothing), the last such mean while none runs
        (``sizing.LastMeasured``, as ``serve/elastic.py`` keeps it)."""
        running = [
            r.startup_s
            for r in pool.replicas
            if r.ready_at <= self.now and not r.draining and r.startup_s is not None
        ]
        reported = {"startup_s": sum(running) / len(running) if running else None}
        return self.measured.fill(pool.spec.name, reported)["startup_s"]

    def _startup_of(self, pool: Pool, replica: Replica) -> float:
        """How long ``replica`` takes to start, its GPUs just found: warm where its pool has started before
        and the GPUs held with it fit the nodes the model has run on."""
        warm = (
            self.warm_startup_s is not None
            and pool.spec.name in self.started_pools
            and self._gpus_held() + replica.gpus <= self.warm_gpus
        )
        return self.warm_startup_s if warm else self.startup_s

    def _on_tick(self, _) -> None:
        self._autoscale()
        self._push(self.now + TICK_S, "tick", None)

    # ----- serving ----------------------------------------------------------------------------------------
    def _loads(self, tenant: str | None = None, cost: float = 0.0) -> dict[str, PoolLoad]:
        """Exactly what the application's state hands routing (for a request of ``tenant`` costing ``cost``:
        as it sees the fair lines)."""
        loads = {}
        for name, pool in self.pools.items():
            ready = sum(r.ready_at <= self.now and not r.draining for r in pool.replicas)
            # A replica waiting for GPUs has no process yet, so it does not report: not starting
            starting = sum(self.now < r.ready_at < math.inf for r in pool.replicas)
            count, queued_cost = pool.outstanding(tenant, cost)
            overhead, rate = pool.fit.fitted or (0.0, None)
            loads[name] = PoolLoad(ready, starting, count, queued_cost, rate, overhead, None)
        return loads

    def _route(self, request: Request, exclude: frozenset[str] = frozenset()) -> Pool:
        specs = [pool.spec for pool in self.pools.values()]
        free = self.budget - self._gpus_held()
        choice = self.routing(specs, request.cost, self._loads(request.tenant, request.cost), exclude, free)[
            0
        ][0]
        return self.pools[choice.name]

    def _dispatch(self, pool: Pool) -> None:
        for replica in pool.replicas:
            if not pool.queue:
                return
            if replica.request is None and replica.ready_at <= self.now and not replica.draining:
                request = pool.dequeue()
                request.start = self.now
                replica.request = request
                seconds = service_s(
                    self.scenario, replica.gpus, request.resolution, request.steps, request.cfg
                )
                self.gpu_seconds[pool.spec.name] = (
                    self.gpu_seconds.get(pool.spec.name, 0.0) + seconds * replica.gpus
                )
                self.gpu_seconds_by_tenant[request.tenant] = (
                    self.gpu_seconds_by_tenant.get(request.tenant, 0.0) + seconds * replica.gpus
                )
                self._push(self.now + seconds, "done", replica)

    # ----- autoscaling (Serve around the policy) --------------------------------------------------------------
    def _gpus_held(self) -> int:
        return sum(r.gpus for pool in self.pools.values() for r in pool.replicas if r.ready_at < math.inf)

    def _account_held(self) -> None:
        """Integrate the GPUs replicas hold up to now within ``counted_span`` (call before any change of them)."""
        start, end = self.counted_span
        overlap = min(self.now, end) - max(self.held_since, start)
        self.held_gpu_seconds += self._gpus_held() * max(0.0, overlap)
        self.held_since = self.now

    def _add_replica(self, pool: Pool, ready_at: float = math.inf) -> None:
        self._account_held()
        replica = Replica(pool.spec.name, pool.spec.ranks, ready_at)
        pool.replicas.append(replica)
        if ready_at == 0.0:  # in place when the run begins: it started cold, before
            replica.startup_s = self.startup_s
            self._started(pool)
        self.replica_starts += ready_at > 0
        self._start_waiting()

    def _start_waiting(self) -> None:
        """Replicas waiting for GPUs start (their start-up clock runs) as GPUs free up."""
        for pool in self.pools.values():
            for replica in pool.replicas:
                if replica.ready_at == math.inf and self._gpus_held() + replica.gpus <= self.budget:
                    replica.startup_s = self._startup_of(pool, replica)
                    self._account_held()
                    replica.ready_at = self.now + replica.startup_s
                    self._push(replica.ready_at, "ready", replica)

    def _autoscale(self) -> None:
        alpha = TICK_S / LOOK_BACK_S
        arrivals = self._arrival_rate()  # as the application's state counts them
        if self.told_rate is not None:
            rate = self.told_rate(self.now)
            if rate > self.told_rate(self.now - TICK_S):  # a step up since the last tick: the policy knows it
                arrivals = self.sizing.demand[MODEL] = rate
        demands = []
        for pool in self.pools.values():
            pool.demand += alpha * (pool.outstanding()[0] - pool.demand)
            pool.waiting += alpha * (len(pool.queue) - pool.waiting)
            overhead, rate = pool.fit.fitted or (0.0, None)
            demands.append(
                PoolDemand(
                    pool.spec,
                    replicas=pool.decision,  # Serve hands the policy its last target
                    outstanding=pool.demand,
                    queued=pool.waiting,
                    min_replicas=pool.min_replicas,
                    max_replicas=pool.max_replicas,
                    seconds_per_cost=rate,
                    overhead_s=overhead,
                    mean_cost=pool.fit.mean_cost,
                    throughput=self._rate(pool),
                    # As its replicas measured it (the pool's prior, the cold start-up, until one has).
                    startup_s=self._measured_startup(pool) or self.startup_s,
                    arrivals=arrivals,
                    quiet_s=self.now - (self.arrived[-1] if self.arrived else 0.0),
                    arrival_cost=self.arrival_costs.mean(self.now),
                    arrivals_counted_s=self.now,  # the state starts with the fleet
                )
            )
        plan = self.sizing(demands, self.budget, self.now)
        for pool in self.pools.values():
            if pool.queue and not any(r.ready_at <= self.now for r in pool.replicas):
                # Serve's cold start: a deployment with requests and no running replica gets one, whatever
                # the policy wants, until one runs.
                pool.decision, pool.wanted = max(1, pool.decision), None
            else:
                pool.decision, pool.wanted = serve_delay(
                    plan[pool.spec.name],
                    pool.decision,
                    pool.wanted,
                    self.now,
                    self.upscale_delay_s,
                    self.downscale_delay_s,
                )
            target = pool.decision
            current = sum(not r.draining for r in pool.replicas)
            for _ in range(target - current):
                self._add_replica(pool)
            for _ in range(current - target):
                self._remove_replica(pool)

    def _arrival_rate(self) -> float:
        """Requests arrived (refused ones too) per second, as the application's state counts them."""
        return arrival_rate(self.arrived, self.now)

    def _rate(self, pool: Pool) -> float:
        """Requests finished per second over the last minute (as replicas report it)."""
        while pool.finished and pool.finished[0] < self.now - 60.0:
            pool.finished.popleft()
        return len(pool.finished) / 60.0

    def _remove_replica(self, pool: Pool) -> None:
        """Serve removes a starting or idle replica first; a busy one finishes its request first."""
        live = [r for r in pool.replicas if not r.draining]
        victim = min(live, key=lambda r: (r.ready_at < math.inf, r.request is not None))
        if victim.request is None:
            self._account_held()
            pool.replicas.remove(victim)
            self._start_waiting()
            self._reroute_if_gone(pool)
        else:
            victim.draining = True

    def _reroute_if_gone(self, pool: Pool) -> None:
        """The routers re-route requests that wait for a pool left without replicas (as rayxdit's do)."""
        if pool.replicas or not pool.queue:
            return
        waiting = [pool.dequeue() for _ in range(len(pool.queue))]
        for request in waiting:
            target = self._route(request, exclude=frozenset({pool.spec.name}))
            target.enqueue(request)
            self._dispatch(target)


def capacity_per_s(budget: int) -> float:
    """Images per second of the fleet as 2-GPU replicas on the mix, in the measured (compounded) scenario:
    the load unit of every scenario, so that a load means the same arrivals in each."""
    mean = sum(weight * service_s("compounded", 2, res, steps, cfg) for weight, res, steps, cfg in MIX)
    return (budget // 2) / mean


def workload(rate, duration: float, seed: int) -> list[Request]:
    """Poisson arrivals at ``rate`` per second, a number or a function of the time (thinning)."""
    rng = random.Random(seed)
    rate_at = rate if callable(rate) else (lambda _t: rate)
    peak = max(rate_at(t) for t in range(0, int(duration) + 1, 10))
    requests, now = [], 0.0
    weights = [weight for weight, *_ in MIX]
    while True:
        now += rng.expovariate(peak)
        if now > duration:
            return requests
        if rng.random() > rate_at(now) / peak:
            continue
        _, resolution, steps, cfg = rng.choices(MIX, weights)[0]
        requests.append(Request(now, resolution, steps, cfg))


PHASE_S = 1800.0
"""The alternating load's phases: 20% and 80% of capacity, 30 minutes each, in turn."""


def varying_load(name: str, capacity: float, duration: float):
    """The arrival rate of a varying load over time, and how many times it changes phase."""
    if name == "alternating":
        return (lambda t: capacity * (0.2 if int(t // PHASE_S) % 2 == 0 else 0.8)), int(duration // PHASE_S)
    if name == "diurnal":  # a day from 10% up to 90% and back, compressed into the window
        return (lambda t: capacity * (0.5 - 0.4 * math.cos(2 * math.pi * t / duration))), 2
    if name == "burst":  # steady 30%, ten minutes at 110% in the middle
        middle = duration / 2
        return (lambda t: capacity * (1.1 if middle <= t < middle + 600 else 0.3)), 2
    raise ValueError(f"unknown load {name!r}")


VARYING = ("alternating", "diurnal", "burst")


def simulate(
    policy: str,
    budget: int,
    load,
    duration: float,
    warmup: float,
    startup: float,
    seed: int,
    scenario: str = "compounded",
    queue_policy: str = FIFO,
    expire_at_deadline: bool = True,
    policy_options: dict | None = None,
    admission: str = ADMISSIONS[0],
    elastic_routing: str = ELASTIC_ROUTING,
    warm_startup_s: float | None = None,
    serve_delays_s: tuple[float, float] = (UPSCALE_DELAY_S, DOWNSCALE_DELAY_S),
) -> dict:
    """One run; ``load`` is a fraction of capacity, or a name of VARYING; ``elastic_routing``: the routing
    policy of an elastic fleet (static ones route within one pool, or by thresholds); ``startup`` a start on
    a cold node, ``warm_startup_s`` on a warm one (None: as on a cold one); ``serve_delays_s``: Serve's
    upscale and downscale delays on the elastic policy's decisions."""
    fleet = Fleet(
        policy,
        budget,
        startup,
        seed,
        scenario,
        queue_policy,
        expire_at_deadline,
        policy_options,
        admission,
        elastic_routing,
        warm_startup_s,
        tuple(serve_delays_s),
    )
    capacity = capacity_per_s(budget)
    phase_changes = 0
    if isinstance(load, str):
        rate, phase_changes = varying_load(load, capacity, duration)
    else:
        rate = load * capacity
    if policy == RISE_KNOWN:
        if load not in STEPPED:
            raise ValueError(f"{RISE_KNOWN!r} is told the steps of a stepped load ({STEPPED}), not {load!r}")
        fleet.told_rate = rate
    requests = workload(rate, duration, seed)
    # GPU-hours over the span whose arrivals count: a static fleet stops when its last request ends, an
    # elastic one ticks on and gives its replicas back, so the whole run's clock is not comparable.
    fleet.counted_span = (warmup, duration)
    fleet.run(requests, until=duration * 3)
    fleet._account_held()
    counted = [r for r in requests if r.arrival >= warmup]
    finished = [r for r in counted if r.end >= 0]
    latencies = sorted(r.end - r.arrival for r in finished)

    def q(p: float) -> float | None:
        return (
            round(latencies[min(len(latencies) - 1, int(p * (len(latencies) - 1) + 0.5))], 3)
            if latencies
            else None
        )

    window = duration - warmup
    good = sum(r.end - r.arrival <= r.slo for r in finished)
    hours = fleet.now / 3600
    windows = {WINDOWS_KEY: by_window(counted)} if isinstance(load, str) else {}
    return {
        "scenario": scenario,
        "startup_s": startup,
        **({"warm_startup_s": warm_startup_s} if warm_startup_s is not None else {}),
        "policy": policy,
        "queue_policy": queue_policy,
        "admission": admission,
        "expire_at_deadline": expire_at_deadline,
        **(
            {"policy_options": policy_options}
            if policy_options and LAYOUTS[policy][2] == "cost_aware"
            else {}
        ),
        **({"routing": elastic_routing} if elastic_routing != ELASTIC_ROUTING and LAYOUTS[policy][2] else {}),
        **(
            {"serve_delays_s": list(serve_delays_s)}
            if tuple(serve_delays_s) != (UPSCALE_DELAY_S, DOWNSCALE_DELAY_S) and LAYOUTS[policy][2]
            else {}
        ),
        "gpus": budget,
        "offered_load": load,
        "requests": len(counted),
        "finished": len(finished),
        "shed": sum(r.shed for r in counted),
        "expired": sum(r.expired for r in counted),
        "p50_s": q(0.5),
        "p95_s": q(0.95),
        "p99_s": q(0.99),
        "throughput_per_s": round(len(finished) / window, 4),
        "goodput_per_s": round(good / window, 4),
        "good_fraction": round(good / max(1, len(counted)), 4),
        "goodput_per_gpu_hour": round(good / max(1e-9, fleet.held_gpu_seconds / 3600), 2),
        "good_fraction_by_class": good_by_class(counted),
        **({"by_phase": by_phase(counted)} if load == "alternating" else {}),
        "gpu_seconds_by_pool": {k: round(v, 1) for k, v in sorted(fleet.gpu_seconds.items())},
        "replica_starts": fleet.replica_starts,
        "replica_starts_per_hour": round(fleet.replica_starts / hours, 2),
        **(
            {
                "starts_per_phase_change_per_8_gpus": round(
                    fleet.replica_starts / phase_changes / (budget / 8), 2
                )
            }
            if phase_changes
            else {}
        ),
        **windows,
    }


def request_class(request: Request) -> str:
    return f"{request.resolution}px" + (" cfg" if request.cfg else "")


def good_by_class(requests: list[Request]) -> dict[str, float]:
    """The good fraction of each kind of request of the mix: where a fleet's goodput comes from (under
    overload a shared queue admits the lenient-deadline large requests that crowd out the small ones)."""
    by_class: dict[str, list[bool]] = {}
    for request in requests:
        good = request.end >= 0 and request.end - request.arrival <= request.slo
        by_class.setdefault(request_class(request), []).append(good)
    return {name: round(sum(flags) / len(flags), 4) for name, flags in sorted(by_class.items())}


ORACLE_WINDOW_S = 600.0
"""The windows of a varying load in which the oracle bound may pick another static layout (they fall on the
phases of the alternating load and the burst; the diurnal load's swing gets twelve)."""
WINDOWS_KEY = "_windows"
"""A fleet's per-window outcomes under a varying load, kept in memory for :func:`oracle_p50` and the
comparison's ``good_by_window``, and left out of the JSON."""


def by_window(requests: list[Request]) -> dict[int, tuple[int, int, list[float]]]:
    """Per ``ORACLE_WINDOW_S`` window of arrival: requests, good ones, and the finished ones' latencies."""
    windows: dict[int, tuple[int, int, list[float]]] = {}
    for request in requests:
        count, good, latencies = windows.get(int(request.arrival // ORACLE_WINDOW_S), (0, 0, []))
        if request.end >= 0:
            latencies.append(request.end - request.arrival)
        good += request.end >= 0 and request.end - request.arrival <= request.slo
        windows[int(request.arrival // ORACLE_WINDOW_S)] = (count + 1, good, latencies)
    return windows


def oracle_p50(statics: Mapping[str, Mapping[int, tuple[int, int, list[float]]]]) -> dict | None:
    """The lowest p50 any schedule of the static layouts could reach under a varying load, switching layout
    at every window boundary for free (no start-up, and knowing what each window brings), with the whole
    run's good fraction within 0.01 of the best static layout's: a bound on what resizing can do for the
    p50, which no real policy beats. ``statics``: per layout, :func:`by_window`'s outcomes of its run of the
    same arrivals.

    Exact for that schedule space: the p50 is at most ``x`` when the chosen layouts finish at least half
    their finished requests within ``x``; for a given ``x`` the schedule that maximizes that margin within
    the goodput allowance is a knapsack over windows (the good requests a window gives up against its best
    layout are the weight), solved by dynamic programming over the allowance; ``x`` is searched over every
    latency seen."""
    names = list(statics)
    windows = sorted(set().union(*(statics[name].keys() for name in names)))
    outcome = {(name, w): statics[name].get(w, (0, 0, [])) for name in names for w in windows}
    requests = sum(max(outcome[(name, w)][0] for name in names) for w in windows)
    most_good = {w: max(outcome[(name, w)][1] for name in names) for w in windows}
    best_good = max(sum(outcome[(name, w)][1] for w in windows) for name in names)
    # Good requests the schedule may give up against every window's best layout and still meet the bar.
    allowance = int(sum(most_good.values()) - (best_good - 0.01 * requests))
    latencies = {key: sorted(value[2]) for key, value in outcome.items()}

    def schedule(limit: float) -> tuple[int, list[str]]:
        """The schedule of the largest margin (twice the finished requests within ``limit``, less all
        finished) within the allowance, and that margin (>= 0: a p50 of at most ``limit`` is reachable)."""
        best = {0: (0, [])}  # good requests given up so far -> (margin, layouts)
        for w in windows:
            following: dict[int, tuple[int, list[str]]] = {}
            for given_up, (margin, chosen) in best.items():
                for name in names:
                    cost = given_up + most_good[w] - outcome[(name, w)][1]
                    if cost > allowance:
                        continue
                    gained = 2 * bisect.bisect_right(latencies[(name, w)], limit) - len(latencies[(name, w)])
                    if cost not in following or following[cost][0] < margin + gained:
                        following[cost] = (margin + gained, [*chosen, name])
            best = following
        return max(best.values(), key=lambda entry: entry[0]) if best else (-1, [])

    candidates = sorted({x for values in latencies.values() for x in values})
    if not candidates:
        return None
    low, high = 0, len(candidates) - 1
    while low < high:  # the smallest latency seen within which half the finished requests can end
        middle = (low + high) // 2
        if schedule(candidates[middle])[0] >= 0:
            high = middle
        else:
            low = middle + 1
    return {"p50_s": round(candidates[low], 3), "layouts": schedule(candidates[low])[1]}


def by_phase(requests: list[Request]) -> dict[str, dict]:
    """The alternating load's light (20%) and heavy (80%) phases apart: where the elastic fleet gains (large
    replicas in the light phase) and where it pays (the start-ups when the heavy phase comes)."""
    found = {}
    for name, parity in (("light", 0), ("heavy", 1)):
        mine = [r for r in requests if int(r.arrival // PHASE_S) % 2 == parity]
        latencies = sorted(r.end - r.arrival for r in mine if r.end >= 0)
        good = sum(r.end >= 0 and r.end - r.arrival <= r.slo for r in mine)
        found[name] = {
            "requests": len(mine),
            "p50_s": round(latencies[len(latencies) // 2], 3) if latencies else None,
            "good_fraction": round(good / max(1, len(mine)), 4),
        }
    return found


ELASTIC = "elastic"
RISE_KNOWN = "elastic rise-known"
"""The elastic fleet told each step up of a stepped load (``STEPPED``) at the first tick after it: the policy's
demand set to the new rate at once, where the real one counts arrivals for 20 s and smooths them. It does not
know what comes next. Not a policy to run: where even it misses the goodput bar, what loses the requests is
the start-ups from the layout the light load was served with, not how late the rise was seen."""
STEPPED = ("alternating", "burst")
"""The varying loads that change in steps. ``diurnal`` rises smoothly: told its rate wherever it is above the
estimate (tried at cf28a2e), the fleet did worse than untold in 10 of the 12 diurnal cells, as the policy reads a rise
from its estimate's lag behind the count (no change for latency meanwhile), which the telling takes away."""
LAYOUTS: dict[str, tuple[dict[int, int] | None, str, str | None]] = {
    # name: (static replicas per GPU count, per 8 GPUs; or None: elastic), routing policy, sizing policy
    "all-2gpu": ({2: 4}, "thresholds", None),
    "all-4gpu": ({4: 2}, "thresholds", None),
    "all-8gpu": ({8: 1}, "thresholds", None),
    "static thresholds": ({2: 2, 4: 1}, "thresholds", None),
    ELASTIC: (None, ELASTIC_ROUTING, "cost_aware"),
    "elastic load_aware": (None, ELASTIC_ROUTING, "load_aware"),
    RISE_KNOWN: (None, ELASTIC_ROUTING, "cost_aware"),
}
POLICIES = tuple(LAYOUTS)
STATIC = tuple(name for name, (layout, _, _) in LAYOUTS.items() if layout)


GOOD_TIE = 0.001
"""Static layouts whose good fractions differ by less than this are tied (a request in a thousand: within a
run's noise). The latency bars are read against the fastest of the tied ones, so that a layout a hair
better in goodput and twice as slow (seed 2: all-2-GPU 100.0% with p99 12.1 s against all-4-GPU 99.93%
with 6.3 s, `seeds` 20% on one node) does not set a bar the elastic fleet meets too easily."""


def _cells(results: list[dict]) -> dict[tuple, dict[str, dict]]:
    """The runs by cell (scenario, start-up, fleet, load, queue policy, admission), then by policy."""
    cells: dict[tuple, dict[str, dict]] = {}
    for result in results:
        key = (
            result["scenario"],
            result["startup_s"],
            result["gpus"],
            result["offered_load"],
            result.get("queue_policy", FIFO),
            result.get("admission", "deadline"),
        )
        cells.setdefault(key, {})[result["policy"]] = result
    return cells


def _bars(statics: list[dict], varying: bool) -> tuple[dict, dict, float]:
    """A cell's best static layout (the highest good fraction, the lower p99 on a tie), the fastest
    layout tied with it on goodput (``GOOD_TIE``; by p50 under a varying load, else by p99), and the
    latency bar it sets: 0.7x its p50 (varying), 1.1x its p99 (steady)."""
    best = max(statics, key=lambda r: (r["good_fraction"], -(r["p99_s"] or math.inf)))
    tied = [r for r in statics if r["good_fraction"] >= best["good_fraction"] - GOOD_TIE]
    if varying:
        fastest = min(tied, key=lambda r: r["p50_s"] or math.inf)
        return best, fastest, 0.7 * (fastest["p50_s"] or math.inf)
    fastest = min(tied, key=lambda r: r["p99_s"] or math.inf)
    return best, fastest, 1.1 * (fastest["p99_s"] or math.inf)


def _meets(result: dict, best: dict, bar: float) -> tuple[bool, bool]:
    """Whether ``result`` meets a cell's goodput bar (the best static layout's good fraction - 0.01) and
    its latency bar (``bar``, from :func:`_bars`: on the p50 under a varying load; on the p99 under a
    steady one, where the best layout's good fraction is at least 0.9, else met)."""
    good_ok = result["good_fraction"] >= best["good_fraction"] - 0.01
    if isinstance(result["offered_load"], str):
        return good_ok, (result["p50_s"] or math.inf) <= bar
    return good_ok, best["good_fraction"] < 0.9 or (result["p99_s"] or math.inf) <= bar


def bars_by_policy(results: list[dict]) -> dict[str, dict[str, int]]:
    """Every policy of the run held to the bars the elastic fleet is held to (:func:`compare`), cell by
    cell: the steady cells where it meets both, the varying cells where it meets both, the goodput bar and
    the p50 bar, and how many of each there are. What an operator who picks one static layout
    gets across the loads: each is the best layout at some loads and far from it at others."""
    counts: dict[str, dict[str, int]] = {}
    for (*_, load, _queue_policy, _admission), by_policy in _cells(results).items():
        statics = [by_policy[name] for name in STATIC if name in by_policy]
        if not statics:
            continue
        best, _, bar = _bars(statics, varying=isinstance(load, str))
        for policy, result in by_policy.items():
            good_ok, latency_ok = _meets(result, best, bar)
            count = counts.setdefault(
                policy,
                dict.fromkeys(
                    ("steady_both", "steady", "varying_both", "varying_goodput", "varying_p50", "varying"), 0
                ),
            )
            if isinstance(load, str):
                count["varying"] += 1
                count["varying_both"] += good_ok and latency_ok
                count["varying_goodput"] += good_ok
                count["varying_p50"] += latency_ok
            else:
                count["steady"] += 1
                count["steady_both"] += good_ok and latency_ok
    return counts


def compare(results: list[dict]) -> list[dict]:
    """For every (scenario, start-up, fleet, load): the elastic fleet against the best static layout (the
    one of the highest good fraction, the lower p99 on a tie), and whether it meets the bars the elastic
    policy is held to: good fraction at least the best's - 0.01; where the best's is >= 0.9, p99 at most
    1.1x the p99 of the fastest static layout tied with it (``GOOD_TIE``; steady loads); p50 at least 30%
    below the lowest p50 of those (varying loads). ``latency_bar_static`` names the layout that sets the
    latency bar, ``latency_bar_s`` the bar. Where the cell has a ``RISE_KNOWN`` run, its good fraction and
    whether it meets the goodput bar (``goodput_bar_within_rise_known``): false says that seeing each rise
    at once would not have kept the requests the elastic fleet lost."""
    rows = []
    for (scenario, startup, gpus, load, queue_policy, admission), by_policy in _cells(results).items():
        statics = [by_policy[name] for name in STATIC if name in by_policy]
        elastic = by_policy.get(ELASTIC)
        if not statics or elastic is None:
            continue
        told = by_policy.get(RISE_KNOWN)
        best, fastest, bar = _bars(statics, varying=isinstance(load, str))
        good_ok, latency_ok = _meets(elastic, best, bar)
        oracle = None
        if isinstance(load, str) and all(WINDOWS_KEY in r for r in (*statics, elastic)):
            oracle = oracle_p50({r["policy"]: r[WINDOWS_KEY] for r in statics})
            # Where the elastic fleet's goodput goes: each window's good fraction beside the best's.
            oracle["good_by_window"] = {
                name: [
                    round(good / max(1, count), 3) for _, (count, good, _) in sorted(r[WINDOWS_KEY].items())
                ]
                for name, r in (("elastic", elastic), ("best_static", best))
            }
        rows.append(
            {
                "scenario": scenario,
                "startup_s": startup,
                **({"warm_startup_s": elastic["warm_startup_s"]} if "warm_startup_s" in elastic else {}),
                "gpus": gpus,
                "offered_load": load,
                "queue_policy": queue_policy,
                "admission": admission,
                "best_static": best["policy"],
                "best_good_fraction": best["good_fraction"],
                "elastic_good_fraction": elastic["good_fraction"],
                "best_p50_s": best["p50_s"],
                "elastic_p50_s": elastic["p50_s"],
                "best_p99_s": best["p99_s"],
                "elastic_p99_s": elastic["p99_s"],
                "goodput_bar_met": good_ok,
                "latency_bar_met": latency_ok,
                "latency_bar_static": fastest["policy"],
                "latency_bar_s": round(bar, 3) if math.isfinite(bar) else None,
                **(
                    {
                        "oracle_p50_s": oracle["p50_s"],
                        "oracle_layouts": oracle["layouts"],
                        "p50_bar_within_oracle": oracle["p50_s"] <= bar,
                        "good_by_window": oracle["good_by_window"],
                    }
                    if oracle
                    else {}
                ),
                **(
                    {
                        "rise_known_good_fraction": told["good_fraction"],
                        "goodput_bar_within_rise_known": _meets(told, best, bar)[0],
                    }
                    if told
                    else {}
                ),
                **(
                    {"starts_per_phase_change_per_8_gpus": elastic["starts_per_phase_change_per_8_gpus"]}
                    if "starts_per_phase_change_per_8_gpus" in elastic
                    else {}
                ),
            }
        )
    return rows


def _run(job: tuple) -> dict:
    return simulate(*job)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fleets", type=int, nargs="+", default=[8, 64], help="GPUs of each fleet")
    parser.add_argument("--loads", type=float, nargs="*", default=[0.2, 0.4, 0.6, 0.8, 1.0, 1.2])
    parser.add_argument("--varying", nargs="*", default=list(VARYING), choices=VARYING, help="varying loads")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument(
        "--startup-s",
        type=float,
        nargs="+",
        default=[60.0, 180.0],
        help="a replica's start on a cold node (one the model has not run on), each a grid of its own",
    )
    parser.add_argument(
        "--warm-startup-s",
        type=float,
        default=WARM_STARTUP_S,
        help=f"a replica's start on a warm node (one the model has run on) for a pool started before "
        f"(default {WARM_STARTUP_S:g}: about twice the measured 1-GPU restart)",
    )
    parser.add_argument(
        "--every-start-cold",
        action="store_true",
        help="every start takes --startup-s, on whatever node (the model of the results before 2026-12-06)",
    )
    parser.add_argument(
        "--serve-delays-s",
        type=float,
        nargs=2,
        default=[UPSCALE_DELAY_S, DOWNSCALE_DELAY_S],
        metavar=("UP", "DOWN"),
        help="Serve's upscale and downscale delays on the elastic policy's decisions (default: an elastic "
        "application's, none; the simulator before 2026-12-06 took 5 and 30 s)",
    )
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--duration-s", type=float, default=7200.0, help="simulated arrivals window")
    parser.add_argument("--warmup-s", type=float, default=600.0, help="arrivals before this are not counted")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="simulations run at once (processes)")
    parser.add_argument(
        "--queue-policies",
        nargs="+",
        default=[FIFO],
        choices=QUEUE_POLICIES,
        help="the order of each pool's waiting requests (routing.queue_policy), every fleet under each; "
        "the elastic fleet is compared with the static ones under the same",
    )
    parser.add_argument(
        "--expire-at-deadline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a request still waiting at its deadline leaves the line, as the router's 504 takes it out in "
        "production (needed for shortest_first, where a large request can wait without end); "
        "--no-expire-at-deadline keeps every admitted request in line until it runs (the model of the "
        "results before 2026-12-04)",
    )
    parser.add_argument(
        "--admissions",
        nargs="+",
        default=[ADMISSIONS[0]],
        choices=ADMISSIONS,
        help="routing.admission, every fleet under each: typical_wait (the default: also refuse what would "
        "wait longer than the typical arrival can) or deadline (refuse only what would miss its own "
        "deadline: the model of the results before 2026-12-04's second run)",
    )
    parser.add_argument(
        "--policy-options",
        type=json.loads,
        default=None,
        help="the elastic fleet's elastic.policy_options as JSON, e.g. '{\"peak_window_s\": 0}' "
        "(default: the policy's own defaults)",
    )
    parser.add_argument(
        "--elastic-routing",
        default=ELASTIC_ROUTING,
        choices=sorted(ROUTING_POLICIES),
        help="routing.policy of the elastic fleets (default line_priced, as in production: a request cheaper "
        "than a pool's line charged its wait there twice; finish_first: without that charge); the static ones "
        "keep theirs",
    )
    args = parser.parse_args(argv)
    jobs = [
        (
            policy,
            budget,
            load,
            args.duration_s,
            args.warmup_s,
            startup,
            args.seed,
            scenario,
            queue_policy,
            args.expire_at_deadline,
            args.policy_options,
            admission,
            args.elastic_routing,
            None if args.every_start_cold else args.warm_startup_s,
            tuple(args.serve_delays_s),
        )
        for admission in args.admissions
        for queue_policy in args.queue_policies
        for scenario in args.scenarios
        for startup in args.startup_s
        for budget in args.fleets
        for load in [*args.loads, *args.varying]
        for policy in args.policies
        if policy != RISE_KNOWN or load in STEPPED
    ]
    with ProcessPoolExecutor(args.workers) if args.workers > 1 else contextlib.nullcontext() as pool:
        runs = pool.map(_run, jobs, chunksize=1) if pool else map(_run, jobs)
        results = []
        started = time.monotonic()
        for result in runs:  # a full grid takes hours on two cores: say how far it is
            results.append(result)
            elapsed = time.monotonic() - started
            left = elapsed / len(results) * (len(jobs) - len(results))
            print(
                f"[{len(results)}/{len(jobs)}] {elapsed / 60:.1f} min, ~{left / 60:.0f} min left",
                file=sys.stderr,
                flush=True,
            )
    for result in results:
        load = result["offered_load"]
        shown = load if isinstance(load, str) else f"{load:.0%}"
        print(
            f"{result['queue_policy']:14s} {result['scenario']:10s} {result['startup_s']:4.0f}s {result['gpus']:3d} GPUs {shown:>11s} "
            f"{result['policy']:18s} p50 {result['p50_s']} p99 {result['p99_s']} good {result['good_fraction']:.3f} "
            f"starts/h {result['replica_starts_per_hour']}",
            flush=True,
        )
    comparison = compare(results)
    for result in results:  # per-request outcomes: the oracle's, not the JSON's
        result.pop(WINDOWS_KEY, None)
    met = sum(row["goodput_bar_met"] and row["latency_bar_met"] for row in comparison)
    print(f"elastic meets both bars in {met} of {len(comparison)} cells", flush=True)
    held_to_the_bars = bars_by_policy(results)
    for policy, count in held_to_the_bars.items():
        print(
            f"  {policy:18s} held to the same bars: steady both {count['steady_both']} of {count['steady']}, "
            f"varying both {count['varying_both']}, goodput {count['varying_goodput']}, "
            f"p50 {count['varying_p50']} of {count['varying']}",
            flush=True,
        )
    for row in comparison:
        if not (row["goodput_bar_met"] and row["latency_bar_met"]):
            print(
                f"  missed: {row['queue_policy']} {row['scenario']} {row['startup_s']:.0f}s {row['gpus']} GPUs "
                f"{row['offered_load']}: "
                f"good {row['elastic_good_fraction']} vs {row['best_static']} {row['best_good_fraction']}, "
                f"p50 {row['elastic_p50_s']} vs {row['best_p50_s']}, p99 {row['elastic_p99_s']} vs {row['best_p99_s']}",
                flush=True,
            )
    document = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": "simulation (no device): service times from the scenarios below",
        "commit": source_commit() or None,
        "single_gpu_s": {f"{r}px": {"seconds": s, "source": src} for r, (s, src) in SINGLE_GPU_S.items()},
        "scenarios": {
            name: {
                "speedups": {
                    f"{r}px": {str(g): round(x, 3) for g, x in by_gpus.items()}
                    for r, by_gpus in table.items()
                },
                "source": source,
            }
            for name, (table, source) in SCENARIOS.items()
        },
        "overhead": {f"{r}px": {"seconds": s, "source": src} for r, (s, src) in OVERHEAD_S.items()},
        "mix": [{"weight": w, "resolution": r, "steps": s, "cfg": c} for w, r, s, c in MIX],
        "slo": f"{SLO_FACTOR}x the request's single-GPU compiled time, sent as its timeout (admission refuses "
        "what would miss it; refused requests count as not good)",
        "autoscaler": {
            "tick_s": TICK_S,
            "look_back_s": LOOK_BACK_S,
            "upscale_delay_s": args.serve_delays_s[0],
            "downscale_delay_s": args.serve_delays_s[1],
        },
        "capacity_per_s": {str(b): round(capacity_per_s(b), 4) for b in args.fleets},
        "results": results,
        "comparison": comparison,
        "bars_by_policy": held_to_the_bars,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
