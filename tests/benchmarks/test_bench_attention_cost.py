"""CPU smoke test of bench_attention_cost.py: every subject (a Flux, a Wan and an SD3 transformer, tiny) are timed at
their two sizes and the result names what a committed GPU result must; the attention term's arithmetic
reproduces Flux's declared term from the single-H200 times it was read from."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_attention_cost
from rayxdit.models.families import FLUX_ATTENTION_COST


def test_the_attention_term_prices_the_two_measured_steps_as_they_took():
    # benchmarks/results/flux-dev-2xh200.json, one H200 compiled, 28 steps: 3.736 s at 1024px, 19.831 s at 2048px.
    term = bench_attention_cost.attention_term(1.048576, 3.736, 4.194304, 19.831)
    assert term == pytest.approx(FLUX_ATTENTION_COST, abs=0.001)
    assert bench_attention_cost.attention_term(1.0, 1.0, 4.0, 4.0) == 0.0  # linear: no term


def test_bench_attention_cost_times_every_subject_on_cpu(tmp_path):
    out = tmp_path / "attention.json"
    argv = ["--preset", "tiny", "--steps", "1", "--repeats", "2", "--warmup-steps", "1", "--out", str(out)]
    assert bench_attention_cost.main(argv) == 0
    document = json.loads(out.read_text())
    assert document["command"].startswith("python benchmarks/bench_attention_cost.py --preset tiny")
    assert "rayxdit_commit" in document["versions"] and document["device"].startswith("cpu")
    results = {result["model"]: result for result in document["results"]}
    assert set(results) == {"tiny-flux", "tiny-wan", "tiny-sd3"}
    assert results["tiny-flux"]["declared"] == FLUX_ATTENTION_COST
    assert [results[name]["text_tokens"] for name in ("tiny-flux", "tiny-sd3")] == [512, 29]
    for result in results.values():
        assert [len(step["repeats_s"]) for step in result["steps"]] == [2, 2]
        assert all(step["seconds_per_step"] > 0 for step in result["steps"])
        assert result["pixel_ratio"] == pytest.approx(4.0, rel=0.01)
