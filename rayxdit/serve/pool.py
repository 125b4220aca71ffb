"""A pool replica: a Serve replica that owns a placement group of N bundles and drives one worker group.

Serve creates the placement group (``placement_group_bundles``) and puts this actor in bundle 0; the
executor places the rank actors one per bundle. Requests run one at a time (collectives must be issued in
the same order on every rank), and each runs as a job that holds the replica's lock until its ranks are
done with it:

- **Cancelled** (the client went away; Serve cancels the call): the job tells the ranks to stop, and they
  agree to stop at the same step boundary; the lock is released only then, so the next request never runs
  on ranks still busy with this one. Ranks that do not stop within ``cancel_grace_s`` mark the group
  broken, and it is rebuilt before the next request.
- **Past its deadline**: the ranks stop the same way and the caller gets :class:`RequestStopped`
  (HTTP 504).
- **A rank dies, raises or hangs**: the group is rebuilt in the same placement group and the request retried
  once if its deadline allows, else :class:`PoolUnavailableError` (HTTP 503).
- **A rank runs out of memory**: the request is not retried (the same ranks would run out again):
  :class:`PoolOutOfMemoryError` (HTTP 507 ``out_of_memory``) at once; the group is rebuilt before the next.
- **The hardware keeps failing**: every failure (and a fatal GPU fault the ranks' NVML reports, checked
  between requests) is reported to the application's state, whose quarantine (``serve/quarantine.py``) may
  take the node out of service. Then this replica runs nothing more: the request and those waiting for it
  get :class:`ReplicaQuarantinedError` (the router routes them elsewhere), and it exits.

``check_health`` pings every rank also while a request runs: a rank that stops answering (frozen, hung)
gets the group killed at once, so the running request fails over instead of waiting for its timeouts.
Between requests a failed group is rebuilt; Serve replaces the whole replica only when a rebuild fails.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from rayxdit.config import PoolConfig
from rayxdit.loras import adapter_set_key
from rayxdit.request import DEADLINE, EncodedResult, GenerateRequest, RequestStopped, engine_seconds
from rayxdit.runtime.compile_artifacts import load_artifacts, publish_artifacts
from rayxdit.runtime.executor import GroupError
from rayxdit.runtime.rank_process import OUT_OF_MEMORY
from rayxdit.runtime.ray_executor import RayExecutor
from rayxdit.serve import metrics
from rayxdit.serve.api import PoolOutOfMemoryError, PoolUnavailableError, ReplicaQuarantinedError
from rayxdit.serve.memory import MemoryProfile, profile_at_start
from rayxdit.serve.quarantine import fatal_gpu_faults
from rayxdit.serve.routing import ServiceFit
from rayxdit.serve.state import HEARTBEAT_S
from rayxdit.serve.tasks import keep_cancellations_quiet, quiet

logger = logging.getLogger("ray.serve")
RATE_WINDOW_S = 60.0
"""The window of the request rate a replica reports to the autoscaling policy."""
PROGRESS_EVERY_S = 0.5
"""How often a job's progress (rank 0's step) is pushed to the application's state."""
PREVIEW_POLL_S = 0.1
"""How often a streamed request's partial images are fetched from rank 0 while it runs (a Flux.1-dev step
takes ~0.1 s on an H200; the poll is a control call, answered beside the loop)."""
EXIT_AFTER_S = 1.0
"""A quarantined replica exits this long after it learned it: its answers to the requests it had get out."""


class PoolReplica:
    async def __init__(self, pool: PoolConfig, state: DeploymentHandle):
        began = time.monotonic()
        keep_cancellations_quiet()
        self.pool = pool
        self.replica = serve.get_replica_context().replica_tag
        self.state = state
        self.startup_s: float | None = None  # known once up: the state learns cold-start costs from it
        self.service = ServiceFit()  # this replica's service time per request cost, for the policy
        self.finished: deque[float] = deque()  # when its recent requests finished: its request rate
        self.executor = RayExecutor.for_group(pool, name=f"{pool.name}-{self.replica}")
        self.lock = asyncio.Lock()
        self.waiting = 0  # requests waiting for the lock (a gauge)
        self.labels = {"model": pool.served_model_name, "pool": pool.name}
        self.timeline: dict[str, float] = {}
        """Seconds of each stage of this replica's start (see :meth:`startup`)."""
        self.warmed_up: list[str] = []
        self.weights_split: dict[str, float] = {}
        """Rank 0's split of the start's ``weights`` stage, with the host copy's read (see :meth:`startup`)."""
        self.memory: MemoryProfile | None = None
        """What its ranks hold and a request adds (GPU ranks; None on CPU, and until its start measured it):
        see :mod:`rayxdit.serve.memory`."""

        async def adapters_served(key: str) -> str:  # the ranks load them; Serve learns where they are
            return key

        # Serve's multiplexed routing then prefers this replica for requests naming the adapter sets it served
        # last, as many as its ranks keep on their GPUs.
        self.note_adapters = serve.multiplexed(max_num_models_per_replica=pool.engine.lora_resident)(
            adapters_served
        )
        self.node = ray.get_runtime_context().get_node_id()  # STRICT_PACK: its ranks' node too
        self.gpus: list[str] = []
        """Its ranks' GPUs (physical index or UUID), named in failure reports."""
        self.quarantined: str | None = None
        """Why its node left service, once it did (see :meth:`_failed`)."""
        self.heartbeat = asyncio.create_task(self._heartbeat())  # "starting" while the model loads
        await asyncio.to_thread(self.executor.start)
        await self._gpu_health()
        sharing = pool.engine.compile and pool.share_compile_artifacts and bool(pool.warmup_sizes)
        self.compile_report: dict[str, object] = {}
        """With compile and a warm-up: ranks that loaded the cluster's artifacts, bytes published, and rank
        0's compile-cache counters after the warm-up (hits: found compiled; misses: compiled here)."""
        artifacts = {}
        if sharing:
            artifacts["compile_artifacts"] = await self._share_artifacts(load_artifacts, "loaded_ranks")
        warm_up = await self._warm_up()
        weights_wait, host_copy_read = await self._weights_ready()
        await self._measure_memory(at_start=True)
        if sharing:
            artifacts["compile_artifacts"] += await self._share_artifacts(
                publish_artifacts, "published_bytes"
            )
        if pool.engine.compile and pool.warmup_sizes:
            try:
                self.compile_report["cache"] = (await self.executor.collective_rpc_async("compile_cache"))[0]
            except Exception as error:  # a report, never a reason to fail the start
                logger.warning("%s: no compile-cache report: %r", self.replica, error)
        self.startup_s = time.monotonic() - began
        self.timeline = {
            **self.executor.timeline,
            **artifacts,
            "warm_up": warm_up,
            "weights_wait": weights_wait,
            "total": round(self.startup_s, 3),
        }
        self.weights_split = {
            **self.executor.load_parts,
            **({"host_copy": host_copy_read} if host_copy_read is not None else {}),
        }
        for stage, seconds in self.timeline.items():
            metrics.observe("rayxdit_replica_start_seconds", seconds, pool=pool.name, stage=stage)
        logger.info("%s: started in %.1f s (%s)", self.replica, self.startup_s, self.timeline)
        # Ready in the shared state before Serve sees this replica up (not up to a heartbeat later): when
        # Serve reports the application running, /readyz agrees.
        await self._report()

    async def _share_artifacts(self, share, report: str) -> float:
        """Load (before the warm-up) or publish (after it) the cluster's compile artifacts of this engine,
        its outcome kept under ``report``; returns the seconds it took. A store that fails costs a compile
        from scratch, never the start."""
        began = time.monotonic()
        try:
            self.compile_report[report] = done = await share(self.executor, self.pool.engine)
            logger.info("%s: %s: %s", self.replica, share.__name__, done)
        except Exception as error:
            logger.warning("%s: %s failed (compiling without them): %r", self.replica, share.__name__, error)
        return round(time.monotonic() - began, 3)

    async def _warm_up(self) -> float:
        """One short generation per ``warmup_sizes`` entry (torch.compile compiles per resolution), before
        the replica reports ready: no user request pays it. Returns the seconds it took."""
        began = time.monotonic()
        for size in self.pool.warmup_sizes:
            width, height = (int(side) for side in size.lower().split("x"))
            begin = time.monotonic()
            request = GenerateRequest(prompt="warm-up", width=width, height=height, steps=2)
            # Its output is thrown away: it compiles while the weights may still arrive (_weights_ready).
            await self.executor.generate_async(request, request_id=f"warm-up-{size}", warm_up=True)
            self.warmed_up.append(size)
            logger.info("%s: warmed up %s in %.1f s", self.replica, size, time.monotonic() - begin)
        return round(time.monotonic() - began, 3)

    async def _weights_ready(self) -> tuple[float, float | None]:
        """Wait until every rank's weights are in place (a read from the node's host copy goes on behind the
        warm-up) before the replica reports ready: the seconds waited, and rank 0's read of the host copy
        (None: its weights did not come from one)."""
        began = time.monotonic()
        read_s = (await self.executor.collective_rpc_async("weights_ready"))[0]
        return round(time.monotonic() - began, 3), read_s

    async def _measure_memory(self, at_start: bool = False) -> None:
        """Read the ranks' memory (after the start: what they hold and, with a warm-up, what its largest
        size added; after a request: what it added). A report that fails costs the measurement, never the
        start or the request."""
        if not at_start and self.memory is None:
            return  # CPU ranks: nothing to measure
        try:
            reports = await self.executor.collective_rpc_async("memory")
        except Exception as error:
            logger.warning("%s: no memory report: %r", self.replica, error)
            return
        if at_start:
            self.memory = profile_at_start(reports)
            if self.memory is not None:
                logger.info("%s: memory per rank %s", self.replica, self.memory.describe())
            return
        self.memory = self.memory.with_reports(reports)

    def startup(self) -> dict[str, object]:
        """How this replica started: seconds by stage (``processes``, ``rendezvous``, ``weights``,
        ``compile_artifacts`` when it compiles and warms up, ``warm_up``, ``weights_wait``: for weights still
        arriving from the node's host copy after the warm-up, ``total``), rank 0's split of ``weights``
        (``model``: read or built on the device; ``add_ons``; ``host_copy``: the host copy's read, which
        overlaps the stages after ``weights``), the sizes it warmed up, all before
        it reported ready, and with compile what the compile found cached (``compile``); ``replica``: its id."""
        return {
            "replica": self.replica,
            "timeline": self.timeline,
            "weights": self.weights_split,
            "warmed_up": list(self.warmed_up),
            **({"compile": self.compile_report} if self.compile_report else {}),
        }

    async def _heartbeat(self) -> None:
        """Tell the application's state every second whether this replica is starting or ready."""
        while True:
            await self._report()
            await asyncio.sleep(HEARTBEAT_S)

    async def _report(self) -> None:
        # Ray's metrics agent drops a gauge not set for two report intervals: set them every heartbeat.
        metrics.set_gauge("rayxdit_requests_waiting", self.waiting, pool=self.pool.name)
        metrics.set_gauge("rayxdit_requests_running", int(self.lock.locked()), pool=self.pool.name)
        ready = self.startup_s is not None and not self.executor.broken
        memory = self.memory.describe() if self.memory is not None else None
        if memory is not None:
            for kind in ("capacity_gib", "resident_gib", "max_megapixels"):
                if memory[kind] is not None:
                    metrics.set_gauge("rayxdit_rank_memory", memory[kind], pool=self.pool.name, kind=kind)
        try:
            await self.state.report.remote(self.pool.name, self.replica, ready, self.startup_s, memory)
        except Exception as error:  # the state replica restarting: the next beat tells it
            logger.debug("heartbeat of %s failed: %r", self.replica, error)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom autoscaling metrics for the application's policy (0: not measured yet)."""
        overhead, rate = self.service.fitted or (0.0, 0.0)
        now = time.monotonic()
        while self.finished and self.finished[0] < now - RATE_WINDOW_S:
            self.finished.popleft()
        return {
            "seconds_per_cost": rate,
            "overhead_s": overhead,
            "mean_cost": self.service.mean_cost or 0.0,
            "requests_per_s": len(self.finished) / RATE_WINDOW_S,
            "startup_s": self.startup_s or 0.0,
        }

    async def generate(
        self,
        request: GenerateRequest,
        request_id: str,
        deadline: float | None = None,
        cost: float = 0.0,
        report_progress: bool = False,
    ) -> EncodedResult:
        """Run ``request`` on the worker group; ``deadline`` in seconds since the epoch; ``cost`` (the
        router's) teaches this replica's rate, reported to the autoscaling policy. ``report_progress``: the
        request is a job (``request_id`` its id) whose progress the application's state shows."""
        # The job runs in a fresh context, detached from this Serve request: when Serve cancels the request
        # (the client went away) Ray cancels its child tasks recursively, which would cut the ranks' calls
        # mid-collective; the job instead stops them at a step boundary, all together.
        job = await self._start(request, request_id, deadline, cost)
        reporter = asyncio.create_task(self._report_progress(request_id)) if report_progress else None
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            job.cancel()  # the job stops its ranks (or marks the group broken) before it releases the lock
            raise
        finally:
            if reporter is not None:
                reporter.cancel()

    async def generate_stream(
        self, request: GenerateRequest, request_id: str, deadline: float | None = None, cost: float = 0.0
    ) -> AsyncIterator[dict[str, Any] | EncodedResult]:
        """:meth:`generate` for a streamed request (Serve's streaming call): its partial images as rank 0
        makes them (``{"partial_image_index", "png"}``; polled every PREVIEW_POLL_S), then the result.
        Closing the stream (the client went away) stops the ranks at their next step, as for ``generate``."""
        job = await self._start(request, request_id, deadline, cost)
        sent = 0
        try:
            while not job.done():
                await asyncio.wait({job}, timeout=PREVIEW_POLL_S)
                if job.done() or not self.lock.locked():
                    continue
                progress = await self.executor.progress_async(request_id, sent)
                for png in (progress or {}).get("partials", ()):
                    yield {"partial_image_index": sent, "png": png}
                    sent += 1
            result = job.result()
            for index in sorted(index for index in result.partials if index >= sent):
                yield {"partial_image_index": index, "png": result.partials[index]}
            result.partials = {}
            yield result
        except (asyncio.CancelledError, GeneratorExit):
            job.cancel()  # the job stops its ranks (or marks the group broken) before it releases the lock
            raise

    async def _start(
        self, request: GenerateRequest, request_id: str, deadline: float | None, cost: float
    ) -> asyncio.Task:
        """The request as a job of its own (see :meth:`generate`), its adapter set noted first."""
        if request.loras:
            await self.note_adapters(adapter_set_key(request.loras))
        job = contextvars.Context().run(asyncio.create_task, self._run(request, request_id, deadline, cost))
        job.add_done_callback(quiet)  # a job cancelled with its caller ends in an error nobody reads
        return job

    async def _report_progress(self, job_id: str) -> None:
        """Push rank 0's step of ``job_id`` to the application's state while it runs."""
        last = None
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            progress = await self.executor.progress_async() if self.lock.locked() else None
            if not progress or progress.get("request_id") != job_id:
                continue
            where = (progress["step"], progress["steps"])
            if where != last:
                last = where
                try:
                    await self.state.job_progress.remote(job_id, *where)
                except Exception as error:  # the state replica restarting: the next report tells it
                    logger.debug("progress of %s not reported: %r", job_id, error)

    async def _rebuild(self, request_id: str | None = None) -> None:
        metrics.inc("rayxdit_group_rebuilds", pool=self.pool.name, cause=self.executor.broken_cause)
        await asyncio.to_thread(self.executor.rebuild, request_id)
        await self._gpu_health()

    async def _gpu_health(self) -> list[str]:
        """Learn the ranks' GPUs (after a start or rebuild); the fatal faults their NVML reports."""
        reports = await self.executor.collective_rpc_async("gpu_health")
        self.gpus = [str(report.get("gpu", "?")) for report in reports]
        return [fault for report in reports for fault in fatal_gpu_faults(report)]

    async def _failed(self, cause: str, faults: list[str] | None = None) -> None:
        """Report a failure of the group (or fatal GPU faults) to the quarantine; when its node leaves
        service, this replica stops running requests and exits (Serve starts a replacement elsewhere)."""
        try:
            record = await self.state.group_failed.remote(
                self.node, self.gpus, self.pool.name, cause, faults or []
            )
        except Exception as error:  # the state restarting: this failure goes uncounted
            logger.warning("%s: failure not reported to the quarantine: %r", self.replica, error)
            return
        if record is None or self.quarantined is not None:
            return
        self.quarantined = record["reason"]
        logger.error(
            "%s: node %s left service (%s): exiting; Serve starts a replacement elsewhere",
            self.replica,
            self.node,
            self.quarantined,
        )
        asyncio.get_running_loop().call_later(EXIT_AFTER_S, self._exit)

    def _exit(self) -> None:
        self.executor.abort()  # the ranks go at once, whatever Ray does next
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def _refuse_if_quarantined(self, request_id: str) -> None:
        if self.quarantined is not None:
            raise ReplicaQuarantinedError(
                f"{self.pool.name}: request {request_id} not run: node {self.node} left service "
                f"({self.quarantined})"
            )

    async def _run(
        self, request: GenerateRequest, request_id: str, deadline: float | None, cost: float
    ) -> EncodedResult:
        arrived = time.monotonic()
        self.waiting += 1
        metrics.set_gauge("rayxdit_requests_waiting", self.waiting, pool=self.pool.name)
        try:
            await self.lock.acquire()
        finally:
            self.waiting -= 1
            metrics.set_gauge("rayxdit_requests_waiting", self.waiting, pool=self.pool.name)
        metrics.observe("rayxdit_queue_wait_seconds", time.monotonic() - arrived, **self.labels)
        metrics.set_gauge("rayxdit_requests_running", 1, pool=self.pool.name)
        try:
            self._refuse_if_quarantined(request_id)
            return await self._attempts(request, request_id, deadline, cost)
        finally:
            metrics.set_gauge("rayxdit_requests_running", 0, pool=self.pool.name)
            self.lock.release()

    async def _attempts(
        self, request: GenerateRequest, request_id: str, deadline: float | None, cost: float
    ) -> EncodedResult:
        """The request on the ranks, once more on a rebuilt group if the first attempt broke it."""
        last_error: BaseException | None = None
        wasted = 0.0  # GPU-seconds of a failed first attempt: the request's tenant pays them too
        for attempt in (1, 2):
            if attempt == 2 and deadline is not None and time.time() >= deadline:
                raise RequestStopped(DEADLINE)
            began = time.monotonic()
            try:
                if self.executor.broken:
                    await self._rebuild(request_id)
                    began = time.monotonic()
                result = await self.executor.generate_async(request, request_id=request_id, deadline=deadline)
                engine_s = engine_seconds(result.timings)
                result.timings["ranks"] = self.pool.ranks
                result.timings["attempts"] = attempt
                gpu_seconds = self.pool.ranks * (engine_s or time.monotonic() - began)
                result.timings["gpu_seconds"] = round(gpu_seconds + wasted, 4)
                if wasted:
                    result.timings["failed_gpu_seconds"] = round(wasted, 4)
                metrics.inc("rayxdit_gpu_seconds", gpu_seconds, **self.labels)
                metrics.inc("rayxdit_images", len(result.pngs), **self.labels)
                metrics.record_engine_timings(self.labels["model"], self.labels["pool"], result.timings)
                if cost > 0 and engine_s:
                    self.service.add(cost, engine_s)
                self.finished.append(time.monotonic())
                await self._measure_memory()
                return result
            except GroupError as error:
                # The GPUs were held whatever came of it: a failed attempt costs its wall time too.
                failed = self.pool.ranks * (time.monotonic() - began)
                wasted += failed
                metrics.inc("rayxdit_gpu_seconds", failed, **self.labels)
                logger.warning("request %s: %s (attempt %d)", request_id, error, attempt)
                if error.cause == OUT_OF_MEMORY:  # the same ranks would run out again: no second attempt
                    raise PoolOutOfMemoryError(f"{self.pool.name}: {error}") from None
                last_error = error
                await self._failed(error.cause)
            except (RequestStopped, asyncio.CancelledError):
                raise
            except Exception as error:  # rebuild failed: let the health check replace the replica
                if not self.executor.broken:
                    raise
                logger.warning("request %s: rebuilding failed: %r", request_id, error)
                last_error = error
                await self._failed("rebuild_failed")
            self._refuse_if_quarantined(request_id)  # never again on the same hardware
        raise PoolUnavailableError(f"{self.pool.name}: {last_error}")

    async def check_health(self) -> None:
        if self.quarantined is not None:
            raise RuntimeError(f"node {self.node} left service: {self.quarantined}")
        healthy = await self.executor.healthy()
        if self.lock.locked():
            if not healthy and not self.executor.broken:
                # A rank stopped answering mid-request: kill the group so the request fails over now.
                logger.warning(
                    "%s: a rank stopped answering during a request; killing the group", self.replica
                )
                self.executor.abort()
            return
        if healthy and self.pool.accelerator != "gpu":
            return
        # The lock is free (checked above, nothing awaited since): taking it cannot wait on a request.
        async with self.lock:
            if healthy:  # a GPU can report a fatal fault (ECC, Xid) before any request fails on it
                faults = await self._gpu_health()
                if faults:
                    await self._failed("gpu_fault", faults)
                return
            if not self.executor.broken:  # found unresponsive between requests: a failure of its own
                self.executor.abort()  # its ranks go now; the rebuild's cause reads "aborted", not the last one
                await self._failed("rank_unresponsive")
            if self.quarantined is None:
                await self._rebuild()

    def worker_pids(self) -> list[int]:
        return self.executor.pids()

    def generation(self) -> int:
        """How many times this replica's worker group was started (1: never rebuilt)."""
        return self.executor.generation
