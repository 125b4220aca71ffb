"""README's local batch command, exactly as written: a local Ray instance started by the job itself on a
2-core machine, tiny-flux on the CPU. It must finish, reruns must skip what is settled (invalid rows too),
and a pool this machine can never host must be refused at once with one line saying what to pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def batch(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "rayxdit.batch", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_the_readme_command_finishes_and_a_rerun_skips_settled_rows(tmp_path: Path):
    rows = [
        {"id": "fox", "prompt": "a red fox", "size": "36x36", "steps": 2, "seed": 1},
        {"id": "owl", "prompt": "an owl at night", "size": "40x36", "steps": 2, "seed": 2},
        {"id": "odd", "prompt": "a tree", "size": "37x36", "steps": 2},
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(row) for row in rows))
    command = ["--input", str(prompts), "--output", str(tmp_path / "out"), "--accelerator", "cpu"]
    done = batch(*command)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 generated, 0 failed" in done.stdout and "1 invalid" in done.stdout, done.stdout
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == ["fox.png", "owl.png"]
    # A rerun plans with the function the command calls (a second full run costs a Ray start; the job test,
    # tests/batch/test_batch_job.py, reruns a stopped job whole): nothing left to generate, the invalid row
    # not retried.
    from rayxdit.batch.job import plan
    from rayxdit.batch.rows import normalize
    from rayxdit.runtime.cards import model_card

    limits = model_card("tiny-flux").limits
    rerun = [normalize(row, limits, tmp_path) for row in rows]
    _, pending, counts = plan(rerun, tmp_path / "out", "rerun")
    assert pending == [] and counts == {"done_before": 2, "adopted": 0, "invalid": 1}, counts


def test_a_pool_the_machine_can_never_host_is_refused_at_once(tmp_path: Path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a cat"}))
    began = time.monotonic()
    done = batch(
        "--input",
        str(prompts),
        "--output",
        str(tmp_path / "out"),
        "--accelerator",
        "cpu",
        "--cpus-per-rank",
        "64",
    )
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert time.monotonic() - began < 90
    lines = [line for line in done.stderr.splitlines() if line.startswith("rayxdit batch: error:")]
    assert len(lines) == 1 and "needs 2 ranks x" in lines[0] and "--cpus-per-rank" in lines[0], done.stderr
    assert not (tmp_path / "out" / "images").exists()


def test_video_rows_become_mp4_files_and_a_rerun_regenerates_none(tmp_path: Path):
    import imageio.v3 as iio

    rows = [
        {"id": "fox", "prompt": "a red fox", "size": "80x48", "steps": 2, "frames": 5, "seed": 1},
        {"id": "owl", "prompt": "an owl", "size": "64x48", "steps": 2, "frames": 9, "seed": 2},
        {"id": "odd", "prompt": "a tree", "size": "80x48", "steps": 2, "frames": 6},
    ]
    prompts = tmp_path / "videos.jsonl"
    prompts.write_text("\n".join(json.dumps(row) for row in rows))
    out = tmp_path / "out"
    command = ["--input", str(prompts), "--output", str(out), "--accelerator", "cpu", "--model", "tiny-wan"]
    done = batch(*command)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 generated, 0 failed" in done.stdout and "1 invalid" in done.stdout, done.stdout
    videos = {path.name: path for path in (out / "videos").iterdir()}
    assert sorted(videos) == ["fox.mp4", "owl.mp4"]
    assert iio.imread(videos["fox.mp4"], extension=".mp4").shape == (5, 48, 80, 3)
    assert iio.imread(videos["owl.mp4"], extension=".mp4").shape == (9, 48, 64, 3)
    import pyarrow.parquet as pq

    manifest = {row["id"]: row for row in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert manifest["fox"]["frames"] == 5 and manifest["fox"]["path"] == "videos/fox.mp4"
    assert manifest["odd"]["status"] == "invalid" and "frames=6" in manifest["odd"]["error"]
    # A rerun plans with the same function the job calls (a second full run costs a Ray start here; the
    # image test above reruns the whole command): nothing is left to generate, the videos are kept.
    from rayxdit.batch.job import plan
    from rayxdit.batch.rows import normalize
    from rayxdit.runtime.cards import model_card

    limits = model_card("tiny-wan").limits
    rerun = [normalize(row, limits, tmp_path) for row in rows]
    settled, pending, counts = plan(rerun, out, "rerun", video=True)
    assert pending == [] and counts == {"done_before": 2, "adopted": 0, "invalid": 1}, counts
    (out / "manifest").rename(out / "lost-manifest")  # a crash took the manifest parts: adopt, not redo
    settled, pending, counts = plan(rerun, out, "rerun", video=True)
    assert pending == [] and counts["adopted"] == 2
    assert {record["path"] for record in settled if record["status"] == "ok"} == {
        "videos/fox.mp4",
        "videos/owl.mp4",
    }
