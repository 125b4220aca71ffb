"""The one interface through which the CLI, the Serve pools and the batch job drive a group of ranks.

Like vLLM's executors (``vllm/v1/executor/abstract.py``): an :class:`Executor` starts one
:class:`~rayxdit.runtime.worker.RankWorker` per rank and every per-rank operation is
``collective_rpc(method, args)``: the same call on every rank at once, each rank's return value back in rank
order. Two implementations differ only in where ranks live: :class:`~rayxdit.runtime.local.LocalExecutor`
(spawned processes; the CLI, tests and benchmarks) and :class:`~rayxdit.runtime.ray_executor.RayExecutor`
(Ray actors in a placement group; serving and batch).

A group is *broken* after any rank dies, raises or hangs: its peers may be stuck in a collective with it,
so nothing more runs on it until :meth:`Executor.rebuild` has replaced every rank. A request the model
refuses (:class:`RequestError`, raised by every rank alike before any collective) leaves it usable, and so
does a request stopped cleanly (:class:`RequestStopped`: cancelled or past its deadline, every rank at the
same step boundary).

This module imports neither torch nor Ray.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from rayxdit.config import EngineConfig
from rayxdit.request import EncodedResult, GenerateRequest, RequestError, RequestStopped

logger = logging.getLogger("rayxdit.runtime")

STARTUP_TIMEOUT_S = 1800.0
"""Loading a model (and building a full-size recipe) on every rank may take this long."""
PING_TIMEOUT_S = 10.0

FORWARDED_ENV_NAMES = frozenset(
    {
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HOME",
        "HF_HUB_CACHE",
        "HF_HUB_OFFLINE",
        "HF_ENDPOINT",
        "HF_HUB_ENABLE_HF_TRANSFER",
        "TRANSFORMERS_VERBOSITY",
        "PYTORCH_CUDA_ALLOC_CONF",  # the caching allocator's options (expandable_segments...), read at
        "PYTORCH_ALLOC_CONF",  # the rank's first CUDA allocation; the second is torch >= 2.9's name
        "XDG_CACHE_HOME",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
    }
)
FORWARDED_ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "RAYXDIT_")
"""Environment every rank needs from its driver (as vLLM's Ray executor forwards ``HF_TOKEN``): gated models
(FLUX.1-dev) need the token, caches and proxies must match, NCCL settings must reach the process that runs
NCCL, the allocator's options the process that allocates."""


def read_outcome(future: asyncio.Future) -> None:
    """A done-callback marking a call's error as read, for calls whose error is decided elsewhere or not at
    all (the other ranks' copy of the first rank's error; a cancel whose answer decides nothing): unread,
    asyncio would log each with a traceback."""
    if not future.cancelled():
        future.exception()


def forwarded_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables of ``environ`` (default: this process's) that ranks must see."""
    environ = dict(os.environ if environ is None else environ)
    return {
        name: value
        for name, value in environ.items()
        if name in FORWARDED_ENV_NAMES or name.startswith(FORWARDED_ENV_PREFIXES)
    }


class GroupError(RuntimeError):
    """The group failed (a rank died, raised, or hung) and must be rebuilt before the next call. The message
    says which ranks and why, with their tracebacks where they are known; ``cause`` is one word for
    metrics: ``rank_died``, ``rank_hung``, ``rank_error`` or ``out_of_memory`` (a rank could not allocate
    what the request needs: retrying it on the same ranks would fail the same way)."""

    def __init__(self, message: str, cause: str = "rank_error"):
        super().__init__(message)
        self.cause = cause


Method = str | Callable[..., Any]
"""A :class:`RankWorker` method name, or a picklable function called as ``fn(worker, *args, **kwargs)``."""


class Executor(ABC):
    """``world_size`` ranks driven together. Not thread-safe: the owner issues one call at a time (every
    rank must issue its collectives in the same order), apart from the control methods
    (:data:`~rayxdit.runtime.worker.CONTROL_METHODS`), which ranks answer while another call runs.

    ``config`` None only joins the ranks in one process group (tests and benchmarks then run their own
    functions through :meth:`collective_rpc`); otherwise every rank loads the model at start.
    """

    def __init__(
        self,
        world_size: int,
        config: EngineConfig | None = None,
        *,
        name: str = "group",
        collective_timeout_s: float = 300.0,
        call_timeout_s: float | None = None,
        cancel_grace_s: float = 30.0,
        env: dict[str, str] | None = None,
    ):
        if config is not None:
            config.parallel.check_world_size(world_size)
        self.world_size = world_size
        self.config = config
        self.name = name
        self.collective_timeout_s = collective_timeout_s
        self.call_timeout_s = call_timeout_s
        """Default bound of a call (None: wait as long as it takes); a call past it means a hung rank."""
        self.cancel_grace_s = cancel_grace_s
        """How long ranks may take to reach the step boundary where they stop a cancelled request (or one
        past its deadline); beyond it they count as hung and the group is broken."""
        self.env = forwarded_env() if env is None else env
        self.generation = 0
        self.broken = True
        self.broken_cause = "not_started"
        """Why the group is (or last was) broken: not_started, rank_died, rank_hung, rank_error,
        cancel_timeout (ranks did not stop a cancelled request in time), aborted (a failed health check)."""
        self.devices: list[str] = []
        self.timeline: dict[str, float] = {}
        """Seconds of each stage of the last start (see :meth:`start`)."""
        self.load_parts: dict[str, float] = {}
        """Rank 0's split of the last start's ``weights`` stage (``model``, ``add_ons``)."""

    # ----- what an implementation provides ------------------------------------------------------------------
    @abstractmethod
    def _launch(self) -> None:
        """Start one host (process, actor) per rank, each holding a ``RankWorker``."""

    @abstractmethod
    def _kill(self) -> None:
        """Stop every rank's host at once, whatever it is doing."""

    @abstractmethod
    def _call(
        self, method: Method, args: tuple, kwargs: dict, timeout: float | None, ranks: Sequence[int]
    ) -> list[Any]:
        """Run ``method`` on ``ranks`` and return their values in order. Raise :class:`RequestError` when the
        ranks refused the request, :class:`GroupError` for any other failure, as soon as one rank fails."""

    async def _call_async(
        self, method: Method, args: tuple, kwargs: dict, timeout: float | None, ranks: Sequence[int]
    ) -> list[Any]:
        return await asyncio.to_thread(self._call, method, args, kwargs, timeout, ranks)

    @abstractmethod
    def pids(self) -> list[int]:
        """Each rank's process id (for operators and fault-injection tests)."""

    # ----- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start every rank, rendezvous at rank 0's store, and load the model everywhere. How long each
        stage took is kept in :attr:`timeline` (seconds by stage: ``processes``, ``rendezvous``,
        ``weights``), for the start-up reports of pools and benchmarks."""
        self.generation += 1
        begin = time.perf_counter()
        timeline: dict[str, float] = {}
        self._launch()
        everyone = range(self.world_size)
        try:
            if self.config is not None:
                self._call("import_engine", (), {}, STARTUP_TIMEOUT_S, everyone)
            host, port = "", 0
            if self.world_size > 1:
                (host, port) = self._call(
                    "open_rendezvous",
                    (self._rendezvous_host(), STARTUP_TIMEOUT_S),
                    {},
                    STARTUP_TIMEOUT_S,
                    [0],
                )[0]
            timeline["processes"] = time.perf_counter() - begin  # ranks up, the model stack imported
            mark = time.perf_counter()
            self.devices = self._call(
                "init_distributed", (host, port, self.collective_timeout_s), {}, STARTUP_TIMEOUT_S, everyone
            )
            timeline["rendezvous"] = time.perf_counter() - mark  # the process group (NCCL, gloo)
            if self.config is not None:
                mark = time.perf_counter()
                parts = self._call("load", (self.config,), {}, STARTUP_TIMEOUT_S, everyone)
                timeline["weights"] = time.perf_counter() - mark  # model built, loaded, parallelized
                self.load_parts = parts[0]
        except BaseException:
            self._kill()
            self.broken = True
            raise
        self.broken = False
        self.timeline = {stage: round(seconds, 3) for stage, seconds in timeline.items()}
        logger.info(
            "worker group %s generation %d up in %.1f s on %s (%s)%s",
            self.name,
            self.generation,
            time.perf_counter() - begin,
            self.devices,
            ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in self.timeline.items()),
            f"; weights from the node's host copy ({self.load_parts['host_copy']:.1f} s)"
            if "host_copy" in self.load_parts
            else "",
        )

    def _rendezvous_host(self) -> str | None:
        """The address rank 0 listens on (None: rank 0 finds its own node's address)."""
        return "127.0.0.1"

    def shutdown(self) -> None:
        """Stop every rank; the executor can be started again."""
        self._kill()
        self.broken = True

    def abort(self) -> None:
        """Kill every rank now, whatever it is doing (a hung group); a call in flight fails at once and the
        group stays broken until :meth:`rebuild`."""
        self.broken = True
        self.broken_cause = "aborted"
        self._kill()

    def rebuild(self, request_id: str | None = None) -> None:
        """Replace every rank with a fresh one (a new generation) and load the model again; ``request_id``:
        the request whose failure called for it (for the log)."""
        logger.warning(
            "rebuilding worker group %s (generation %d, %s%s)",
            self.name,
            self.generation,
            self.broken_cause,
            f", after request {request_id}" if request_id else "",
        )
        self.shutdown()
        self.start()

    def __enter__(self) -> Executor:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    # ----- calls --------------------------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self.broken:
            raise GroupError(f"worker group {self.name} is broken or not started; rebuild it first")

    def _failed(self, error: BaseException) -> BaseException:
        if isinstance(error, (RequestError, RequestStopped)):
            return error
        self.broken = True
        if not isinstance(error, GroupError):
            error = GroupError(f"worker group {self.name}: {error!r}")
        self.broken_cause = error.cause
        return error

    def collective_rpc(
        self,
        method: Method,
        args: tuple = (),
        kwargs: dict | None = None,
        timeout: float | None = None,
        ranks: Sequence[int] | None = None,
    ) -> list[Any]:
        """Run ``method`` on every rank (or ``ranks``) at once; their return values in rank order. A rank
        that fails marks the group broken and raises :class:`GroupError` (:class:`RequestError`, raised by
        ranks that refuse a request, leaves it usable)."""
        self._check_usable()
        try:
            return self._call(
                method,
                args,
                kwargs or {},
                timeout or self.call_timeout_s,
                range(self.world_size) if ranks is None else ranks,
            )
        except Exception as error:
            raise self._failed(error) from error

    async def collective_rpc_async(
        self,
        method: Method,
        args: tuple = (),
        kwargs: dict | None = None,
        timeout: float | None = None,
        ranks: Sequence[int] | None = None,
    ) -> list[Any]:
        """:meth:`collective_rpc` for asyncio owners (Serve replicas)."""
        self._check_usable()
        try:
            return await self._call_async(
                method,
                args,
                kwargs or {},
                timeout or self.call_timeout_s,
                range(self.world_size) if ranks is None else ranks,
            )
        except Exception as error:
            raise self._failed(error) from error

    def generate(
        self, request: GenerateRequest, output: str = "pil", progress: bool = False
    ) -> EncodedResult:
        """Run one request on every rank; rank 0's result (images as PNG bytes)."""
        return self.collective_rpc("generate", (request, output, progress))[0]

    async def generate_async(
        self,
        request: GenerateRequest,
        output: str = "pil",
        request_id: str | None = None,
        deadline: float | None = None,
        warm_up: bool = False,
    ) -> EncodedResult:
        """:meth:`generate` for asyncio owners (Serve replicas), stoppable: past ``deadline`` (seconds since
        the epoch) every rank stops at a step boundary and :class:`RequestStopped` is raised; if the awaiting
        task is cancelled (the client went away), the ranks are stopped the same way before the cancellation
        propagates, so the group is clean (or, if they do not stop within ``cancel_grace_s``, broken) by the
        time the caller can issue another call. ``warm_up``: a warm-up, whose output is thrown away, may run on
        weights still arriving from the node's host copy (:meth:`RankWorker.generate`)."""
        request_id = request_id or uuid.uuid4().hex
        timeout = self.call_timeout_s
        if deadline is not None:
            bound = max(0.0, deadline - time.time()) + self.cancel_grace_s
            timeout = bound if timeout is None else min(timeout, bound)
        call = asyncio.ensure_future(
            self.collective_rpc_async(
                "generate", (request, output, False, request_id, deadline, warm_up), timeout=timeout
            )
        )
        try:
            return (await asyncio.shield(call))[0]
        except asyncio.CancelledError:
            await self._stop_call(call, request_id)
            raise

    async def _stop_call(self, call: asyncio.Future, request_id: str) -> None:
        """Stop a call whose caller went away and wait until every rank has left it. The group is clean when
        the call ends within ``cancel_grace_s`` (stopped at a step boundary, or finished first), however
        slowly the ranks' control threads answer the cancel itself (on a loaded host one took over 10 s
        while its ranks had stopped at once): only a call still running then marks the group broken."""
        cancel = asyncio.ensure_future(
            self._call_async("cancel", (request_id,), {}, PING_TIMEOUT_S, range(self.world_size))
        )
        cancel.add_done_callback(read_outcome)
        try:
            await asyncio.wait_for(asyncio.shield(call), self.cancel_grace_s)
            logger.info("worker group %s: request %s finished before it stopped", self.name, request_id)
        except RequestStopped:
            logger.info("worker group %s: request %s stopped on every rank", self.name, request_id)
        except Exception as error:  # no clean stop in time, or a rank failed meanwhile
            logger.warning(
                "worker group %s: request %s did not stop cleanly (%r)", self.name, request_id, error
            )
            self.broken = True
            self.broken_cause = "cancel_timeout"
        finally:
            if not call.done():
                call.cancel()
            if not cancel.done():
                cancel.cancel()

    def progress(self, previews_of: str | None = None, previews_from: int = 0) -> dict[str, Any] | None:
        """:meth:`progress_async` for a thread of its own while another thread waits on a call (the CLI's
        previews)."""
        if self.broken:
            return None
        try:
            return self._call("progress", (previews_of, previews_from), {}, PING_TIMEOUT_S, [0])[0]
        except Exception:
            return None

    async def progress_async(
        self, previews_of: str | None = None, previews_from: int = 0
    ) -> dict[str, Any] | None:
        """Rank 0's running request (its id, step, step count, previews made; when it is ``previews_of``,
        its partial images from ``previews_from`` on), None when idle or unreachable; answered while the
        request runs, without touching it."""
        if self.broken:
            return None
        try:
            arguments = (previews_of, previews_from)
            return (await self._call_async("progress", arguments, {}, PING_TIMEOUT_S, [0]))[0]
        except Exception:
            return None

    async def healthy(self) -> bool:
        """Every rank answers a ping in time (ranks answer while a request runs)."""
        if self.broken:
            return False
        try:
            await self._call_async("ping", (), {}, PING_TIMEOUT_S, range(self.world_size))
        except Exception:
            return False
        return True
