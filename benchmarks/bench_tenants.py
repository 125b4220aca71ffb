"""Two tenants sharing one pool, through real HTTP: what ``routing.queue_policy`` gives each of them.

A local Ray instance serves one pool (``--model``, ``--parallel``, one replica) behind keys of two tenants,
A and B (equal weights), deployed twice in the same run: with ``fifo`` (the baseline: requests wait in
Serve's queues in the order they came) and with ``fair_share`` (they wait in the application's state and
start in weighted fair order across tenants). Three phases each:

1. ``b alone``: B sends ``--b-rate`` requests a second (open loop): its latency on its own;
2. ``a floods``: A keeps ``--concurrency`` requests in flight (closed loop, far beyond its share) while B
   sends as before: B's p99 against phase 1 (the bar: at most 1.5x) and what A gets meanwhile (the
   pool's GPU-busy fraction: A takes whatever B leaves);
3. ``both flood``: A and B each keep ``--concurrency`` in flight: their GPU-seconds, from ``GET /v1/usage``
   before and after (the bar: within 10% of each other).

    python benchmarks/bench_tenants.py --out benchmarks/results/tenants-tiny-flux-cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import (  # noqa: E402
    cpu_provenance,
    poisson_arrivals,
    shared_cpu_pool,
    start_local_serve,
    write_result,
)
from benchmarks.bench_load import percentile  # noqa: E402

KEYS = {"a": "tenant-a-key", "b": "tenant-b-key", "admin": "tenant-admin-key"}
P99_BAR, SHARE_BAR = 1.5, 0.10


def app_config(args: argparse.Namespace, queue_policy: str):
    from rayxdit.config import RouterConfig, RoutingConfig, ServeConfig

    pool = shared_cpu_pool(args.model, args.parallel)
    keys = [
        {"key": KEYS["a"], "tenant": "a"},
        {"key": KEYS["b"], "tenant": "b"},
        {"key": KEYS["admin"], "tenant": "ops", "admin": True},
    ]
    return ServeConfig(
        pools=[pool],
        router=RouterConfig(api_keys=keys),
        routing=RoutingConfig(queue_policy=queue_policy),
        elastic=None,
    )


def send(url: str, tenant: str, body: dict[str, Any]) -> dict[str, Any]:
    began = time.monotonic()
    headers = {"Authorization": f"Bearer {KEYS[tenant]}"}
    try:
        response = requests.post(url + "/v1/images/generations", json=body, headers=headers, timeout=600)
        status = response.status_code
        info = response.json()["rayxdit"] if status == 200 else {"gpu_seconds": 0.0, "timings": {}}
    except requests.RequestException as error:
        status, info = f"error {type(error).__name__}", {"gpu_seconds": 0.0, "timings": {}}
    engine_s = sum(info["timings"].get(f"{stage}_s", 0.0) for stage in ("encode", "denoise", "decode"))
    return {
        "tenant": tenant,
        "status": status,
        "seconds": time.monotonic() - began,
        "engine_s": engine_s,
        "line_s": info["timings"].get("line_s", 0.0),
        "route_s": info["timings"].get("route_s", 0.0),
        "gpu_seconds": info["gpu_seconds"],
    }


def open_loop(url: str, tenant: str, body: dict, rate: float, seconds: float, seed: int, out: list) -> None:
    """Poisson arrivals at ``rate`` per second for ``seconds``."""
    out.extend(
        poisson_arrivals(lambda index: send(url, tenant, {**body, "seed": index}), rate, seconds, seed)
    )


def closed_loop(url: str, tenant: str, body: dict, concurrency: int, seconds: float, out: list) -> None:
    """``concurrency`` clients, each sending its next request when the last one answered, for ``seconds``."""
    end = time.monotonic() + seconds

    def client(index: int) -> list[dict]:
        done = []
        while time.monotonic() < end:
            done.append(send(url, tenant, {**body, "seed": 1000 * index + len(done)}))
        return done

    with ThreadPoolExecutor(concurrency) as pool:
        for done in pool.map(client, range(concurrency)):
            out.extend(done)


def usage(url: str) -> dict[str, dict]:
    headers = {"Authorization": f"Bearer {KEYS['admin']}"}
    return requests.get(url + "/v1/usage", headers=headers, timeout=60).json()["tenants"]


def summary(records: list[dict], tenant: str) -> dict[str, Any]:
    mine = [r for r in records if r["tenant"] == tenant]
    ok = [r["seconds"] for r in mine if r["status"] == 200]
    waits = [r["seconds"] - r["engine_s"] for r in mine if r["status"] == 200]
    return {
        "requests": len(mine),
        "ok": len(ok),
        "other": sorted({str(r["status"]) for r in mine if r["status"] != 200}),
        "p50_s": percentile(ok, 0.5),
        "p99_s": percentile(ok, 0.99),
        "p50_wait_s": percentile(waits, 0.5),  # queueing and the serving path's hops: all but the engine
        "p99_wait_s": percentile(waits, 0.99),
        # Of the wait: in the pool's fair line (fair_share), and the router asking the state where to go.
        "p50_line_s": percentile([r["line_s"] for r in mine if r["status"] == 200], 0.5),
        "p99_line_s": percentile([r["line_s"] for r in mine if r["status"] == 200], 0.99),
        "p99_route_s": percentile([r["route_s"] for r in mine if r["status"] == 200], 0.99),
        "gpu_seconds": round(sum(r["gpu_seconds"] for r in mine), 3),
    }


def run_phases(url: str, args: argparse.Namespace, ranks: int) -> dict[str, Any]:
    body = {
        "prompt": "a lighthouse",
        "size": args.size,
        "steps": args.steps,
        "model": args.model_name,
    }
    phases: dict[str, Any] = {}
    for name in ("b alone", "a floods", "both flood"):
        records: list[dict] = []
        before = usage(url)
        began = time.monotonic()
        workers = [
            threading.Thread(target=open_loop, args=(url, "b", body, args.b_rate, args.seconds, 7, records))
        ]
        if name != "b alone":
            workers.append(
                threading.Thread(
                    target=closed_loop, args=(url, "a", body, args.concurrency, args.seconds, records)
                )
            )
        if name == "both flood":
            workers[0] = threading.Thread(
                target=closed_loop, args=(url, "b", body, args.concurrency, args.seconds, records)
            )
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        wall = time.monotonic() - began
        answered = {t: sum(r["gpu_seconds"] for r in records if r["tenant"] == t) for t in ("a", "b")}
        settle = time.monotonic() + 10  # a release may reach the state just after its answer left
        while True:
            after = usage(url)
            spent = {
                tenant: round(
                    after.get(tenant, {}).get("gpu_seconds", 0.0)
                    - before.get(tenant, {}).get("gpu_seconds", 0.0),
                    3,
                )
                for tenant in ("a", "b")
            }
            if all(spent[t] >= answered[t] - 1e-3 for t in spent) or time.monotonic() > settle:
                break
            time.sleep(0.2)
        gpu_seconds = sum(r["gpu_seconds"] for r in records)
        phases[name] = {
            "wall_s": round(wall, 2),
            "gpu_busy_fraction": round(gpu_seconds / (wall * ranks), 4),
            "usage_gpu_seconds": spent,
            "tenants": {tenant: summary(records, tenant) for tenant in ("a", "b")},
        }
        print(f"  {name}: {json.dumps(phases[name])}", flush=True)
    return phases


def verdict(phases: dict[str, Any]) -> dict[str, Any]:
    alone = phases["b alone"]["tenants"]["b"]["p99_s"]
    crowded = phases["a floods"]["tenants"]["b"]["p99_s"]
    ratio = crowded / alone if alone and crowded else None
    spent = phases["both flood"]["usage_gpu_seconds"]
    spread = abs(spent["a"] - spent["b"]) / max(spent["a"], spent["b"]) if max(spent.values()) else None
    return {
        "b_p99_ratio": None if ratio is None else round(ratio, 3),
        "b_p99_bar_met": ratio is not None and ratio <= P99_BAR,
        "gpu_busy_while_a_floods": phases["a floods"]["gpu_busy_fraction"],
        "both_flooding_gpu_seconds_spread": None if spread is None else round(spread, 4),
        "share_bar_met": spread is not None and spread <= SHARE_BAR,
        "lost": sum(len(phase["tenants"][t]["other"]) for phase in phases.values() for t in ("a", "b")),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--model", default="tiny-flux", help="the pool's model (a preset or a checkpoint)")
    parser.add_argument(
        "--parallel", default="single", help="the pool's layout (its ranks: the GPUs it holds)"
    )
    parser.add_argument("--size", default="64x64", help="every request's size")
    parser.add_argument("--steps", type=int, default=8, help="every request's steps")
    parser.add_argument("--seconds", type=float, default=60.0, help="each phase's length")
    parser.add_argument("--b-rate", type=float, default=1.0, help="tenant B's requests per second")
    parser.add_argument(
        "--concurrency", type=int, default=8, help="requests a flooding tenant keeps in flight"
    )
    parser.add_argument(
        "--policies", nargs="+", default=["fifo", "fair_share"], help="queue policies, in order"
    )
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from rayxdit.config import ParallelConfig
    from rayxdit.serve.app import APP_NAME, deploy

    args.model_name = args.model.rstrip("/").split("/")[-1]
    ranks = ParallelConfig.parse(args.parallel).world_size
    url = start_local_serve()
    runs = {}
    try:
        for policy in args.policies:
            print(f"deploying with queue_policy {policy}...", flush=True)
            deploy(app_config(args, policy), logging_config={"log_level": "WARNING"})
            for _ in range(5):  # warm: the first requests pay the ranks' first forward
                send(
                    url,
                    "a",
                    {"prompt": "warm", "size": args.size, "steps": args.steps, "model": args.model_name},
                )
            phases = run_phases(url, args, ranks)
            runs[policy] = {"phases": phases, "verdict": verdict(phases)}
            print(f"{policy}: {json.dumps(runs[policy]['verdict'])}", flush=True)
            if policy != args.policies[-1]:  # the next policy's deployment starts afresh
                serve.delete(APP_NAME)
    finally:  # the instance goes whole: no Serve handle here, nothing a graceful shutdown (~2 s a deployment) saves
        ray.shutdown()
    document = {
        **cpu_provenance(),
        "workload": {
            "model": args.model,
            "parallel": args.parallel,
            "size": args.size,
            "steps": args.steps,
            "seconds_per_phase": args.seconds,
            "b_rate_per_s": args.b_rate,
            "concurrency": args.concurrency,
        },
        "bars": {"b_p99_ratio_at_most": P99_BAR, "gpu_seconds_spread_at_most": SHARE_BAR},
        "baseline": "fifo" if "fifo" in runs else None,
        "runs": runs,
    }
    write_result(args.out, document)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
