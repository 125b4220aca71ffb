"""CPU smoke test of benchmarks/bench_batch.py: a real local Ray instance, the online phases with and
without a batch through real HTTP (OpenAI's Files and Batch APIs), and the JSON the README quotes (the
measured run: benchmarks/results/batch-tiny-flux-cpu.json)."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_batch

pytestmark = pytest.mark.slow


def test_the_batch_benchmark_runs_both_phases_and_the_batch_to_its_end(tmp_path):
    out = tmp_path / "batch.json"
    argv = [
        "--out",
        str(out),
        "--seconds",
        "2",
        "--batch-lines",
        "12",
        "--size",
        "36x36",
        "--steps",
        "2",
        "--repeats",
        "1",
    ]
    argv += ["--batch-timeout", "120"]  # a batch that stops progressing fails the test, never hangs it
    assert bench_batch.main([*argv, "--compare", "2"]) == 0
    document = json.loads(out.read_text())
    assert {"command", "device", "versions", "commit", "baseline", "phases", "bar"} <= document.keys()
    alone, beside = document["phases"]["online alone"], document["phases"]["online + batch"]
    assert (
        alone["online_ok"] == alone["online_requests"] > 0
        and beside["online_ok"] == beside["online_requests"]
    )
    assert alone["busy_fraction"] > 0 and document["online_p99_ratio"] > 0
    batch = document["batch"]
    assert batch["status"] == "completed" and batch["request_counts"] == {
        "total": 12,
        "completed": 9,
        "failed": 3,
    }
    assert batch["outputs"] == 9 and batch["error_custom_ids"] == [None, None, "odd-size"]
    assert batch["max_pixel_diff_vs_online"] and max(batch["max_pixel_diff_vs_online"]) <= 1
