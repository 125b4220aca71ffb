"""CPU smoke test of benchmarks/bench_memory.py on the tiny preset: its phases run and are recorded (no GPU:
no limit applied, offloading's code path with host and device alike), and the offloaded images are the
whole model's. It cannot rot unseen."""

from __future__ import annotations

import json

from benchmarks import bench_memory


def test_bench_memory_runs_its_phases_on_cpu(tmp_path):
    out = tmp_path / "memory.json"
    argv = ["--model", "tiny-flux", "--size", "32", "--steps", "2", "--repeats", "1", "--out", str(out)]
    assert bench_memory.main(argv) == 0
    record = json.loads(out.read_text())
    assert {"command", "device", "versions", "date", "baseline_whole", "offload_limited"} <= record.keys()
    assert record["baseline_whole"]["fits"] and record["offload_limited"]["fits"]
    assert record["whole_limited"] == {"skipped": "no GPU"}
    assert record["max_latent_difference_offload_vs_whole"] == 0.0
