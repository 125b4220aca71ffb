"""Driving a batch (OpenAI's Batch API) from the router replica that created it, on the online pools' idle
replicas.

A batch is a job of kind ``batch`` in the shared state (``serve/jobs.py``, ``serve/batches.py``): any router
replica answers for it, and the one that created it drives it. It reads the input file, checks every line as
its endpoint would (image generations, JSON edits, videos; a line its endpoint would refuse goes to the error
file; it never stops the batch), then
runs the lines through the :class:`~rayxdit.serve.dispatch.Dispatcher` as *background* work: a line is
admitted only onto a ready replica that no request runs on or waits for (``routing.idle_pools``), and waits
otherwise. So an online request waits behind at most the one line a replica is running, the lines fill the
gaps between online requests, and they never make a pool grow. The driver renews the batch's lease twice a
second and learns there whether it was cancelled (through any router replica): its lines under way stop at
their ranks' next step boundary, and the output and error files are written with what finished. So it is
when the batch's completion window passes: the lines without an answer go to the error file as
``batch_expired`` and the batch ends ``expired``. Each line gets exactly one output or error line.

Each line's answer is kept in the state as it comes (with ``state.redis_url`` in Redis too). A router
replica that dies leaves its batches' leases to lapse; another router replica adopts each (it looks on every
health check Serve makes of it, every 10 s) and runs the lines without an answer: each line gets one answer
in the files. Lines that were under way on the dead replica's watch run again (their first run's result
was lost with it).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from ray.serve.handle import DeploymentHandle

from rayxdit.config import TenantLimits
from rayxdit.limits import ResolvedRequest
from rayxdit.request import EncodedResult, GenerateRequest
from rayxdit.serve import metrics
from rayxdit.serve.api import (
    ApiError,
    ImageData,
    ImageGenerationRequest,
    ImageGenerationResponse,
    VideoGenerationRequest,
    invalid,
)
from rayxdit.serve.batches import (
    BatchLine,
    batch_object,
    error_line,
    expired_line,
    jsonl,
    output_line,
    parse_lines,
    window_seconds,
)
from rayxdit.serve.catalog import Catalog
from rayxdit.serve.dispatch import BUSY_WAIT_S, Busy, Dispatcher, Preempted
from rayxdit.serve.inputs import (
    conditioning_inputs,
    json_edit_inputs,
    resolve,
    validated_body,
    video_fields,
)
from rayxdit.serve.job_driver import RENEW_JOB_S
from rayxdit.serve.jobs import CANCELLED, COMPLETED, TAKEN
from rayxdit.serve.tasks import ask_state, file_reader, quiet

logger = logging.getLogger("ray.serve")
LINES_IN_FLIGHT = 8
"""A batch's lines asking for idle replicas at once (the state admits only as many as replicas idle)."""

ImageStorer = Callable[[list[bytes], str, str], Awaitable[list[ImageData]]]
"""``(pngs, response_format, base_url) -> data``: the images of an answer as the endpoint gives them."""
EXPIRED = "expired"
"""Why a batch's lines under way were stopped: its completion window passed."""


@dataclasses.dataclass(frozen=True)
class LineWork:
    """A batch's line checked as its endpoint checks it: the request to run, and ``answer(result, info)``:
    the body its endpoint answers with (ApiError: the line fails as the endpoint would)."""

    line: BatchLine
    model: str
    request: GenerateRequest
    resolved: ResolvedRequest
    labels: dict[str, str]
    timeout: float | None
    answer: Callable[[EncodedResult, dict[str, Any]], Awaitable[dict[str, Any]]]


class BatchDriver:
    """Creates batches in the shared state and drives the ones this router replica created."""

    def __init__(
        self,
        state: DeploymentHandle,
        dispatcher: Dispatcher,
        catalog: Catalog,
        image_data: ImageStorer,
        replica: str = "",
    ):
        self.replica = replica
        self.state = state
        self.dispatcher = dispatcher
        self.catalog = catalog
        self.image_data = image_data
        self.running: set[asyncio.Task] = set()

    async def start(
        self,
        owner: str,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str] | None,
        base_url: str,
        tenant: str | None,
        limits: TenantLimits | None,
    ) -> dict[str, Any]:
        """Create the batch and drive it from this replica; the batch object, at once."""
        found = await ask_state(lambda: self.state.get_file.remote(input_file_id, owner), "a batch's input")
        if found is None or found["purpose"] != "batch":
            raise invalid(
                f"input_file_id: no file '{input_file_id[:64]}' of purpose 'batch' (upload it with POST "
                "/v1/files, purpose=batch)",
                "input_file_id",
            )
        fields = {
            "endpoint": endpoint,
            "input_file_id": input_file_id,
            "completion_window": completion_window,
            "metadata": metadata,
            # What a replica that adopts the batch needs to run it as its creator would (never shown):
            "_base_url": base_url,
            "_tenant": tenant,
            "_limits": None if limits is None else dataclasses.asdict(limits),
            "_driver": self.replica,
        }
        job = await ask_state(lambda: self.state.create_job.remote("batch", owner, "", fields), "a batch")
        self._launch(job, owner)
        logger.info("batch %s: created from %s", job["id"], input_file_id)
        return batch_object(job, time.time())

    async def adopt_orphans(self) -> None:
        """Take over the batches whose driver (another router replica) died: each runs on here from the
        lines that have no answer yet (the state grants each batch to one replica)."""
        for batch_id in await self.state.orphaned_batches.remote():
            adopted = await self.state.adopt_batch.remote(batch_id, self.replica)
            if adopted is not None:
                job, owner = adopted
                logger.warning("batch %s: its driver is gone; adopted, running its lines left", batch_id)
                self._launch(job, owner)

    def _launch(self, job: dict[str, Any], owner: str) -> None:
        limits = job.get("_limits")
        drive = self._drive(
            job["id"],
            owner,
            job["input_file_id"],
            job["endpoint"],
            job["_base_url"],
            job.get("_tenant"),
            None if limits is None else TenantLimits(**limits),
            job["created_at"] + window_seconds(job["completion_window"]),
            job.get("adoptions", 0),
        )
        # A fresh context: the batch outlives the HTTP request that created it.
        task = contextvars.Context().run(asyncio.create_task, drive)
        task.add_done_callback(quiet)
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    async def _drive(
        self,
        batch_id: str,
        owner: str,
        input_file_id: str,
        endpoint: str,
        base_url: str,
        tenant: str | None,
        limits: TenantLimits | None,
        expires_at: float,
        adoptions: int = 0,
    ) -> None:
        began = time.monotonic()
        status = "failed"
        try:
            content = await ask_state(lambda: self.state.file_content.remote(input_file_id, owner), batch_id)
            if content is None:
                await self._fail(batch_id, "input_file_gone", f"input file {input_file_id} was deleted")
                return
            lines, errors = parse_lines(content, endpoint)
            runnable: list[LineWork] = []
            for line in lines:
                try:
                    runnable.append(await self._validated(line, endpoint, owner, base_url))
                except ApiError as error:
                    errors.append(_error_line_of(line.custom_id, error))
            # Lines answered already (by a driver that died: this replica adopted the batch) are not run again.
            answered = await ask_state(lambda: self.state.answered_batch_lines.remote(batch_id), batch_id)
            run = _Run(batch_id, total=len(runnable) + len(errors), adoptions=adoptions)
            run.completed = sum(ok for ok, _ in answered.values())
            run.failed = len(errors) + len(answered) - run.completed
            if not answered:
                await self._update(batch_id, {"in_progress_at": int(time.time()), **run.report()})
            await self.state.job_progress.remote(batch_id, len(answered), max(1, run.total))
            queue = deque(work for work in runnable if work.line.index not in answered)
            workers = [
                asyncio.create_task(self._work(queue, run, tenant, limits))
                for _ in range(min(LINES_IN_FLIGHT, len(queue)))
            ]
            stopped = await self._supervise(batch_id, workers, run, expires_at)
            if stopped == TAKEN:  # the adopter runs it on, and writes its files
                status = TAKEN
                return
            await self._update(batch_id, {"finalizing_at": int(time.time()), **run.report()})
            answered = await ask_state(lambda: self.state.answered_batch_lines.remote(batch_id), batch_id)
            if stopped == EXPIRED:  # every line without an answer: batch_expired in the error file
                unrun = [work.line for work in runnable if work.line.index not in answered]
                errors += [expired_line(line.custom_id) for line in unrun]
                run.failed += len(unrun)
            files = await self._write_files(batch_id, owner, errors, answered)
            ended = {"expired_at": int(time.time())} if stopped == EXPIRED else {}
            await self._update(batch_id, {**files, **run.report(), **ended, "finalized": True})
            await ask_state(lambda: self.state.drop_batch_lines.remote(batch_id), batch_id)
            if stopped == CANCELLED:
                status = CANCELLED
                return
            stored = await ask_state(lambda: self.state.complete_job.remote(batch_id, [], None), batch_id)
            status = (stopped or "completed") if stored else "failed"
        except Exception as error:
            logger.error("batch %s failed: %r", batch_id, error)
            await self._fail(
                batch_id, "server_error", f"internal error in batch {batch_id}; see the server log"
            )
        finally:
            metrics.inc("rayxdit_jobs", model="", kind="batch", status=status)
            logger.info("batch %s: %s after %.3f s", batch_id, status, time.monotonic() - began)

    async def _validated(self, line: BatchLine, endpoint: str, owner: str, base_url: str) -> LineWork:
        """A line's body checked as ``endpoint`` checks it (400s as the endpoint's), with how its answer is
        shown: images as the images endpoints answer; a video stored as a completed video job, whose object
        is the answer."""
        labels = {"model": "", "pool": "", "size_class": ""}
        if endpoint == "/v1/videos":
            video = validated_body(VideoGenerationRequest, line.body)
            model, request, resolved = resolve(self.catalog, video, None, labels)
            fields = video_fields(self.catalog, model, video, resolved)

            async def stored_video(result: EncodedResult, info: dict[str, Any]) -> dict[str, Any]:
                job = await ask_state(
                    lambda: self.state.store_completed_job.remote(
                        "video", owner, model, fields, result.pngs, {"rayxdit": info}
                    ),
                    f"a video of batch line {line.custom_id}",
                )
                if job["status"] != COMPLETED:  # its frames exceed the store (router.max_job_bytes)
                    raise ApiError(500, job["error"]["message"], "server_error", code=job["error"]["code"])
                return job

            return LineWork(line, model, request, resolved, labels, video.timeout, stored_video)
        if endpoint == "/v1/images/edits":
            body, inputs = await json_edit_inputs(self.catalog, line.body, file_reader(self.state, owner))
        else:
            body = validated_body(ImageGenerationRequest, line.body)
            if body.background:
                raise invalid("background: a batch's lines run in the background already", "background")
            inputs = await conditioning_inputs(self.catalog, body)
        if body.stream:
            raise invalid("stream: a batch's answers are its output file; send stream=false", "stream")
        model, request, resolved = resolve(self.catalog, body, inputs, labels)

        async def images(result: EncodedResult, info: dict[str, Any]) -> dict[str, Any]:
            data = await self.image_data(result.pngs, body.response_format, base_url)
            answer = ImageGenerationResponse(created=int(time.time()), data=data, rayxdit=info)
            return answer.model_dump(exclude_none=True)

        return LineWork(line, model, request, resolved, labels, body.timeout, images)

    async def _supervise(
        self, batch_id: str, workers: list[asyncio.Task], run: _Run, expires_at: float
    ) -> str | None:
        """Renew the batch's lease until its lines are done; None then, else why the lines under way were
        stopped: ``cancelled`` (or the batch gone), ``taken`` (another replica adopted the batch while this
        one could not renew its lease) or ``expired`` (its completion window, ``expires_at`` on the wall
        clock, passed)."""
        reported = run.report()
        while workers and not all(worker.done() for worker in workers):
            if time.time() >= expires_at:
                await _stop(workers)
                return EXPIRED
            await asyncio.wait(workers, timeout=min(RENEW_JOB_S, max(0.0, expires_at - time.time())))
            try:
                now = await self.state.renew_job.remote(batch_id, self.replica)
            except Exception as error:  # the state replica restarting: the next renewal tells
                logger.debug("batch %s: lease not renewed: %r", batch_id, error)
                continue
            if now in (None, CANCELLED, TAKEN):
                await _stop(workers)
                return TAKEN if now == TAKEN else CANCELLED
            if run.report() != reported:
                reported = run.report()
                await self._update(batch_id, reported)
                await self.state.job_progress.remote(batch_id, run.completed + run.failed, max(1, run.total))
        for worker in workers:
            worker.result()  # a worker's own failure (not a line's) fails the batch
        return None

    async def _work(
        self,
        queue: deque[LineWork],
        run: _Run,
        tenant: str | None,
        limits: TenantLimits | None,
    ) -> None:
        """Run lines off ``queue`` until it is empty, each on an idle replica (waiting for one)."""
        while queue:
            work = queue.popleft()
            line = work.line
            runs = 0  # a preempted line runs again under a new id: its first attempt's ticket is finished
            while True:
                request_id = run.request_id(line.index, runs)
                try:
                    result, info = await self.dispatcher.run(
                        work.model,
                        work.request,
                        work.resolved,
                        request_id,
                        work.timeout,
                        dict(work.labels),
                        tenant=tenant,
                        limits=limits,
                        background=True,
                    )
                    shown = output_line(line.custom_id, request_id, await work.answer(result, info))
                except Busy as busy:
                    await asyncio.sleep(busy.wait_s)
                    continue
                except Preempted:  # an online request took its replica: again later, from its first step
                    run.preempted += 1
                    runs += 1
                    await asyncio.sleep(BUSY_WAIT_S)
                    continue
                except ApiError as error:
                    await self._answer(run.batch_id, line.index, False, _error_line_of(line.custom_id, error))
                    run.failed += 1
                    break
                await self._answer(run.batch_id, line.index, True, shown)
                run.completed += 1
                break

    async def _answer(self, batch_id: str, index: int, ok: bool, line: dict[str, Any]) -> None:
        """A line's answer, kept in the state at once (a replica that adopts the batch skips the line)."""
        data = jsonl([line])
        await ask_state(lambda: self.state.record_batch_line.remote(batch_id, index, ok, data), batch_id)

    async def _write_files(
        self,
        batch_id: str,
        owner: str,
        invalid_lines: list[dict[str, Any]],
        answered: dict[int, tuple[bool, bytes]],
    ) -> dict[str, str | None]:
        """The output file (the ``answered`` lines that succeeded, in input order) and the error file
        (``invalid_lines``, then the answered lines that failed; none when no line failed)."""
        ordered = [answered[index] for index in sorted(answered)]
        files: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
        for name, content in (
            ("output", b"".join(line for ok, line in ordered if ok)),
            ("error", jsonl(invalid_lines) + b"".join(line for ok, line in ordered if not ok)),
        ):
            if not content:
                continue
            created = await ask_state(
                lambda name=name, content=content: self.state.create_file.remote(
                    owner, "batch_output", f"{batch_id}_{name}.jsonl", content
                ),
                batch_id,
            )
            if created is None:
                raise RuntimeError(f"the {name} file exceeds the router's store (router.max_job_bytes)")
            files[f"{name}_file_id"] = created["id"]
        return files

    async def _update(self, batch_id: str, fields: dict[str, Any]) -> None:
        await ask_state(lambda: self.state.update_job.remote(batch_id, fields), batch_id)

    async def _fail(self, batch_id: str, code: str, message: str) -> None:
        try:
            await ask_state(lambda: self.state.fail_job.remote(batch_id, code, message), batch_id)
        except Exception as error:
            logger.warning("batch %s: its failure (%s) not stored: %r", batch_id, code, error)


class _Run:
    """A batch's counts as its driver runs it."""

    def __init__(self, batch_id: str, total: int, adoptions: int = 0):
        self.batch_id = batch_id
        self.total = total
        self.adoptions = adoptions
        self.completed = self.failed = 0
        self.preempted = 0
        """Lines stopped for an online request (and run again)."""

    def request_id(self, index: int, runs: int) -> str:
        """The id line ``index`` runs under on its ``runs``-th run (after preemptions) by this driver. An
        adopter's ids differ from the dead driver's (``@adoptions``): a line the dead driver ran to its end
        without recording the answer is run again, and under its old id the state would take it for the
        late routing call of a finished request and never admit it."""
        adopted = f"@{self.adoptions}" if self.adoptions else ""
        return f"{self.batch_id}:{index}{adopted}" + (f".{runs}" if runs else "")

    def counts(self) -> dict[str, int]:
        return {"total": self.total, "completed": self.completed, "failed": self.failed}

    def report(self) -> dict[str, Any]:
        """What the batch object shows of the run: OpenAI's counts, and rayxdit's preemptions."""
        return {"request_counts": self.counts(), "preemptions": self.preempted}


async def _stop(workers: list[asyncio.Task]) -> None:
    """Stop every line under way (its ranks stop at their next step boundary) and wait until they have."""
    for worker in workers:
        worker.cancel()
    await asyncio.wait(workers)


def _error_line_of(custom_id: str, error: ApiError) -> dict[str, Any]:
    return error_line(custom_id, error.status, error.code or error.kind, str(error), error.kind, error.param)
