"""Which pool serves a request: pure functions of the request's cost, the pools and their load.

A request goes where it **finishes first**: for every pool serving its model, the router estimates the
wait for a replica (the work ahead of it, spread over the pool's ready replicas, or a replica's start-up
when the pool is cold) plus its own service time (its cost times the pool's seconds per cost unit), and
picks the earliest (ties: the smaller pool, which leaves large replicas free for the next request). Seconds
per cost unit are learned online per pool from the engine timings every response carries; until a pool is
measured its rate is extrapolated from a measured pool of the same model by GPU count, or taken from the
pool's configured prior. With nothing known at all, the configured cost thresholds decide, as before
(``route_min_cost``: cheap requests to small pools, expensive ones to big pools, free pools first).

Cost is megapixels x steps x (2 with CFG) x images, each megapixel dearer by the model's attention term
(:func:`sample_cost`): proportional to transformer work. Load is the whole
application's (``serve/state.py`` keeps it), never one router replica's. The fleet simulator
(``benchmarks/simulate_fleet.py``) calls these same functions.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from rayxdit.config import PoolConfig
from rayxdit.limits import ResolvedRequest, request_work

TRUST_FACTOR = 4.0
"""Admission refuses only on estimates within this factor of the largest request cost a pool has measured."""
SCALING_EXPONENT = 0.85
"""Before a pool is measured, n times the GPUs is taken as n**0.85 times as fast (2 GPUs: 1.80x). Measured
on 2x H200 (benchmarks/results/flux-dev-2xh200.json): 1.58x at 1024px, 1.78x at 2048px, 1.98x with cfg=2."""


def version_draw(request_id: str) -> float:
    """Where in [0, 1) a request falls among its model's versions: a hash of its id, so that one request
    (and a retried attempt of it) always goes to the same version, and the ids of many spread evenly."""
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") / 2**64


def pick_version(weights: Mapping[str, float], draw: float) -> str:
    """The version an unpinned request goes to: ``draw`` (in [0, 1)) falls in one version's share of the
    total weight, versions in sorted order (0-weight versions take none)."""
    total = sum(weights.values())
    edge = 0.0
    for version in sorted(weights):
        edge += weights[version] / total
        if draw < edge and weights[version] > 0:
            return version
    return max(sorted(weights), key=lambda version: weights[version])  # float rounding at the top edge


def sample_cost(megapixels: float, steps: int, uses_cfg: bool, attention_per_megapixel: float) -> float:
    """One image's (or video's: ``megapixels`` is width x height x frames) cost in cost units, a unit being
    one step of a one-megapixel image: megapixel-steps (x 2 with CFG), each megapixel dearer by the model's
    attention term ``(1 + a x megapixels) / (1 + a)``. Attention grows with the square of the sequence, the
    rest of a step linearly: with Flux's measured ``a`` a 2048px image costs 5.3 1024px ones, as it takes, not
    4 (which made a pool's fitted rate follow its share of 2048px requests). Normalised at one megapixel so
    that thresholds and priors written in megapixel-steps keep their meaning."""
    quadratic = (1 + attention_per_megapixel * megapixels) / (1 + attention_per_megapixel)
    return megapixels * quadratic * steps * (2 if uses_cfg else 1)


def request_cost(req: ResolvedRequest, uses_cfg: bool, attention_per_megapixel: float) -> float:
    """:func:`sample_cost` of each of a request's images (or videos), summed; ``uses_cfg``: whether the model
    runs CFG for this request; ``attention_per_megapixel``: its
    :attr:`~rayxdit.limits.ModelLimits.attention_cost_per_megapixel`."""
    megapixels = request_work(req.width, req.height, req.frames)  # one sample's
    return sample_cost(megapixels, req.steps, uses_cfg, attention_per_megapixel) * req.batch


class ServiceFit:
    """A pool's service time as ``overhead_s + seconds_per_cost * cost``, fitted online by exponentially
    weighted least squares: text encoding and decoding cost about the same for any request, the denoising
    loop is proportional to its cost, and the newest requests weigh most (``forget`` per sample). With only
    one cost seen so far, the fit is proportional."""

    MEAN_FORGET = 0.99
    """The request mix changes slowly and varies a lot from one request to the next (a 2048px image costs
    five 1024px ones): its mean cost is averaged over about a hundred requests, not ten."""

    def __init__(self, forget: float = 0.9):
        self.forget = forget
        self.weight = self.cost = self.cost2 = self.seconds = self.cost_seconds = 0.0
        self.largest = 0.0
        self.mix_weight = self.mix_cost = 0.0

    def add(self, cost: float, seconds: float) -> None:
        self.largest = max(self.largest, cost)
        self.mix_weight = self.MEAN_FORGET * self.mix_weight + 1.0
        self.mix_cost = self.MEAN_FORGET * self.mix_cost + cost
        f = self.forget
        self.weight = f * self.weight + 1.0
        self.cost = f * self.cost + cost
        self.cost2 = f * self.cost2 + cost * cost
        self.seconds = f * self.seconds + seconds
        self.cost_seconds = f * self.cost_seconds + cost * seconds

    @property
    def fitted(self) -> tuple[float, float] | None:
        """``(overhead_s, seconds_per_cost)``, or None before any sample."""
        if self.weight == 0 or self.cost <= 0:
            return None
        spread = self.weight * self.cost2 - self.cost**2
        if spread > 1e-9 * self.weight * self.cost2:
            slope = (self.weight * self.cost_seconds - self.cost * self.seconds) / spread
            overhead = (self.seconds - slope * self.cost) / self.weight
            if slope > 0 and overhead >= 0:
                return overhead, slope
        return 0.0, self.seconds / self.cost

    @property
    def mean_cost(self) -> float | None:
        """The mean cost of the requests this pool serves, over about its last hundred (``MEAN_FORGET``)."""
        return self.mix_cost / self.mix_weight if self.mix_weight else None

    @property
    def trusted_cost(self) -> float:
        """The largest request cost this fit's estimates may refuse a request on: TRUST_FACTOR times the
        largest cost measured. Beyond it the fit is an extrapolation (small requests are mostly fixed
        overhead: taken proportionally, they make a large request look many times slower than it is)."""
        return TRUST_FACTOR * self.largest


@dataclass(frozen=True)
class PoolSpec:
    """What routing and autoscaling need to know about a pool (from its ``PoolConfig``)."""

    name: str
    model: str
    ranks: int
    route_min_cost: float = 0.0
    seconds_per_cost: float | None = None
    """Configured prior of the pool's service rate, until it is measured."""
    startup_s: float = 60.0
    """Configured prior of a replica's start-up (model load, warm-up), until one is measured."""

    @classmethod
    def of(cls, pool: PoolConfig) -> PoolSpec:
        return cls(
            pool.name,
            pool.served_model_name,
            pool.ranks,
            pool.route_min_cost,
            pool.seconds_per_cost,
            pool.startup_s,
        )


@dataclass(frozen=True)
class PoolLoad:
    """One pool as the whole application sees it."""

    ready_replicas: int = 0
    """Replicas whose worker group is up (each runs one request at a time)."""
    starting_replicas: int = 0
    """Replicas loading their model (or warming up)."""
    outstanding: int = 0
    """Requests routed to the pool and not finished yet (running or queued), from every router replica."""
    outstanding_cost: float = 0.0
    """Their total cost."""
    seconds_per_cost: float | None = None
    """Measured service rate (None: not measured yet)."""
    overhead_s: float = 0.0
    """Measured fixed part of a request's service time (text encoding, decoding)."""
    startup_s: float | None = None
    """Measured replica start-up (None: not measured yet)."""
    trusted_cost: float = math.inf
    """Requests up to this cost may be refused on this pool's estimate (see ``ServiceFit.trusted_cost``)."""
    max_work: float = math.inf
    """The largest request (megapixels x frames x images) its ranks' memory holds (:mod:`~rayxdit.serve.memory`)."""

    @property
    def free(self) -> bool:
        return self.outstanding < self.ready_replicas


def service_rates(pools: Sequence[PoolSpec], loads: Mapping[str, PoolLoad]) -> dict[str, float] | None:
    """Seconds per cost unit of each pool: measured where measured; else extrapolated from the measured
    (or configured) pool of the same model nearest in GPU count; None if some pool's model has neither."""
    known = _known_rates(pools, loads)
    rates: dict[str, float] = {}
    for pool in pools:
        anchor = _anchor(pool, pools, known)
        if anchor is None:
            return None
        rates[pool.name] = known[anchor.name] * (anchor.ranks / pool.ranks) ** SCALING_EXPONENT
    return rates


def service_overheads(pools: Sequence[PoolSpec], loads: Mapping[str, PoolLoad]) -> dict[str, float]:
    """Each pool's fixed seconds per request (text encoding, decoding): measured where measured; else that of
    the pool its rate is extrapolated from (:func:`service_rates`), as those steps do not shrink with the
    GPUs. Without it an unmeasured pool looked faster than its GPU count makes it by the whole overhead: on
    64 GPUs at 120% load a fit of 0.4 s overhead on the 2-GPU pool made 4-GPU replicas look 2.0 times as
    fast, not 1.8, and the fleet started two it then kept, losing 5 points of goodput."""
    known = _known_rates(pools, loads)
    overheads = {}
    for pool in pools:
        anchor = _anchor(pool, pools, known) or pool
        overheads[pool.name] = loads.get(anchor.name, PoolLoad()).overhead_s
    return overheads


def _known_rates(pools: Sequence[PoolSpec], loads: Mapping[str, PoolLoad]) -> dict[str, float | None]:
    """Each pool's measured seconds per cost unit, else its configured prior, else None."""
    return {
        pool.name: (loads.get(pool.name, PoolLoad()).seconds_per_cost or pool.seconds_per_cost)
        for pool in pools
    }


def _anchor(pool: PoolSpec, pools: Sequence[PoolSpec], known: Mapping[str, float | None]) -> PoolSpec | None:
    """The pool whose measured (or configured) rate ``pool``'s is read from: itself if known, else the known
    pool of its model nearest in GPU count; None if none is known."""
    if known[pool.name]:
        return pool
    anchors = [other for other in pools if other.model == pool.model and known[other.name]]
    return min(anchors, key=lambda other: abs(math.log(other.ranks / pool.ranks)), default=None)


def completion_estimate(pool: PoolSpec, load: PoolLoad, cost: float, seconds_per_cost: float) -> float:
    """Seconds until a request of ``cost`` would finish on ``pool``: the wait for a replica plus its service
    (the pool's measured overhead plus ``cost`` at ``seconds_per_cost``).

    With ``n`` requests outstanding on ``c`` busy replicas (``S`` their mean service), the first replica
    frees when the running request nearest its end finishes: a denoising request's time hardly varies, so
    the ``c`` running ones are spread evenly through their runs and the nearest ends after ``S / (c + 1)``
    (half a request on one replica); one more frees every ``S / c`` after that, and the ``n - c`` queued
    requests start first. Read as "each running request half done" (``S / 2`` for the first replica on
    any ``c``), the wait on four 2-GPU replicas came out 0.5 s long on average, and admission refused 2-3%
    of the requests of a one-node fleet at 60% load that would have made their deadlines
    (``benchmarks/simulate_fleet.py``: all-2-GPU 97.3% good, 98.8% with this). A cold pool first needs a
    replica (its start-up; half of it when one is already starting), then serves its queue in turn.
    """
    service = load.overhead_s + cost * seconds_per_cost
    n, c = load.outstanding, load.ready_replicas
    outstanding_work = n * load.overhead_s + load.outstanding_cost * seconds_per_cost
    if c == 0:
        startup = load.startup_s or pool.startup_s
        return (startup / 2 if load.starting_replicas else startup) + outstanding_work + service
    if n < c:
        return service
    mean_service = outstanding_work / n
    return mean_service * (1 / (c + 1) + (n - c) / c) + service


def threshold_order(pools: Sequence[PoolSpec], cost: float, loads: Mapping[str, PoolLoad]) -> list[PoolSpec]:
    """Routing by configured thresholds alone (nothing measured yet): the pool whose ``route_min_cost`` is
    the highest not above ``cost`` first, then the others nearest in GPU count (ties: the larger), free pools
    before busy ones."""
    if not pools:
        return []
    eligible = [pool for pool in pools if pool.route_min_cost <= cost]
    first = (
        max(eligible, key=lambda pool: (pool.route_min_cost, pool.ranks))
        if eligible
        else min(pools, key=lambda pool: pool.route_min_cost)
    )
    order = [
        first,
        *sorted((p for p in pools if p is not first), key=lambda p: (abs(p.ranks - first.ranks), -p.ranks)),
    ]
    free = [pool for pool in order if loads.get(pool.name, PoolLoad()).free]
    return free + [pool for pool in order if pool not in free]


def route(
    pools: Sequence[PoolSpec],
    cost: float,
    loads: Mapping[str, PoolLoad],
    exclude: frozenset[str] = frozenset(),
    free_ranks: float = math.inf,
    price_lines: bool = False,
) -> list[tuple[PoolSpec, float | None]]:
    """The pools of one model to try, best first, each with its completion estimate (seconds; None while
    nothing is known and thresholds decide). Excluded pools (full or down for this request) never.
    ``price_lines``: order by the estimate plus :func:`line_price` (the estimates returned stay as they are).

    ``free_ranks``: ranks of the shared budget that no replica holds. A cold pool whose replica would not
    fit there comes last whatever its estimate: its start-up would first wait for other pools to drain (on
    a full node under heavy load, never), and a queue sent there holds requests that a warm pool would
    serve, and makes Serve start a replica the budget has no room for."""
    candidates = [pool for pool in pools if pool.name not in exclude]

    def blocked(pool: PoolSpec) -> bool:
        load = loads.get(pool.name, PoolLoad())
        return load.ready_replicas + load.starting_replicas == 0 and pool.ranks > free_ranks

    rates = service_rates(pools, loads)
    if rates is None:
        order = threshold_order(candidates, cost, loads)
        return [(pool, None) for pool in sorted(order, key=blocked)]
    estimates = [
        (pool, completion_estimate(pool, loads.get(pool.name, PoolLoad()), cost, rates[pool.name]))
        for pool in candidates
    ]

    def preference(item: tuple[PoolSpec, float]) -> tuple:
        pool, estimate = item
        load = loads.get(pool.name, PoolLoad())
        priced = line_price(pool, load, cost, estimate, rates) if price_lines else 0.0
        return (blocked(pool), estimate + priced, pool.ranks)

    return sorted(estimates, key=preference)


def line_price(
    pool: PoolSpec, load: PoolLoad, cost: float, estimate: float, rates: Mapping[str, float]
) -> float:
    """What a request of ``cost`` is charged beyond its completion estimate for joining ``pool``: its wait
    there once more where it is cheaper than the mean request the pool holds, else nothing.

    Finish-first routing is each request's own best, and each joins a fast pool's line while that still
    finishes it sooner; but every request in that line delays the ones that come after, and the fast
    replicas save the most for the large requests. A cheap request gains little from them (a 1024px image:
    0.9 s on a 4-GPU replica against a 2-GPU one) and lengthens the line the large ones wait in (a 2048px
    image: 4.9 s). Charged its wait twice, it takes a free slower replica unless the fast pool finishes it
    sooner even then; requests at least as costly as the line's mean judge by the estimate alone. Found in
    the fleet simulator (64 GPUs, 60% load, 2-, 4- and 8-GPU replicas): the 1024px requests queued on the
    4-GPU pool (p90 2.41 s against its 1.66 s service) and the 2048px ones waited behind them (p90 8.19 s
    against 6.74 s alone), which set the fleet's p99. Charging every request its wait twice sent 2048px
    images to a slower pool instead, and the p99 of other fleets rose (docs/elastic-history.md)."""
    if load.outstanding <= 0 or cost >= load.outstanding_cost / load.outstanding:
        return 0.0
    return waiting_time(pool, load, cost, estimate, rates)


def idle_pools(pools: Sequence[PoolSpec], loads: Mapping[str, PoolLoad]) -> list[PoolSpec]:
    """The pools with a ready replica that no request runs on or waits for: where background work (a
    batch's line) may go without an online request waiting behind more than it."""
    return [pool for pool in pools if loads[pool.name].ready_replicas > loads[pool.name].outstanding]


def retry_after(
    estimate: float | None,
    time_left: float,
    cost: float = 0.0,
    trusted_cost: float = math.inf,
    waiting_s: float = 0.0,
    typical_slack_s: float | None = None,
) -> float | None:
    """Admission control: None admits a request (of ``cost``) expected to finish in ``estimate`` seconds with
    ``time_left`` before its deadline, and any request beyond the cost its pool's estimate can be trusted
    for; otherwise the seconds after which its queue should have drained enough for it (the
    ``Retry-After`` of a 429).

    With ``typical_slack_s`` (admission ``typical_wait``: :class:`Slacks`), a request that would wait
    ``waiting_s`` for a replica, longer than the typical request of its model can wait and still make its
    deadline, is refused too, however lenient its own deadline: in an overload the line then stays as long
    as the typical request tolerates, instead of filling with the requests that tolerate the most (the
    large ones, whose deadlines are longest in seconds) while every typical request behind them is
    refused."""
    if estimate is None or cost > trusted_cost:
        return None
    over = estimate - time_left
    if typical_slack_s is not None:
        over = max(over, waiting_s - typical_slack_s)
    if over <= 0:
        return None
    return float(max(1, math.ceil(over)))


def waiting_time(
    pool: PoolSpec, load: PoolLoad, cost: float, estimate: float | None, rates: Mapping[str, float] | None
) -> float:
    """Seconds of ``estimate`` that a request of ``cost`` would spend waiting for a replica of ``pool``
    (its own service taken out); 0 where nothing is estimated, and for a pool with no ready replica, whose
    wait is a start-up (the deadline alone judges that one)."""
    if estimate is None or rates is None or load.ready_replicas == 0:
        return 0.0
    return max(0.0, estimate - service_time(pool, load, cost, rates))


def service_time(pool: PoolSpec, load: PoolLoad, cost: float, rates: Mapping[str, float]) -> float:
    """Seconds a request of ``cost`` runs on a replica of ``pool`` (its overhead plus the cost at its rate)."""
    return load.overhead_s + cost * rates[pool.name]


def admit(
    order: Sequence[tuple[PoolSpec, float | None]],
    loads: Mapping[str, PoolLoad],
    cost: float,
    time_left: float,
    trusted_costs: Mapping[str, float],
    rates: Mapping[str, float] | None,
    typical_slack_s: float | None = None,
) -> tuple[PoolSpec, float | None, float | None, float]:
    """Admission over the routing ``order`` (best first, from :func:`route`): ``(pool, its estimate, the
    Retry-After of a refusal or None, the request's wait for a replica there)``. The first pool, where
    :func:`retry_after` admits the request there; where only the typical wait refuses it (it would make its
    deadline there), the first pool further down the order with a ready replica that admits it (a shorter
    line to a slower replica: in time, and not behind a line the typical request could not wait out); else
    refused, with the first pool's Retry-After."""
    first: tuple[PoolSpec, float | None, float | None, float] | None = None
    for pool, estimate in order:
        load = loads.get(pool.name, PoolLoad())
        if first is not None and load.ready_replicas == 0:
            continue  # a cold pool further down: its replica may never start where the first could not
        waiting = waiting_time(pool, load, cost, estimate, rates)
        refused = retry_after(estimate, time_left, cost, trusted_costs[pool.name], waiting, typical_slack_s)
        if refused is None:
            return pool, estimate, None, waiting
        if first is None:
            first = (pool, estimate, refused, waiting)
            if estimate is None or estimate > time_left:
                break  # its own deadline refused it on the pool that finishes it first: on every pool
    if first is None:
        raise ValueError("admission needs at least one pool in the routing order")
    return first


ADMISSIONS = ("typical_wait", "deadline")
"""``routing.admission``: ``deadline`` refuses what would miss its own deadline; ``typical_wait`` also what
would wait longer than the typical request can (:func:`retry_after`)."""
SLACK_WINDOW_S = 600.0
"""The typical request's slack is the median over this long a window of arrivals."""


@dataclass
class Slacks:
    """How long a model's arriving requests could wait for a replica and still make their deadlines (their
    time left less their own service), over the last ``window_s``: the median is the *typical slack*. Only
    requests that could make their deadline at all count (a timeout shorter than the request's own service
    says nothing about how long a servable request can wait). One per model in the application's state
    (and per fleet in the simulator)."""

    window_s: float = SLACK_WINDOW_S
    arrivals: deque[tuple[float, float]] = field(default_factory=deque)
    ordered: list[float] = field(default_factory=list)

    def add(self, now: float, slack: float) -> None:
        self._trim(now)
        if slack >= 0:
            self.arrivals.append((now, slack))
            bisect.insort(self.ordered, slack)

    def typical(self, now: float) -> float | None:
        """The window's median slack (None: no servable arrival in it)."""
        self._trim(now)
        return self.ordered[len(self.ordered) // 2] if self.ordered else None

    def _trim(self, now: float) -> None:
        while self.arrivals and self.arrivals[0][0] < now - self.window_s:
            _, slack = self.arrivals.popleft()
            del self.ordered[bisect.bisect_left(self.ordered, slack)]


ADAPTER_PATIENCE_S = 0.3
"""How long a request naming adapters waits for a replica that holds them (or is their home) before any free
replica may take it: about what a miss costs, a rank-64 Flux.1-dev adapter read from disk and fused (estimated
from bandwidths, ~0.3 s; benchmarks/simulate_adapters.py: waiting 1 s, Serve's own wait for a multiplexed
model, made the 80%-load p99 worse than 0.3 s)."""
ADAPTER_HOMES = 2
"""Replicas an adapter set calls home (rendezvous hashing): where it goes when no replica holds it yet, so
that each set settles on few replicas and each replica's GPUs hold few sets."""


def _affinity(key: str, replica: str) -> int:
    digest = hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def adapter_tiers(
    replicas: Sequence[tuple[str, frozenset[str]]],
    key: str | None,
    waited_s: float,
    patience_s: float = ADAPTER_PATIENCE_S,
    homes: int = ADAPTER_HOMES,
) -> list[list[str]]:
    """Which of a pool's replicas may take a request, best tier first (each replica is ``(id, adapter sets
    it holds)``; the router takes the least busy free replica of the first tier that has one, and asks
    again later when none does).

    A request without adapters (``key`` None) may go anywhere. One naming adapter set ``key`` goes to a
    replica holding it, then to one of its ``homes`` (the replicas ranked first for ``key`` by rendezvous
    hashing: stable as replicas come and go, the same in every router process); for ``patience_s`` it waits
    for those rather than make another replica load the adapters, then any replica may take it (those
    first)."""
    everyone = [replica for replica, _ in replicas]
    if key is None:
        return [everyone]
    holders = [replica for replica, held in replicas if key in held]
    home = sorted(everyone, key=lambda replica: _affinity(key, replica), reverse=True)[:homes]
    preferred = [holders, [replica for replica in home if replica not in holders]]
    if waited_s < patience_s:
        return [tier for tier in preferred if tier]
    rest = [replica for replica in everyone if replica not in holders and replica not in home]
    return [tier for tier in (*preferred, rest) if tier]
