"""CPU smoke test of benchmarks/simulate_fleet.py: it runs, writes its JSON, and at light load the elastic
policy gives requests the speed of the largest replicas (the claim the committed results quote)."""

from __future__ import annotations

import json

from benchmarks import simulate_fleet


def test_a_short_simulation_writes_every_policy_and_light_load_gets_large_replicas(tmp_path):
    out = tmp_path / "simulate.json"
    argv = ["--out", str(out), "--fleets", "8", "--loads", "0.2", "--duration-s", "3600"]
    assert simulate_fleet.main([*argv, "--warmup-s", "600", "--no-alternating"]) == 0

    document = json.loads(out.read_text())
    assert {"command", "device", "commit", "service_table", "mix", "slo", "results"} <= document.keys()
    results = {r["policy"]: r for r in document["results"]}
    assert set(results) == set(simulate_fleet.POLICIES)
    for result in results.values():
        assert result["finished"] == result["requests"] > 0
        assert result["p50_s"] <= result["p99_s"]
    elastic, small = results["load-aware + shared budget"], results["all-2gpu"]
    # At 20% load the policy runs the 8-GPU pool: a 1024px image in ~1.1 s, not the 2-GPU pool's ~2.5 s.
    assert elastic["p50_s"] < 0.6 * small["p50_s"]
    assert "p8" in elastic["gpu_seconds_by_pool"]
