"""GPU benchmarks, the fleet simulator and their shared provenance helpers."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def source_commit() -> str | None:
    """The commit the measured code comes from, with ``-dirty`` when the package or the benchmark scripts
    differ from it (results and notebooks do not count): a result must name the code that produced it.
    ``RAYXDIT_SOURCE_COMMIT`` names it where the tree is a copy without its own history (the GPU machines
    receive the working tree, not the repository's current .git)."""
    if os.environ.get("RAYXDIT_SOURCE_COMMIT"):
        return os.environ["RAYXDIT_SOURCE_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=30
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "rayxdit", "benchmarks/*.py", "benchmarks/workloads"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not head:
        return None
    return f"{head}-dirty" if changed else head


def command_line() -> str:
    """How this run was started, as a result records it: the interpreter's name and the arguments."""
    import sys

    return " ".join([Path(sys.executable).name, *sys.argv])


def write_result(path: Path, document: object) -> None:
    """Write a result's JSON (its directory made if missing)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


def cpu_provenance() -> dict[str, object]:
    """What a result run on this machine's CPU says of its making: the command, the device, the versions,
    the commit and the date (the serving benchmarks on CPU; torch and Ray are imported here)."""
    import datetime
    import socket
    import sys

    import ray
    import torch

    return {
        "command": command_line(),
        "device": f"cpu ({socket.gethostname()}, {os.cpu_count()} cores)",
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "ray": ray.__version__},
        "commit": source_commit() or None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def poisson_arrivals(call, rate: float, seconds: float, seed: int) -> list:
    """``call(index)`` at Poisson arrivals of ``rate`` per second for ``seconds``, each in a thread of its
    own; their results in arrival order (an open loop: arrivals do not wait for answers)."""
    import random
    import time
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(seed)
    with ThreadPoolExecutor(64) as pool:
        futures, end, at = [], time.monotonic() + seconds, time.monotonic()
        while True:
            at += rng.expovariate(rate)
            if at >= end:
                break
            time.sleep(max(0.0, at - time.monotonic()))
            futures.append(pool.submit(call, len(futures)))
        return [future.result() for future in futures]


def start_local_serve(**ray_options: Any) -> str:
    """A local Ray instance (no dashboard; ``ray_options`` more of ``ray.init``'s arguments) and Serve's HTTP
    proxy on a free loopback port: its URL."""
    import socket

    from ray import serve

    from rayxdit.runtime.ray_start import init_ray

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    init_ray(include_dashboard=False, logging_level="warning", **ray_options)
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    return f"http://127.0.0.1:{port}"


def shared_cpu_pool(model: str, parallel: str, replicas: int = 1):
    """The one pool ("shared") of a CPU serving benchmark: ``model`` at ``parallel``, a fixed ``replicas``,
    a quarter CPU reserved per rank (the cores are shared by every process of the run)."""
    from rayxdit.config import PoolConfig

    return PoolConfig(
        name="shared",
        model=model,
        parallel=parallel,
        accelerator="cpu",
        cpus_per_rank=0.25,
        deployment_config={"autoscaling_config": {"min_replicas": replicas, "max_replicas": replicas}},
    )
