"""CPU smoke test of benchmarks/simulate_adapters.py: a short run writes every policy at every load with its
latencies and cache counts, routing that follows the adapters finds them on the GPUs more often than blind
routing, and requests with nothing to load are the floor. It cannot rot unseen."""

from __future__ import annotations

import json

from benchmarks import simulate_adapters


def test_a_short_adapter_simulation_writes_every_policy_and_aware_routing_hits_more(tmp_path):
    out = tmp_path / "adapters.json"
    argv = ["--hours", "0.3", "--seeds", "1", "--loads", "0.5", "--replicas", "4", "--adapters", "200"]
    assert simulate_adapters.main([*argv, "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert {"command", "commit", "costs", "costs_source", "comparison"} <= record.keys()
    by = {result["policy"]: result for result in record["results"]}
    assert set(by) == set(simulate_adapters.POLICIES)
    for result in by.values():
        assert result["requests"] > 100 and 0 < result["p50_s"] <= result["p99_s"]
        assert sum(result["runs"][0]["where"].values()) >= result["requests"]
    assert by["adapter-aware"]["device_hit_ratio"] > by["adapter-blind"]["device_hit_ratio"]
    assert by["no-adapters"]["p50_s"] <= by["adapter-blind"]["p50_s"]
    assert "p99_ratio_adapter-aware_over_blind" in record["comparison"]["0.5"]
