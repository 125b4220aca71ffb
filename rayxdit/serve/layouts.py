"""The ``cost_aware`` sizing policy: the layout of replicas that serves the expected demand best, changed
only when the change pays for what it costs.

A *layout* is a replica count per pool. For each model it is judged on the demand expected from now on:

- **Demand**: the model's arrival rate, from what its pools finish per second plus the growth of their
  queues, smoothed fast on the way up (an overload must be met within a minute) and slowly on the way down
  (a lull of a few minutes is no reason to give up the replicas a busy hour needs).
- **Capacity and latency**: each pool's replicas serve a typical request in the pool's measured time; a
  layout's capacity is the sum of its replicas' rates, and its expected response time is an M/M/c
  estimate: Erlang C's queueing delay over all its replicas, plus the mean service time finish-first
  routing gives (:func:`mean_service`: the fastest replicas take the arrivals while one is free, slower
  ones what overflows them; a light load is served by the fastest, a heavy one by all in proportion to
  their rates). A layout over ``MAX_UTILIZATION`` is not a candidate (it would queue into collapse),
  unless it has so many replicas that an arrival rarely waits longer than a typical request takes
  (:func:`carries`, ``WAIT_TAIL``): replicas that share one line keep its waits short at a utilization
  where a few would queue for long.
- **The best layout** is the one with the lowest expected response time, fewer GPUs on a tie; with no
  layout that carries the demand (overload), the one of the most capacity: admission then refuses what
  would miss its deadline (``routing.retry_after``), so the admitted requests stay good.
- **Changing costs.** A change starts replicas that serve nothing for their start-up (measured per pool:
  ``PoolDemand.startup_s``), and where the budget has no room for them until other replicas go, the
  demand meanwhile runs on what is left. The change to the best layout happens when the latency it saves
  over ``HORIZON_STARTUPS`` start-ups exceeds the latency its transition adds; where it does not, a step
  on the way may (on a full fleet, a quarter of the 2-GPU replicas becoming 8-GPU ones while the rest
  carry the load, where swapping every replica at once would leave the demand waiting out a start-up):
  the step of the best net gain is taken (where the best layout saves ``MIN_GAIN``, a step toward it
  needs only save something itself: each of a full fleet's steps is small). A change that would leave the
  demand without the capacity to carry it while its replicas start is not made by choice
  (``GAP_REQUESTS``): the requests of that gap
  would miss their deadlines; only a layout that cannot carry the demand itself is left that way, and only
  as far as the change loses fewer requests than the overload would over the same horizon
  (:func:`least_lost`: a full fleet a few percent over its capacity swaps a replica, not all of them).
  After a change, the layout holds for ``DWELL_STARTUPS`` start-ups (hysteresis: a slow alternation of
  load causes one change per phase, or two where the first is partial, not a change at every tick), except
  that a further step on the way to the layout the last step was heading for waits only for that step's
  replicas (one start-up); and
  while the last count runs ``MIN_GAIN`` and ``RISE_SIGMAS`` of its noise above the smoothed demand (a rise,
  :func:`outruns`), no change is made for latency: it would be judged on a load already gone by; except
  replicas added in free ranks beside those in place, removing none (:func:`only_adds`): they take nothing
  away, and a closed-loop population's count rises with each one added.
- **The busiest demand of the last hour** (``PEAK_WINDOW_S``) bounds the layouts: each must carry it (the
  most capacity where none does), so that a load that fell and comes back finds its capacity in place, not
  a start-up away; and a layout that cannot carry the demand is replaced by one that carries
  ``OVERLOAD_MARGIN`` times it, so that a rise is met with one change, not one per minute of it: one
  started in free GPUs beside the replicas in place where such a one carries it (they serve meanwhile).
  Until the policy has seen a whole window of a model, the busy hour may be in the part not seen: the
  capacity in place is kept within ``MIN_GAIN`` (a light first half hour swapped for fewer, faster
  replicas would pay the start-ups back, through a gap on a full fleet, when the load rose).
- **A sustained rise** (``TREND_WINDOW_S``, 15 minutes): where the counts of the last window rise steadily
  (:func:`sustained_rise`: a day's ramp, not a step of load nor noise), every layout must carry the demand
  the rise brings within the horizon, and the layout in place is changed, as for an overload, once the
  demand it brings within ``TREND_SOON_STARTUPS`` start-ups is beyond its capacity: on a full fleet of
  large replicas a ramp met at the count's overload is swapped a replica at a time, each swap a start-up
  without the capacity it takes away. Before that, a change the rise will need is made while the
  replicas that stay through its start-up still carry the load (:func:`ahead_of_rise`: when made a
  start-up later it would lose more requests than the Poisson noise of a start-up's arrivals).

- **Before it knows enough** (:func:`informed`: no pool of the model has a measured or configured service
  time, or its arrivals have not been counted over a whole ``sizing.ARRIVALS_WINDOW_S``), the model is
  sized by its queue (:func:`by_queue`, a replica per request held), and its demand enters no peak: a
  layout chosen on a guess would be held for the hour.

Multiple models share the budget in proportion to the GPUs their demand needs, each at least one replica
of its smallest pool while it has traffic. Everything here is a pure function of plain data except
:class:`CostAwarePolicy`, which remembers the smoothed demand and the time of the last change (the fleet
simulator and Serve's hook run the same object).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from rayxdit.serve.sizing import ARRIVALS_WINDOW_S, EPSILON, PoolDemand, typical_seconds

MAX_UTILIZATION = 0.85
"""A layout busier than this at the expected demand is not a candidate (queues grow without bound near 1),
unless its replicas are many enough that its waits stay short (``WAIT_TAIL``)."""
WAIT_TAIL = 0.05
"""A layout over MAX_UTILIZATION is still a candidate where an arrival waits longer than a typical request's
service with at most this probability (Erlang C's tail): many replicas share one line and keep its waits
short at a utilization where a few would queue for long (sixteen 4-GPU replicas at 86% busy: 4.9%; four
2-GPU replicas at 85%: 38%). Found in the ``seeds`` scenario, where 2- and 4-GPU replicas are about as
efficient per GPU: on 64 GPUs at 80% load the fleet kept its 2-GPU replicas (p99 12.3 s) beside an
all-4-GPU layout that carries the load at 85-87% busy (6.9 s), as those were over MAX_UTILIZATION."""
HORIZON_STARTUPS = 10.0
"""A change must pay for itself within this many start-ups of its slowest new replica."""
DWELL_STARTUPS = 3.0
"""After a change, hold the layout this many start-ups (unless it cannot carry the demand)."""
RISE_S, FALL_S = 20.0, 300.0
"""Time constants of the demand estimate going up and going down (``CostAwarePolicy.fall_s``)."""
IDLE_S = 60.0
"""A model with no arrival and nothing outstanding for this long has no demand: its replicas go back."""
MIN_GAIN = 0.1
"""A change must also save at least this fraction of the expected response time."""
OVERLOAD_MARGIN = 1.25
"""A layout that cannot carry its demand is replaced by one that carries this much more than the demand
seen (while a load rises, what was counted lags what is coming)."""
PEAK_WINDOW_S = 3600.0
"""A layout must carry the busiest demand of this long a window (``CostAwarePolicy.peak_window_s``)."""
GAP_REQUESTS = 1.0
"""A change that leaves its model less capacity than its demand while the new replicas start is not made
(unless the layout in place cannot carry the demand either) when this many requests or more are expected
to arrive in that gap: they would wait a start-up, past any deadline of a request that takes seconds."""
TREND_WINDOW_S = 900.0
"""A sustained rise is read over this long a window of counts (``CostAwarePolicy.trend_window_s``)."""
TREND_PARTS = 6
"""A sustained rise is read from the mean count of each of this many equal parts of the trend window."""
TREND_SIGMAS = 2.0
"""The rise from the window's first part to its last must exceed this many standard deviations of the
difference of two such means (Poisson counts) to be read as a trend and not noise."""
TREND_SPREAD = 0.45
"""No step between neighbouring parts may hold this share of the rise or more: a step of load (the
alternating load's) puts at least half its rise between two parts, a ramp (a day's rise) spreads it."""
RISE_SIGMAS = 1.0
"""The last count reads as a rise (no change for latency meanwhile) only where it runs ``MIN_GAIN`` and this
many standard deviations of a ``sizing.ARRIVALS_WINDOW_S`` count's Poisson noise above the smoothed demand
(:func:`outruns`)."""
TREND_SOON_STARTUPS = 3.0
"""With a sustained rise, the layout in place is changed as if overloaded once the demand the trend brings
within this many start-ups is beyond its capacity: the new replicas are up before the load is."""


def erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits in an M/M/c queue with ``servers`` and ``offered`` load (Erlangs)."""
    if offered <= 0:
        return 0.0
    if offered >= servers:
        return 1.0
    term, total = 1.0, 1.0
    for k in range(1, servers):
        term *= offered / k
        total += term
    term *= offered / servers
    last = term * servers / (servers - offered)
    return last / (total + last)


def erlang_b(servers: int, offered: float) -> float:
    """Probability that an arrival finds all ``servers`` busy in a loss system with ``offered`` Erlangs."""
    blocked = 1.0
    for k in range(1, servers + 1):
        blocked = offered * blocked / (k + offered * blocked)
    return blocked


def mean_service(counts: Mapping[str, int], seconds: Mapping[str, float], arrivals: float) -> float:
    """Mean service seconds of a typical request at ``arrivals`` per second under finish-first routing: the
    fastest replicas take the arrivals while one of them is free, the next-fastest what overflows them, and
    so on (Erlang's loss formula per pool, fastest first); what overflows them all waits, and goes to the
    replica that frees first (capacity-weighted). A light load is served by the fastest replicas, a heavy
    one by all in proportion to their rates; between the two, a slow replica beside a fast one takes far
    more than a straight line between those limits says (two 2-GPU replicas beside a 4-GPU one at 40% load
    serve 40% of the requests, not 15%)."""
    classes = sorted((seconds[name], count) for name, count in counts.items() if count > 0)
    rate = capacity(counts, seconds)
    if arrivals <= EPSILON:
        return classes[0][0]
    overflow, busy = arrivals, 0.0
    for service, servers in classes:
        blocked = erlang_b(servers, overflow * service)
        busy += overflow * (1 - blocked) * service
        overflow *= blocked
    busy += overflow * sum(count for _, count in classes) / rate
    return busy / arrivals


def capacity(counts: Mapping[str, int], seconds: Mapping[str, float]) -> float:
    """Typical requests per second the replicas of ``counts`` serve together."""
    return sum(count / seconds[name] for name, count in counts.items() if count > 0)


def response_time(
    counts: Mapping[str, int], seconds: Mapping[str, float], arrivals: float, candidate: bool = True
) -> float:
    """Expected seconds from arrival to answer of a typical request with ``arrivals`` per second on the
    replicas of ``counts``: infinite for a ``candidate`` that does not :func:`carry <carries>` them (the
    layout in place, ``candidate=False``, is judged up to utilization 1, where its queue grows)."""
    servers = sum(count for count in counts.values() if count > 0)
    if servers == 0:
        return math.inf if arrivals > EPSILON else 0.0
    rate = capacity(counts, seconds)
    if arrivals >= rate or (candidate and not carries(counts, seconds, arrivals)):
        return math.inf
    waiting = erlang_c(servers, arrivals * servers / rate) / max(rate - arrivals, EPSILON)
    return waiting + mean_service(counts, seconds, arrivals)


def carries(counts: Mapping[str, int], seconds: Mapping[str, float], arrivals: float) -> bool:
    """Whether the replicas of ``counts`` carry ``arrivals`` per second as a candidate layout must: below
    MAX_UTILIZATION, or above it with replicas so many that an arrival waits longer than a typical request's
    service with at most WAIT_TAIL probability (M/M/c: Erlang C times ``exp(-(capacity - arrivals) * s)``)."""
    servers = sum(count for count in counts.values() if count > 0)
    return _carries(servers, capacity(counts, seconds), arrivals)


def _carries(servers: int, rate: float, arrivals: float) -> bool:
    """:func:`carries` for a layout of ``servers`` replicas serving ``rate`` typical requests per second."""
    if servers == 0:
        return arrivals <= EPSILON
    if arrivals < MAX_UTILIZATION * rate:
        return True
    if arrivals >= rate:
        return False
    typical = servers / rate  # a replica's mean service time
    waits_long = erlang_c(servers, arrivals * typical) * math.exp(-(rate - arrivals) * typical)
    return waits_long <= WAIT_TAIL


def layouts(members: Sequence[PoolDemand], ranks: float, fill: bool = True) -> list[dict[str, int]]:
    """Every layout of one model's pools within ``ranks`` and each pool's bounds: any count of the larger
    pools, the smallest pool filling what is left (up to its maximum); without ``fill``, also every
    smaller count of the smallest pool (down to its minimum): layouts that leave part of ``ranks`` free."""
    bounds = tuple(
        (pool.spec.name, pool.spec.ranks, pool.min_replicas, pool.max_replicas) for pool in members
    )
    # Fresh dicts: callers may keep and change what they pick; the enumeration itself is cached (a 64-GPU
    # fleet's has 153 layouts filled, enumerated on every autoscaling tick).
    return [dict(zip(names, counts, strict=True)) for names, counts in _layouts(bounds, ranks, fill)]


@functools.lru_cache(maxsize=256)
def _layouts(
    bounds: tuple[tuple[str, int, int, int], ...], ranks: float, fill: bool = True
) -> tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]:
    """:func:`layouts` over (name, ranks, min, max) per pool, as (pool names, counts) pairs."""
    ordered = sorted(bounds, key=lambda pool: pool[1])
    (smallest, smallest_ranks, smallest_min, smallest_max), larger = ordered[0], ordered[1:]
    names = (*(name for name, _, _, _ in larger), smallest)
    choices = [range(low, high + 1) for _, _, low, high in larger]
    found = []
    for combination in itertools.product(*choices):
        used = sum(count * size for count, (_, size, _, _) in zip(combination, larger, strict=True))
        if used > ranks and any(combination):
            continue
        room = max(0, int((ranks - used) // smallest_ranks))
        most = max(smallest_min, min(smallest_max, room))
        for count in range(most if fill else smallest_min, most + 1):
            found.append((names, (*combination, count)))
    return tuple(found) or ((tuple(name for name, _, _, _ in bounds), tuple(low for _, _, low, _ in bounds)),)


def best_layout(
    members: Sequence[PoolDemand],
    seconds: Mapping[str, float],
    arrivals: float,
    ranks: float,
    peak: float = 0.0,
    reachable: Callable[[Mapping[str, int]], bool] | None = None,
    candidates: Sequence[Mapping[str, int]] | None = None,
    give_back: float = 0.0,
) -> dict[str, int]:
    """The layout of one model with the lowest expected response time at ``arrivals`` per second within
    ``ranks`` (fewer ranks on a tie; with ``give_back``, the fewest ranks within that fraction of the
    lowest) among those that also :func:`carry <carries>` ``peak`` arrivals per
    second (the busiest demand of a recent window: a load that came back would find the capacity in place,
    not a start-up away); where none does, the one of the most capacity (in an overload, admission then
    refuses what would miss its deadline). With ``reachable``, only the layouts it accepts
    where any of those qualify. ``candidates``: :func:`layouts` of ``members`` within ``ranks``, where the
    caller has them already. No demand: minimums."""
    if arrivals <= EPSILON:
        return {pool.spec.name: pool.min_replicas for pool in members}
    by_name = {pool.spec.name: pool for pool in members}

    def ranks_of(counts: Mapping[str, int]) -> int:
        return sum(count * by_name[name].spec.ranks for name, count in counts.items())

    if candidates is None:
        candidates = layouts(members, ranks)
    feasible = carrying(candidates, seconds, max(arrivals, peak))
    if reachable is not None:
        feasible = [c for c in feasible if reachable(c)] or feasible
    # In an overload none is faster (every response time is infinite): the fewest ranks of the most capacity.
    timed = [(round(response_time(c, seconds, arrivals), 3), ranks_of(c), c) for c in feasible]
    fastest = min(time for time, _, _ in timed)
    if give_back > 0 and fastest < math.inf:
        near = [(ranks, time, c) for time, ranks, c in timed if time <= fastest * (1 + give_back)]
        return min(near, key=lambda item: item[:2])[2]
    return min(timed, key=lambda item: item[:2])[2]


def carrying(candidates: Sequence[Mapping[str, int]], seconds: Mapping[str, float], peak: float) -> list:
    """The layouts of ``candidates`` that carry ``peak`` arrivals per second (:func:`carries`); where none
    does, those of the most capacity (within a hair)."""
    if not candidates:
        return []
    # Each candidate's capacity once (a 64-GPU fleet judges 153 layouts every tick).
    sized = [(c, sum(count for count in c.values() if count > 0), capacity(c, seconds)) for c in candidates]
    found = [c for c, servers, rate in sized if _carries(servers, rate, peak)]
    if found:
        return found
    most = max(rate for _, _, rate in sized)
    return [c for c, _, rate in sized if rate > most * (1 - 1e-9)]


def informed(members: Sequence[PoolDemand]) -> bool:
    """Whether the policy knows enough of a model to judge its layouts: a service time (measured by a
    replica, or configured as the pool's prior) and an arrival rate counted over a whole window. Before
    either, its estimates are a guess (unmeasured, a pool serves one cost unit per second per rank, ten
    times slower than Flux on an H200) or noise (three requests in a state's first second), and a layout
    chosen on them is held for an hour: the busiest demand of the last hour bounds every later layout,
    and on a full node a layout is not swapped through a gap without capacity."""
    timed = any(pool.seconds_per_cost or pool.spec.seconds_per_cost for pool in members)
    return timed and counted_whole(members)


def counted_whole(members: Sequence[PoolDemand]) -> bool:
    """Whether the model's arrival rate is a whole ``sizing.ARRIVALS_WINDOW_S``'s count."""
    return min(pool.arrivals_counted_s for pool in members) >= ARRIVALS_WINDOW_S


def sustained_rise(counts: Sequence[tuple[float, float]], window_s: float) -> float:
    """The slope (arrivals per second, per second) of a rise sustained over the last ``window_s`` of
    ``counts`` ((time, counted arrivals per second) at each tick, oldest first), 0 where there is none: the
    mean count of each of ``TREND_PARTS`` parts of the window, the rise from the first part to the last
    beyond ``TREND_SIGMAS`` of its Poisson noise, and spread over the parts (no step between neighbouring
    parts holds ``TREND_SPREAD`` of it). A step of load is not a trend (a fleet that read one as a rise going
    on for minutes swapped its replicas through start-ups for a load that never came), nor is a count's
    noise; a day's rise is. Less than a whole window of counts: 0."""
    if not counts or counts[-1][0] - counts[0][0] < 0.95 * window_s:
        return 0.0
    start, end = counts[-1][0] - window_s, counts[-1][0]
    part_s = window_s / TREND_PARTS
    sums, sizes = [0.0] * TREND_PARTS, [0] * TREND_PARTS
    for time_s, count in counts:
        if time_s < start:
            continue
        index = min(TREND_PARTS - 1, int((time_s - start) / part_s))
        sums[index] += count
        sizes[index] += 1
    if not all(sizes):
        return 0.0
    means = [total / size for total, size in zip(sums, sizes, strict=True)]
    rise = means[-1] - means[0]
    # Each part's mean is about that part's count over its length: Poisson, variance rate / length.
    noise = math.sqrt(2 * max(means[0], EPSILON) / part_s)
    steps = [later - earlier for earlier, later in itertools.pairwise(means)]
    if rise <= TREND_SIGMAS * noise or max(steps) >= TREND_SPREAD * rise:
        return 0.0
    return rise / (end - start - part_s)


def outruns(counted: float, demand: float) -> bool:
    """Whether a count of ``counted`` arrivals per second over ``sizing.ARRIVALS_WINDOW_S`` says the load is
    rising past its smoothed estimate ``demand``: above it by ``MIN_GAIN`` and by ``RISE_SIGMAS`` standard
    deviations of such a count's Poisson noise. At a light load the noise is most of the count (0.1
    requests/s: two arrivals in 20 s, give or take 1.4), and the 10% alone read a third of the counts as a
    rise: a fleet with free GPUs held one small replica through a whole light phase and into the heavy one
    after it (bench_load's alternating run on 16 cores), waiting for an estimate to catch up with noise."""
    noise = math.sqrt(max(demand, 0.0) / ARRIVALS_WINDOW_S)
    return counted > (1 + MIN_GAIN) * demand + RISE_SIGMAS * noise


def by_queue(members: Sequence[PoolDemand], current: Mapping[str, int], ranks: float) -> dict[str, int]:
    """The layout of a model the policy cannot judge yet (see :func:`informed`): a replica per request it
    holds (Serve's own default, one ongoing request per replica), the missing ones of its smallest pool
    within ``ranks``; never fewer than in place (nothing says fewer would do)."""
    holding = sum(pool.outstanding for pool in members if math.isfinite(pool.outstanding))
    smallest = min(members, key=lambda pool: pool.spec.ranks)
    name = smallest.spec.name
    others = sum(count for pool_name, count in current.items() if pool_name != name)
    used = sum(current.get(pool.spec.name, 0) * pool.spec.ranks for pool in members if pool is not smallest)
    room = int(max(0.0, ranks - used) // smallest.spec.ranks)
    grown = min(smallest.max_replicas, room, math.ceil(holding - EPSILON) - others)
    return {**current, name: max(smallest.min_replicas, current.get(name, 0), grown)}


def transition(
    current: Mapping[str, int], target: Mapping[str, int], members: Sequence[PoolDemand], free_ranks: float
) -> tuple[dict[str, int], float, bool]:
    """What a change from ``current`` to ``target`` keeps serving while it happens: the replicas that stay,
    the start-up of its slowest new replica (0 when it only removes), and whether the free ranks hold the
    new replicas beside the old ones (which then serve until the new ones are up)."""
    by_name = {pool.spec.name: pool for pool in members}
    staying = {name: min(count, target.get(name, 0)) for name, count in current.items()}
    added = {name: max(0, count - current.get(name, 0)) for name, count in target.items()}
    if not any(added.values()):
        return staying, 0.0, True
    startup = max(by_name[name].startup_s for name, count in added.items() if count)
    added_ranks = sum(count * by_name[name].spec.ranks for name, count in added.items())
    return staying, startup, added_ranks <= free_ranks


def only_adds(
    current: Mapping[str, int], candidate: Mapping[str, int], members: Sequence[PoolDemand], free_ranks: float
) -> bool:
    """Whether a change from ``current`` to ``candidate`` removes no replica and starts its new ones in free
    ranks (beside those in place, which serve meanwhile)."""
    if any(candidate.get(name, 0) < count for name, count in current.items()):
        return False
    return transition(current, candidate, members, free_ranks)[2]


def transition_cost(
    current: Mapping[str, int],
    target: Mapping[str, int],
    members: Sequence[PoolDemand],
    seconds: Mapping[str, float],
    arrivals: float,
    free_ranks: float,
) -> float:
    """Request-seconds of latency a change from ``current`` to ``target`` adds while its new replicas
    start: replicas that go stop serving at once; those that come serve after their start-up, and where the
    free ranks cannot hold them they wait for the leaving ones. Meanwhile the demand runs on what stays (an
    overload there costs every arrival its whole start-up)."""
    staying, startup, beside = transition(current, target, members, free_ranks)
    if startup == 0.0:
        return 0.0  # only removals: nothing waits
    if beside:
        return 0.0  # the new replicas start beside the old ones, which go once they are up
    during = response_time(staying, seconds, arrivals, candidate=False)
    before = response_time(current, seconds, arrivals, candidate=False)
    if during < math.inf:
        return arrivals * startup * max(0.0, during - max(before, 0.0) if before < math.inf else during)
    # What stays cannot carry the demand: the shortfall piles up for the start-up and waits half of it,
    # which loses them (a client's deadline is seconds, a start-up a minute or more), unless hardly any
    # would arrive in the gap.
    shortfall = max(0.0, arrivals - capacity(staying, seconds))
    if shortfall * startup >= GAP_REQUESTS:
        return math.inf
    return shortfall * startup * startup / 2 + arrivals * startup * min(seconds.values())


def requests_lost(
    current: Mapping[str, int],
    candidate: Mapping[str, int],
    members: Sequence[PoolDemand],
    seconds: Mapping[str, float],
    arrivals: float,
    free_ranks: float,
    horizon_s: float,
    rise: float = 0.0,
    delay_s: float = 0.0,
) -> float:
    """Requests that arrive beyond the capacity serving them over the next ``horizon_s`` if ``candidate``
    replaces ``current`` after ``delay_s`` (``candidate`` = ``current``: staying as is), at ``arrivals`` per
    second rising by ``rise`` per second: until the change, ``current`` serves; while the new replicas
    start, the replicas in place (where the free ranks hold the new ones beside them) or only those that
    stay; after it, ``candidate``'s. A fluid count: under an overload, admission refuses about what arrives
    beyond the capacity, and a start-up without capacity loses what arrives in it (its requests would wait
    past any deadline of a request that takes seconds)."""
    staying, startup, beside = transition(current, candidate, members, free_ranks)
    change_s = min(horizon_s, delay_s)
    up_s = min(horizon_s, change_s + startup)

    def beyond(layout: Mapping[str, int], start_s: float, end_s: float) -> float:
        # The integral of max(0, arrivals + rise * t - capacity) over [start_s, end_s].
        over = arrivals - capacity(layout, seconds)
        if rise <= 0:
            return max(0.0, over) * (end_s - start_s)
        start_s = max(start_s, -over / rise)  # when the rise passes the capacity
        if start_s >= end_s:
            return 0.0
        return over * (end_s - start_s) + rise / 2 * (end_s**2 - start_s**2)

    return (
        beyond(current, 0.0, change_s)
        + beyond(current if beside else staying, change_s, up_s)
        + beyond(candidate, up_s, horizon_s)
    )


def ahead_of_rise(
    current: Mapping[str, int],
    target: Mapping[str, int],
    candidates: Sequence[Mapping[str, int]],
    members: Sequence[PoolDemand],
    seconds: Mapping[str, float],
    arrivals: float,
    rise: float,
    free_ranks: float,
    horizon_s: float,
) -> dict[str, int]:
    """While the demand rises by ``rise`` per second: ``target`` or the step toward it that loses the fewest
    requests over ``horizon_s`` (:func:`requests_lost`) if made now, where that saves, against the best of
    them made a start-up later and against staying, ``MIN_GAIN`` of the loss and more than the Poisson noise
    of a start-up's arrivals (a fluid count's smaller differences are noise, and a rise read from noise
    then swaps nothing); else ``current`` (waiting costs nothing yet). On a full fleet a change takes
    capacity away for a start-up, and a rising load makes that gap dearer by the minute: one node of two
    2-GPU replicas and a 4-GPU one met a day's rise at its capacity, where the 4-GPU replica's swap left
    half the load unserved for a start-up; made while the replicas that stay still carried the load, it
    lost nothing."""
    now = least_lost(current, target, candidates, members, seconds, arrivals, free_ranks, horizon_s, rise)
    if now == current:
        return now  # a rise, extrapolated, must not swap replicas through a start-up losing more than it
    startup = max(pool.startup_s for pool in members)

    def lost(candidate: Mapping[str, int], delay_s: float = 0.0) -> float:
        return requests_lost(
            current, candidate, members, seconds, arrivals, free_ranks, horizon_s, rise, delay_s
        )

    later = min(lost(current), *(lost(step, startup) for step in on_the_way(current, target, candidates)))
    saved = later - lost(now)
    noise = math.sqrt(max(arrivals, 0.0) * startup)
    return now if saved >= max(GAP_REQUESTS, noise) and saved >= MIN_GAIN * later else dict(current)


def on_the_way(
    current: Mapping[str, int], target: Mapping[str, int], candidates: Sequence[Mapping[str, int]]
) -> list[dict[str, int]]:
    """``target`` and the steps toward it among ``candidates`` (layouts between it and ``current``)."""
    steps = (c for c in candidates if c not in (current, target) and toward(current, target, c))
    return [dict(target), *(dict(step) for step in steps)]


def least_lost(
    current: Mapping[str, int],
    target: Mapping[str, int],
    candidates: Sequence[Mapping[str, int]],
    members: Sequence[PoolDemand],
    seconds: Mapping[str, float],
    arrivals: float,
    free_ranks: float,
    horizon_s: float,
    rise: float = 0.0,
) -> dict[str, int]:
    """Where ``current`` is overloaded (or will be, the demand rising by ``rise`` per second): of staying,
    ``target`` and the steps toward it among ``candidates``, the one that loses the fewest requests over
    ``horizon_s`` (:func:`requests_lost`), where it loses at least ``MIN_GAIN`` fewer than staying; on a
    tie ``target``. A full fleet a few percent over its capacity (a 20 s count of Poisson noise reads so)
    swaps a replica or two, where swapping every replica would leave nothing serving for a start-up; one
    far over it swaps what the gap's loss repays. Replicas are swapped through a gap only for ones that
    serve :func:`more <serves_more>` in their place."""

    def lost(candidate: Mapping[str, int]) -> float:
        return requests_lost(current, candidate, members, seconds, arrivals, free_ranks, horizon_s, rise)

    ways = [
        c
        for c in on_the_way(current, target, candidates)
        if serves_more(current, c, members, seconds, free_ranks)
    ]
    if not ways:
        return dict(current)
    best = min(ways, key=lost)
    # A change must save MIN_GAIN of what staying loses: measured service times waver (a pool's typical
    # request is fitted online), and two layouts within that of each other would be swapped back and forth.
    return best if lost(best) < (1 - MIN_GAIN) * lost(current) else dict(current)


def serves_more(
    current: Mapping[str, int],
    candidate: Mapping[str, int],
    members: Sequence[PoolDemand],
    seconds: Mapping[str, float],
    free_ranks: float,
) -> bool:
    """Whether a change from ``current`` to ``candidate`` either starts its replicas beside those in place
    or gives the replicas it removes successors that serve at least ``MIN_GAIN`` more than they did. Near
    its capacity an overload's loss turns on a few percent of capacity, and a few percent is what the
    fitted service times of equally efficient pools differ by (the ``seeds`` scenario's 2- and 4-GPU
    replicas: two 4-GPU replicas swapped for four 2-GPU ones through a start-up, 92 s into a burst, on a
    2.5% lead that was the fits' noise, and the burst lost the gap's requests)."""
    staying, _, beside = transition(current, candidate, members, free_ranks)
    if beside:
        return True
    removed = {name: count - staying.get(name, 0) for name, count in current.items()}
    added = {name: count - staying.get(name, 0) for name, count in candidate.items()}
    return capacity(added, seconds) >= (1 + MIN_GAIN) * capacity(removed, seconds)


def toward(current: Mapping[str, int], target: Mapping[str, int], candidate: Mapping[str, int]) -> bool:
    """Whether ``candidate`` lies between ``current`` and ``target`` in every pool: a step on the way."""
    return all(
        min(current.get(name, 0), target.get(name, 0))
        <= candidate.get(name, 0)
        <= max(current.get(name, 0), target.get(name, 0))
        for name in {*current, *target, *candidate}
    )


def best_move(
    current: Mapping[str, int],
    target: Mapping[str, int],
    candidates: Sequence[Mapping[str, int]],
    members: Sequence[PoolDemand],
    seconds: Mapping[str, float],
    arrivals: float,
    free_ranks: float,
    horizon_startups: float = HORIZON_STARTUPS,
) -> tuple[dict[str, int], float]:
    """The change to make from ``current``, and its net gain in request-seconds (the latency it saves for
    ``arrivals`` over ``horizon_startups`` start-ups, less :func:`transition_cost`): ``target`` itself if
    that pays; else the step on the way to it (a layout between the two in every pool) that gains the
    most, as when a full fleet turns a quarter of its small replicas into large ones while the rest carry
    the load. Only changes that save at least ``MIN_GAIN`` of the expected response time count, and a step
    toward a ``target`` that does so needs only save something itself (on 64 GPUs, each step of two 2-GPU
    replicas turned into a 4-GPU one saves a few percent, and the whole change, through a gap, does not
    pay: the fleet stayed where it was for hours); none pays: ``current`` with a net of 0."""
    before = response_time(current, seconds, arrivals, candidate=False)
    startup = max(pool.startup_s for pool in members)
    worth_going = response_time(target, seconds, arrivals) < (1 - MIN_GAIN) * before

    def net(candidate: Mapping[str, int], step: bool = False) -> float:
        after = response_time(candidate, seconds, arrivals)
        if not after < (before if step and worth_going else (1 - MIN_GAIN) * before):
            return -math.inf
        gain = arrivals * (before - after) * horizon_startups * startup
        return gain - transition_cost(current, candidate, members, seconds, arrivals, free_ranks)

    direct = net(target)
    if direct > 0:
        return dict(target), direct
    best, best_net = dict(current), 0.0
    # Steps toward the target first: where one of those pays, the best of them; else any layout that
    # pays (the target may lie beyond a gap no step toward it avoids, as an 8-GPU replica does on a node
    # of 2-GPU ones: a 4-GPU one beside them may still pay).
    others = [c for c in candidates if c != current and c != target]
    steps = [c for c in others if toward(current, target, c)]
    for group, step in ((steps, True), ([c for c in others if c not in steps], False)):
        for candidate in group:
            if (gained := net(candidate, step)) > best_net:
                best, best_net = dict(candidate), gained
        if best_net > 0:
            break
    return best, best_net


def shares(models: Mapping[str, Sequence[PoolDemand]], seconds, arrivals: Mapping[str, float], budget: float):
    """Ranks of the budget each model may lay out: in proportion to the ranks its demand keeps busy on its
    most efficient pool (at MAX_UTILIZATION), at least one replica of its smallest pool while it has any
    demand; all of it when only one model has demand."""
    needs = {}
    for model, members in models.items():
        if arrivals[model] <= EPSILON:
            needs[model] = 0.0
            continue
        efficient = min(members, key=lambda pool: seconds[pool.spec.name] * pool.spec.ranks)
        busy = arrivals[model] * seconds[efficient.spec.name] * efficient.spec.ranks / MAX_UTILIZATION
        needs[model] = max(busy, min(pool.spec.ranks for pool in members))
    minimums = {
        model: sum(pool.min_replicas * pool.spec.ranks for pool in members)
        for model, members in models.items()
    }
    spare = budget - sum(minimums[model] for model in models if needs[model] == 0)
    total = sum(needs.values())
    return {
        model: (spare * needs[model] / total if needs[model] else minimums[model])
        if total
        else minimums[model]
        for model in models
    }


@dataclass
class CostAwarePolicy:
    """The ``cost_aware`` entry of ``serve/policies.py``: one object per application (or simulated fleet),
    called every autoscaling tick with every pool's demand, the budget and the time. Its knobs come from
    the application's ``elastic.policy_options``."""

    idle_s: float = IDLE_S
    """A model with no arrival and nothing outstanding for this long returns its replicas."""
    dwell_startups: float = DWELL_STARTUPS
    """After a change, hold the layout this many start-ups (unless it cannot carry the demand)."""
    horizon_startups: float = HORIZON_STARTUPS
    """A change must pay for itself within this many start-ups."""
    peak_window_s: float = PEAK_WINDOW_S
    """A layout must carry the busiest (smoothed) demand of this window (:func:`carries`): a load that
    fell for a while and comes back finds its capacity in place instead of a start-up away, on a full
    fleet with nothing serving meanwhile. 0: size for the demand now alone (the light hours of a varying
    load get larger, faster replicas, and each rise pays a start-up)."""

    give_back: float = 0.0
    """Replicas that buy less than this fraction of the expected response time go back: the layout is the
    one of the fewest GPUs within it of the fastest, and replicas beyond it are removed (nothing starts, the
    peak window's demand stays carried). 0, the default: every layout fills the model's share of the budget,
    the smallest pool taking what the larger ones leave, whatever the load. 0.02 holds fewer GPUs in light
    hours; the replicas a rise needs are then started in the free GPUs, where they take nothing away while
    they start but are not there when the rise comes."""
    fall_s: float = FALL_S
    """Time constant of the demand estimate going down: a lull shorter than this is no reason to give up the
    replicas a busy spell needed (it rises with ``RISE_S``). With ``peak_window_s`` it sets how soon after a
    busy spell a fleet turns to fewer, faster replicas."""
    trend_window_s: float = TREND_WINDOW_S
    """Read a sustained rise of the counts over this long a window (:func:`sustained_rise`) and size for it
    ahead: every layout must carry the demand the rise brings within ``horizon_startups`` start-ups, and the
    layout in place is changed as if overloaded once the demand it brings within ``TREND_SOON_STARTUPS``
    start-ups is beyond its capacity. 0: no trend read (the policy before 2026-12-05)."""

    demand: dict[str, float] = field(default_factory=dict)
    """Smoothed arrivals per second, by model."""

    observed: dict[str, float] = field(default_factory=dict)
    """The last unsmoothed arrival rate, by model."""
    outstanding: dict[str, float] = field(default_factory=dict)
    idle: set[str] = field(default_factory=set)
    """Models with no arrival and nothing outstanding for ``idle_s``: their demand is 0 for that reason."""
    last_tick: float | None = None
    changed_at: dict[str, float] = field(default_factory=dict)
    """When each model's layout last changed."""
    busy_at: dict[str, float] = field(default_factory=dict)
    """When each model last had an arrival or something outstanding."""
    peaks: dict[str, deque[tuple[float, float]]] = field(default_factory=lambda: defaultdict(deque))
    """Per model, the demand's sliding maximum over ``peak_window_s``: (time, demand), decreasing."""
    counts: dict[str, deque[tuple[float, float]]] = field(default_factory=lambda: defaultdict(deque))
    """Per model, (time, counted arrivals per second) of the last ``trend_window_s``."""
    started_at: dict[str, float] = field(default_factory=dict)
    """When each model was first judged (its peak window is whole ``peak_window_s`` later)."""
    heading: dict[str, dict[str, int] | None] = field(default_factory=dict)
    """Per model, the best layout the last change stepped toward (None: the last change reached its
    target, or was not a step)."""
    planned: dict[str, int] = field(default_factory=dict)
    """This policy's last decision per pool: what it holds to (Serve applies a decision only after the pool's
    upscale/downscale delay, so the targets it reports lag behind, and returning those would undo it)."""

    def __post_init__(self) -> None:
        # Checked once at deploy, not at the first tick in Serve's controller (a zero fall_s divides by 0).
        knobs = (
            "idle_s",
            "dwell_startups",
            "horizon_startups",
            "peak_window_s",
            "give_back",
            "fall_s",
            "trend_window_s",
        )
        for knob in knobs:
            value = getattr(self, knob)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{knob} must be a number of 0 or more, not {value!r}")
        if self.fall_s == 0:
            raise ValueError("fall_s must be above 0 (seconds; 1 follows the count almost at once)")

    def arrivals(self, model: str, members: Sequence[PoolDemand], now: float) -> float:
        """The model's smoothed arrival rate: as the application's state counts it (refused requests too),
        else what its pools finish plus the growth of what they hold."""
        holding = sum(pool.outstanding for pool in members if math.isfinite(pool.outstanding))
        elapsed = None if self.last_tick is None else max(EPSILON, now - self.last_tick)
        # A report without a sample (NaN) says nothing: it must not turn every estimate into NaN.
        counted = [
            pool.arrivals for pool in members if pool.arrivals is not None and math.isfinite(pool.arrivals)
        ]
        if counted:
            observed = max(counted)
        else:
            finished = sum(pool.throughput for pool in members if math.isfinite(pool.throughput))
            growth = 0.0 if elapsed is None else (holding - self.outstanding.get(model, holding)) / elapsed
            observed = max(0.0, finished + growth)
            if holding > EPSILON and observed <= EPSILON:
                observed = holding / max(1.0, elapsed or 1.0)  # queued before anything finished
        self.outstanding[model] = holding
        self.observed[model] = observed
        quiet = [pool.quiet_s for pool in members if pool.quiet_s is not None and math.isfinite(pool.quiet_s)]
        if quiet and holding <= EPSILON:  # the state knows when the last request came
            self.busy_at[model] = max(self.busy_at.get(model, -math.inf), now - min(quiet))
        elif observed > EPSILON or holding > EPSILON:
            self.busy_at[model] = now
        else:
            self.busy_at.setdefault(model, now)  # nothing yet: idle once idle_s pass from the first tick
        if holding <= EPSILON and now - self.busy_at.get(model, now) >= self.idle_s:
            self.demand[model] = 0.0  # idle, not a lull: nothing to keep replicas for
            self.idle.add(model)
            return 0.0
        self.idle.discard(model)
        previous = self.demand.get(model)
        if previous is None or elapsed is None or not counted_whole(members):
            # A count over part of a window is not smoothed: the first whole one starts the estimate.
            self.demand[model] = observed
        else:
            constant = RISE_S if observed > previous else self.fall_s
            weight = 1 - math.exp(-elapsed / constant)
            self.demand[model] = previous + weight * (observed - previous)
        return self.demand[model]

    def rise(self, model: str, now: float) -> float:
        """The model's sustained rise (:func:`sustained_rise`) over ``trend_window_s``, its last count kept."""
        if self.trend_window_s <= 0:
            return 0.0
        counts = self.counts[model]
        counts.append((now, self.observed.get(model, 0.0)))
        while counts and counts[0][0] < now - self.trend_window_s:
            counts.popleft()
        return sustained_rise(counts, self.trend_window_s)

    def peak(self, model: str, demand: float, now: float) -> float:
        """The busiest ``demand`` of ``model`` within the last ``peak_window_s`` (a sliding maximum; 0 when
        the window is 0)."""
        if self.peak_window_s <= 0:
            return 0.0
        window = self.peaks[model]
        while window and window[-1][1] <= demand:
            window.pop()
        window.append((now, demand))
        while window[0][0] < now - self.peak_window_s:
            window.popleft()
        return window[0][1]

    def __call__(self, pools: Sequence[PoolDemand], budget: float, now: float) -> dict[str, int]:
        # No accelerator bounds CPU pools (their budget is infinite): the pools' own maximums do.
        budget = min(budget, sum(pool.max_replicas * pool.spec.ranks for pool in pools))
        seconds = typical_seconds(pools)
        models: dict[str, list[PoolDemand]] = defaultdict(list)
        for pool in pools:
            models[pool.spec.model].append(pool)
        arrivals = {model: self.arrivals(model, members, now) for model, members in models.items()}
        self.last_tick = now
        share = shares(models, seconds, arrivals, budget)
        current_of = {pool.spec.name: self.planned.get(pool.spec.name, pool.replicas) for pool in pools}
        used = sum(current_of[pool.spec.name] * pool.spec.ranks for pool in pools)  # the targets in place
        plan: dict[str, int] = {}
        for model, members in models.items():
            current = {pool.spec.name: current_of[pool.spec.name] for pool in members}
            plan.update(
                self._decide(
                    model, members, current, share[model], seconds, arrivals[model], budget - used, now
                )
            )
        self.planned.update(plan)
        return plan

    def _decide(self, model, members, current, ranks, seconds, arrivals, free_ranks, now) -> dict[str, int]:
        """The layout to hold from now: the best one at once where ``current`` cannot carry the demand (or
        there is none), else the move of the best net gain if one pays for itself, else ``current``."""
        if arrivals > EPSILON and not informed(members):
            return by_queue(members, current, ranks)  # its demand kept out of the peak too: noise
        peak = self.peak(model, arrivals, now)
        startup = max(pool.startup_s for pool in members)
        rise = self.rise(model, now)
        # A day's rise: every layout must carry what it brings within the horizon a change pays in.
        peak = max(peak, arrivals + rise * self.horizon_startups * startup)
        if now - self.started_at.setdefault(model, now) < self.peak_window_s and any(current.values()):
            # A window not seen whole may hold a busier hour than the part seen: the capacity in place
            # is kept within MIN_GAIN until it has been (its return would cost a start-up, on a full
            # fleet one without capacity).
            peak = max(peak, (1 - MIN_GAIN) * MAX_UTILIZATION * capacity(current, seconds))
        candidates = layouts(members, ranks, fill=not self.give_back)
        target = best_layout(
            members, seconds, arrivals, ranks, peak, candidates=candidates, give_back=self.give_back
        )
        if target == current:
            return current
        if arrivals <= EPSILON and not any(current.values()):
            return target
        # The layout in place is left at once only when its queue grows (utilization 1), not when an
        # estimate near MAX_UTILIZATION wavers: that would flip a layout sized close to it back and forth.
        before = response_time(current, seconds, arrivals, candidate=False)
        since_change = now - self.changed_at.get(model, -math.inf)
        # The dwell holds a layout against a change back; a further step on the way to the layout the last
        # step was heading for waits only for that step's replicas to be up (one start-up). On the way, not
        # to the very same layout: the best layout judged at each tick wavers between neighbours (sixteen
        # 4-GPU replicas, or fifteen and two 2-GPU ones) as the estimates do.
        heading = self.heading.get(model)
        dwelling = since_change < self.dwell_startups * startup
        held = dwelling and (heading is None or since_change < startup)
        if rise and before < math.inf and any(current.values()) and free_ranks >= 0 and not held:
            # A rising load on a layout that carries it: made ahead, a change that takes capacity away
            # for a start-up loses nothing it would lose later.
            move = ahead_of_rise(
                current,
                target,
                candidates,
                members,
                seconds,
                arrivals,
                rise,
                free_ranks,
                self.horizon_startups * startup,
            )
            if move != current and (not dwelling or toward(current, heading, move)):
                return self._stepped(model, now, target, move)
        soon = arrivals + rise * TREND_SOON_STARTUPS * startup
        if (
            rise
            and before < math.inf
            and any(current.values())
            and response_time(current, seconds, soon, candidate=False) == math.inf
        ):
            # The rise outruns the layout within a few start-ups: change now, as for an overload of the
            # demand it brings (on a full fleet, swapped a replica at a time, each a start-up without the
            # capacity it takes away: begun when the count reaches the capacity, the last swaps came after).
            arrivals, before = soon, math.inf
        if before == math.inf or free_ranks < 0:
            # Overloaded, no replica, or more than the budget holds (some would never start): change now
            # (an overloaded layout only as far as the change pays in requests, below).
            # A load still rising has outrun its smoothed estimate (and the state's one-minute count lags
            # a step of load too): the new layout must carry OVERLOAD_MARGIN times the higher of the two,
            # or a rise met with a layout sized for its first minute needs a second change, and on a full
            # fleet a second start-up without capacity.
            rising = OVERLOAD_MARGIN * max(arrivals, self.observed.get(model, 0.0))

            def beside(candidate: Mapping[str, int]) -> bool:
                # Started in free GPUs beside the replicas in place, which serve meanwhile: where such a
                # layout carries the load, not one that must first remove them (one 2-GPU replica swapped
                # for an 8-GPU one serves nothing for a start-up, and every arrival of it misses).
                return transition_cost(current, candidate, members, seconds, arrivals, free_ranks) == 0.0

            target = best_layout(
                members, seconds, arrivals, ranks, max(peak, rising), beside, candidates=candidates
            )
            if free_ranks >= 0 and any(current.values()):
                # Where the change must first remove replicas, it is made as far as it loses fewer
                # requests than the overload would: a 20 s count a few percent over the capacity (Poisson
                # noise) is worth a replica or two swapped, not a fleet swapped through a start-up; and
                # layouts of about as much capacity (2- and 4-GPU replicas of equal efficiency) are not
                # swapped at all, nor back and forth as the estimate wavers between them.
                horizon_s = self.horizon_startups * max(pool.startup_s for pool in members)
                target = least_lost(
                    current,
                    target,
                    candidates,
                    members,
                    seconds,
                    arrivals,
                    free_ranks,
                    horizon_s,
                )
                if target == current:
                    return current
            self.changed_at[model], self.heading[model] = now, None
            return target
        if arrivals <= EPSILON:
            if model not in self.idle:
                # Nothing counted yet (a first tick, before any arrival) is not idleness: a fleet that
                # returned its replicas then started them again for the first request.
                return current
            # Idle for IDLE_S: return the replicas, nothing waits for them.
            self.changed_at[model], self.heading[model] = now, None
            return target
        if held:
            return current
        if outruns(self.observed.get(model, 0.0), arrivals):
            # A rising load: the smoothed demand lags the last count (RISE_S), and a change for latency
            # judged on it is made for a load already gone by (64 GPUs turned to fewer, faster replicas at
            # the start of a rise swapped back through start-ups a minute later). It waits for the estimate
            # to catch up; a rise the layout cannot carry is met above, as an overload. Only replicas added
            # in free GPUs beside those in place are not held: they take nothing away, and a rise is what
            # they serve (a closed-loop population, a batch of N clients, raises its count with each
            # replica added and held the next one back ~45 s per step).
            candidates = [c for c in candidates if only_adds(current, c, members, free_ranks)]
            if target not in candidates:
                if not candidates:
                    return current
                target = best_layout(
                    members, seconds, arrivals, ranks, peak, candidates=candidates, give_back=self.give_back
                )
            if target == current:
                return current
        if self.give_back and all(target.get(name, 0) <= count for name, count in current.items()):
            # Replicas that buy too little latency go back (the target carries the peak window's demand):
            # a removal starts nothing, so it need not pay for a start-up, only wait out the dwell.
            self.changed_at[model], self.heading[model] = now, None
            return target
        # Steps too must carry the window's peak (the most capacity where nothing does).
        move, net = best_move(
            current,
            target,
            carrying(candidates, seconds, max(arrivals, peak)),
            members,
            seconds,
            arrivals,
            free_ranks,
            self.horizon_startups,
        )
        if net > 0 and (not dwelling or toward(current, heading, move)):
            return self._stepped(model, now, target, move)
        return current

    def _stepped(
        self, model: str, now: float, target: dict[str, int], move: dict[str, int]
    ) -> dict[str, int]:
        """``move``, a change made now toward ``target`` (the target itself, or a step the next may follow
        within the dwell)."""
        self.changed_at[model] = now
        self.heading[model] = target if move != target else None
        return move
