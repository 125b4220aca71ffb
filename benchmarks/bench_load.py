"""Load on a rayxdit deployment: open-loop Poisson arrivals from a workload file, through real HTTP.

Arrivals do not wait for answers (open loop), so queues build as they would in production. The workload
file (``benchmarks/workloads/*.yaml``) gives the mix of sizes, steps and CFG, the arrival rate, bursts,
and the SLO (also each request's ``timeout``); the run is bounded by ``max_requests`` and ``duration_s``,
and targets loopback only. Every request ends as 200, or as a deliberate 429 (admission) or 504 (deadline):
anything else counts as *lost* and must be 0.

Without ``--url`` the script starts a local Ray instance (``--logical-gpus N`` gives it N logical GPUs, so
GPU pools run on the CPU) and deploys ``--config`` the way ``rayxdit serve`` does: first with the elastic
policy, then, as the baseline of the same run, with each pool scaling on its own (``elastic: null``). It
samples the pools' replica counts every second, so the JSON shows the policy at work.

    python benchmarks/bench_load.py --config serve_configs/flux-dev-8gpu.yaml \\
        --workload benchmarks/workloads/flux-dev.yaml --out benchmarks/results/load-flux-dev.json
    python benchmarks/bench_load.py --config benchmarks/workloads/cpu-pools.yaml --logical-gpus 8 \\
        --workload benchmarks/workloads/mixed-cpu.yaml --out benchmarks/results/load-tiny-flux-cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DELIBERATE = (429, 504)
"""Answers a client is meant to get under overload: refused before any GPU work, or stopped at a deadline."""


def phases(workload: dict[str, Any]) -> list[tuple[float, float, float]]:
    """(start, end, arrivals per second) of each phase of the workload: its ``phases`` in turn (a varying
    load, e.g. light and heavy alternating), else one phase of ``rate_per_s`` for ``duration_s``."""
    if "phases" not in workload:
        return [(0.0, float(workload["duration_s"]), float(workload["rate_per_s"]))]
    spans, start = [], 0.0
    for phase in workload["phases"]:
        end = start + float(phase["duration_s"])
        spans.append((start, end, float(phase["rate_per_s"])))
        start = end
    return spans


def phase_of(at: float, spans: list[tuple[float, float, float]]) -> int:
    return next((index for index, (_, end, _) in enumerate(spans) if at < end), len(spans) - 1)


def arrivals(workload: dict[str, Any]) -> list[tuple[float, dict[str, Any]]]:
    """(seconds after the start, request body) for every request: Poisson arrivals at each phase's rate
    plus the bursts, bounded by the phases' end and ``max_requests``; seeded, so a run is repeatable."""
    rng = random.Random(workload.get("seed", 0))
    times: list[float] = []
    for start, end, rate in phases(workload):
        now = start
        while rate > 0:
            now += rng.expovariate(rate)
            if now > end:
                break
            times.append(now)
    for burst in workload.get("bursts", []):
        times += [float(burst["at_s"])] * int(burst["requests"])
    times = sorted(times)[: workload["max_requests"]]
    mix = workload["mix"]
    weights = [item.get("weight", 1) for item in mix]
    bodies = []
    for index, at in enumerate(times):
        kind = {k: v for k, v in rng.choices(mix, weights)[0].items() if k != "weight"}
        body = {"prompt": f"load {index}", "seed": index, "timeout": workload["slo_s"], **kind}
        bodies.append((at, body))
    return bodies


def size_class(body: dict[str, Any]) -> str:
    cfg = "+cfg" if body.get("true_cfg_scale", 1.0) > 1 and body.get("negative_prompt") else ""
    return f"{body['size']}x{body['steps']}{cfg}"


def send(url: str, body: dict[str, Any], headers: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """One request; its outcome and timings."""
    begin = time.perf_counter()
    record: dict[str, Any] = {"class": size_class(body), "size": body["size"], "steps": body["steps"]}
    try:
        response = requests.post(
            url + "/v1/images/generations", json=body, headers=headers, timeout=timeout_s
        )
    except requests.RequestException as error:
        return {
            **record,
            "status": "error",
            "error": repr(error)[:200],
            "end_to_end_s": time.perf_counter() - begin,
        }
    record["end_to_end_s"] = round(time.perf_counter() - begin, 4)
    record["status"] = response.status_code
    if response.status_code == 200:
        info = response.json()["rayxdit"]
        timings = info["timings"]
        engine = sum(timings.get(key, 0.0) for key in ("encode_s", "denoise_s", "decode_s"))
        record.update(
            pool=info["pool"],
            service_s=round(engine, 4),
            wait_s=round(record["end_to_end_s"] - engine, 4),  # queueing plus serving overhead
            estimate_s=info.get("estimate_s"),
        )
    else:
        try:
            record["error"] = response.json()["error"].get("code")
        except ValueError:
            record["error"] = response.text[:200]
    return record


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))], 4)


def by_phase(records: list[dict[str, Any]], spans: list[tuple[float, float, float]]) -> list[dict[str, Any]]:
    """Each phase's requests (by arrival), what answered 200 and its latency percentiles."""
    found = []
    for index, (start, end, rate) in enumerate(spans):
        mine = [r for r in records if phase_of(r["arrival_s"], spans) == index]
        latencies = [r["end_to_end_s"] for r in mine if r["status"] == 200]
        found.append(
            {
                "start_s": start,
                "end_s": end,
                "rate_per_s": rate,
                "requests": len(mine),
                "ok": len(latencies),
                "p50_s": percentile(latencies, 0.5),
                "p99_s": percentile(latencies, 0.99),
                "pools": {
                    pool: sum(r.get("pool") == pool for r in mine)
                    for pool in sorted({r["pool"] for r in mine if r.get("pool")})
                },
            }
        )
    return found


def summarize(
    records: list[dict[str, Any]], slo_s: float, wall_s: float, spans: list | None = None
) -> dict[str, Any]:
    ok = [r for r in records if r["status"] == 200]
    classes = sorted({r["class"] for r in records})
    by_class = {}
    for name in classes:
        latencies = [r["end_to_end_s"] for r in ok if r["class"] == name]
        by_class[name] = {
            "requests": sum(r["class"] == name for r in records),
            "ok": len(latencies),
            "p50_s": percentile(latencies, 0.5),
            "p95_s": percentile(latencies, 0.95),
            "p99_s": percentile(latencies, 0.99),
        }
    latencies = [r["end_to_end_s"] for r in ok]
    status: dict[str, int] = {}
    for record in records:
        status[str(record["status"])] = status.get(str(record["status"]), 0) + 1
    return {
        "requests": len(records),
        "status": status,
        "lost": sum(r["status"] not in (200, *DELIBERATE) for r in records),
        "p50_s": percentile(latencies, 0.5),
        "p95_s": percentile(latencies, 0.95),
        "p99_s": percentile(latencies, 0.99),
        "throughput_per_s": round(len(ok) / wall_s, 4),
        "goodput_per_s": round(sum(r["end_to_end_s"] <= slo_s for r in ok) / wall_s, 4),
        "slo_s": slo_s,
        "pools": {
            pool: sum(r.get("pool") == pool for r in ok) for pool in sorted({r.get("pool") for r in ok})
        },
        "by_class": by_class,
        **({"by_phase": by_phase(records, spans)} if spans and len(spans) > 1 else {}),
        "wall_s": round(wall_s, 1),
    }


def run_workload(url: str, workload: dict[str, Any], api_key: str | None, sample=None) -> dict[str, Any]:
    """Send the workload open-loop; the per-request records and their summary (and, with ``sample``, a
    replica-count sample every second)."""
    schedule = arrivals(workload)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout_s = workload["slo_s"] + 120
    samples: list[dict[str, Any]] = []
    done = threading.Event()

    def sampler(start: float) -> None:
        last = None
        while not done.wait(1.0):
            counts = sample()
            at = round(time.perf_counter() - start, 1)
            samples.append({"t_s": at, **counts})
            if counts != last:  # the policy at work, as it happens (a run lasts minutes)
                print(f"  {at:7.1f} s  replicas {counts}", flush=True)
                last = counts

    spans = phases(workload)
    print(
        f"sending {len(schedule)} requests over {spans[-1][1]:.0f} s: "
        + ", ".join(f"{rate:g}/s for {end - start:.0f} s" for start, end, rate in spans),
        flush=True,
    )
    begin = time.perf_counter()
    if sample is not None:
        threading.Thread(target=sampler, args=(begin,), daemon=True).start()

    def timed(at: float, body: dict[str, Any]) -> dict[str, Any]:
        time.sleep(max(0.0, begin + at - time.perf_counter()))
        return {"arrival_s": round(at, 3), **send(url, body, headers, timeout_s)}

    with ThreadPoolExecutor(max_workers=max(8, len(schedule))) as clients:
        records = list(clients.map(lambda item: timed(*item), schedule))
    wall = time.perf_counter() - begin
    done.set()
    summary = summarize(records, workload["slo_s"], wall, spans)
    return {"summary": summary, "requests": records, "replicas": samples}


def replica_counts(app_name: str) -> dict[str, int]:
    from ray import serve

    deployments = serve.status().applications[app_name].deployments
    return {name: status.replica_states.get("RUNNING", 0) for name, status in deployments.items()}


def static_layout(config, layout: str):
    """``config`` with a fixed number of replicas per pool (``POOL=N,...``; pools not named: none) and no
    elastic policy: the static fleet an elastic one is compared with."""
    counts = {}
    for item in layout.split(","):
        name, _, count = item.partition("=")
        counts[name.strip()] = int(count)
    names = {pool.name for pool in config.pools}
    if unknown := set(counts) - names:
        raise SystemExit(
            f"--static-layout names no pool of the config: {sorted(unknown)} (pools: {sorted(names)})"
        )
    pools = []
    for pool in config.pools:
        count = counts.get(pool.name, 0)
        if count == 0:
            continue
        scaling = {**pool.deployment_config.get("autoscaling_config", {}), "min_replicas": count}
        scaling["max_replicas"] = count
        pools.append(
            pool.updated(deployment_config={**pool.deployment_config, "autoscaling_config": scaling})
        )
    return config.model_copy(update={"pools": pools, "elastic": None})


def with_policy_options(config, options: dict[str, Any]):
    """``config`` with ``options`` over its elastic policy's ``policy_options``; a knob the policy does not
    take, or a bad value, fails here with the config's error, not later in Serve's controller."""
    from rayxdit.serve.policies import autoscaling_policy

    if config.elastic is None:
        raise SystemExit("--policy-options: the config has no elastic policy to pass them to")
    merged = {**config.elastic.policy_options, **options}
    autoscaling_policy(config.elastic.policy, merged)
    elastic = config.elastic.model_copy(update={"policy_options": merged})
    return config.model_copy(update={"elastic": elastic})


def run_local(args: argparse.Namespace, workload: dict[str, Any]) -> list[dict[str, Any]]:
    """Deploy ``--config`` on a local Ray instance, elastic then static; a record for each."""
    import ray
    from ray import serve

    from benchmarks import start_local_serve
    from rayxdit.serve.app import APP_NAME, deploy, load_serve_file

    config, _ = load_serve_file(args.config)
    if args.policy_options:
        config = with_policy_options(config, args.policy_options)
    url = start_local_serve(num_gpus=args.logical_gpus)
    results = []
    variants = [("elastic", config)]
    if args.static_layout:
        variants.append((f"static {args.static_layout}", static_layout(config, args.static_layout)))
    elif args.baseline:
        variants.append(("per-pool autoscaling", config.model_copy(update={"elastic": None})))
    try:
        for label, variant in variants:
            print(f"deploying ({label})...", flush=True)
            deploy(variant, logging_config={"log_level": "WARNING"})
            for _ in range(600):
                if requests.get(url + "/readyz", timeout=10).status_code == 200:
                    break
                time.sleep(1)
            result = run_workload(url, workload, None, sample=lambda: replica_counts(APP_NAME))
            results.append({"policy": label, **result})
            print(f"{label}: {json.dumps(result['summary'])}", flush=True)
            serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", type=Path, required=True, help="workload YAML (benchmarks/workloads)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--url", default=None, help="a running deployment (loopback) instead of a local one")
    parser.add_argument("--api-key", default=None, help="bearer key for --url")
    parser.add_argument("--config", type=Path, default=REPO / "serve_configs" / "local-cpu.yaml")
    parser.add_argument(
        "--logical-gpus", type=int, default=None, help="local Ray's GPUs (logical on a CPU box)"
    )
    parser.add_argument(
        "--no-baseline", dest="baseline", action="store_false", help="skip the per-pool autoscaling run"
    )
    parser.add_argument(
        "--static-layout",
        default=None,
        metavar="POOL=N[,POOL=N]",
        help="the baseline run: this fixed layout (replicas per pool, no autoscaling) instead of per-pool "
        "autoscaling",
    )
    parser.add_argument(
        "--policy-options",
        type=json.loads,
        default=None,
        metavar="JSON",
        help="knobs of the elastic policy over the config's elastic.policy_options, e.g. "
        '\'{"peak_window_s": 0, "fall_s": 15}\': a workload whose phases last minutes, not hours, with '
        "the policy's time constants scaled to it",
    )
    args = parser.parse_args(argv)
    if args.url and args.policy_options:
        parser.error("--policy-options applies to the local deployment; a running one has its config's")
    if args.url and not args.url.startswith(("http://127.0.0.1", "http://localhost")):
        parser.error("--url must be loopback: this script generates load, it is not a remote client")
    workload = yaml.safe_load(args.workload.read_text())
    if args.url:
        results = [{"policy": "as deployed", **run_workload(args.url, workload, args.api_key)}]
    else:
        results = run_local(args, workload)
    from benchmarks.bench_flux import device_name, versions

    document = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": device_name(),
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "workload": workload,
        "config": None if args.url else str(args.config),
        "policy_options": args.policy_options,
        "runs": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1))
    lost = sum(run["summary"]["lost"] for run in results)
    for run in results:
        summary = run["summary"]
        print(
            f"{run['policy']}: {summary['requests']} requests {summary['status']}, p50 {summary['p50_s']} s, "
            f"p99 {summary['p99_s']} s, goodput {summary['goodput_per_s']}/s, lost {summary['lost']}"
        )
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
