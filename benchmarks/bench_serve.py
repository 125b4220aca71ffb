"""End to end through Ray Serve on the GPUs: HTTP request -> PNG, against the engine's own time.

Starts a local Ray instance on this machine, deploys one pool (every GPU of a replica in one placement
group), sends a warm-up request (torch.compile runs there), then times requests one after another. Each
response carries the engine's split (text encode, denoise, VAE decode, measured on rank 0); the serving
overhead is what the client waited beyond it (HTTP, router, replica, Ray transfers, PNG encoding).

    python benchmarks/bench_serve.py --model benchmarks.models:FLUX_DEV --parallel ulysses=2 --compile \\
        --out benchmarks/results/serve-flux-dev-2xh200.json
    python benchmarks/bench_serve.py --model tiny-flux --parallel ulysses=2 --accelerator cpu --size 128 \\
        --steps 4 --out /tmp/serve-smoke.json                                                    # CPU smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
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

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from rayxdit.config import PoolConfig, ServeConfig
    from rayxdit.serve.app import APP_NAME, build_app

    pool = PoolConfig(
        name="bench",
        model=args.model,
        parallel=args.parallel,
        accelerator=args.accelerator,
        compile=args.compile,
        cpus_per_rank=0.5,
        request_timeout_s=1800,
    )
    ray.init(include_dashboard=False, logging_level="warning")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 1800})
    begin = time.perf_counter()
    serve.run(build_app(ServeConfig(pools=[pool])), name=APP_NAME, route_prefix="/")
    deploy_s = time.perf_counter() - begin
    url = f"http://127.0.0.1:{port}/v1/generate"
    body = {
        "prompt": "a lighthouse on a cliff at dusk, oil painting",
        "size": f"{args.size}x{args.size}",
        "steps": args.steps,
        "seed": 1,
    }
    print(f"deployed in {deploy_s:.1f} s; warm-up request (compiles)...", flush=True)
    begin = time.perf_counter()
    warm = requests.post(url, json=body, timeout=1800)
    warm.raise_for_status()
    warmup_s = time.perf_counter() - begin
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
                "png_bytes": len(response.content),
            }
        )
        print(json.dumps(runs[-1]), flush=True)
    serve.shutdown()
    ray.shutdown()

    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
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
        "serving_overhead_s": round(median["overhead_s"], 4),
        "serving_overhead_pct": round(100 * median["overhead_s"] / median["end_to_end_s"], 2),
        "pipeline_split_s": {k: median[k] for k in ("encode_s", "denoise_s", "decode_s")},
        "runs": runs,
        "deploy_s": round(deploy_s, 1),
        "warmup_request_s": round(warmup_s, 1),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": device_name(),
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps([record], indent=1))
    print(
        f"end to end {record['seconds']:.3f} s, engine {record['engine_seconds']:.3f} s "
        f"(encode {median['encode_s']:.3f}, denoise {median['denoise_s']:.3f}, decode {median['decode_s']:.3f}), "
        f"serving overhead {record['serving_overhead_s']:.3f} s = {record['serving_overhead_pct']:.1f}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
