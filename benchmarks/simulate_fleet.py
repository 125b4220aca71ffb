"""A discrete-event simulation of a rayxdit fleet, to compare pool policies at loads no test can reach.

It calls the production decisions unchanged, by name from the same tables the application uses
(``rayxdit.serve.policies``): a routing policy (``finish_first``: where a request finishes first, from loads
built exactly as the application's state builds them, service times learned online with ``ServiceFit``;
``thresholds``: the configured cost thresholds) and, for elastic fleets, an autoscaling policy
(``load_aware``). The rest is a model of the machinery around them, and says so:

- **Service times** per (GPUs, resolution) for Flux.1-dev, 28 steps, on H200, from the committed results
  (``SERVICE_TABLE``; each row says whether it was measured, in which file, or extrapolated and how). A
  request of other steps scales per step; true CFG runs both branches (no cfg axis in these pools); text
  encoding and VAE decoding add the measured ``OVERHEAD_S``.
- **Replicas** run one request at a time; a pool's queue is FIFO; a new replica waits for free GPUs, then
  ``--startup-s`` (load and warm-up) before it serves; a removed replica first finishes its request.
- **Serve's autoscaler around the policy**: a tick every ``TICK_S``, outstanding requests averaged over
  ``LOOK_BACK_S``, scale-ups after ``UPSCALE_DELAY_S`` and scale-downs after ``DOWNSCALE_DELAY_S`` of
  agreeing decisions, as Serve applies an application-level policy's decisions.

Policies on one 8-GPU node and on a 64-GPU fleet, open-loop Poisson arrivals at 20% to 120% of capacity
(capacity: the fleet as 2-GPU replicas, its most images per GPU, on the request mix):

- ``all-2gpu``, ``all-8gpu``: every GPU in replicas of one size, least-loaded routing;
- ``static thresholds``: per 8 GPUs one 4-GPU and two 2-GPU replicas, routed by cost thresholds;
- ``load-aware + shared budget``: pools of 2, 4 and 8 GPUs sized by the elastic policy, routed by
  completion estimates.

    python benchmarks/simulate_fleet.py --out benchmarks/results/simulate-fleet.json
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import source_commit  # noqa: E402
from rayxdit.serve.policies import AUTOSCALING_POLICIES, ROUTING_POLICIES  # noqa: E402
from rayxdit.serve.routing import PoolLoad, PoolSpec, ServiceFit  # noqa: E402
from rayxdit.serve.sizing import PoolDemand  # noqa: E402

STEPS = 28
SERVICE_TABLE = {
    # (gpus, resolution): (seconds for the 28-step transformer loop, where the number comes from)
    (1, 1024): (3.736, "measured: benchmarks/results/flux-dev-2xh200.json, single GPU compiled"),
    (1, 2048): (19.831, "measured: benchmarks/results/flux-dev-2xh200.json, single GPU compiled"),
    (2, 1024): (2.371, "measured: benchmarks/results/flux-dev-2xh200.json, rayxdit ulysses=2"),
    (2, 2048): (11.140, "measured: benchmarks/results/flux-dev-2xh200.json, rayxdit ulysses=2"),
    (4, 1024): (2.371 / 1.576, "extrapolated: the measured 1->2 GPU speedup (1.576x) again for 2->4"),
    (4, 2048): (11.140 / 1.780, "extrapolated: the measured 1->2 GPU speedup (1.780x) again for 2->4"),
    (8, 1024): (2.371 / 1.576**2, "extrapolated: the measured 1->2 GPU speedup twice more for 2->8"),
    (8, 2048): (11.140 / 1.780**2, "extrapolated: the measured 1->2 GPU speedup twice more for 2->8"),
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
"""A request is good if it ends within twice its time on one GPU (compiled)."""
TICK_S, LOOK_BACK_S, UPSCALE_DELAY_S, DOWNSCALE_DELAY_S = 2.0, 30.0, 5.0, 30.0
POOL_SIZES = (2, 4, 8)
THRESHOLDS = {2: 0.0, 4: 45.0, 8: 100.0}
"""As in serve_configs/flux-dev-8gpu.yaml."""


def service_s(gpus: int, resolution: int, steps: int, cfg: bool) -> float:
    loop = SERVICE_TABLE[(gpus, resolution)][0] * steps / STEPS
    return loop * (2 if cfg else 1) + OVERHEAD_S[resolution][0]


def cost_of(resolution: int, steps: int, cfg: bool) -> float:
    return resolution * resolution / 1e6 * steps * (2 if cfg else 1)


@dataclass
class Request:
    arrival: float
    resolution: int
    steps: int
    cfg: bool
    start: float = -1.0
    end: float = -1.0

    @property
    def cost(self) -> float:
        return cost_of(self.resolution, self.steps, self.cfg)

    @property
    def slo(self) -> float:
        return SLO_FACTOR * service_s(1, self.resolution, self.steps, self.cfg)


@dataclass
class Replica:
    pool: str
    gpus: int
    ready_at: float = math.inf  # inf while waiting for GPUs
    request: Request | None = None
    draining: bool = False


@dataclass
class Pool:
    spec: PoolSpec
    min_replicas: int
    max_replicas: int
    replicas: list[Replica] = field(default_factory=list)
    queue: deque = field(default_factory=deque)
    fit: ServiceFit = field(default_factory=ServiceFit)
    demand: float = 0.0  # outstanding requests, averaged over LOOK_BACK_S
    waiting: float = 0.0  # of those, queued for a replica, averaged likewise
    finished: deque = field(default_factory=deque)  # completion times, for the request rate
    decision: int = 0
    decision_since: float = 0.0

    queue_cost: float = 0.0

    def enqueue(self, request: Request) -> None:
        self.queue.append(request)
        self.queue_cost += request.cost

    def dequeue(self) -> Request:
        request = self.queue.popleft()
        self.queue_cost -= request.cost
        return request

    def outstanding(self) -> tuple[int, float]:
        """Requests queued or running, and their total cost (kept incrementally: queues get long)."""
        running = [r.request for r in self.replicas if r.request is not None]
        return len(self.queue) + len(running), self.queue_cost + sum(r.cost for r in running)


class Fleet:
    """One simulation: pools, replicas, queues, the clock."""

    def __init__(self, policy: str, budget: int, startup_s: float, seed: int):
        self.policy, self.budget, self.startup_s = policy, budget, startup_s
        self.rng = random.Random(seed)
        self.now = 0.0
        self.events: list = []
        self.seq = 0
        self.done: list[Request] = []
        self.gpu_seconds: dict[str, float] = {}
        self.replica_starts = 0
        self.pools: dict[str, Pool] = {}
        self.routing = ROUTING_POLICIES["finish_first" if policy == ELASTIC else "thresholds"]
        self.sizing = AUTOSCALING_POLICIES["load_aware"]() if policy == ELASTIC else None
        if policy == "all-2gpu":
            self._static({2: budget // 2})
        elif policy == "all-8gpu":
            self._static({8: budget // 8})
        elif policy == "static thresholds":
            self._static({2: 2 * (budget // 8), 4: budget // 8})
        else:  # load-aware + shared budget: every size, sized by the policy, one 2-GPU replica to start
            for gpus in POOL_SIZES:
                self._pool(gpus, 0, budget // gpus, startup_s)
            self._add_replica(self.pools["p2"], ready_at=0.0)
            self.pools["p2"].decision = 1
            self._push(TICK_S, "tick", None)

    def _pool(self, gpus: int, minimum: int, maximum: int, startup: float) -> Pool:
        spec = PoolSpec(f"p{gpus}", "flux", gpus, route_min_cost=THRESHOLDS[gpus], startup_s=startup)
        pool = self.pools[spec.name] = Pool(spec, minimum, maximum)
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
        pool = self._route(request)
        pool.enqueue(request)
        self._dispatch(pool)

    def _on_done(self, replica: Replica) -> None:
        request = replica.request
        request.end = self.now
        self.done.append(request)
        pool = self.pools[replica.pool]
        pool.fit.add(request.cost, request.end - request.start)
        pool.finished.append(self.now)
        replica.request = None
        if replica.draining:
            pool.replicas.remove(replica)
            self._start_waiting()
            self._reroute_if_gone(pool)
        self._dispatch(pool)

    def _on_ready(self, replica: Replica) -> None:
        if replica in self.pools[replica.pool].replicas:
            self._dispatch(self.pools[replica.pool])

    def _on_tick(self, _) -> None:
        self._autoscale()
        self._push(self.now + TICK_S, "tick", None)

    # ----- serving ----------------------------------------------------------------------------------------
    def _loads(self) -> dict[str, PoolLoad]:
        """Exactly what the application's state hands routing."""
        loads = {}
        for name, pool in self.pools.items():
            ready = sum(r.ready_at <= self.now and not r.draining for r in pool.replicas)
            # A replica waiting for GPUs has no process yet, so it does not report: not starting
            starting = sum(self.now < r.ready_at < math.inf for r in pool.replicas)
            count, cost = pool.outstanding()
            overhead, rate = pool.fit.fitted or (0.0, None)
            loads[name] = PoolLoad(ready, starting, count, cost, rate, overhead, None)
        return loads

    def _route(self, request: Request, exclude: frozenset[str] = frozenset()) -> Pool:
        specs = [pool.spec for pool in self.pools.values()]
        free = self.budget - self._gpus_held()
        choice = self.routing(specs, request.cost, self._loads(), exclude, free)[0][0]
        return self.pools[choice.name]

    def _dispatch(self, pool: Pool) -> None:
        for replica in pool.replicas:
            if not pool.queue:
                return
            if replica.request is None and replica.ready_at <= self.now and not replica.draining:
                request = pool.dequeue()
                request.start = self.now
                replica.request = request
                seconds = service_s(replica.gpus, request.resolution, request.steps, request.cfg)
                self.gpu_seconds[pool.spec.name] = (
                    self.gpu_seconds.get(pool.spec.name, 0.0) + seconds * replica.gpus
                )
                self._push(self.now + seconds, "done", replica)

    # ----- autoscaling (Serve around the policy) --------------------------------------------------------------
    def _gpus_held(self) -> int:
        return sum(r.gpus for pool in self.pools.values() for r in pool.replicas if r.ready_at < math.inf)

    def _add_replica(self, pool: Pool, ready_at: float = math.inf) -> None:
        pool.replicas.append(Replica(pool.spec.name, pool.spec.ranks, ready_at))
        self.replica_starts += ready_at > 0
        self._start_waiting()

    def _start_waiting(self) -> None:
        """Replicas waiting for GPUs start (their start-up clock runs) as GPUs free up."""
        for pool in self.pools.values():
            for replica in pool.replicas:
                if replica.ready_at == math.inf and self._gpus_held() + replica.gpus <= self.budget:
                    replica.ready_at = self.now + self.startup_s
                    self._push(replica.ready_at, "ready", replica)

    def _autoscale(self) -> None:
        alpha = TICK_S / LOOK_BACK_S
        demands = []
        for pool in self.pools.values():
            pool.demand += alpha * (pool.outstanding()[0] - pool.demand)
            pool.waiting += alpha * (len(pool.queue) - pool.waiting)
            overhead, rate = pool.fit.fitted or (0.0, None)
            current = sum(not r.draining for r in pool.replicas)
            demands.append(
                PoolDemand(
                    pool.spec,
                    replicas=current,
                    outstanding=pool.demand,
                    queued=pool.waiting,
                    min_replicas=pool.min_replicas,
                    max_replicas=pool.max_replicas,
                    seconds_per_cost=rate,
                    overhead_s=overhead,
                    mean_cost=pool.fit.mean_cost,
                    throughput=self._rate(pool),
                )
            )
        plan = self.sizing(demands, self.budget, self.now)
        for pool in self.pools.values():
            target = plan[pool.spec.name]
            if not pool.replicas and pool.queue:  # Serve's cold-start path: a queue always gets a replica
                target = max(1, target)
            if target != pool.decision:
                pool.decision, pool.decision_since = target, self.now
            current = sum(not r.draining for r in pool.replicas)
            delay = UPSCALE_DELAY_S if target > current else DOWNSCALE_DELAY_S
            if target == current or self.now - pool.decision_since < delay:
                continue
            for _ in range(target - current):
                self._add_replica(pool)
            for _ in range(current - target):
                self._remove_replica(pool)

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
    """Images per second of the fleet as 2-GPU replicas (its most per GPU) on the mix."""
    mean = sum(weight * service_s(2, res, steps, cfg) for weight, res, steps, cfg in MIX)
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


ALTERNATING_PERIOD_S = 1800.0
"""The changing scenario, a day's swing with headroom: 20% and 80% of capacity, 30 minutes each, in turn."""


def alternating(capacity: float):
    return lambda t: capacity * (0.2 if int(t // ALTERNATING_PERIOD_S) % 2 == 0 else 0.8)


def simulate(
    policy: str, budget: int, load, duration: float, warmup: float, startup: float, seed: int
) -> dict:
    """One run; ``load`` is a fraction of capacity, or "alternating" (20% and 80% in turn)."""
    fleet = Fleet(policy, budget, startup, seed)
    capacity = capacity_per_s(budget)
    rate = alternating(capacity) if load == "alternating" else load * capacity
    requests = workload(rate, duration, seed)
    fleet.run(requests, until=duration * 3)
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
    return {
        "policy": policy,
        "gpus": budget,
        "offered_load": load,
        "requests": len(counted),
        "finished": len(finished),
        "p50_s": q(0.5),
        "p95_s": q(0.95),
        "p99_s": q(0.99),
        "throughput_per_s": round(len(finished) / window, 4),
        "goodput_per_s": round(sum(r.end - r.arrival <= r.slo for r in finished) / window, 4),
        "good_fraction": round(sum(r.end - r.arrival <= r.slo for r in finished) / max(1, len(counted)), 4),
        "gpu_seconds_by_pool": {k: round(v, 1) for k, v in sorted(fleet.gpu_seconds.items())},
        "replica_starts": fleet.replica_starts,
    }


ELASTIC = "load-aware + shared budget"
POLICIES = ("all-2gpu", "all-8gpu", "static thresholds", ELASTIC)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fleets", type=int, nargs="+", default=[8, 64], help="GPUs of each fleet")
    parser.add_argument("--loads", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8, 1.0, 1.2])
    parser.add_argument("--duration-s", type=float, default=7200.0, help="simulated arrivals window")
    parser.add_argument("--warmup-s", type=float, default=600.0, help="arrivals before this are not counted")
    parser.add_argument("--startup-s", type=float, default=60.0, help="a replica's load and warm-up")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--no-alternating", dest="alternating", action="store_false", help="skip that scenario"
    )
    args = parser.parse_args(argv)
    results = []
    for budget in args.fleets:
        for load in [*args.loads, *(["alternating"] if args.alternating else [])]:
            for policy in POLICIES:
                result = simulate(
                    policy, budget, load, args.duration_s, args.warmup_s, args.startup_s, args.seed
                )
                results.append(result)
                shown = load if isinstance(load, str) else f"{load:.0%}"
                print(
                    f"{budget:3d} GPUs load {shown} {policy:27s} p50 {result['p50_s']} p99 {result['p99_s']} "
                    f"goodput {result['goodput_per_s']}/s ({result['good_fraction']:.0%})",
                    flush=True,
                )
    commit = source_commit()
    document = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": "simulation (no device): service times from the table below",
        "commit": commit or None,
        "service_table": {
            f"{g}gpu-{r}px": {"seconds": round(s, 4), "source": src}
            for (g, r), (s, src) in SERVICE_TABLE.items()
        },
        "overhead": {f"{r}px": {"seconds": s, "source": src} for r, (s, src) in OVERHEAD_S.items()},
        "mix": [{"weight": w, "resolution": r, "steps": s, "cfg": c} for w, r, s, c in MIX],
        "slo": f"{SLO_FACTOR}x the request's single-GPU compiled time",
        "autoscaler": {
            "tick_s": TICK_S,
            "look_back_s": LOOK_BACK_S,
            "upscale_delay_s": UPSCALE_DELAY_S,
            "downscale_delay_s": DOWNSCALE_DELAY_S,
            "startup_s": args.startup_s,
        },
        "capacity_per_s": {str(b): round(capacity_per_s(b), 4) for b in args.fleets},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
