"""benchmarks/bench_load.py's pure parts: the workload's phases and the static layout a run compares with
(its run over HTTP: tests/serve/test_serve.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from benchmarks.bench_load import arrivals, by_phase, phases, static_layout, with_policy_options
from rayxdit.config import ConfigError
from rayxdit.serve.app import load_serve_file

WORKLOADS = Path(__file__).resolve().parents[2] / "benchmarks" / "workloads"


def test_phases_give_each_its_own_arrival_rate_and_the_records_are_counted_per_phase():
    workload = {
        "seed": 3,
        "phases": [
            {"duration_s": 200, "rate_per_s": 0.1},
            {"duration_s": 200, "rate_per_s": 1.0},
            {"duration_s": 200, "rate_per_s": 0.0},
        ],
        "max_requests": 10_000,
        "slo_s": 10,
        "mix": [{"size": "36x36", "steps": 2}],
    }
    spans = phases(workload)
    assert spans == [(0.0, 200.0, 0.1), (200.0, 400.0, 1.0), (400.0, 600.0, 0.0)]
    times = [at for at, _ in arrivals(workload)]
    light = sum(at < 200 for at in times)
    heavy = sum(200 <= at < 400 for at in times)
    assert 5 <= light <= 40 and 150 <= heavy <= 260, (light, heavy)  # Poisson: 20 and 200 expected
    assert not any(at >= 400 for at in times)
    records = [
        {"arrival_s": at, "status": 200, "end_to_end_s": 1.0 if at < 200 else 3.0, "pool": "p"}
        for at in times
    ]
    counted = by_phase(records, spans)
    assert [phase["requests"] for phase in counted] == [light, heavy, 0]
    assert counted[0]["p50_s"] == 1.0 and counted[1]["p50_s"] == 3.0 and counted[2]["p50_s"] is None


def test_a_workload_without_phases_is_one_phase_at_its_rate():
    workload = yaml.safe_load((WORKLOADS / "mixed-cpu.yaml").read_text())
    assert phases(workload) == [(0.0, 90.0, 0.35)]
    # The arrivals of benchmarks/results/load-tiny-flux-cpu.json, as before phases existed.
    assert len(arrivals(workload)) == 54


def test_the_static_layout_fixes_each_named_pool_and_drops_the_others():
    config, _ = load_serve_file(WORKLOADS / "cpu-pools.yaml")
    static = static_layout(config, "tiny-2=2")
    assert static.elastic is None
    assert [pool.name for pool in static.pools] == ["tiny-2"]
    scaling = static.pools[0].deployment_config["autoscaling_config"]
    assert scaling["min_replicas"] == scaling["max_replicas"] == 2
    with pytest.raises(SystemExit, match="names no pool"):
        static_layout(config, "tiny-9=1")


def test_policy_options_go_over_the_configs_and_a_bad_one_is_refused_before_anything_starts():
    config, _ = load_serve_file(WORKLOADS / "cpu-pools.yaml")
    scaled = with_policy_options(config, {"peak_window_s": 0, "fall_s": 15})
    assert scaled.elastic.policy_options == {"peak_window_s": 0, "fall_s": 15}
    assert scaled.pools == config.pools and config.elastic.policy_options == {}
    with pytest.raises(ConfigError, match="fall_s"):
        with_policy_options(config, {"fall_s": 0})
    with pytest.raises(ConfigError, match="unexpected keyword argument 'peak_window'"):
        with_policy_options(config, {"peak_window": 0})
    with pytest.raises(SystemExit, match="no elastic policy"):
        with_policy_options(static_layout(config, "tiny-2=2"), {"fall_s": 15})
