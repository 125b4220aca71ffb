"""End to end through Ray Serve on the GPUs: HTTP request -> PNG, against the engine's own time.

Starts a local Ray instance on this machine, deploys one pool (every GPU of a replica in one placement
group), sends a warm-up request (torch.compile runs there), then times requests one after another. Each
response carries the engine's split (text encode, denoise, VAE decode, measured on rank 0); the serving
overhead is what the client waited beyond it (HTTP, router, replica, Ray transfers, PNG encoding).

    python benchmarks/bench_serve.py --model benchmarks.models:FLUX_DEV --parallel ulysses=2 --compile \\
        --out benchmarks/results/serve-flux-dev-2xh200.json
    python benchmarks/bench_serve.py --model tiny-flux --parallel ulysses=2 --accelerator cpu --size 128 \\
        --steps 4 --out /tmp/serve-smoke.json                                                    # CPU smoke
    python benchmarks/bench_serve.py --parallel ulysses=1 --compile --metrics-ab --requests 4 \\
        --out benchmarks/results/serve-flux-dev-1xh200.json          # one GPU: NVML, GPU-seconds, metrics cost
    python benchmarks/bench_serve.py --parallel ulysses=1 --compile --restarts 3 --requests 3 \\
        --out benchmarks/results/serve-restart-flux-dev-1xh200.json   # a replica restarted on a warm node
    python benchmarks/bench_serve.py --parallel ulysses=1 --compile --requests 3 --stream-ab 4 \\
        --out benchmarks/results/serve-stream-flux-dev-1xh200.json    # what 3 streamed previews cost

With ``--restarts N`` the pool warms its size up as part of its start (``warmup_sizes``: torch.compile runs
before the replica reports ready), and after the timed requests the replica is killed N times: each time Serve starts a new one on the same
node. The record holds every start's stage timeline (cold: the first on this node; warm: the restarts), the
seconds from each kill until the new replica answers, and the first request after each restart against the
steady requests (equal: it compiled nothing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_flux import device_name, versions  # noqa: E402

from benchmarks.models import FLUX_DEV_RANDOM  # noqa: E402


def free_port() -> int:
    import socket

    """A port that was free a moment ago, for servers the tests start (Ray, Serve HTTP): drawn below Linux's
    ephemeral range (32768+, where every outgoing connection, Ray's many among them, takes its local port:
    one did take a port picked there before Serve bound it) and above Ray's worker ports (10002-19999)."""
    import random

    while True:
        port = random.randint(20000, 32767)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=FLUX_DEV_RANDOM)
    parser.add_argument("--parallel", default="ulysses=2")
    parser.add_argument("--accelerator", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--requests", type=int, default=5, help="timed requests per phase (median)")
    parser.add_argument(
        "--metrics-ab",
        action="store_true",
        help="also serve with RAYXDIT_METRICS=0 (no rayxdit metrics, no NVML sampling), alternating phases, "
        "and report what the metrics cost end to end",
    )
    parser.add_argument(
        "--ab-rounds",
        type=int,
        default=2,
        help="with --metrics-ab: off/on phase pairs (default: %(default)s)",
    )
    parser.add_argument(
        "--restarts",
        type=int,
        default=0,
        help="warm the size up at start, then kill the replica this many times and time each restart on "
        "this (warm) node (median reported; default: %(default)s)",
    )
    parser.add_argument(
        "--cold-cache",
        action="store_true",
        help="with --restarts: empty this node's compile caches (inductor, Triton) and host copies of weights "
        "before each restart, as on a node the replica never ran on; restarts alternate between the cluster's "
        "compile-artifact store emptied too (compile from scratch) and kept (compile from the artifacts)",
    )
    parser.add_argument(
        "--host-copy-ab",
        action="store_true",
        help="with --restarts on a warm node: restarts alternate between the node's host copy of the weights "
        "kept (the weights from it) and emptied (read from the checkpoint, as without one), the copy's gain "
        "measured in one run; meaningful for a model read from a directory (a recipe's weights are drawn)",
    )
    parser.add_argument(
        "--stream-ab",
        type=int,
        default=0,
        metavar="PAIRS",
        help="also time this many pairs of the same request unstreamed and streamed with --partial-images "
        "previews (POST /v1/images/generations, b64_json; order alternating within pairs) in the last phase, "
        "and report what streaming costs (default: %(default)s)",
    )
    parser.add_argument(
        "--partial-images", type=int, default=3, help="with --stream-ab (default: %(default)s)"
    )
    parser.add_argument(
        "--offload", action="store_true", help="the pool keeps its weights in host memory (offload)"
    )
    parser.add_argument(
        "--memory-gib", type=float, default=None, help="cap each rank's GPU memory (the pool's memory_gib)"
    )
    parser.add_argument(
        "--memory-check",
        metavar="SIZExN",
        default=None,
        help="in the last phase, first a request of SIZE px square x N images the ranks cannot hold (before "
        "any is measured: its out-of-memory answer), then after the timed requests the pool's declared memory "
        "(GET /v1/models), a request of SIZE x 1 and the first again (each answered or refused as measured), "
        "and one more of --size: still served",
    )
    parser.add_argument(
        "--runtime-env",
        action="store_true",
        help="give the deployment its environment as a job runtime_env (as `rayxdit serve` on a cluster "
        "joined with --address), not in this process's environment, which the Ray it starts inherits (as "
        "`rayxdit serve` starting its own Ray): Ray then starts every worker (replicas, ranks) through its "
        "runtime-environment agent",
    )
    parser.add_argument(
        "--no-worker-preload",
        dest="worker_preload",
        action="store_false",
        help="Ray's workers import nothing ahead (by default they import Serve's replica module as they start, "
        "as in a Ray that `rayxdit serve` starts: config.SERVING_WORKER_PRELOAD)",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from rayxdit.config import PoolConfig

    pool = PoolConfig(
        name="bench",
        model=args.model,
        parallel=args.parallel,
        accelerator=args.accelerator,
        compile=args.compile,
        cpus_per_rank=0.5,
        request_timeout_s=1800,
        warmup_sizes=[f"{args.size}x{args.size}"] if args.restarts else [],
        offload=args.offload,
        memory_gib=args.memory_gib,
    )
    # Off, on, off, on: a drift over the run (clocks, heat) cannot pass for the metrics' cost.
    order = [False, True] * args.ab_rounds if args.metrics_ab else [True]
    # The streaming pairs and the restarts run once, in the last phase (the one whose record is kept).
    environ = dict(os.environ)  # the phases set variables for the Ray they start; the caller's come back
    try:
        phases = [
            serve_phase(pool, args, metrics_on, last=index == len(order) - 1)
            for index, metrics_on in enumerate(order)
        ]
    finally:
        leave_no_ray_behind()
        os.environ.clear()
        os.environ.update(environ)
    on = [run for phase in phases if phase["metrics"] for run in phase["runs"]]
    off = [run for phase in phases if not phase["metrics"] for run in phase["runs"]]
    median = {key: statistics.median(run[key] for run in on) for key in on[0]}
    record = {
        "impl": "rayxdit-serve",
        "config": args.parallel,
        "gpus": pool.ranks if args.accelerator == "gpu" else 0,
        "resolution": args.size,
        "steps": args.steps,
        "cfg": False,
        "compile": args.compile,
        "model": args.model,
        "seconds": median["end_to_end_s"],
        "engine_seconds": median["engine_s"],
        "gpu_seconds_per_request": median["gpu_seconds"],
        "serving_overhead_s": round(median["overhead_s"], 4),
        "serving_overhead_pct": round(100 * median["overhead_s"] / median["end_to_end_s"], 2),
        "pipeline_split_s": {k: median[k] for k in ("encode_s", "denoise_s", "decode_s")},
        "peak_memory_gib": median.get("peak_memory_gib"),
        "phases": phases,
        "worker_preload": args.worker_preload,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": device_name(),
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    restart = phases[-1].get("restart")
    if restart:
        record["restart"] = restart
    memory = phases[-1].get("memory")
    if memory:
        record["memory_check"] = memory
        print("memory check: " + json.dumps(memory))
    stream = phases[-1].get("stream")
    if stream:
        record["stream_overhead"] = stream
    if off:
        record["metrics_overhead"] = metrics_overhead(phases)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps([record], indent=1))
    print(
        f"end to end {record['seconds']:.3f} s, engine {record['engine_seconds']:.3f} s "
        f"(encode {median['encode_s']:.3f}, denoise {median['denoise_s']:.3f}, decode {median['decode_s']:.3f}), "
        f"serving overhead {record['serving_overhead_s']:.3f} s = {record['serving_overhead_pct']:.1f}%, "
        f"{record['gpu_seconds_per_request']:.3f} GPU-seconds per request"
        + (f"; metrics cost {record['metrics_overhead']['pct']:+.2f}%" if off else "")
    )
    if stream:
        print(
            f"streaming {stream['partial_images']} previews: {stream['streamed_s']:.3f} s vs "
            f"{stream['unstreamed_s']:.3f} s unstreamed ({stream['pct']:+.2f}%), first preview after "
            f"{stream['first_partial_s']:.3f} s"
        )
    if restart:
        print(
            f"restart (median of {len(restart['restarts'])}): ready {restart['kill_to_ready_s']:.1f} s after the "
            f"kill, replica start {restart['warm_start_s']:.1f} s (cold {restart['cold']['timeline']['total']:.1f}"
            f" s); first request after it {restart['first_request_s']:.2f} s vs {restart['steady_request_s']:.2f}"
            f" s steady"
        )
    return 0


def metrics_overhead(phases: list[dict]) -> dict:
    """What rayxdit's metrics cost a request end to end: the median of the metrics-on phases' requests against
    the median of the metrics-off ones (``RAYXDIT_METRICS=0``)."""
    on = [run["end_to_end_s"] for phase in phases if phase["metrics"] for run in phase["runs"]]
    off = [run["end_to_end_s"] for phase in phases if not phase["metrics"] for run in phase["runs"]]
    seconds_on, seconds_off = statistics.median(on), statistics.median(off)
    return {
        "end_to_end_s_metrics_off": seconds_off,
        "end_to_end_s_metrics_on": seconds_on,
        "pct": round(100 * (seconds_on - seconds_off) / seconds_off, 3),
        "method": f"medians of {len(on)} requests with metrics and {len(off)} without "
        f"(RAYXDIT_METRICS=0), {len(phases)} phases alternating off/on, each a fresh deployment",
    }


def leave_no_ray_behind() -> None:
    """After a phase that failed midway: its Serve and Ray instance go, so that the next user of this
    process (another benchmark, the next test module) can start its own."""
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def serve_phase(pool, args: argparse.Namespace, metrics_on: bool, last: bool) -> dict:
    """A fresh Ray instance and deployment; a warm-up request (torch.compile runs there), then
    ``args.requests`` timed ones, with NVML sampled meanwhile and Ray's exported metrics scraped after; in
    the ``last`` phase then ``args.stream_ab`` streaming pairs and ``args.restarts`` replica restarts,
    timed."""
    restarts = args.restarts if last else 0
    import ray
    from ray import serve

    from rayxdit.config import WORKER_PRELOAD_VARIABLE, ServeConfig, worker_preload_env
    from rayxdit.runtime.ray_start import init_ray
    from rayxdit.runtime.telemetry import sample_gpu
    from rayxdit.serve.app import APP_NAME, build_app

    env = {"RAYXDIT_METRICS": "1" if metrics_on else "0"}
    if not args.runtime_env:  # as `rayxdit serve` starting its own Ray: every Ray worker inherits it
        os.environ.update(env)
    metrics_port = free_port()
    if restarts:  # Serve's actors record no task events unless asked (read by its controller at import)
        os.environ["RAY_SERVE_ENABLE_TASK_EVENTS"] = "1"
    if args.worker_preload:  # as `rayxdit serve` starting its own Ray
        os.environ.update(worker_preload_env())
    else:
        os.environ.pop(WORKER_PRELOAD_VARIABLE, None)
    init_ray(
        include_dashboard=bool(restarts),  # the restarts read Ray's task events through its state API
        logging_level="warning",
        runtime_env={"env_vars": env} if args.runtime_env else None,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 2000},
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 1800})
    begin = time.perf_counter()
    serve.run(build_app(ServeConfig(pools=[pool], elastic=None)), name=APP_NAME, route_prefix="/")
    deploy_s = time.perf_counter() - begin
    url = f"http://127.0.0.1:{port}/v1/generate"
    body = {
        "prompt": "a lighthouse on a cliff at dusk, oil painting",
        "size": f"{args.size}x{args.size}",
        "steps": args.steps,
        "seed": 1,
    }
    print(f"metrics {'on' if metrics_on else 'off'}: deployed in {deploy_s:.1f} s; warm-up...", flush=True)
    oversized = parse_oversized(args.memory_check) if args.memory_check and last else None
    memory = {"first": answer_of(port, body, *oversized, seed=50)} if oversized else None
    begin = time.perf_counter()
    requests.post(url, json=body, timeout=1800).raise_for_status()
    warmup_s = time.perf_counter() - begin
    gpus = [str(index) for index in range(pool.ranks)] if args.accelerator == "gpu" else []
    sampler = NvmlSampler(gpus, sample_gpu)
    runs = []
    for index in range(args.requests):
        begin = time.perf_counter()
        response = requests.post(url, json={**body, "seed": 2 + index}, timeout=1800)
        end_to_end = time.perf_counter() - begin
        response.raise_for_status()
        assert response.headers["content-type"] == "image/png" and response.content[:4] == b"\x89PNG"
        timings = json.loads(response.headers["X-Rayxdit-Timings"])
        engine = timings["encode_s"] + timings["denoise_s"] + timings["decode_s"]
        runs.append(
            {
                "end_to_end_s": round(end_to_end, 4),
                "engine_s": round(engine, 4),
                "encode_s": round(timings["encode_s"], 4),
                "denoise_s": round(timings["denoise_s"], 4),
                "decode_s": round(timings["decode_s"], 4),
                "overhead_s": round(end_to_end - engine, 4),
                "gpu_seconds": float(response.headers["X-Rayxdit-Gpu-Seconds"]),
                "png_bytes": len(response.content),
                **({"peak_memory_gib": timings["peak_memory_gib"]} if "peak_memory_gib" in timings else {}),
            }
        )
        print(json.dumps(runs[-1]), flush=True)
    nvml = sampler.stop()
    made = args.requests + 1 + (memory["first"]["n"] if memory and memory["first"]["status"] == 200 else 0)
    exported = scrape_rayxdit(metrics_port, images=made) if metrics_on else {}
    stream = (
        stream_phase(port, body, args.stream_ab, args.partial_images) if args.stream_ab and last else None
    )
    if memory is not None:
        memory.update(memory_phase(port, body, *oversized))
    restart = (
        restart_phase(pool, port, body, runs, restarts, args.cold_cache, args.host_copy_ab)
        if restarts
        else None
    )
    # The phase's Ray instance goes whole (the GPUs' memory with its processes): Serve's graceful shutdown
    # would only wait on every replica first (7 s on 2 cores).
    ray.shutdown()
    return {
        "metrics": metrics_on,
        "deploy_s": round(deploy_s, 1),
        "warmup_request_s": round(warmup_s, 1),
        "runs": runs,
        "nvml_during_requests": nvml,
        "exported_metrics": exported,
        **({"restart": restart} if restart else {}),
        **({"stream": stream} if stream else {}),
        **({"memory": memory} if memory else {}),
    }


def parse_oversized(spec: str) -> tuple[int, int]:
    """``--memory-check``'s ``SIZExN``."""
    side, _, images = spec.lower().partition("x")
    return int(side), int(images or 1)


CHECK_STEPS = 4
"""Steps of ``--memory-check``'s large requests: their memory is the same at any step count."""


def answer_of(port: int, body: dict, side: int, images: int, seed: int, steps: int = CHECK_STEPS) -> dict:
    """One request of ``side`` px square x ``images`` through ``/v1/images/generations``: its status, error
    code, and how long the answer took."""
    request = {**body, "size": f"{side}x{side}", "n": images, "seed": seed, "steps": steps}
    begin = time.perf_counter()
    response = requests.post(f"http://127.0.0.1:{port}/v1/images/generations", json=request, timeout=1800)
    answer = {
        "size": request["size"],
        "n": images,
        "status": response.status_code,
        "seconds": round(time.perf_counter() - begin, 3),
    }
    if response.status_code != 200:
        error = response.json()["error"]
        answer.update(code=error.get("code"), message=error["message"][:400])
    print(json.dumps(answer), flush=True)
    return answer


def memory_phase(port: int, body: dict, side: int, images: int) -> dict:
    """After the timed requests (the pool has measured its memory): what ``GET /v1/models`` declares, then a
    request of ``side`` x 1, the first oversized request again, and one of the body's size (served: the
    group survived every refusal and the out-of-memory answer)."""
    listed = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=60).json()["data"]
    declared = [pool["memory"] for model in listed for pool in model["pools"]]
    width = int(body["size"].split("x")[0])
    return {
        "declared": declared,
        "single": answer_of(port, body, side, 1, seed=51),
        "again": answer_of(port, body, side, images, seed=52),
        "after": answer_of(port, body, width, 1, seed=53, steps=body["steps"]),
    }


def stream_phase(port: int, body: dict, pairs: int, partial_images: int) -> dict:
    """``pairs`` pairs of one request through ``/v1/images/generations``, unstreamed and streamed with
    ``partial_images`` previews (seeds alike within a pair; the order alternates, so that a drift cannot pass
    for the cost): the medians of each, the cost in percent, and when the first preview arrived."""
    url = f"http://127.0.0.1:{port}/v1/images/generations"
    unstreamed, streamed, first_partial, partials = [], [], [], []
    for index in range(pairs):
        request = {**body, "seed": 500 + index, "response_format": "b64_json"}
        for streaming in (index % 2 == 1, index % 2 == 0):
            begin = time.perf_counter()
            if not streaming:
                response = requests.post(url, json=request, timeout=1800)
                response.raise_for_status()
                assert response.json()["data"][0]["b64_json"]
                unstreamed.append(time.perf_counter() - begin)
                continue
            events = []
            streamed_body = {**request, "stream": True, "partial_images": partial_images}
            with requests.post(url, json=streamed_body, timeout=1800, stream=True) as response:
                response.raise_for_status()
                # Large reads: a preview's line is megabytes, and iter_lines joins its default 512-byte
                # reads one by one (quadratic: ~10 s per 4 MB line, seen on the H200 host).
                for line in response.iter_lines(chunk_size=1 << 20):
                    if line.startswith(b"data: "):
                        events.append((time.perf_counter() - begin, json.loads(line[6:])["type"]))
            streamed.append(time.perf_counter() - begin)
            kinds = [kind for _, kind in events]
            assert kinds[-1] == "image_generation.completed", kinds
            partials.append(len(kinds) - 1)
            first_partial.append(events[0][0])
        print(
            f"stream pair {index + 1}: {unstreamed[-1]:.3f} s unstreamed, {streamed[-1]:.3f} s streamed",
            flush=True,
        )
    unstreamed_s, streamed_s = statistics.median(unstreamed), statistics.median(streamed)
    return {
        "partial_images": partial_images,
        "partials_received": partials,
        "unstreamed_s": round(unstreamed_s, 4),
        "streamed_s": round(streamed_s, 4),
        "pct": round(100 * (streamed_s - unstreamed_s) / unstreamed_s, 3),
        "first_partial_s": round(statistics.median(first_partial), 4),
        "method": f"medians of {pairs} unstreamed and {pairs} streamed requests (b64_json), pairs alternating "
        "which goes first, one deployment, after its warm-up",
    }


def restart_phase(
    pool, port: int, body: dict, runs: list[dict], restarts: int, cold_cache: bool, host_copy_ab: bool = False
) -> dict:
    """Kill the pool's replica ``restarts`` times; each time Serve starts a new one on the same node (the
    inductor cache, the page cache and the node's host copy of the weights warm, unless ``cold_cache``; with
    ``host_copy_ab`` every other restart finds the host copy gone). Times each kill until the new replica
    answers (Serve routes to a replica only once its start, warm-up included, is done), then one request."""
    from ray import serve

    from rayxdit.models.host_copy import existing_copies, remove_copies, wait_for_writes
    from rayxdit.serve.app import APP_NAME

    # One handle (one Serve router in this process), shut down at the end: left running, it would start Ray
    # again after the phase's instance went.
    startup = serve.get_deployment_handle(pool.name, app_name=APP_NAME).options(method_name="startup")
    cold = startup.remote().result()
    each: list[dict] = []
    for index in range(restarts):
        mode = "warm node"
        if host_copy_ab:
            mode = "warm node, no host copy" if index % 2 == 1 else "warm node, host copy"
        if cold_cache:
            from_artifacts = index % 2 == 1
            mode = "cold cache, artifacts" if from_artifacts else "cold cache, no artifacts"
        wait_for_writes()  # a copy written in this process (a CPU run's local ranks) is whole or absent
        if cold_cache or mode == "warm node, no host copy":
            remove_copies()
        elif host_copy_ab:  # the replica before wrote it in the background: wait until it is whole
            deadline = time.perf_counter() + 300
            while not existing_copies() and time.perf_counter() < deadline:
                time.sleep(0.5)
        if cold_cache:
            dirs = cold.get("compile", {}).get("cache", {}).get("dirs", [])  # none without compile
            empty_compile_caches(dirs, keep_artifact_store=from_artifacts)
        begin = time.perf_counter()
        killed = kill_replica(pool.name)
        # The handle holds the call until a replica runs. The kill takes a moment: until it lands the killed
        # replica may still answer (seen on 2 cores), and a call sent before Serve saw it die fails: again.
        while True:
            try:
                started = startup.remote().result(timeout_s=1800)
                if started["replica"] != killed:
                    break
            except Exception:  # the killed replica's, until Serve has noticed
                pass
            if time.perf_counter() - begin > 1800:
                raise TimeoutError(f"no replica of {pool.name} replaced {killed} within 1800 s")
            time.sleep(0.2)
        kill_to_ready = round(time.perf_counter() - begin, 2)
        ready_at_ms = time.time() * 1000
        assert requests.get(f"http://127.0.0.1:{port}/readyz", timeout=30).status_code == 200
        begin = time.perf_counter()
        url = f"http://127.0.0.1:{port}/v1/generate"
        requests.post(url, json={**body, "seed": 100 + index}, timeout=1800).raise_for_status()
        each.append(
            {
                "mode": mode,
                "kill_to_ready_s": kill_to_ready,
                "first_request_s": round(time.perf_counter() - begin, 3),
                "weights_from": "host copy" if "host_copy" in started["weights"] else "checkpoint or built",
                **started,
                "serve": serve_side_start_or_why_not(pool.name, started["replica"], ready_at_ms),
            }
        )
        print(f"restart {index + 1} ({mode}): ready after {kill_to_ready} s, {each[-1]}", flush=True)
    startup.shutdown()
    by_mode = {
        mode: {
            "kill_to_ready_s": statistics.median(r["kill_to_ready_s"] for r in runs_of_mode),
            "serve_start_to_ready_s": statistics.median(
                [r["serve"]["created_to_ready_s"] for r in runs_of_mode if "created_to_ready_s" in r["serve"]]
                or [None]
            ),
            "start_s": statistics.median(r["timeline"]["total"] for r in runs_of_mode),
            "warm_up_s": statistics.median(r["timeline"]["warm_up"] for r in runs_of_mode),
            "first_request_s": statistics.median(r["first_request_s"] for r in runs_of_mode),
            "restarts": len(runs_of_mode),
        }
        for mode in dict.fromkeys(r["mode"] for r in each)
        if (runs_of_mode := [r for r in each if r["mode"] == mode])
    }
    return {
        "kill_to_ready_s": statistics.median(r["kill_to_ready_s"] for r in each),
        # Serve's start of the replica (its actor created) until the client's call reached the new replica
        "serve_start_to_ready_s": statistics.median(
            [r["serve"]["created_to_ready_s"] for r in each if "created_to_ready_s" in r["serve"]] or [None]
        ),
        "warm_start_s": statistics.median(r["timeline"]["total"] for r in each),
        "first_request_s": statistics.median(r["first_request_s"] for r in each),
        "steady_request_s": statistics.median(run["end_to_end_s"] for run in runs),
        "by_mode": by_mode,
        "cold": cold,
        "restarts": each,
    }


def serve_side_start_or_why_not(deployment: str, replica: str, ready_at_ms: float) -> dict:
    """:func:`serve_side_start`, or why Ray's state API could not tell (the restart's own timings stand)."""
    try:
        return serve_side_start(deployment, replica, ready_at_ms)
    except Exception as error:
        return {"error": repr(error)}


def serve_side_start(deployment: str, replica: str, ready_at_ms: float) -> dict:
    """What Ray's task events say about a replica's start around its own timeline: when Serve created its
    actor, when that actor's worker ran its constructor (a Ray worker process started and the deployment's
    module imported in between) and when its rank actors' workers ran theirs; ``ready_at_ms``: when the
    client's call first reached the new replica. Seconds from the actor's creation."""
    from ray.util.state import list_tasks

    actor_id = replica_actor(deployment, replica)[0]._actor_id.hex()

    def creation(task) -> dict[str, float]:
        return {event["state"]: event["created_ms"] for event in task.events}

    # Task events reach the state API within a second or so of happening
    deadline = time.monotonic() + 30
    while True:
        (task,) = list_tasks(
            filters=[("actor_id", "=", actor_id), ("type", "=", "ACTOR_CREATION_TASK")], detail=True
        ) or [None]
        if task is not None and "FINISHED" in creation(task):
            break
        if time.monotonic() > deadline:
            return {"error": "no creation task events for the replica's actor within 30 s"}
        time.sleep(0.5)
    events = creation(task)
    created = events["PENDING_ARGS_AVAIL"]
    # The deployment's own constructor runs in the replica's first call, after Serve's actor is up
    (initialize,) = [
        creation(call)
        for call in list_tasks(filters=[("actor_id", "=", actor_id)], detail=True)
        if call.name.endswith("initialize_and_get_metadata")
    ] or [{}]

    def rank_creations() -> list[dict[str, float]]:
        return [
            creation(rank)
            for rank in list_tasks(filters=[("type", "=", "ACTOR_CREATION_TASK")], detail=True, limit=10_000)
            if rank.name.endswith(("ForkedRank.__init__", "RankWorker.__init__"))
            and rank.creation_time_ms >= created
        ]

    # A worker's events reach the state API in batches: one rank's RUNNING was seen to arrive after its
    # FINISHED (a 2-core machine, 2026-12-04). Wait a little for every rank's pair.
    deadline = time.monotonic() + 10
    ranks = rank_creations()
    while not all({"RUNNING", "FINISHED"} <= rank.keys() for rank in ranks) and time.monotonic() < deadline:
        time.sleep(0.5)
        ranks = rank_creations()
    since = lambda ms: round((ms - created) / 1000, 3) if ms else None  # noqa: E731
    return {
        "placed_s": since(events.get("PENDING_NODE_ASSIGNMENT", created)),
        "actor_running_s": since(events["RUNNING"]),  # a worker process started for Serve's replica actor
        "actor_ready_s": since(events["FINISHED"]),  # its constructor: the deployment's module imported
        "constructor_running_s": since(initialize.get("RUNNING")),  # the controller asked it to initialize
        "constructor_done_s": since(initialize.get("FINISHED")),
        "rank_actors_running_s": [since(rank.get("RUNNING")) for rank in ranks],
        "rank_actors_ready_s": [since(rank.get("FINISHED")) for rank in ranks],  # forked by then
        "created_to_ready_s": since(ready_at_ms),  # the client's call reached the new replica
    }


def empty_compile_caches(dirs: list[str], keep_artifact_store: bool) -> None:
    """This node's compile caches (``dirs``: inductor's and Triton's, as the replica reported them)
    emptied, as on a node the replica never ran on; the cluster's compile-artifact store too unless
    ``keep_artifact_store``."""
    import contextlib
    import shutil

    import ray

    from rayxdit.runtime.compile_artifacts import STORE_NAME, STORE_NAMESPACE

    for path in dirs:
        shutil.rmtree(path, ignore_errors=True)
    if not keep_artifact_store:
        with contextlib.suppress(ValueError):  # none yet
            ray.kill(ray.get_actor(STORE_NAME, namespace=STORE_NAMESPACE))


def kill_replica(deployment: str) -> str:
    """Kill the one running replica of ``deployment`` (its rank actors die with it, their owner); its id."""
    import ray

    actor, tag = replica_actor(deployment)
    ray.kill(actor, no_restart=True)
    return tag


def replica_actor(deployment: str, tag: str | None = None) -> tuple:
    """The actor of the one running replica of ``deployment`` (of id ``tag`` where given) and its id."""
    import ray

    (replica,) = [
        actor
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith("SERVE_REPLICA::")
        and f"#{deployment}#" in actor["name"]
        and (tag is None or actor["name"].endswith(f"#{tag}"))
    ]
    return ray.get_actor(replica["name"], namespace=replica["namespace"]), replica["name"].rsplit("#", 1)[-1]


class NvmlSampler:
    """The driver's own NVML view of the pool's GPUs while requests run (median and max per field)."""

    def __init__(self, gpus: list[str], sample, period_s: float = 0.5):
        import threading

        self.gpus, self.sample, self.period_s = gpus, sample, period_s
        self.samples: dict[str, list[dict[str, float]]] = {gpu: [] for gpu in gpus}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(self.period_s):
            for gpu in self.gpus:
                self.samples[gpu].append(self.sample(gpu))

    def stop(self) -> dict[str, dict[str, dict[str, float]]]:
        self.stopped.set()
        self.thread.join()
        summary = {}
        for gpu, samples in self.samples.items():
            fields = sorted({name for sample in samples for name in sample})
            summary[gpu] = {
                name.removeprefix("rayxdit_gpu_"): {
                    "median": statistics.median(values),
                    "max": max(values),
                    "samples": len(values),
                }
                for name in fields
                if (values := [sample[name] for sample in samples if name in sample])
            }
        return summary


def scrape_rayxdit(port: int, images: int, wait_s: float = 60.0) -> dict[str, float]:
    """Ray's Prometheus endpoint after the requests: every rayxdit series summed by sample name (GPU gauges
    from the ranks, request counters, GPU-seconds), once all ``images`` are counted (exports lag)."""
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + wait_s
    totals: dict[str, float] = {}
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        totals = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("ray_rayxdit_"):
                    totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        if totals.get("ray_rayxdit_images_total", 0) >= images:
            break
        time.sleep(2)
    return {name: round(value, 4) for name, value in sorted(totals.items())}


if __name__ == "__main__":
    sys.exit(main())
