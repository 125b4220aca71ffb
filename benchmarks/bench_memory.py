"""Flux.1-dev on a 24 GB budget: one GPU limited to what a 24 GB card has, with the weights offloaded.

Three phases in one process, on one GPU, the whole pipeline (text encoders, transformer, VAE; random bf16
weights of the real architecture, ``benchmarks.models:FLUX_DEV``):

1. ``whole``: the baseline, weights on the GPU, no limit: seconds per image and peak memory;
2. ``whole, limited``: the same under ``--memory-gib`` (``torch.cuda.set_per_process_memory_fraction``):
   it does not fit (the transformer alone is 23.8 GB), recorded as the error it meets;
3. ``offload, limited``: ``EngineConfig(offload=True)`` under the same limit: the weights in host memory,
   each block brought to the GPU just before it runs: seconds per image, peak memory, and whether its images
   equal the baseline's (the same seeds).

Each timed figure is the median of ``--repeats`` requests after one untimed request. On CPU (the smoke test)
the limit is not applied and nothing is offloaded but the code path runs.

    python benchmarks/bench_memory.py --out benchmarks/results/memory-flux-dev-1xh200.json
    python benchmarks/bench_memory.py --model tiny-flux --size 64 --steps 2 --repeats 1 --out /tmp/m.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import write_result
from benchmarks.bench_flux import device_name, gpu_provenance
from rayxdit.config import EngineConfig
from rayxdit.engine import Engine, pick_device
from rayxdit.parallel.mesh import ParallelState
from rayxdit.request import GenerateRequest


def gib(count: int) -> float:
    return round(count / 2**30, 2)


def phase(config: EngineConfig, request: GenerateRequest, repeats: int, device: torch.device) -> dict:
    """Load ``config`` and time ``request``: seconds per image (median), peak memory, the last image's
    latents; or the error met (out of memory) and where."""
    on_gpu = device.type == "cuda"
    gc.collect()  # what an earlier phase left, a failed one's partial model too
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    try:
        engine = Engine(config, ParallelState.single(device))
    except torch.OutOfMemoryError as error:
        return {"fits": False, "failed_at": "load", "error": str(error).splitlines()[0][:300]}
    loaded_s = time.perf_counter() - began
    loaded_peak = torch.cuda.max_memory_allocated(device) if on_gpu else 0
    try:
        engine.generate(request, output="latent")  # untimed: first-call costs
        seconds, latents = [], None
        for _ in range(repeats):
            began = time.perf_counter()
            latents = engine.generate(request, output="latent").latents
            if on_gpu:
                torch.cuda.synchronize(device)
            seconds.append(round(time.perf_counter() - began, 3))
    except torch.OutOfMemoryError as error:
        return {"fits": False, "failed_at": "request", "error": str(error).splitlines()[0][:300]}
    finally:
        del engine
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
    return {
        "fits": True,
        "load_s": round(loaded_s, 2),
        "seconds_per_image": seconds,
        "median_s": round(statistics.median(seconds), 3),
        "peak_gib_after_load": gib(loaded_peak),
        "peak_gib": gib(torch.cuda.max_memory_allocated(device)) if on_gpu else None,
        "latents": latents.float().cpu(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="benchmarks.models:FLUX_DEV", help="model name or preset")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3, help="timed requests per phase (median)")
    parser.add_argument("--memory-gib", type=float, default=24.0, help="the GPU budget of phases 2 and 3")
    parser.add_argument(
        "--phases",
        nargs="+",
        choices=("whole", "limited", "offload"),
        default=["whole", "limited", "offload"],
        help="which phases to run (default: all three)",
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)

    device = pick_device(0)
    request = GenerateRequest(
        prompt="a lighthouse at dusk", height=args.size, width=args.size, steps=args.steps, seed=3
    )
    plain = EngineConfig(model=args.model)
    print(f"{device_name()}: {args.model}, {args.size}px, {args.steps} steps", flush=True)
    skipped = {"skipped": "not asked for (--phases)"}
    whole = phase(plain, request, args.repeats, device) if "whole" in args.phases else skipped
    print(f"whole: { ({k: v for k, v in whole.items() if k != 'latents'}) }", flush=True)
    limit = None
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        limit = min(1.0, args.memory_gib * 2**30 / total)
        torch.cuda.set_per_process_memory_fraction(limit, device)
    limited = {"skipped": "no GPU"} if limit is None else skipped
    if limit is not None and "limited" in args.phases:
        limited = phase(plain, request, args.repeats, device)
    print(f"whole, limited: { ({k: v for k, v in limited.items() if k != 'latents'}) }", flush=True)
    offloaded = skipped
    if "offload" in args.phases:
        offloaded = phase(EngineConfig(model=args.model, offload=True), request, args.repeats, device)
    print(f"offload, limited: { ({k: v for k, v in offloaded.items() if k != 'latents'}) }", flush=True)

    same = None
    if whole.get("fits") and offloaded.get("fits"):
        same = round((whole["latents"] - offloaded["latents"]).abs().max().item(), 6)
    for result in (whole, limited, offloaded):
        result.pop("latents", None)
    record = {
        "benchmark": "memory",
        **gpu_provenance("benchmarks/bench_memory.py", argv),
        "model": args.model,
        "size": args.size,
        "steps": args.steps,
        "repeats": args.repeats,
        "memory_limit_gib": args.memory_gib if limit is not None else None,
        "baseline_whole": whole,
        "whole_limited": limited,
        "offload_limited": offloaded,
        "offload_slowdown": round(offloaded["median_s"] / whole["median_s"], 3)
        if whole.get("fits") and offloaded.get("fits")
        else None,
        "max_latent_difference_offload_vs_whole": same,
    }
    write_result(args.out, record)
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
