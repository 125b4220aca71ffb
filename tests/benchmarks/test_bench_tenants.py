"""CPU smoke test of benchmarks/bench_tenants.py: a real local Ray instance, the fair-share application
deployed, both tenants' phases through real HTTP, and the JSON the README quotes (the measured run:
benchmarks/results/tenants-tiny-flux-cpu.json)."""

from __future__ import annotations

import json

from benchmarks import bench_tenants


def test_the_tenants_benchmark_runs_every_phase_and_loses_nothing(tmp_path):
    out = tmp_path / "tenants.json"
    argv = ["--out", str(out), "--seconds", "2", "--b-rate", "1", "--concurrency", "2", "--size", "36x36"]
    assert bench_tenants.main([*argv, "--steps", "2", "--policies", "fair_share"]) == 0
    document = json.loads(out.read_text())
    assert {"command", "device", "versions", "commit", "workload", "bars", "runs"} <= document.keys()
    run = document["runs"]["fair_share"]
    assert set(run["phases"]) == {"b alone", "a floods", "both flood"}
    assert run["verdict"]["lost"] == 0
    flooded = run["phases"]["both flood"]
    for tenant in ("a", "b"):
        assert flooded["tenants"][tenant]["ok"] > 0
        # /v1/usage counted what the responses said each tenant used.
        assert abs(flooded["usage_gpu_seconds"][tenant] - flooded["tenants"][tenant]["gpu_seconds"]) < 1e-2
