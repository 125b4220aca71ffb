"""CPU smoke test of benchmarks/simulate_tenants.py: it runs, writes its JSON, and in a short run the fair line
serves the light tenant better than first come first served while a heavy one floods the fleet."""

from __future__ import annotations

import json

from benchmarks import simulate_tenants


def test_a_short_simulation_writes_both_queue_policies_and_fair_share_protects_the_light_tenant(tmp_path):
    out = tmp_path / "tenants.json"
    assert simulate_tenants.main(["--out", str(out), "--duration-s", "1200", "--warmup-s", "120"]) == 0
    document = json.loads(out.read_text())
    assert {"command", "device", "commit", "cases", "bars", "results", "summary"} <= document.keys()
    fifo, fair = document["summary"]["fifo"], document["summary"]["fair_share"]
    assert fair["b_shed_fraction_with_a_flooding"] < fifo["b_shed_fraction_with_a_flooding"]
    assert fair["b_good_fraction_with_a_flooding"] > fifo["b_good_fraction_with_a_flooding"]
    flooded = document["results"]["a floods"]["fair_share"]
    assert flooded["gpu_busy_fraction"] > 0.95  # A takes whatever B leaves: the replicas stay busy
    assert fair["share_bar_met"], fair["both_flooding_gpu_seconds"]
