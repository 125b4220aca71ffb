"""CPU smoke test of benchmarks/bench_serve.py: the GPU serving benchmark runs end to end on tiny-flux (one
metrics-off and one metrics-on deployment, a restart, a streamed/unstreamed pair), so it cannot rot between GPU
sessions."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_serve

pytestmark = pytest.mark.slow


def test_the_serving_benchmark_runs_with_and_without_metrics_and_times_a_restart(tmp_path):
    out = tmp_path / "serve.json"
    argv = ["--model", "tiny-flux", "--parallel", "ulysses=2", "--accelerator", "cpu", "--size", "64"]
    argv += [
        "--steps",
        "2",
        "--requests",
        "2",
        "--metrics-ab",
        "--ab-rounds",
        "1",
        "--restarts",
        "1",
        "--cold-cache",
        "--stream-ab",
        "1",
    ]
    argv += ["--out", str(out)]
    assert bench_serve.main(argv) == 0

    (record,) = json.loads(out.read_text())
    assert [phase["metrics"] for phase in record["phases"]] == [False, True]
    assert {"command", "device", "versions", "date", "metrics_overhead"} <= record.keys()
    on = record["phases"][1]
    assert len(on["runs"]) == 2 and all(run["gpu_seconds"] > 0 for run in on["runs"])
    # 2 ranks x the engine's time, as the response says
    assert record["gpu_seconds_per_request"] == pytest.approx(2 * record["engine_seconds"], rel=0.05)
    # The restart: the killed replica's successor started (warm-up included) before it answered.
    restart = record["restart"]
    (warm,) = restart["restarts"]
    assert warm["mode"] == "cold cache, no artifacts" and list(restart["by_mode"]) == [warm["mode"]]
    assert warm["warmed_up"] == ["64x64"] and set(warm["weights"]) == {"model", "add_ons"}
    assert 0 < warm["timeline"]["total"] < warm["kill_to_ready_s"]
    assert restart["cold"]["timeline"]["warm_up"] > 0 and restart["first_request_s"] > 0
    # The metrics-on phase exported rayxdit's counters (warm-up + 2 requests); the off phase nothing.
    assert on["exported_metrics"]["ray_rayxdit_images_total"] == 3
    assert on["exported_metrics"]["ray_rayxdit_gpu_seconds_total"] > 0
    assert record["phases"][0]["exported_metrics"] == {}
    # One pair unstreamed/streamed: the 2-step request makes one of the 3 previews asked (never the last step).
    stream = record["stream_overhead"]
    assert stream["partials_received"] == [1] and stream["streamed_s"] > 0 and stream["unstreamed_s"] > 0
    assert 0 < stream["first_partial_s"] <= stream["streamed_s"]
