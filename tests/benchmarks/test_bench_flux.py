"""CPU smoke tests of the GPU benchmark scripts: bench_flux.py runs every kind of job (single, rayxdit,
step caching at two thresholds; fp8 and diffusers' context parallelism are GPU-only) on the tiny preset and
exits non-zero if any job fails; gpu_probe.py runs its probes at tiny shapes. They cannot rot unseen."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_flux, gpu_probe

pytestmark = pytest.mark.slow


def test_bench_flux_runs_every_job_kind_on_cpu(tmp_path):
    out = tmp_path / "flux.json"
    jobs = [
        "single:single:eager",
        "single:single:eager:cache=0.3/0.9",
        "rayxdit:ulysses=2:eager",
        "rayxdit:ulysses=2:eager:cache=0.9",
    ]  # diffusers' context parallelism needs an accelerator (diffusers 0.42 divides by the device count)
    argv = [
        "--preset",
        "tiny",
        "--steps",
        "6",
        "--resolutions",
        "64",
        "--warmup-steps",
        "1",
        "--repeats",
        "2",
    ]
    assert bench_flux.main([*argv, "--jobs", *jobs, "--out", str(out)]) == 0

    records = json.loads(out.read_text())
    assert len(records) == 1 + 2 + 1 + 1
    for record in records:
        assert {"command", "device", "versions", "date", "seconds", "repeats_s", "rel_err"} <= record.keys()
        assert len(record["repeats_s"]) == 2 and record["seconds"] == pytest.approx(
            sorted(record["repeats_s"])[0] / 2 + sorted(record["repeats_s"])[1] / 2, abs=1e-4
        )
    exact = [r for r in records if not r["cache_threshold"]]
    assert all(r["rel_err"] < 1e-5 for r in exact)  # every exact method equals one GPU
    cached = {r["cache_threshold"]: r for r in records if r["impl"] == "single" and r["cache_threshold"]}
    assert cached[0.9]["cached_steps"] >= cached[0.3]["cached_steps"]


def test_bench_flux_exits_non_zero_when_a_job_fails(tmp_path):
    # ulysses=3 does not divide the tiny model's heads: the job fails in its ranks, the run says so.
    argv = [
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--resolutions",
        "64",
        "--warmup-steps",
        "1",
        "--repeats",
        "1",
    ]
    assert (
        bench_flux.main([*argv, "--jobs", "rayxdit:ulysses=3:eager", "--out", str(tmp_path / "x.json")]) == 1
    )


def test_gpu_probe_runs_at_tiny_shapes(tmp_path):
    out = tmp_path / "probe.json"
    assert gpu_probe.main(["--small", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert {r["probe"] for r in results} == {"attention", "gemm", "collective", "gpu_health"}
    assert [r["fatal_faults"] for r in results if r["probe"] == "gpu_health"] == [[]]
    assert any(r["probe"] == "attention" and "ms" in r for r in results)


def test_the_profile_breakdown_counts_each_kernel_once_and_exposed_time_is_never_negative():
    # Two steps; a GEMM overlapping an all-to-all on another stream, then attention; 10 ms of wall per step.
    kernels = [
        ("nvjet_gemm", 0, 4000),
        ("ncclDevKernel_AllToAll", 1000, 6000),
        ("cudnn_attention", 4000, 7000),
        ("nvjet_gemm", 10000, 14000),
        ("ncclDevKernel_AllToAll", 11000, 16000),
        ("cudnn_attention", 14000, 17000),
    ]
    profile = bench_flux.kernel_breakdown(kernels, wall_ms=20.0, steps=2)
    assert profile["kernel_ms_per_step"] == {"nccl": 5.0, "gemm": 4.0, "attention": 3.0}
    assert profile["compute_ms_per_step"] == 7.0 and profile["exposed_ms_per_step"] == 3.0
    # Compute kernels overlapping each other (two streams) are not counted twice as busy time.
    overlapped = bench_flux.kernel_breakdown([("gemm", 0, 8000), ("gemm", 0, 8000)], wall_ms=8.0, steps=1)
    assert overlapped["compute_ms_per_step"] == 8.0 and overlapped["exposed_ms_per_step"] == 0.0
