"""Ceilings that explain the Flux numbers: attention kernel throughput at the exact shapes (whole sequence
and ring blocks), a large GEMM, and NCCL bandwidth between the GPUs (all-to-all, point-to-point); and each
GPU's health as the quarantine reads it from NVML (a healthy GPU must show no fatal fault, or rayxdit would
drain a good node).

    python benchmarks/gpu_probe.py [--out probe.json]
    python benchmarks/gpu_probe.py --small --out /tmp/probe.json      # CPU smoke: tiny shapes, gloo
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rayxdit.parallel.attention import attention_with_lse
from rayxdit.runtime.local import LocalExecutor

HEADS, HEAD_DIM = 24, 128
SEQUENCES = (4608, 16896)  # Flux at 1024px and 2048px, text included
GEMM = 8192
RESULTS: list[dict] = []


def timed(fn, repeats: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` (CUDA events on a GPU, the wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if not torch.cuda.is_available():
            begin = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - begin))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def device_and_dtype() -> tuple[str, torch.dtype]:
    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


def _candidates(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    candidates = {"sdpa-default": lambda: F.scaled_dot_product_attention(q, k, v)}
    for name, backend in (
        ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
        ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
    ):
        candidates[name] = lambda backend=backend: _with(sdpa_kernel([backend]), q, k, v)
    for backend in ("cudnn", "flash", "efficient"):
        candidates[f"lse-{backend}"] = lambda backend=backend: attention_with_lse(q, k, v, None, backend)
    return candidates


def attention_kernels() -> None:
    print(f"{'shape (q x kv)':>16} {'kernel':>16} {'ms':>8} {'TFLOP/s':>8}")
    device, dtype = device_and_dtype()
    for full in SEQUENCES:
        for q_len, kv_len in ((full, full), (full // 2, full // 2)):
            q = torch.randn(1, HEADS, q_len, HEAD_DIM, device=device, dtype=dtype)
            k = torch.randn(1, HEADS, kv_len, HEAD_DIM, device=device, dtype=dtype)
            v = torch.randn_like(k)
            flops = 4 * q_len * kv_len * HEAD_DIM * HEADS
            for name, fn in _candidates(q, k, v).items():
                try:
                    ms = timed(fn)
                    print(
                        f"{q_len:>7} x {kv_len:<6} {name:>16} {ms:8.3f} {flops / ms / 1e9:8.0f}", flush=True
                    )
                    RESULTS.append(
                        {
                            "probe": "attention",
                            "q": q_len,
                            "kv": kv_len,
                            "kernel": name,
                            "ms": round(ms, 4),
                            "tflops": round(flops / ms / 1e9, 1),
                        }
                    )
                except Exception as error:  # a kernel that refuses the shape is a finding too
                    print(f"{q_len:>7} x {kv_len:<6} {name:>16} failed: {str(error)[:80]}", flush=True)
                    RESULTS.append(
                        {
                            "probe": "attention",
                            "q": q_len,
                            "kv": kv_len,
                            "kernel": name,
                            "failed": str(error)[:200],
                        }
                    )
    a = torch.randn(GEMM, GEMM, device=device, dtype=dtype)
    ms = timed(lambda: a @ a)
    print(f"gemm {GEMM}^3 {dtype}: {ms:.3f} ms, {2 * GEMM**3 / ms / 1e9:.0f} TFLOP/s")
    RESULTS.append(
        {"probe": "gemm", "n": GEMM, "ms": round(ms, 4), "tflops": round(2 * GEMM**3 / ms / 1e9, 1)}
    )


def _with(context, q, k, v):
    with context:
        return F.scaled_dot_product_attention(q, k, v)


def _bandwidth(worker, sequences: tuple[int, ...]) -> list[str] | None:
    import torch.distributed as dist

    rank, world_size = worker.rank, worker.world_size
    device = torch.device(worker.device)
    lines = []
    for tokens in sequences:
        x = torch.randn(tokens, HEADS * HEAD_DIM, device=device, dtype=device_and_dtype()[1])
        out = torch.empty_like(x)
        ms = timed(lambda x=x, out=out: dist.all_to_all_single(out, x))
        moved = x.numel() * 2 * (world_size - 1) / world_size
        lines.append(
            f"all_to_all {x.numel() * 2 / 1e6:.0f} MB: {ms:.3f} ms, {moved / ms / 1e6:.0f} GB/s per rank"
        )
        peer = (rank + 1) % world_size
        source = (rank - 1) % world_size

        def exchange(x=x, out=out, peer=peer, source=source):
            for request in dist.batch_isend_irecv(
                [dist.P2POp(dist.isend, x, peer), dist.P2POp(dist.irecv, out, source)]
            ):
                request.wait()

        ms = timed(exchange)
        lines.append(
            f"p2p exchange {x.numel() * 2 / 1e6:.0f} MB: {ms:.3f} ms, {x.numel() * 2 / ms / 1e6:.0f} GB/s each way"
        )
    return lines if rank == 0 else None


def gpu_health() -> None:
    """Each visible GPU's NVML health report and the fatal faults the quarantine would find in it."""
    from rayxdit.runtime.telemetry import _nvml, gpu_health_now
    from rayxdit.serve.quarantine import fatal_gpu_faults

    nvml = _nvml()
    for index in range(max(1, torch.cuda.device_count())):
        report = gpu_health_now(str(index))
        faults = fatal_gpu_faults(report)
        xids = None  # whether this GPU delivers Xid events here (a container may not): the fatal-Xid check
        if nvml is not None:
            try:
                events = nvml.nvmlEventSetCreate()
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, events)
                xids = True
            except Exception as error:
                xids = repr(error)
        print(f"GPU {index} health {report}: fatal faults {faults or 'none'}; Xid events {xids}", flush=True)
        RESULTS.append({"probe": "gpu_health", "report": report, "fatal_faults": faults, "xid_events": xids})


def main(argv: list[str] | None = None) -> int:
    global SEQUENCES, GEMM
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="also write the measurements as JSON")
    args = parser.parse_args(argv)
    if args.small:
        SEQUENCES, GEMM = (96, 160), 256
    RESULTS.clear()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(
        f"torch {torch.__version__} cuda {torch.version.cuda} cudnn {torch.backends.cudnn.version()} "
        f"{torch.cuda.device_count()}x {gpu}; NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}"
    )
    gpu_health()
    attention_kernels()
    if torch.cuda.device_count() >= 2 or not torch.cuda.is_available():  # on CPU: gloo between 2 processes
        with LocalExecutor(2, call_timeout_s=300) as executor:
            for line in executor.collective_rpc(_bandwidth, (SEQUENCES,))[0]:
                print(line, flush=True)
                RESULTS.append({"probe": "collective", "line": line})
    if args.out is not None:
        from bench_flux import device_name, versions

        document = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "device": device_name(),
            "versions": versions(),
            "results": RESULTS,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(document, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
