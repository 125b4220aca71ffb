"""Driving jobs (videos, background images) from the router replica that created them.

A job lives in the application's shared state (``serve/jobs.py``: status, progress, lease, result), so any
router replica answers for it. The replica that created it runs it like any request (through the
:class:`~rayxdit.serve.dispatch.Dispatcher`), renews its lease twice a second and learns there whether a
``DELETE`` through any replica cancelled it; then the pool stops the ranks at their next step boundary.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ray.serve.handle import DeploymentHandle

from rayxdit.config import TenantLimits
from rayxdit.limits import ResolvedRequest
from rayxdit.request import EncodedResult, GenerateRequest
from rayxdit.serve import metrics
from rayxdit.serve.api import ApiError, shown_id
from rayxdit.serve.dispatch import Dispatcher
from rayxdit.serve.jobs import CANCELLED, COMPLETED
from rayxdit.serve.tasks import ask_state, quiet

logger = logging.getLogger("ray.serve")
RENEW_JOB_S = 0.5
"""How often a job's driver renews its lease (and so how soon it sees a cancellation)."""

Deliver = Callable[[EncodedResult, dict[str, Any]], Awaitable[tuple[list[bytes], dict[str, Any]]]]
"""What the state keeps of a finished job: ``deliver(result, info) -> (content, shown result)``."""


class JobDriver:
    """Creates jobs in the shared state and drives the ones this router replica created."""

    def __init__(self, state: DeploymentHandle, dispatcher: Dispatcher):
        self.state = state
        self.dispatcher = dispatcher
        self.running: set[asyncio.Task] = set()  # the jobs this replica drives (referenced until done)

    async def start(
        self,
        kind: str,
        owner: str,
        model: str,
        request: GenerateRequest,
        resolved: ResolvedRequest,
        timeout: float | None,
        fields: dict[str, Any],
        labels: dict[str, str],
        deliver: Deliver,
        request_id: str,
        tenant: str | None = None,
        limits: TenantLimits | None = None,
    ) -> dict[str, Any]:
        """Create a job in the shared state and drive it from this replica; the job object, at once. Its
        request counts against ``tenant``'s ``limits`` when it is routed (over one, the job fails with the
        limit's code)."""
        job = await ask_state(
            lambda: self.state.create_job.remote(kind, owner, model, fields), f"request {request_id}"
        )
        drive = self._drive(
            job["id"], kind, model, request, resolved, timeout, dict(labels), deliver, tenant, limits
        )
        # A fresh context: the job outlives the HTTP request that created it, and must not be cancelled
        # with it.
        task = contextvars.Context().run(asyncio.create_task, drive)
        task.add_done_callback(quiet)
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        logger.info("job %s: %s on %s created by request %s", job["id"], kind, model, request_id)
        return job

    async def _drive(
        self,
        job_id: str,
        kind: str,
        model: str,
        request: GenerateRequest,
        resolved: ResolvedRequest,
        timeout: float | None,
        labels: dict[str, str],
        deliver: Deliver,
        tenant: str | None = None,
        limits: TenantLimits | None = None,
    ) -> None:
        """Run a job to its end: its lease renewed meanwhile; stopped when it is cancelled; its result or its
        error stored in the shared state."""
        run = asyncio.create_task(
            self.dispatcher.run(
                model,
                request,
                resolved,
                job_id,
                timeout,
                labels,
                report_progress=True,
                tenant=tenant,
                limits=limits,
            )
        )
        run.add_done_callback(quiet)  # a cancelled run may end in the pool call's cancellation error
        status = "failed"
        began = time.monotonic()
        try:
            while not run.done():
                await asyncio.wait({run}, timeout=RENEW_JOB_S)
                if run.done():
                    break
                try:
                    now = await self.state.renew_job.remote(job_id)
                except Exception as error:  # the state replica restarting: the next renewal tells
                    logger.debug("job %s: lease not renewed: %r", job_id, error)
                    continue
                if now in (None, CANCELLED):  # deleted through some router replica (or the state forgot it)
                    run.cancel()  # the pool stops its ranks at their next step boundary
                    await asyncio.wait({run})
                    status = CANCELLED
                    return
            result, info = run.result()
            content, shown = await deliver(result, info)
            stored = await ask_state(
                lambda: self.state.complete_job.remote(job_id, content, shown), f"job {job_id}"
            )
            status = COMPLETED if stored else "failed"
        except ApiError as error:
            await self._fail(job_id, error.code or error.kind, str(error))
        except Exception as error:
            logger.error("job %s failed: %r", job_id, error)
            await self._fail(
                job_id, "server_error", f"internal error in job {job_id}; the server log has the details"
            )
        finally:
            metrics.inc("rayxdit_jobs", model=model, kind=kind, status=status)
            logger.info("job %s: %s after %.3f s", job_id, status, time.monotonic() - began)

    async def _fail(self, job_id: str, code: str, message: str) -> None:
        try:
            await ask_state(lambda: self.state.fail_job.remote(job_id, code, message), f"job {job_id}")
        except Exception as error:  # the state replica restarted and lost the job: nobody can see it now
            logger.warning("job %s: its failure (%s) not stored: %r", job_id, code, error)

    async def find(self, job_id: str, kind: str, owner: str, action: str = "get_job") -> Any:
        """The caller's job of ``kind`` through the state's ``action`` (get_job, cancel_job, job_content);
        404 when it does not exist for the caller."""
        found = await ask_state(
            lambda: getattr(self.state, action).remote(job_id, owner, kind), f"{kind} job {shown_id(job_id)}"
        )
        if found is None:
            raise ApiError(
                404, f"{kind} job {shown_id(job_id)} not found or expired", "invalid_request_error", "id"
            )
        return found
