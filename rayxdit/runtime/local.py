"""The local executor: one process per rank (``torch.multiprocessing``), no Ray needed.

The CLI, the tests and the benchmarks run ranks this way. Each rank process holds a
:class:`~rayxdit.runtime.worker.RankWorker` and serves calls from two pipes: one for the group's calls, in
order, and one for control calls (pings) answered by a second thread while a call runs. One rank runs in
the calling process itself. A failing rank sends its traceback, and the caller gets every failed rank's
traceback in one :class:`GroupError`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.multiprocessing as mp

from rayxdit.config import ConfigError, EngineConfig
from rayxdit.request import EncodedResult, GenerateRequest, RequestError
from rayxdit.runtime.executor import Executor, GroupError, Method
from rayxdit.runtime.rank_process import (
    FORK_SAFE_ENV,
    OUT_OF_MEMORY,
    Reply,
    check_fork_safe,
    preloaded_modules,
    run_call,
    serve_rank,
)
from rayxdit.runtime.worker import CONTROL_METHODS, RankWorker

MAX_LOCAL_CPU_RANKS = 64


def rank_context():
    """The multiprocessing context of rank processes: forks of a server that has imported the model stack
    (:func:`~rayxdit.runtime.rank_process.preloaded_modules`). The server imports nothing else and never touches a GPU,
    so a fork of it starts as clean as a spawned process (no CUDA context, no allocator or compile state)."""
    # The forkserver starts with this process's environment: it must import the model stack fork-safely.
    for name, value in FORK_SAFE_ENV.items():
        os.environ.setdefault(name, value)
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(list(preloaded_modules()))  # ImportErrors are skipped
    return context


LATE_REPORTS_S = 5.0
"""After one rank fails, how long to wait for the others' reports (they usually fail in the same
collective) before giving up on them."""


def check_launchable(world_size: int) -> None:
    """Fail early with one clear line when this machine cannot host ``world_size`` ranks."""
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if world_size > gpus:
            raise ConfigError(f"{world_size} ranks need {world_size} GPUs, but {gpus} are visible")
    elif world_size > MAX_LOCAL_CPU_RANKS:
        raise ConfigError(f"{world_size} CPU ranks is more than this launcher starts ({MAX_LOCAL_CPU_RANKS})")


def _rank_main(
    rank: int,
    world_size: int,
    threads: int,
    env: dict[str, str],
    calls: Connection,
    control: Connection,
) -> None:
    check_fork_safe()
    torch.set_num_threads(threads)
    serve_rank(RankWorker(rank, world_size, device_index=rank, env=env), calls, control)


class LocalExecutor(Executor):
    """Ranks as local processes (one GPU each on a GPU machine, gloo on CPU). One rank runs in the calling
    process unless ``in_process=False`` (benchmarks want a fresh process: clean allocator and compile
    caches)."""

    def __init__(
        self, world_size: int, config: EngineConfig | None = None, in_process: bool = True, **options: Any
    ):
        super().__init__(world_size, config, **options)
        self.in_process = in_process and world_size == 1
        self._processes: list[mp.Process] = []
        self._calls: list[Connection] = []
        self._controls: list[Connection] = []
        self._local: RankWorker | None = None

    def _launch(self) -> None:
        if self.in_process:
            self._local = RankWorker(0, 1, device_index=0)
            return
        context = rank_context()
        threads = max(1, (os.cpu_count() or 1) // self.world_size)
        for rank in range(self.world_size):
            calls, rank_calls = context.Pipe()
            control, rank_control = context.Pipe()
            process = context.Process(
                target=_rank_main,
                args=(rank, self.world_size, threads, self.env, rank_calls, rank_control),
                daemon=True,
                name=f"rayxdit-{self.name}-rank{rank}",
            )
            process.start()
            rank_calls.close()
            rank_control.close()
            self._processes.append(process)
            self._calls.append(calls)
            self._controls.append(control)

    def _kill(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None
        for process in self._processes:
            if process.is_alive():
                process.kill()
        for process in self._processes:
            process.join()
        for connection in (*self._calls, *self._controls):
            connection.close()
        self._processes, self._calls, self._controls = [], [], []

    def shutdown(self) -> None:
        # A healthy group is asked to stop, so that ranks leave their process group; a broken one (ranks
        # possibly stuck in a collective) is killed at once, as is whatever does not exit in time.
        if not self.broken:
            for connection in self._calls:
                with contextlib.suppress(OSError):
                    connection.send(None)
            deadline = time.monotonic() + 5
            for process in self._processes:
                process.join(timeout=max(0.0, deadline - time.monotonic()))
        super().shutdown()

    def pids(self) -> list[int]:
        return [os.getpid()] if self._local is not None else [p.pid for p in self._processes]

    def _call(
        self, method: Method, args: tuple, kwargs: dict, timeout: float | None, ranks: Sequence[int]
    ) -> list[Any]:
        ranks = list(ranks)
        if self._local is not None:
            reply = run_call(self._local, method, args, kwargs)
            return [self._check({0: reply}, ranks)[0]]
        pipes = self._controls if method in CONTROL_METHODS else self._calls
        for rank in ranks:
            pipes[rank].send((method, args, kwargs))
        return self._check(self._collect(pipes, ranks, timeout), ranks)

    def _collect(self, pipes: list[Connection], ranks: list[int], timeout: float | None) -> dict[int, Reply]:
        """Each rank's reply, until every rank answered, one failed (then the others get a few seconds to
        report too), a rank process died, or ``timeout`` passed."""
        replies: dict[int, Reply] = {}
        waiting = {pipes[rank]: rank for rank in ranks}
        deadline = None if timeout is None else time.monotonic() + timeout
        failed_at: float | None = None
        while waiting:
            limit = deadline
            if failed_at is not None:
                limit = min(limit or float("inf"), failed_at + LATE_REPORTS_S)
            remaining = None if limit is None else max(0.0, limit - time.monotonic())
            sentinels = {self._processes[rank].sentinel: rank for rank in waiting.values()}
            ready = wait([*waiting, *sentinels], timeout=remaining)
            if not ready:
                if failed_at is not None:
                    break
                missing = sorted(waiting.values())
                raise GroupError(
                    f"worker group {self.name}: no answer from ranks {missing} within {timeout:.0f} s (a rank hung)",
                    cause="rank_hung",
                )
            for handle in ready:
                if handle in waiting:
                    rank = waiting.pop(handle)
                    try:
                        replies[rank] = handle.recv()
                    except (EOFError, OSError):
                        replies[rank] = Reply(error=f"rank {rank} closed its pipe")
                elif sentinels[handle] in waiting.values():
                    rank = sentinels[handle]
                    if self._poll_reply(pipes[rank], replies, rank):
                        waiting.pop(pipes[rank])
                        continue
                    code = self._processes[rank].exitcode
                    replies[rank] = Reply(error=f"rank {rank} exited without a result (exit code {code})")
                    waiting.pop(pipes[rank])
                if failed_at is None and any(reply.error for reply in replies.values()):
                    failed_at = time.monotonic()
        return replies

    @staticmethod
    def _poll_reply(pipe: Connection, replies: dict[int, Reply], rank: int) -> bool:
        """A rank may report and exit at once: read what it sent before declaring it dead."""
        try:
            if pipe.poll():
                replies[rank] = pipe.recv()
                return True
        except (EOFError, OSError):
            pass
        return False

    def _check(self, replies: dict[int, Reply], ranks: list[int]) -> list[Any]:
        failures = {rank: reply.error for rank, reply in replies.items() if reply.error is not None}
        expected = [reply.expected for reply in replies.values() if reply.expected is not None]
        # A refused request is the caller's error even if a peer then failed; a stop is clean only if no
        # rank failed.
        refused = [error for error in expected if isinstance(error, RequestError)]
        if refused or (expected and not failures):
            raise (refused or expected)[0]
        if failures or len(replies) < len(ranks):
            details = "\n".join(f"--- rank {rank} ---\n{error}" for rank, error in sorted(failures.items()))
            silent = sorted(set(ranks) - set(replies))
            note = f"; no report from ranks {silent}" if silent else ""
            starved = any(reply.out_of_memory for reply in replies.values())
            raise GroupError(
                f"worker group {self.name}: {len(failures)} of {len(ranks)} ranks failed{note}:\n{details}",
                cause=OUT_OF_MEMORY if starved else "rank_error",
            )
        return [replies[rank].value for rank in ranks]


def run_local_group(
    config: EngineConfig,
    requests: list[GenerateRequest],
    output: str = "pil",
    progress: bool = False,
) -> list[EncodedResult]:
    """Start ``config.parallel.world_size`` local ranks, run ``requests`` in order, stop the ranks; rank 0's
    results."""
    check_launchable(config.parallel.world_size)
    with LocalExecutor(config.parallel.world_size, config) as executor:
        return [executor.generate(request, output, progress) for request in requests]


PREVIEW_POLL_S = 0.2
"""How often :func:`run_local_with_previews` asks rank 0 for new previews."""


def run_local_with_previews(
    config: EngineConfig,
    request: GenerateRequest,
    on_preview: Callable[[int, bytes], None],
    progress: bool = False,
) -> EncodedResult:
    """Run one request with ``request.partial_images`` previews on local ranks, handing each preview (a PNG,
    numbered from 0) to ``on_preview`` as soon as rank 0 has made it (it is polled, as a pool replica polls
    it for a streamed request); rank 0's result."""
    check_launchable(config.parallel.world_size)
    with LocalExecutor(config.parallel.world_size, config) as executor:
        request_id = uuid.uuid4().hex
        outcome: dict[str, Any] = {}

        def generate() -> None:
            try:
                arguments = (request, "pil", progress, request_id, None)
                outcome["result"] = executor.collective_rpc("generate", arguments)[0]
            except BaseException as error:  # raised again in the caller's thread
                outcome["error"] = error

        call = threading.Thread(target=generate, name="rayxdit-generate", daemon=True)
        call.start()
        shown = 0
        while call.is_alive():
            call.join(PREVIEW_POLL_S)
            answer = executor.progress(request_id, shown) or {}
            for png in answer.get("partials", []):
                on_preview(shown, png)
                shown += 1
        if "error" in outcome:
            raise outcome["error"]
        result: EncodedResult = outcome["result"]
        for index in sorted(result.partials or {}):  # made after the last poll
            if index >= shown:
                on_preview(index, result.partials[index])
        return result
