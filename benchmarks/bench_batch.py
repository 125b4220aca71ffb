"""A batch on the online pools' spare capacity, through real HTTP: does online traffic notice it?

A local Ray instance serves one pool (``--model``, ``--parallel``, ``--replicas`` replicas). The online
requests' service time is measured first (sequential requests, the mix's mean), which gives the pool's
capacity; then two phases of ``--seconds`` each, with Poisson online arrivals at ``--load`` of that
capacity, a mix of three requests in turn (the batch's shape, twice its steps, and with true CFG):

1. ``online alone``: the baseline;
2. ``online + batch``: the same arrivals (same seed) while a batch of ``--batch-lines`` lines (OpenAI's Batch
   API: ``POST /v1/files``, ``POST /v1/batches``; 3 of its lines bad on purpose) runs on the same pool.

Each pair of phases is repeated ``--repeats`` times, alternating (each batch phase starts a new batch of
the same file; all but the last are cancelled after their phase, the last runs to its end). Reported per
phase, as medians of the repeats: online p50/p99 (the bar: p99 with the batch at most 1.1x without), the
pool's busy fraction (GPU-seconds from ``GET /v1/usage`` over replica-seconds), the batch lines finished
during the phase and the lines preempted by online requests. Then the batch runs to its end: its counts, and a few of
its images compared with the same requests sent online (max pixel difference).

    python benchmarks/bench_batch.py --out benchmarks/results/batch-tiny-flux-cpu.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image

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

KEY = "bench-batch-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
P99_BAR = 1.1
BAD_LINES = 3


def app_config(args: argparse.Namespace):
    from rayxdit.config import RouterConfig, ServeConfig

    pool = shared_cpu_pool(args.model, args.parallel, args.replicas)
    return ServeConfig(
        pools=[pool],
        router=RouterConfig(api_keys=[{"key": KEY, "tenant": "ops", "admin": True}]),
        elastic=None,
    )


def send(url: str, body: dict[str, Any]) -> dict[str, Any]:
    began = time.monotonic()
    try:
        response = requests.post(url + "/v1/images/generations", json=body, headers=AUTH, timeout=600)
        status = response.status_code
    except requests.RequestException as error:
        return {"status": f"error {type(error).__name__}", "seconds": time.monotonic() - began}
    record = {"status": status, "seconds": time.monotonic() - began}
    if status == 200:
        record["png"] = response.json()["data"][0]["b64_json"]
    return record


def online_mix(body: dict) -> list[dict]:
    """The online requests, in turn: ``body``, twice its steps, and with true CFG (twice its work)."""
    return [
        body,
        {**body, "steps": 2 * body["steps"]},
        {**body, "negative_prompt": "blurry", "true_cfg_scale": 3.0},
    ]


def open_loop(url: str, bodies: list[dict], rate: float, seconds: float, seed: int) -> list[dict]:
    """Poisson arrivals at ``rate`` per second for ``seconds``, the ``bodies`` in turn."""
    return poisson_arrivals(
        lambda index: send(url, {**bodies[index % len(bodies)], "seed": index}), rate, seconds, seed
    )


def gpu_seconds(url: str) -> float:
    usage = requests.get(url + "/v1/usage", headers=AUTH, timeout=60).json()["tenants"]
    return sum(tenant["gpu_seconds"] for tenant in usage.values())


def batch_input(body: dict, lines: int) -> bytes:
    """``lines`` lines, the first ``BAD_LINES`` of every 60 unusable (not JSON, no custom_id, a size the
    endpoint refuses) up to BAD_LINES in all."""
    out = []
    for index in range(lines - BAD_LINES):
        item = {"custom_id": f"line-{index}", "method": "POST", "url": "/v1/images/generations"}
        out.append(json.dumps({**item, "body": {**body, "prompt": f"batch {index}", "seed": index}}))
    bad = [
        "{not json",
        json.dumps({"method": "POST", "url": "/v1/images/generations", "body": body}),
        json.dumps(
            {
                "custom_id": "odd-size",
                "method": "POST",
                "url": "/v1/images/generations",
                "body": {**body, "size": "37x36"},
            }
        ),
    ]
    for position, line in zip((1, len(out) // 2, len(out)), bad, strict=True):
        out.insert(position, line)
    return "\n".join(out).encode()


def phase(url: str, bodies: list[dict], rate: float, seconds: float, replicas_ranks: int) -> dict[str, Any]:
    before = gpu_seconds(url)
    records = open_loop(url, bodies, rate, seconds, seed=7)
    time.sleep(1.0)  # the last answers' usage reaches the state
    used = gpu_seconds(url) - before
    ok = [r["seconds"] for r in records if r["status"] == 200]
    return {
        "online_requests": len(records),
        "online_ok": len(ok),
        "other": sorted({str(r["status"]) for r in records if r["status"] != 200}),
        "online_p50_s": percentile(ok, 0.5),
        "online_p99_s": percentile(ok, 0.99),
        "busy_fraction": round(used / (replicas_ranks * seconds), 3),
    }


def median_phase(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each number of a phase's repeats, as their median."""
    merged: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and value is not None:
            merged[key] = round(float(np.median([run[key] for run in runs])), 4)
        else:
            merged[key] = sorted({str(item) for run in runs for item in run[key]})
    return merged


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--model", default="tiny-flux", help="the pool's model (a preset or a checkpoint)")
    parser.add_argument("--parallel", default="single", help="each replica's layout")
    parser.add_argument("--replicas", type=int, default=2, help="the pool's replicas")
    parser.add_argument("--size", default="64x64", help="every request's size")
    parser.add_argument("--steps", type=int, default=8, help="every request's steps")
    parser.add_argument("--load", type=float, default=0.5, help="online arrivals, a fraction of capacity")
    parser.add_argument("--seconds", type=float, default=40.0, help="each phase's length")
    parser.add_argument(
        "--repeats", type=int, default=3, help="pairs of phases, alternating; medians reported"
    )
    parser.add_argument("--batch-lines", type=int, default=200, help="the batch's lines (3 of them bad)")
    parser.add_argument("--compare", type=int, default=5, help="batch images checked against online ones")
    parser.add_argument(
        "--batch-timeout", type=float, default=3600.0, help="seconds the batch may take before the run fails"
    )
    args = parser.parse_args(argv)

    import ray

    from rayxdit.config import ParallelConfig
    from rayxdit.serve.app import deploy

    model_name = args.model.rstrip("/").split("/")[-1]
    ranks = ParallelConfig.parse(args.parallel).world_size
    url = start_local_serve()
    body = {"model": model_name, "prompt": "a lighthouse", "size": args.size, "steps": args.steps}
    try:
        deploy(app_config(args), logging_config={"log_level": "WARNING"})
        for _ in range(3):  # warm: the first requests pay the ranks' first forward
            send(url, {**body, "seed": 0})
        mix = online_mix(body)
        service = [
            float(np.median([send(url, {**shape, "seed": index})["seconds"] for index in range(3)]))
            for shape in mix
        ]
        service_s = float(np.mean(service))  # the mix's mean: each shape as often
        capacity = args.replicas / service_s
        rate = args.load * capacity
        print(f"service {service_s:.3f} s; capacity {capacity:.2f}/s; online {rate:.2f}/s", flush=True)
        upload = requests.post(
            url + "/v1/files",
            files={"file": ("batch.jsonl", batch_input(body, args.batch_lines))},
            data={"purpose": "batch"},
            headers=AUTH,
            timeout=60,
        ).json()

        def start_batch() -> dict:
            return requests.post(
                url + "/v1/batches",
                json={
                    "input_file_id": upload["id"],
                    "endpoint": "/v1/images/generations",
                    "completion_window": "24h",
                },
                headers=AUTH,
                timeout=60,
            ).json()

        alone_runs, beside_runs = [], []
        for repeat in range(
            args.repeats
        ):  # alternating, so that a drift of the machine cannot pass for a cost
            alone_runs.append(phase(url, mix, rate, args.seconds, args.replicas * ranks))
            print(f"online alone ({repeat + 1}): {json.dumps(alone_runs[-1])}", flush=True)
            batch = start_batch()
            began = time.monotonic()
            beside = phase(url, mix, rate, args.seconds, args.replicas * ranks)
            during = requests.get(f"{url}/v1/batches/{batch['id']}", headers=AUTH, timeout=60).json()
            beside["batch_lines_done"] = during["request_counts"]["completed"]
            beside["batch_preemptions"] = during["rayxdit"]["preemptions"]
            beside_runs.append(beside)
            print(f"online + batch ({repeat + 1}): {json.dumps(beside)}", flush=True)
            if repeat < args.repeats - 1:  # the next pair starts without it; the last runs to its end
                requests.post(f"{url}/v1/batches/{batch['id']}/cancel", headers=AUTH, timeout=60)
                while requests.get(f"{url}/v1/batches/{batch['id']}", headers=AUTH, timeout=60).json()[
                    "status"
                ] not in ("cancelled", "completed", "failed"):
                    time.sleep(0.5)
        shown = time.monotonic()
        while (done := requests.get(f"{url}/v1/batches/{batch['id']}", headers=AUTH, timeout=60).json())[
            "status"
        ] not in ("completed", "failed", "cancelled"):
            if time.monotonic() - shown > 5:
                shown = time.monotonic()
                print(f"batch {done['status']}: {json.dumps(done['request_counts'])}", flush=True)
            if time.monotonic() - began > args.batch_timeout:
                raise TimeoutError(f"the batch did not end within {args.batch_timeout} s: {done}")
            time.sleep(0.5)
        batch_s = time.monotonic() - began
        outputs = requests.get(f"{url}/v1/files/{done['output_file_id']}/content", headers=AUTH, timeout=600)
        answers = [json.loads(line) for line in outputs.text.splitlines()]
        errors = requests.get(f"{url}/v1/files/{done['error_file_id']}/content", headers=AUTH, timeout=60)
        failed = [json.loads(line) for line in errors.text.splitlines()]
        differences = []
        for answer in answers[:: max(1, len(answers) // max(1, args.compare))][: args.compare]:
            index = int(answer["custom_id"].removeprefix("line-"))
            online = send(url, {**body, "prompt": f"batch {index}", "seed": index})
            batched = answer["response"]["body"]["data"][0]["b64_json"]
            differences.append(int(np.abs(pixels(batched) - pixels(online["png"])).max()))
    finally:  # the instance goes whole: no Serve handle here, nothing a graceful shutdown (~2 s a deployment) saves
        ray.shutdown()
    alone, beside = median_phase(alone_runs), median_phase(beside_runs)
    ratio = beside["online_p99_s"] / alone["online_p99_s"] if alone["online_p99_s"] else None
    document = {
        **cpu_provenance(),
        "workload": {
            "model": args.model,
            "parallel": args.parallel,
            "replicas": args.replicas,
            "size": args.size,
            "steps": args.steps,
            "load": args.load,
            "seconds_per_phase": args.seconds,
            "repeats": args.repeats,
            "batch_lines": args.batch_lines,
            "online_mix": online_mix({"size": args.size, "steps": args.steps}),
        },
        "service_s": round(service_s, 4),
        "online_rate_per_s": round(rate, 3),
        "baseline": "online alone",
        "phases": {"online alone": alone, "online + batch": beside},
        "runs": {"online alone": alone_runs, "online + batch": beside_runs},
        "online_p99_ratio": None if ratio is None else round(ratio, 3),
        "bar": {"online_p99_ratio_at_most": P99_BAR, "met": ratio is not None and ratio <= P99_BAR},
        "batch": {
            "status": done["status"],
            "request_counts": done["request_counts"],
            "preemptions": done["rayxdit"]["preemptions"],
            "seconds_to_complete": round(batch_s, 1),
            "outputs": len(answers),
            "error_lines": len(failed),
            "error_custom_ids": [line["custom_id"] for line in failed],
            "max_pixel_diff_vs_online": differences,
        },
    }
    write_result(args.out, document)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
