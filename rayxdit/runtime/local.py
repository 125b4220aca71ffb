"""Run a worker group as local processes (``torch.multiprocessing``): the CLI's executor, no Ray needed.

Each rank runs in a spawned process with its own device; rank 0 sends results back over a queue. A rank that
fails reports its traceback, and the caller gets every rank's traceback in one error.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing as mp

from rayxdit.config import ConfigError, EngineConfig
from rayxdit.imaging import encode_png
from rayxdit.request import GenerateRequest, GenerateResult, RequestError

MAX_LOCAL_CPU_RANKS = 64


class GroupError(RuntimeError):
    """One or more ranks of a worker group failed; the message holds each rank's traceback."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_launchable(world_size: int) -> None:
    """Fail early with one clear line when this machine cannot host ``world_size`` ranks."""
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if world_size > gpus:
            raise ConfigError(f"{world_size} ranks need {world_size} GPUs, but {gpus} are visible")
    elif world_size > MAX_LOCAL_CPU_RANKS:
        raise ConfigError(f"{world_size} CPU ranks is more than this launcher starts ({MAX_LOCAL_CPU_RANKS})")


def encode_images(result: GenerateResult) -> GenerateResult:
    """PNG bytes cross process boundaries more cheaply and safely than PIL objects."""
    encoded = [encode_png(image) for image in result.images]
    return GenerateResult(encoded, result.latents, result.timings, result.frames_per_video)


def decode_images(result: GenerateResult) -> GenerateResult:
    from PIL import Image

    result.images = [Image.open(io.BytesIO(data)) for data in result.images]
    return result


@dataclass
class _Report:
    rank: int
    value: Any = None
    error: str | None = None
    rejected: RequestError | None = None  # the model refused the request: the caller's error, not a fault


def _rank_entry(
    rank: int,
    world_size: int,
    init_method: str,
    threads: int,
    reports: mp.Queue,
    target: Callable,
    args: tuple,
) -> None:
    from rayxdit.parallel.mesh import destroy_distributed

    try:
        torch.set_num_threads(threads)
        value = target(rank, world_size, init_method, *args)
        reports.put(_Report(rank, value if rank == 0 else None))
    except RequestError as error:
        reports.put(
            _Report(rank, error=traceback.format_exc(), rejected=RequestError(str(error), error.param))
        )
    except BaseException:
        reports.put(_Report(rank, error=traceback.format_exc()))
    finally:
        destroy_distributed()


def spawn_group(
    target: Callable[..., Any], world_size: int, args: tuple = (), timeout_s: float = 1800.0
) -> Any:
    """Run ``target(rank, world_size, init_method, *args)`` in ``world_size`` spawned processes and return
    rank 0's return value. If any rank fails, raise :class:`GroupError` with every failed rank's traceback,
    or the :class:`RequestError` of a request the model refused (every rank refuses it alike).

    ``target`` must be importable (a module-level function): spawned processes import it afresh.
    """
    context = mp.get_context("spawn")
    reports: mp.Queue = context.Queue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    threads = max(1, (os.cpu_count() or 1) // world_size)
    processes = [
        context.Process(
            target=_rank_entry,
            args=(rank, world_size, init_method, threads, reports, target, args),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    collected: dict[int, _Report] = {}
    try:
        deadline = time.monotonic() + timeout_s
        while len(collected) < world_size:
            try:
                report = reports.get(timeout=1.0)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(collected))
                # A rank that died without reporting (killed, or failed before its entry ran) never will.
                dead = [rank for rank in missing if processes[rank].exitcode is not None]
                if dead:
                    codes = ", ".join(f"rank {rank}: exit code {processes[rank].exitcode}" for rank in dead)
                    raise GroupError(f"ranks exited without a result ({codes})") from None
                if time.monotonic() > deadline:
                    raise GroupError(f"no answer from ranks {missing} within {timeout_s:.0f} s") from None
                continue
            collected[report.rank] = report
            if report.error is not None:
                # One failure strands the others in a collective until it times out: collect what the
                # others report within a few seconds, then stop them.
                for process in processes:
                    process.join(timeout=5)
                while not reports.empty():
                    late = reports.get()
                    collected[late.rank] = late
                break
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join()
    rejected = [report.rejected for report in collected.values() if report.rejected is not None]
    if rejected:
        raise rejected[0]
    failures = {rank: report.error for rank, report in collected.items() if report.error is not None}
    if failures:
        details = "\n".join(f"--- rank {rank} ---\n{error}" for rank, error in sorted(failures.items()))
        raise GroupError(f"{len(failures)} of {world_size} ranks failed:\n{details}")
    return collected[0].value


def _serve_requests(
    rank: int,
    world_size: int,
    init_method: str,
    config: EngineConfig,
    requests: list[GenerateRequest],
    output: str,
    progress: bool,
) -> list[GenerateResult] | None:
    from rayxdit.engine import pick_device, start_engine

    engine = start_engine(config, rank, init_method, pick_device(rank))
    results = [engine.generate(request, output=output, progress=progress) for request in requests]
    return [encode_images(result) for result in results] if rank == 0 else None


def run_local_group(
    config: EngineConfig,
    requests: list[GenerateRequest],
    output: str = "pil",
    progress: bool = False,
    timeout_s: float = 1800.0,
) -> list[GenerateResult]:
    """Start ``config.parallel.world_size`` local ranks, run ``requests`` in order, return rank 0's results."""
    world_size = config.parallel.world_size
    check_launchable(world_size)
    if world_size == 1:
        from rayxdit.engine import pick_device, start_engine

        engine = start_engine(config, 0, "", pick_device(0))
        return [engine.generate(request, output=output, progress=progress) for request in requests]
    results = spawn_group(_serve_requests, world_size, (config, requests, output, progress), timeout_s)
    return [decode_images(result) for result in results]
