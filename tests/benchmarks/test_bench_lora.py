"""CPU smoke test of benchmarks/bench_lora.py on the tiny preset: every measurement runs and is recorded, the
swaps come from host memory where they should, nothing recompiles (eager: nothing compiles at all) and the
plain weights are exact after the swaps. It cannot rot unseen."""

from __future__ import annotations

import json

from benchmarks import bench_lora


def test_bench_lora_measures_every_cost_on_cpu(tmp_path):
    out = tmp_path / "lora.json"
    argv = ["--model", "tiny-flux", "--size", "32", "--steps", "2", "--rank", "4", "--no-compile"]
    assert bench_lora.main([*argv, "--repeats", "2", "--swaps", "3", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert {"command", "device", "versions", "date", "baseline_plain_request_s"} <= record.keys()
    assert len(record["plain_request_s"]) == 2 and len(record["resident_adapter_request_s"]) == 2
    assert len(record["swap_s"]) == 3 and record["host_loads_from_host_memory"] == 3
    assert record["base_weights_exact_after_swaps"] and not record["recompiled"]
    assert record["adapter_parameters"] > 0 and record["counts"]["disk_loads"] == 3
