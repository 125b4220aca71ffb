"""``python -m rayxdit.batch`` submitted with ``ray job submit`` to a real local Ray cluster (``ray start``
with logical GPUs and token authentication, as a user would run it)."""

from __future__ import annotations

import io
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rayxdit.batch.rows import seed_for
from rayxdit.config import EngineConfig
from rayxdit.engine import Engine
from rayxdit.parallel.mesh import ParallelState
from rayxdit.request import ControlInput, GenerateRequest
from tests.helpers import free_port, private_ray_temp_dir, start_ray_head, stop_ray_cluster

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
JOB_FLAGS = [
    "--model",
    "tiny-flux",
    "--parallel",
    "ulysses=2",
    "--accelerator",
    "gpu",
    "--cpus-per-rank",
    "0.25",
    "--controlnet",
    "tiny-flux-controlnet",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    home = tmp_path_factory.mktemp("ray")
    token = home / "token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "TRANSFORMERS_VERBOSITY": "error",
    }
    env.pop("RAY_ADDRESS", None)
    temp_dir = private_ray_temp_dir()
    dashboard, gcs = free_port(), free_port()
    try:  # also when the start itself fails or times out: a cluster left running slows every later test
        options = [
            f"--dashboard-port={dashboard}",
            "--num-cpus=8",
            "--num-gpus=8",
            "--include-dashboard=true",
        ]
        start_ray_head(temp_dir, gcs, env, *options)
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env}
    finally:
        stop_ray_cluster(gcs)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(
    cluster, input_path: Path, output: Path, *extra: str, wait: bool = True
) -> subprocess.CompletedProcess:
    command = ["ray", "job", "submit", "--address", cluster["address"], "--working-dir", str(REPO)]
    if not wait:
        command.append("--no-wait")
    command += [
        "--",
        sys.executable,
        "-m",
        "rayxdit.batch",
        "--input",
        str(input_path),
        "--output",
        str(output),
        *JOB_FLAGS,
        *extra,
    ]
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run(command, env=cluster["env"], capture_output=True, text=True, timeout=900)
        # Right after `ray start` the job server may have no dashboard agent yet; Ray says to try again.
        if "No available agent to submit job" not in done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(2)


def manifest(output: Path) -> list[dict]:
    return pq.read_table(output / "manifest.parquet").to_pylist()


def single_process(engine: Engine, row: dict, base_dir: Path | None = None) -> np.ndarray:
    width, height = (int(v) for v in row["size"].split("x"))
    controls = ()
    if row.get("control_image"):
        image = (base_dir / row["control_image"]).read_bytes()
        controls = (ControlInput(image=image, scale=row["controlnet_scale"]),)
    request = GenerateRequest(
        prompt=row["prompt"],
        width=width,
        height=height,
        steps=row["steps"],
        seed=row["seed"],
        controls=controls,
    )
    return np.asarray(engine.generate(request).images[0], dtype=np.int16)


VARIED_ROWS = [
    {"id": "cat", "prompt": "a red cat", "size": "36x36", "steps": 3, "seed": 1},
    {"id": "dog", "prompt": "a blue dog", "size": "40x36", "steps": 3, "seed": None},
    {"id": "empty", "prompt": "", "size": "36x36", "steps": 3, "seed": 2},
    {"id": "odd-size", "prompt": "a tree", "size": "37x36", "steps": 3, "seed": 3},
    {"id": "huge", "prompt": "a tree", "size": "4096x4096", "steps": 3, "seed": 3},
    {"id": "house", "prompt": "a house by the sea", "size": "36x40", "steps": 2, "seed": 4},
    # A ControlNet row: its control image a path under the input's directory.
    {
        "id": "edges",
        "prompt": "a house",
        "size": "36x36",
        "steps": 2,
        "seed": 5,
        "control_image": "edges.png",
        "controlnet_scale": 0.7,
    },
]
INVALID = {"empty", "odd-size", "huge"}


def test_a_job_stopped_midway_and_rerun_writes_each_row_once_as_one_process_makes_it(cluster, tmp_path):
    """One job of varied rows (unseeded, invalid, a ControlNet's) and slower ones, stopped midway with
    ``ray job stop`` and submitted again: every row settled exactly once, in input order, invalid rows with
    their reasons, the rows made by the first run not made again, and each image the single-process one.
    (One scenario: a job submission costs a driver, a Ray Data pipeline and a worker group's start.)"""
    slow = [
        {"id": f"p{i:02d}", "prompt": f"a photo of a cat number {i}", "size": "128x128", "steps": 6}
        for i in range(9)
    ]
    rows = VARIED_ROWS + slow
    edges = np.random.default_rng(5).integers(0, 256, (36, 36, 3), dtype=np.uint8)
    Image.fromarray(edges).save(tmp_path / "edges.png")
    input_path = tmp_path / "prompts.parquet"
    columns = dict.fromkeys(key for row in rows for key in row)  # pyarrow takes its columns from row 0
    pq.write_table(pa.Table.from_pylist([{**columns, **row} for row in rows]), input_path)
    output = tmp_path / "out"
    started = submit(cluster, input_path, output, "--rows-per-part", "1", wait=False)
    assert started.returncode == 0, started.stderr
    job_id = re.search(r"raysubmit_\w+", started.stdout + started.stderr).group(0)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list((output / "images").glob("*.png"))) < 3:
        time.sleep(0.5)
    stopped = subprocess.run(
        ["ray", "job", "stop", "--address", cluster["address"], job_id],
        env=cluster["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert stopped.returncode == 0, stopped.stderr
    first_run: set[str] = set()
    stable = 0
    while stable < 3:  # actors die with the driver, asynchronously: wait until nothing new appears for 3 s
        time.sleep(1)
        now = {p.name for p in (output / "images").glob("*.png")}
        stable = stable + 1 if now == first_run else 0
        first_run = now
    valid = [row for row in rows if row["id"] not in INVALID]
    assert 3 <= len(first_run) < len(valid), "the job was not stopped midway"

    done = submit(cluster, input_path, output)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "0 failed" in done.stdout and "3 invalid" in done.stdout, done.stdout[-3000:]
    regenerated = int(re.search(r"(\d+) generated", done.stdout).group(1))
    assert regenerated == len(valid) - len(first_run), "images of the stopped run were made again"
    records = manifest(output)
    assert [r["id"] for r in records] == [r["id"] for r in rows]  # each row exactly once, in input order
    records = {r["id"]: r for r in records}
    assert {i for i, r in records.items() if r["status"] == "ok"} == {row["id"] for row in valid}
    assert "prompt is empty" in records["empty"]["error"]
    assert "multiple of 4" in records["odd-size"]["error"] and "outside" in records["huge"]["error"]
    images = sorted(p.name for p in (output / "images").iterdir())
    assert images == sorted(f"{row['id']}.png" for row in valid)  # one image per row, no leftovers
    assert records["dog"]["seed"] == seed_for("dog")  # no seed given: derived from the id
    assert (records["edges"]["control_image"], records["edges"]["controlnet_scale"]) == ("edges.png", 0.7)

    config = EngineConfig(model="tiny-flux", controlnets=("tiny-flux-controlnet",))
    engine = Engine(config, ParallelState.single())
    for identifier in ("cat", "dog", "house", "edges", "p08"):
        record = records[identifier]
        assert len(record["sha256"]) == 64
        if f"{identifier}.png" not in first_run:  # made by the rerun (the first run's may be adopted)
            assert record["ranks"] == 2 and 0 < record["gpu_seconds"] <= 2 * record["seconds"], record
        written = np.asarray(Image.open(io.BytesIO((output / record["path"]).read_bytes())), dtype=np.int16)
        source = next(r for r in rows if r["id"] == identifier)
        expected = single_process(engine, {**source, "seed": record["seed"]}, tmp_path)
        assert np.abs(written - expected).max() <= 1, identifier
