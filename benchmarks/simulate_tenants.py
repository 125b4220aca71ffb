"""Tenants contending for one fleet, in the fleet simulator (``benchmarks/simulate_fleet.py``, its service
times and admission): how the queue policies of ``rayxdit.serve.fairness`` share it.

Three cases on a fleet of 2-GPU replicas (open-loop Poisson arrivals on the simulator's request mix, loads as
fractions of the fleet's capacity), each under ``fifo`` and ``fair_share``:

- ``b alone``: tenant B at 10%: its latency on its own, the baseline;
- ``a floods``: tenant A at 200% (far beyond its share) and B at 10% as before: B's p99 against its p99
  alone (the bar: at most 1.5x) and how many of B's requests admission refuses (their estimate counts the
  requests that would start before them), and how much A gets (whatever B leaves: the replicas stay busy);
- ``both flood``: A and B at 150% each, equal weights: their GPU-seconds (the bar: within 10%).

Admission is the application's: a request whose completion estimate misses its deadline is refused at once
(counted as shed); under ``fair_share`` the estimate counts only the requests that would start before it.

    python benchmarks/simulate_tenants.py --out benchmarks/results/simulate-tenants.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import command_line, source_commit, write_result  # noqa: E402
from benchmarks.simulate_fleet import Fleet, Request, capacity_per_s, workload  # noqa: E402
from rayxdit.serve.fairness import QUEUE_POLICIES  # noqa: E402

CASES = {
    "b alone": {"b": 0.1},
    "a floods": {"a": 2.0, "b": 0.1},
    "both flood": {"a": 1.5, "b": 1.5},
}
P99_BAR, SHARE_BAR = 1.5, 0.10


def quantile(values: list[float], p: float) -> float | None:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(p * (len(ordered) - 1) + 0.5))], 3) if ordered else None


def simulate(
    queue_policy: str, loads: dict[str, float], budget: int, duration: float, warmup: float, seed: int
):
    """One run: each tenant's arrivals at its load; per tenant what it got."""
    fleet = Fleet("all-2gpu", budget, startup_s=60.0, seed=seed, queue_policy=queue_policy)
    capacity = capacity_per_s(budget)
    requests: list[Request] = []
    for offset, (tenant, load) in enumerate(sorted(loads.items())):
        for request in workload(load * capacity, duration, seed + offset):
            request.tenant = tenant
            requests.append(request)
    requests.sort(key=lambda request: request.arrival)
    fleet.run(requests, until=duration * 3)
    window = duration - warmup
    tenants = {}
    for tenant in sorted(loads):
        mine = [r for r in requests if r.tenant == tenant and r.arrival >= warmup]
        latencies = [r.end - r.arrival for r in mine if r.end >= 0]
        tenants[tenant] = {
            "offered_load": loads[tenant],
            "requests": len(mine),
            "finished": len(latencies),
            "shed": sum(r.shed for r in mine),
            "p50_s": quantile(latencies, 0.5),
            "p99_s": quantile(latencies, 0.99),
            "good_fraction": round(
                sum(r.end >= 0 and r.end - r.arrival <= r.slo for r in mine) / max(1, len(mine)), 4
            ),
            "throughput_per_s": round(len(latencies) / window, 4),
            "gpu_seconds": round(fleet.gpu_seconds_by_tenant.get(tenant, 0.0), 1),
        }
    busy = sum(fleet.gpu_seconds_by_tenant.values()) / (budget * fleet.now) if fleet.now else 0.0
    return {"queue_policy": queue_policy, "tenants": tenants, "gpu_busy_fraction": round(busy, 4)}


def verdicts(results: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Per queue policy: B's p99 with A flooding against alone, and the two flooders' GPU-seconds apart."""
    found = {}
    for policy in QUEUE_POLICIES:
        alone = results["b alone"][policy]["tenants"]["b"]["p99_s"]
        crowded = results["a floods"][policy]["tenants"]["b"]["p99_s"]
        both = results["both flood"][policy]["tenants"]
        a_seconds, b_seconds = both["a"]["gpu_seconds"], both["b"]["gpu_seconds"]
        spread = abs(a_seconds - b_seconds) / max(a_seconds, b_seconds) if max(a_seconds, b_seconds) else 0.0
        ratio = crowded / alone if alone and crowded else None
        b = results["a floods"][policy]["tenants"]["b"]
        found[policy] = {
            "b_shed_fraction_with_a_flooding": round(b["shed"] / max(1, b["requests"]), 4),
            "b_good_fraction_alone": results["b alone"][policy]["tenants"]["b"]["good_fraction"],
            "b_good_fraction_with_a_flooding": b["good_fraction"],
            "b_p99_alone_s": alone,
            "b_p99_with_a_flooding_s": crowded,
            "b_p99_ratio": None if ratio is None else round(ratio, 3),
            "b_p99_bar_met": ratio is not None and ratio <= P99_BAR,
            "both_flooding_gpu_seconds": {"a": a_seconds, "b": b_seconds},
            "gpu_seconds_spread": round(spread, 4),
            "share_bar_met": spread <= SHARE_BAR,
        }
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gpus", type=int, default=8, help="the fleet's GPUs (2-GPU replicas)")
    parser.add_argument("--duration-s", type=float, default=3600.0, help="simulated arrivals window")
    parser.add_argument("--warmup-s", type=float, default=300.0, help="arrivals before this are not counted")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    results = {
        case: {
            policy: simulate(policy, loads, args.gpus, args.duration_s, args.warmup_s, args.seed)
            for policy in QUEUE_POLICIES
        }
        for case, loads in CASES.items()
    }
    summary = verdicts(results)
    for policy, row in summary.items():
        print(
            f"{policy:10s} B p99 alone {row['b_p99_alone_s']} s, with A flooding {row['b_p99_with_a_flooding_s']} s "
            f"(x{row['b_p99_ratio']}, bar {P99_BAR}: {'met' if row['b_p99_bar_met'] else 'missed'}; "
            f"{row['b_shed_fraction_with_a_flooding']:.0%} of B's refused at admission); both flooding: "
            f"GPU-seconds {row['both_flooding_gpu_seconds']} apart by {row['gpu_seconds_spread']:.1%} "
            f"(bar {SHARE_BAR:.0%}: {'met' if row['share_bar_met'] else 'missed'})",
            flush=True,
        )
    document = {
        "command": command_line(),
        "device": "simulation (no device): benchmarks/simulate_fleet.py's service times, compounded scenario",
        "commit": source_commit() or None,
        "gpus": args.gpus,
        "duration_s": args.duration_s,
        "warmup_s": args.warmup_s,
        "seed": args.seed,
        "cases": CASES,
        "bars": {"b_p99_ratio_at_most": P99_BAR, "gpu_seconds_spread_at_most": SHARE_BAR},
        "results": results,
        "summary": summary,
    }
    write_result(args.out, document)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
