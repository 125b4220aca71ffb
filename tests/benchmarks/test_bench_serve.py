"""CPU smoke test of benchmarks/bench_serve.py: the GPU serving benchmark runs end to end on tiny-flux (a
deployment, a restart, a streamed/unstreamed pair), so it cannot rot between GPU sessions. Its metrics A/B
(``--metrics-ab``: the same phase again in a fresh Ray instance with ``RAYXDIT_METRICS=0``) is checked in its
parts: the summary of both phases, and that the switch leaves rayxdit's metrics uncreated."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_serve
from tests.helpers import fresh_python

pytestmark = pytest.mark.slow


def test_the_serving_benchmark_runs_a_deployment_and_times_a_restart(tmp_path):
    out = tmp_path / "serve.json"
    argv = ["--model", "tiny-flux", "--parallel", "ulysses=2", "--accelerator", "cpu", "--size", "64"]
    argv += [
        "--steps",
        "2",
        "--requests",
        "2",
        "--restarts",
        "1",
        "--cold-cache",
        "--stream-ab",
        "1",
        "--memory-check",
        "64x2",
        # Its Ray's workers import nothing ahead: on two cores with no idle worker to start in, every actor's
        # worker would import Serve's replica module first (2.5 s of this test). `rayxdit serve`'s test
        # checks the preload (tests/test_cli.py).
        "--no-worker-preload",
    ]
    argv += ["--out", str(out)]
    assert bench_serve.main(argv) == 0

    (record,) = json.loads(out.read_text())
    assert [phase["metrics"] for phase in record["phases"]] == [True]
    assert {"command", "device", "versions", "date"} <= record.keys() and record["worker_preload"] is False
    on = record["phases"][0]
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
    # Serve's side of it, from Ray's task events: its actor up, then the deployment's constructor, in which
    # the two rank actors started, then the first call that reached it.
    serve = warm["serve"]
    assert 0 < serve["actor_running_s"] <= serve["actor_ready_s"] <= serve["constructor_running_s"], serve
    assert len(serve["rank_actors_running_s"]) == 2, serve
    assert serve["constructor_running_s"] < min(serve["rank_actors_running_s"]), serve
    assert (
        max(serve["rank_actors_running_s"]) < serve["created_to_ready_s"] == restart["serve_start_to_ready_s"]
    )
    # The phase exported rayxdit's counters (the memory check's first request of 2 images, the warm-up and
    # 2 timed requests).
    assert on["exported_metrics"]["ray_rayxdit_images_total"] == 5
    assert on["exported_metrics"]["ray_rayxdit_gpu_seconds_total"] > 0
    # One pair unstreamed/streamed: the 2-step request makes one of the 3 previews asked (never the last step).
    stream = record["stream_overhead"]
    assert stream["partials_received"] == [1] and stream["streamed_s"] > 0 and stream["unstreamed_s"] > 0
    assert 0 < stream["first_partial_s"] <= stream["streamed_s"]
    # CPU ranks measure no memory: nothing declared, nothing refused, every answer an image.
    memory = record["memory_check"]
    assert memory["declared"] == [{"per_rank": None, "max_megapixels": None}]
    assert [memory[key]["status"] for key in ("first", "single", "again", "after")] == [200] * 4


def test_the_metrics_ab_summary_compares_the_medians_of_both_phases():
    runs = lambda *seconds: [{"end_to_end_s": s} for s in seconds]  # noqa: E731
    phases = [
        {"metrics": False, "runs": runs(1.0, 1.2, 1.1)},
        {"metrics": True, "runs": runs(1.3, 1.1)},
        {"metrics": False, "runs": runs(0.9)},
        {"metrics": True, "runs": runs(1.2)},
    ]
    overhead = bench_serve.metrics_overhead(phases)
    assert overhead["end_to_end_s_metrics_off"] == 1.05 and overhead["end_to_end_s_metrics_on"] == 1.2
    assert overhead["pct"] == pytest.approx(100 * 0.15 / 1.05, abs=1e-3)
    assert "3 requests with metrics and 4 without" in overhead["method"] and "4 phases" in overhead["method"]


def test_metrics_off_creates_none_of_rayxdits_metrics():
    """What the A/B's off phase runs with: ``RAYXDIT_METRICS=0`` in the application's environment, and no
    rayxdit metric is ever created (so none is exported), whatever is recorded."""
    import os

    probe = (
        "from rayxdit.serve import metrics\n"
        "for spec in metrics.SERVING_METRICS:\n"
        "    tags = dict.fromkeys(spec.tags, 'x')\n"
        "    metrics.inc(spec.name, 1.0, **tags); metrics.observe(spec.name, 1.0, **tags)\n"
        "    metrics.set_gauge(spec.name, 1.0, **tags)\n"
        "print(metrics.ENABLED, metrics.metric.cache_info().currsize)\n"
    )
    assert fresh_python(probe, env={**os.environ, "RAYXDIT_METRICS": "0"}).split() == ["False", "0"]
