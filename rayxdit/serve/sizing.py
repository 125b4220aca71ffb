"""Sizing the pools: every pool's replica count decided together, within one budget of ranks (GPUs), by
pure functions of plain data.

The principle: every request that wants to run should have a replica, and spare ranks buy speed.

1. **A queue keeps its pool.** A pool with requests waiting for it keeps its replicas (up to as many as it
   has requests), so a large replica is only given up once the small ones have absorbed its queue; a
   replica merely running a request may be given up (Serve lets it finish first). Unless keeping it blocks
   what the demand needs (on a full node, a lone large replica under a growing queue keeps the small ones
   that would absorb it from starting): then it goes, and the routers re-route its queue. Every pool keeps
   its ``min_replicas``.
2. **Concurrency first.** Each model wants as many replicas as it has requests outstanding (averaged by
   Serve over the look-back window, rounded; at least one while it has any traffic), and at least enough
   of its most efficient pool to serve its measured request rate at 80% utilization (so a steady stream
   that happens to show few requests at each tick still gets the replicas it keeps busy). Missing
   replicas are added in the pool that does the most work per rank (the smallest, by measurement), for as
   many requests as the budget allows: under heavy load, many small replicas, the most images per GPU.
3. **Then latency.** Spare ranks upgrade planned replicas to larger pools, best gain per extra rank first
   (the time a typical request saves, from each pool's measured seconds per cost unit): under light load a
   single request gets the largest replica the budget holds, the lowest latency.
4. **Idle returns it all**: no traffic, no replicas beyond the minimums.
5. **No flapping.** The configuration in place stays unless the ideal one completes the current demand's
   requests 15% faster on average (requests sent to the replica that finishes each first): every change
   costs replica start-ups.

``plan_replicas`` is a pure function, the ``load_aware`` entry of ``serve/policies.py``'s table (the fleet
simulator calls it too); ``serve/elastic.py`` is the thin adapter Serve 2.60 calls as the application's
``autoscaling_policy``, after which Serve applies each pool's own ``upscale_delay_s``/``downscale_delay_s``
and bounds.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from rayxdit.serve.routing import SCALING_EXPONENT, PoolLoad, PoolSpec, service_overheads, service_rates

EPSILON = 1e-6


@dataclass(frozen=True)
class PoolDemand:
    """One pool at one autoscaling decision."""

    spec: PoolSpec
    replicas: int
    """The current target."""
    outstanding: float
    """Requests running or queued at the pool (Serve's total_num_requests, averaged over its look-back)."""
    queued: float = 0.0
    """Of those, requests waiting for a replica of this pool (Serve's total_queued_requests)."""
    min_replicas: int = 0
    max_replicas: int = 1
    seconds_per_cost: float | None = None
    """Measured service rate (None: not measured yet)."""
    overhead_s: float = 0.0
    """Measured fixed part of a request's service time."""
    mean_cost: float | None = None
    """Measured mean cost of the pool's recent requests."""
    throughput: float = 0.0
    """Requests the pool finished per second recently (all its replicas)."""
    startup_s: float = 60.0
    """How long a replica of the pool takes to start (measured by its replicas, else the pool's prior)."""
    arrivals: float | None = None
    """Requests per second arriving for the pool's model, refused ones included, as the application's state
    counts them (None: unknown; a policy then infers it from what the pools finish and hold)."""
    quiet_s: float | None = None
    """Seconds since the model's last request arrived, as the application's state knows it (None: unknown)."""
    arrival_cost: float | None = None
    """Mean cost of the model's arrivals over the last ARRIVAL_COST_WINDOW_S, as the state counts them
    (None: unknown; the pools' own mean costs, weighted by what each finishes, stand in: under an
    overload they are what admission and deadlines let through)."""
    arrivals_counted_s: float = math.inf
    """How long the state has counted the model's arrivals (its replica's uptime): ``arrivals`` is a
    whole window's count only from ARRIVALS_WINDOW_S on."""


@dataclass
class LastMeasured:
    """Per pool, what its replicas last measured (``seconds_per_cost``, ``overhead_s``, ``mean_cost``,
    ``startup_s``): a pool whose replicas are all gone (an 8-GPU pool given back for a busy hour) reports
    nothing, and its configured prior would otherwise stand in for its measured speed and start-up exactly
    when the policy weighs starting it again. The fleet simulator's pools keep what they measured, as this
    does; a new controller starts from the priors again."""

    values: dict[str, dict[str, float]] = field(default_factory=dict)

    def fill(self, pool: str, reported: Mapping[str, float | None]) -> dict[str, float | None]:
        """``reported`` (None: nothing reported now) with each missing value replaced by the pool's last."""
        kept = self.values.setdefault(pool, {})
        kept.update({name: value for name, value in reported.items() if value is not None})
        return {name: kept.get(name) for name in reported}


def typical_seconds(pools: Sequence[PoolDemand]) -> dict[str, float]:
    """Each pool's service time of a typical request of its model: its rate (measured, else extrapolated,
    else relative to one rank) times the model's mean request cost (1 if unmeasured). The model's mean is
    that of its arrivals where the state reports it (``arrival_cost``), else its pools' means weighted by
    the requests each finishes: routing sends the large requests to the large pools, so each pool's own
    mean is not the model's."""
    specs = [pool.spec for pool in pools]
    loads = {
        pool.spec.name: PoolLoad(seconds_per_cost=pool.seconds_per_cost, overhead_s=pool.overhead_s)
        for pool in pools
    }
    rates = service_rates(specs, loads) or {s.name: s.ranks**-SCALING_EXPONENT for s in specs}
    overheads = service_overheads(specs, loads)
    costs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    arriving = {pool.spec.model: pool.arrival_cost for pool in pools if pool.arrival_cost}
    for pool in pools:
        if pool.mean_cost and pool.spec.model not in arriving:
            costs[pool.spec.model].append((pool.mean_cost, pool.throughput))
    mean_cost = {}
    for model, values in costs.items():
        weight = sum(throughput for _, throughput in values)
        mean_cost[model] = (
            sum(cost * throughput for cost, throughput in values) / weight
            if weight > EPSILON
            else sum(cost for cost, _ in values) / len(values)
        )
    mean_cost.update(arriving)
    return {
        pool.spec.name: overheads[pool.spec.name]
        + rates[pool.spec.name] * mean_cost.get(pool.spec.model, 1.0)
        for pool in pools
    }


ARRIVALS_WINDOW_S = 20.0
"""A model's arrival rate is counted over this long a window (the application's state's
``arrivals_per_s.<model>``, and the fleet simulator's)."""


def arrival_rate(times: deque[float], now: float, window_s: float = ARRIVALS_WINDOW_S) -> float:
    """Arrivals per second over the last ``window_s``, from their times (oldest first; those older than
    the window are dropped from ``times``). Always over the whole window, also while less of it has passed
    since counting began: one request in a state's first second is not a rate of one per second, and the
    ``cost_aware`` policy keeps the busiest demand of an hour (its layouts must carry it), so a count over
    a second would hold a fleet sized for noise for that hour. A new count starts low and reaches the rate
    within the window, as a rise of load does."""
    while times and times[0] < now - window_s:
        times.popleft()
    return len(times) / window_s


ARRIVAL_COST_WINDOW_S = 600.0
"""The mean cost of a model's arrivals is taken over this long a window: a mix of requests changes over
minutes, and one minute of a mix with a few large requests swings the typical request's time by half."""


@dataclass
class ArrivalCosts:
    """The mean cost of a model's arrivals over the last ``window_s`` (a sliding window; the application's
    state keeps one per model, and the fleet simulator one per fleet)."""

    window_s: float = ARRIVAL_COST_WINDOW_S
    arrivals: deque[tuple[float, float]] = field(default_factory=deque)
    total: float = 0.0

    def add(self, now: float, cost: float) -> None:
        self.arrivals.append((now, cost))
        self.total += cost

    def mean(self, now: float) -> float | None:
        """The window's mean cost (None: no arrival in it)."""
        while self.arrivals and self.arrivals[0][0] < now - self.window_s:
            self.total -= self.arrivals.popleft()[1]
        if not self.arrivals:
            self.total = 0.0  # no drift from the running sum's rounding
            return None
        return max(0.0, self.total) / len(self.arrivals)


TARGET_UTILIZATION = 0.8
"""Replicas are sized to be this busy at the current request rate: queues stay short (at 0.9 and above a
queue's wait grows several-fold)."""
QUEUE_KEEPS_POOL = 0.5
"""Requests waiting for a pool (averaged) from which on its replicas are kept."""


def wanted_replicas(members: Sequence[PoolDemand], seconds: Mapping[str, float]) -> int:
    """Replicas a model wants: as many as its outstanding requests (averaged, rounded), and enough of its
    most efficient pool to serve its request rate at TARGET_UTILIZATION; at least one while it has any."""
    outstanding = sum(pool.outstanding for pool in members)
    rate = sum(pool.throughput for pool in members)
    if outstanding <= EPSILON and rate <= EPSILON:
        return 0
    efficient = min(members, key=lambda pool: seconds[pool.spec.name] * pool.spec.ranks)
    by_rate = math.ceil(rate * seconds[efficient.spec.name] / TARGET_UTILIZATION - EPSILON)
    return max(1, round(outstanding), by_rate)


def mean_completion(
    counts: Mapping[str, int], models: Mapping[str, Sequence[PoolDemand]], seconds: Mapping[str, float]
) -> float:
    """How good a configuration is for the current demand: the mean completion time of each model's wanted
    requests, each sent to the replica that finishes it first (so a lone fast replica wins for one request,
    and many small ones win once requests queue)."""
    total = count = 0.0
    for members in models.values():
        wanted = wanted_replicas(members, seconds)
        replicas = [seconds[m.spec.name] for m in members for _ in range(counts[m.spec.name])]
        if not wanted:
            continue
        if not replicas:
            return math.inf
        busy = [0.0] * len(replicas)
        for _ in range(wanted):
            best = min(range(len(replicas)), key=lambda i: busy[i] + replicas[i])
            busy[best] += replicas[best]
            total += busy[best]
            count += 1
    return total / count if count else 0.0


HYSTERESIS = 0.15
"""A configuration is replaced only by one expected to complete requests this much faster: every change
costs replica start-ups (minutes for a large model), so near-equal plans must not flap."""


def plan_replicas(pools: Sequence[PoolDemand], budget: float) -> dict[str, int]:
    """Replicas per pool (by pool name) for ``budget`` ranks; never more ranks than ``budget`` unless the
    pools' minimums alone exceed it (then exactly the minimums). The current configuration stays unless the
    ideal one is :data:`HYSTERESIS` better for the current demand; idle models return to their minimums."""
    by_name = {pool.spec.name: pool for pool in pools}
    models: dict[str, list[PoolDemand]] = defaultdict(list)
    for pool in pools:
        models[pool.spec.model].append(pool)

    def ranks(plan: Mapping[str, int]) -> int:
        return sum(max(by_name[n].min_replicas, count) * by_name[n].spec.ranks for n, count in plan.items())

    def bounded(plan: Mapping[str, int]) -> dict[str, int]:
        return {n: min(by_name[n].max_replicas, max(by_name[n].min_replicas, c)) for n, c in plan.items()}

    seconds = typical_seconds(pools)
    kept = _kept(by_name, ranks, budget)
    ideal = bounded(_ideal(by_name, models, seconds, kept, ranks, budget))
    # Keeping a queued pool may block what the demand needs (on a full node, the small replicas that would
    # absorb a big one's growing queue cannot start while it holds the GPUs): then the queue goes instead,
    # re-routed by the routers once its pool is gone.
    unblocked = bounded(_ideal(by_name, models, seconds, dict.fromkeys(by_name, 0), ranks, budget))
    if _better(unblocked, ideal, models, seconds, ranks):
        ideal, kept = unblocked, dict.fromkeys(by_name, 0)
    current = {name: pool.replicas for name, pool in by_name.items()}
    for members in models.values():  # an idle model returns its replicas whatever the rest does
        if not wanted_replicas(members, seconds):
            for member in members:
                current[member.spec.name] = ideal[member.spec.name]
    current = bounded(current)
    stable = ranks(current) <= budget and all(current[n] >= kept[n] for n in by_name)
    if stable and not _better(ideal, current, models, seconds, ranks):
        return current
    return ideal


def _capacity_shortfall(counts: Mapping[str, int], models, seconds) -> float:
    """How far a configuration's throughput falls short of each model's request rate at
    TARGET_UTILIZATION (0: every model is served with headroom)."""
    shortfall = 0.0
    for members in models.values():
        rate = sum(pool.throughput for pool in members)
        capacity = sum(counts[m.spec.name] / seconds[m.spec.name] for m in members)
        shortfall += max(0.0, rate - capacity * TARGET_UTILIZATION)
    return shortfall


def _better(candidate: Mapping[str, int], current: Mapping[str, int], models, seconds, ranks) -> bool:
    """Whether ``candidate`` is worth a change from ``current``: it serves the request rate where the
    current one cannot; or, both able (or both not), it completes the demand's requests HYSTERESIS faster,
    or about as fast (within 5%) on a quarter fewer ranks (idle ranks go back, and a surge can start
    replicas on them without draining any)."""
    short_candidate = _capacity_shortfall(candidate, models, seconds)
    short_current = _capacity_shortfall(current, models, seconds)
    if short_current > EPSILON and short_candidate < (1 - HYSTERESIS) * short_current:
        return True
    if short_candidate > short_current + EPSILON:
        return False
    faster = mean_completion(candidate, models, seconds)
    now = mean_completion(current, models, seconds)
    if faster < (1 - HYSTERESIS) * now:
        return True
    return ranks(candidate) <= 0.75 * ranks(current) and faster <= 1.05 * now


def _kept(by_name: Mapping[str, PoolDemand], ranks, budget: float) -> dict[str, int]:
    """Replicas of pools with a queue of their own, up to as many as their requests (fewer, largest first,
    if the budget shrank below them)."""
    # A cold pool with requests waiting gets a replica from Serve anyway (its cold-start path overrides
    # any policy): plan with it rather than against it.
    kept = {
        name: max(1, min(pool.replicas, math.ceil(pool.outstanding - EPSILON)))
        if pool.queued >= QUEUE_KEEPS_POOL
        else 0
        for name, pool in by_name.items()
    }
    while ranks(kept) > budget:
        busy = [name for name in kept if kept[name] > by_name[name].min_replicas and kept[name] > 0]
        if not busy:
            break
        kept[max(busy, key=lambda name: by_name[name].spec.ranks)] -= 1
    return kept


def _trimmed(assign: dict[str, int], planned: Mapping[str, list[str]], models, seconds) -> dict[str, int]:
    """Drop planned replicas that upgrades made unnecessary (smallest first): a model needs a replica per
    outstanding request and capacity for its request rate at TARGET_UTILIZATION, no more. Ranks left free
    cost nothing on an autoscaling cloud and let the next surge start replicas without draining any."""
    for model, names in planned.items():
        members = models[model]
        outstanding = round(sum(pool.outstanding for pool in members))
        rate = sum(pool.throughput for pool in members)
        for name in sorted(names, key=lambda n: seconds[n], reverse=True):
            trial = {**assign, name: assign[name] - 1}
            replicas = sum(trial[m.spec.name] for m in members)
            capacity = sum(trial[m.spec.name] / seconds[m.spec.name] for m in members)
            if replicas >= max(1, outstanding) and capacity * TARGET_UTILIZATION >= rate:
                assign = trial
    return assign


def _ideal(by_name, models, seconds, kept, ranks, budget: float) -> dict[str, int]:
    """The configuration the demand calls for, from the kept replicas: one replica per wanted request in
    each model's most efficient pool with room (while the budget lasts), then upgrades of those replicas to
    larger pools, best latency gain per extra rank first."""
    assign = dict(kept)
    need = {
        model: max(0, wanted_replicas(members, seconds) - sum(kept[m.spec.name] for m in members))
        for model, members in models.items()
    }
    planned: dict[str, list[str]] = defaultdict(list)  # model -> pools of its planned (movable) replicas
    while any(need.values()):
        model = max(need, key=lambda m: need[m])
        options = sorted(
            (pool for pool in models[model] if assign[pool.spec.name] < pool.max_replicas),
            key=lambda pool: (seconds[pool.spec.name] * pool.spec.ranks, pool.spec.ranks),
        )
        placed = False
        for pool in options:
            trial = {**assign, pool.spec.name: assign[pool.spec.name] + 1}
            if ranks(trial) <= budget:
                assign, placed = trial, True
                planned[model].append(pool.spec.name)
                break
        need[model] = need[model] - 1 if placed else 0
    while True:
        best = None
        for model, names in planned.items():
            for index, source in enumerate(names):
                for target in models[model]:
                    name = target.spec.name
                    if target.spec.ranks <= by_name[source].spec.ranks or assign[name] >= target.max_replicas:
                        continue
                    trial = {**assign, source: assign[source] - 1, name: assign[name] + 1}
                    extra = ranks(trial) - ranks(assign)
                    gain = seconds[source] - seconds[name]
                    if ranks(trial) > budget or gain <= 0:
                        continue
                    score = math.inf if extra <= 0 else gain / extra
                    if best is None or score > best[0]:
                        best = (score, model, index, name, trial)
        if best is None:
            return _trimmed(assign, planned, models, seconds)
        _, model, index, name, assign = best
        planned[model][index] = name
