"""Ceilings that explain the Flux numbers: attention kernel throughput at the exact shapes (whole sequence
and ring blocks), a large GEMM, and NCCL bandwidth between the GPUs (all-to-all, point-to-point).

    python benchmarks/gpu_probe.py
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayxdit.parallel.attention import attention_with_lse
from rayxdit.runtime.local import LocalExecutor

HEADS, HEAD_DIM = 24, 128


def timed(fn, repeats: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` measured with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


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
    for full in (4608, 16896):
        for q_len, kv_len in ((full, full), (full // 2, full // 2)):
            q = torch.randn(1, HEADS, q_len, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, HEADS, kv_len, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            flops = 4 * q_len * kv_len * HEAD_DIM * HEADS
            for name, fn in _candidates(q, k, v).items():
                try:
                    ms = timed(fn)
                    print(
                        f"{q_len:>7} x {kv_len:<6} {name:>16} {ms:8.3f} {flops / ms / 1e9:8.0f}", flush=True
                    )
                except Exception as error:  # a kernel that refuses the shape is a finding too
                    print(f"{q_len:>7} x {kv_len:<6} {name:>16} failed: {str(error)[:80]}", flush=True)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = timed(lambda: a @ a)
    print(f"gemm 8192^3 bf16: {ms:.3f} ms, {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s")


def _with(context, q, k, v):
    with context:
        return F.scaled_dot_product_attention(q, k, v)


def _bandwidth(worker) -> list[str] | None:
    import torch.distributed as dist

    rank, world_size = worker.rank, worker.world_size
    device = torch.device(worker.device)
    lines = []
    for tokens in (4608, 16896):
        x = torch.randn(tokens, HEADS * HEAD_DIM, device=device, dtype=torch.bfloat16)
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


def main() -> None:
    print(
        f"torch {torch.__version__} cuda {torch.version.cuda} cudnn {torch.backends.cudnn.version()} "
        f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}; NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}"
    )
    attention_kernels()
    if torch.cuda.device_count() >= 2:
        with LocalExecutor(2, call_timeout_s=300) as executor:
            for line in executor.collective_rpc(_bandwidth)[0]:
                print(line, flush=True)


if __name__ == "__main__":
    main()
