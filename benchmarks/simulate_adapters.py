"""A discrete-event simulation of one pool serving LoRA adapters per request: does routing that follows the
adapters pay, and what do misses cost?

A pool of ``--replicas`` 2-GPU replicas (Flux.1-dev, 1024px, 28 steps, compiled: the single-GPU H200 time
measured in ``benchmarks/results/flux-dev-2xh200.json`` over the measured 1->2 GPU speedup, plus text
encoding and decoding, as ``simulate_fleet.py`` has it) runs one request at a time, as production pools do
(``max_ongoing_requests: 1``). Every request names one of ``--adapters`` adapters, drawn Zipf(``--zipf``)
by popularity. A replica keeps ``--resident`` adapters on its GPUs (``lora_resident``) and ``--host`` in host memory
(least recently used leave first), and its weights hold the adapter it ran last. Before a request runs, its
replica brings the weights to its adapter:

- nothing when its adapter is the one applied (a *fused hit*);
- ``swap_s`` when the adapter is on the GPUs (a *device hit*);
- ``host_s`` when it is in host memory, ``disk_s`` when it must be read (a *miss*).

The three costs are read from the LoRA benchmark's JSON (``--costs FILE``, measured on one H200), or taken
from a named scenario: ``estimated`` (from bandwidths: no GPU measurement yet) or ``bounds`` (issue 27's
acceptance bounds); the JSON names which.

Routing is a model of Ray Serve's, which production uses unchanged (``rayxdit/serve/dispatch.py`` sends a
request's adapter set as its ``multiplexed_model_id``; ``rayxdit/serve/pool.py`` registers each replica's sets
with ``serve.multiplexed``), in the simplification that Serve's router, holding requests until a replica is
free, acts as:

- ``adapter-blind`` (no multiplexed id): a free replica at random; none free: the request waits, and the
  next replica to be free takes the longest-waiting request;
- ``serve-multiplexed``: a free replica whose multiplexed ids hold the request's adapter first, else a free
  replica among those with the fewest ids (all, once warm), else it waits as above (Serve prefers holders
  for a second, then takes any; a replica that frees takes the longest-waiting request).

    python benchmarks/simulate_adapters.py --costs benchmarks/results/lora-flux-dev-1xh200.json \\
        --out benchmarks/results/simulate-adapters.json
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import itertools
import json
import random
import statistics
import sys
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import source_commit
from benchmarks.simulate_fleet import service_s
from rayxdit.serve.routing import ADAPTER_PATIENCE_S, adapter_tiers

COST_SCENARIOS = {
    "estimated": (
        {"swap_s": 0.04, "host_s": 0.1, "disk_s": 0.3},
        "estimated from bandwidths, not measured (a rank-64 Flux.1-dev adapter, 0.52 GB, on one H200): a swap "
        "restores ~23 GB of touched weights and adds the new updates on the GPU (~4.8 TB/s); a host load adds a "
        "0.52 GB copy over PCIe (~10 GB/s from pageable memory); a disk load adds a cold read (~3 GB/s NVMe). "
        "Parsing the file is 33 ms on the 2-core development machine (safetensors maps it)",
    ),
    "bounds": (
        {"swap_s": 0.05, "host_s": 1.0, "disk_s": 3.0},
        "issue 27's acceptance bounds (swap <= 50 ms, host load <= 1 s) and a 3 s read: the worst the bounds allow",
    ),
}
POLICIES = ("adapter-blind", "serve-multiplexed", "adapter-aware", "no-adapters")
"""``no-adapters``: the same requests with nothing to load (blind routing, every cost 0): the floor."""
ROUTING_TASKS = 64
"""Pending requests Serve's router routes at once (the rest wait their turn, in order)."""


@dataclass
class Replica:
    resident: int
    host_capacity: int
    device: OrderedDict = field(default_factory=OrderedDict)
    host: OrderedDict = field(default_factory=OrderedDict)
    served: OrderedDict = field(default_factory=OrderedDict)
    """The multiplexed ids Serve knows this replica by (the adapter sets it served last)."""
    applied: int | None = None
    busy: bool = False

    def bring(self, adapter: int, costs: dict[str, float]) -> tuple[str, float]:
        """Where the adapter was and what bringing the weights to it costs; updates the caches."""
        if adapter == self.applied:
            where, seconds = "fused", 0.0
        elif adapter in self.device:
            where, seconds = "device", costs["swap_s"]
        elif adapter in self.host:
            where, seconds = "host", costs["host_s"]
        else:
            where, seconds = "disk", costs["disk_s"]
        for cache, capacity in (
            (self.device, self.resident),
            (self.host, self.host_capacity),
            (self.served, self.resident),
        ):
            cache[adapter] = True
            cache.move_to_end(adapter)
            while len(cache) > capacity:
                cache.popitem(last=False)
        self.applied = adapter
        return where, seconds


def zipf_sampler(adapters: int, exponent: float, rng: random.Random):
    weights = [1.0 / (rank**exponent) for rank in range(1, adapters + 1)]
    cumulative = list(itertools.accumulate(weights))
    total = cumulative[-1]
    return lambda: bisect.bisect_left(cumulative, rng.random() * total)


def simulate(
    policy: str,
    load: float,
    replicas: int,
    adapters: int,
    exponent: float,
    resident: int,
    host: int,
    costs: dict[str, float],
    duration: float,
    warmup: float,
    seed: int,
    patience: float = ADAPTER_PATIENCE_S,
) -> dict:
    service = service_s("compounded", 2, 1024, 28, False)
    rate = load * replicas / service
    rng = random.Random(seed)
    draw = zipf_sampler(adapters, exponent, random.Random(seed + 1))
    pool = [Replica(resident, host) for _ in range(replicas)]
    if policy == "no-adapters":
        costs = dict.fromkeys(costs, 0.0)
    events: list = []
    sequence = itertools.count()
    waiting: deque = deque()
    latencies: list[float] = []
    places: dict[str, int] = {"fused": 0, "device": 0, "host": 0, "disk": 0}

    def start(replica: Replica, arrival: float, adapter: int, now: float) -> None:
        where, seconds = replica.bring(adapter, costs)
        replica.busy = True
        if arrival >= warmup:
            places[where] += 1
        heapq.heappush(events, (now + seconds + service, next(sequence), "done", (replica, arrival)))

    def tiers(adapter: int, waited: float) -> list[list[int]]:
        everyone = list(range(len(pool)))
        if policy in ("adapter-blind", "no-adapters"):
            return [everyone]
        if policy == "serve-multiplexed":  # holders, else the replicas with the fewest ids (all, once warm)
            holders = [i for i in everyone if adapter in pool[i].served]
            fewest = min(len(replica.served) for replica in pool)
            return [holders, [i for i in everyone if len(pool[i].served) == fewest], everyone]
        # adapter-aware: the production decision, on the same view Serve's router has
        named = [(str(i), frozenset(str(key) for key in replica.served)) for i, replica in enumerate(pool)]
        return [[int(name) for name in tier] for tier in adapter_tiers(named, str(adapter), waited, patience)]

    def match(now: float) -> None:
        """Pending requests, oldest first, to free replicas of their first tier that has one (Serve's router
        routes at most ROUTING_TASKS of them at once)."""
        for entry in list(itertools.islice(waiting, ROUTING_TASKS)):
            arrival, adapter = entry
            for tier in tiers(adapter, now - arrival):
                free = [i for i in tier if not pool[i].busy]
                if free:
                    waiting.remove(entry)
                    start(pool[rng.choice(free)], arrival, adapter, now)
                    break
            if all(replica.busy for replica in pool):
                return

    now = 0.0
    heapq.heappush(events, (rng.expovariate(rate), next(sequence), "arrival", None))
    while events:
        now, _, kind, data = heapq.heappop(events)
        if now > duration:
            break
        if kind == "arrival":
            waiting.append((now, draw()))
            heapq.heappush(events, (now + patience, next(sequence), "patience", None))
            heapq.heappush(events, (now + rng.expovariate(rate), next(sequence), "arrival", None))
        elif kind == "done":
            replica, arrival = data
            replica.busy = False
            if arrival >= warmup:
                latencies.append(now - arrival)
        match(now)
    latencies.sort()
    started = sum(places.values())

    def quantile(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3)

    return {
        "policy": policy,
        "load": load,
        "requests": len(latencies),
        "p50_s": quantile(0.5),
        "p99_s": quantile(0.99),
        "mean_s": round(statistics.fmean(latencies), 3),
        "swaps_per_request": round((started - places["fused"]) / started, 3),
        "device_hit_ratio": round((places["fused"] + places["device"]) / started, 3),
        "host_loads_per_request": round(places["host"] / started, 3),
        "disk_loads_per_request": round(places["disk"] / started, 3),
        "where": places,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replicas", type=int, default=8, help="2-GPU replicas in the pool")
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--zipf", type=float, default=1.1, help="popularity exponent")
    parser.add_argument("--resident", type=int, default=8, help="adapters kept on each replica's GPUs")
    parser.add_argument(
        "--host",
        type=int,
        default=64,
        help="adapters kept in each replica's host memory (64 x 0.5 GB: 32 GB)",
    )
    parser.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    parser.add_argument("--hours", type=float, default=4.0, help="simulated time per run")
    parser.add_argument("--seeds", type=int, default=3, help="runs per point (their medians are reported)")
    parser.add_argument(
        "--costs",
        default="estimated",
        help=f"bench_lora.py's JSON (measured swap, host load, disk read) or one of {', '.join(COST_SCENARIOS)}",
    )
    parser.add_argument(
        "--patience",
        type=float,
        default=ADAPTER_PATIENCE_S,
        help="seconds a request waits for its adapters' replicas",
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    if args.costs in COST_SCENARIOS:
        costs, source = COST_SCENARIOS[args.costs]
    else:
        measured = json.loads(Path(args.costs).read_text())
        costs = {
            "swap_s": measured["swap_median_s"],
            "host_s": measured["host_load_median_s"],
            "disk_s": max(
                0.0, measured["first_request_with_adapter_s"] - measured["baseline_plain_request_s"]
            ),
        }
        source = f"measured: {args.costs} ({measured['device']}, commit {measured['versions'].get('rayxdit_commit')})"
    duration = args.hours * 3600
    results = []
    for load in args.loads:
        for policy in POLICIES:
            runs = [
                simulate(
                    policy,
                    load,
                    args.replicas,
                    args.adapters,
                    args.zipf,
                    args.resident,
                    args.host,
                    costs,
                    duration,
                    duration / 10,
                    seed,
                    args.patience,
                )
                for seed in range(args.seeds)
            ]
            summary = {
                key: statistics.median(run[key] for run in runs)
                for key in runs[0]
                if key not in ("policy", "load", "where")
            }
            results.append({"policy": policy, "load": load, **summary, "runs": runs})
            print(
                f"load {load:.0%} {policy:18s} p50 {summary['p50_s']:6.2f} s  p99 {summary['p99_s']:6.2f} s  "
                f"swaps/request {summary['swaps_per_request']:.2f}  device hits {summary['device_hit_ratio']:.2f}"
            )
    comparison = {}
    for load in args.loads:
        by = {r["policy"]: r for r in results if r["load"] == load}
        comparison[f"{load:g}"] = {
            f"{stat}_ratio_{policy}_over_blind": round(
                by[policy][f"{stat}_s"] / by["adapter-blind"][f"{stat}_s"], 3
            )
            for policy in ("serve-multiplexed", "adapter-aware", "no-adapters")
            for stat in ("p50", "p99")
        }
    record = {
        "command": " ".join(
            ["python", "benchmarks/simulate_adapters.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "commit": source_commit(),
        "replicas": args.replicas,
        "adapters": args.adapters,
        "zipf": args.zipf,
        "resident": args.resident,
        "host": args.host,
        "service_s": round(service_s("compounded", 2, 1024, 28, False), 3),
        "costs": costs,
        "costs_source": source,
        "patience_s": args.patience,
        "hours": args.hours,
        "seeds": args.seeds,
        "results": results,
        "comparison": comparison,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(comparison, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
