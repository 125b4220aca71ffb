"""Asynchronous jobs (videos, background images) as plain data: their life cycle, progress and results.

A job is created ``queued`` by the router replica that took the request, which then drives it (routes it,
calls the pool) and holds a *lease* on it: it renews the lease every fraction of a second, and learns from
the renewal whether the job was cancelled meanwhile (through any router replica). A job whose lease lapses
(its router replica died) fails with ``driver_lost`` instead of staying ``in_progress`` forever.

::

    queued ──▶ in_progress ──▶ completed
       │            │      └──▶ failed
       └────────────┴────────▶ cancelled   (DELETE while queued or running: the ranks stop at a step boundary)

Finished jobs and their results are kept ``ttl_s`` seconds within ``max_bytes``: beyond the budget the
oldest finished jobs go first (a client then gets 404, as after the TTL). Progress only grows: it comes from
rank 0's step counter, capped at 99 until the result is stored. No Ray, no torch: the application's state
replica holds one :class:`JobStore`, and tests drive it with their own clock.

Each change is written through to the state's journal (``serve/durable.py``: a job's record as JSON, its
result's bytes apart, once), and a store that starts reads them back: with a Redis journal a job outlives
the state replica, its driver's next lease renewal finds it, and it runs on.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from rayxdit.serve.durable import Journal, MemoryJournal, pack_parts, unpack_parts, wall_offset

QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = (
    "queued",
    "in_progress",
    "completed",
    "failed",
    "cancelled",
)
UNFINISHED = frozenset({QUEUED, IN_PROGRESS})
TAKEN = "taken"
"""What a renewal tells a batch's driver that another router replica adopted its batch."""
logger = logging.getLogger("ray.serve")
RECORD_FIELDS = (
    *("id", "kind", "owner", "model", "created_at", "fields", "status", "progress"),
    *("completed_at", "error", "result", "bytes"),
)
"""What a job's journal record holds (its lease is renewed afresh, its content kept apart)."""
ORPHAN_S = 300.0
"""How long a batch whose driver is gone waits for another router replica to adopt it before it fails."""


@dataclass
class Job:
    """One job. ``kind``: ``video`` or ``image``; ``owner``: who may see it (a digest of the caller's API key,
    empty without keys); ``content``: the result's bytes (PNG frames of a video, PNGs of images), stored once
    completed; ``result``: what the job object shows of it (e.g. the images' response)."""

    id: str
    kind: str
    owner: str
    model: str
    created_at: float
    fields: dict[str, Any] = field(default_factory=dict)
    """What the job object echoes of the request (size, frames, seconds...)."""
    status: str = QUEUED
    progress: int = 0
    completed_at: float | None = None
    error: dict[str, str] | None = None
    content: list[bytes] = field(default_factory=list)
    result: dict[str, Any] | None = None
    lease_expires: float = math.inf
    finished_at: float | None = None
    """Monotonic time it finished (for the TTL)."""
    bytes: int = 0
    """What its result holds in memory: the content and the shown result (base64 images, say)."""

    @property
    def finished(self) -> bool:
        return self.status not in UNFINISHED

    def public(self, expires_after_s: float) -> dict[str, Any]:
        """The job object clients see (no content)."""
        view = {
            "id": self.id,
            "object": "video" if self.kind == "video" else "image.generation.job",
            "status": self.status,
            "progress": self.progress,
            "created_at": int(self.created_at),
            "completed_at": None if self.completed_at is None else int(self.completed_at),
            "expires_at": None if self.completed_at is None else int(self.completed_at + expires_after_s),
            "model": self.model,
            **self.fields,
            "error": self.error,
        }
        if self.result is not None:
            view["result"] = self.result
        return view


class JobStore:
    """Every job of the application by id (see the module docstring). Methods take ``now`` (monotonic
    seconds) for tests; wall-clock times shown to clients come from ``time.time()``."""

    RECORDS, CONTENT = "jobs", "job-content"
    """The journal's spaces: each job's record (JSON), and a completed job's content (its parts packed)."""

    def __init__(self, ttl_s: float, max_bytes: int, lease_s: float, journal: Journal | None = None):
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.lease_s = lease_s
        """A job's driver (a router replica) not heard from for this long is gone: the job fails (a batch waits
        for another router replica to adopt it, ``ORPHAN_S``)."""
        self.journal = journal or MemoryJournal()
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.bytes = 0
        self._restore(time.monotonic())

    @staticmethod
    def _now(now: float | None) -> float:
        return time.monotonic() if now is None else now

    def create(
        self, kind: str, owner: str, model: str, fields: dict[str, Any], now: float | None = None
    ) -> dict[str, Any]:
        """A new queued job, leased to its creator; the job object."""
        now = self._now(now)
        self._expire(now)
        job = Job(
            id=f"{kind}_{uuid.uuid4().hex}",
            kind=kind,
            owner=owner,
            model=model,
            created_at=time.time(),
            fields=dict(fields),
            lease_expires=now + self.lease_s,
        )
        self.jobs[job.id] = job
        self._save(job, now)
        return job.public(self.ttl_s)

    def renew(self, job_id: str, now: float | None = None, driver: str | None = None) -> str | None:
        """The driver's heartbeat: extends the lease; the job's status (``cancelled``: stop it), None if gone,
        ``taken`` when ``driver`` is no longer the batch's driver (its lease had lapsed and another router
        replica adopted it: stop, the adopter runs it)."""
        now = self._now(now)
        job = self.jobs.get(job_id)
        if job is None:
            return None
        if driver is not None and job.fields.get("_driver") not in (None, driver):
            return TAKEN
        if not job.finished:
            job.lease_expires = now + self.lease_s
        return job.status

    def progress(self, job_id: str, step: int, steps: int, now: float | None = None) -> None:
        """Rank 0 is at ``step`` of ``steps``: the job runs; its progress grows (never shrinks), below 100."""
        job = self.jobs.get(job_id)
        if job is None or job.finished or steps <= 0:
            return
        progress = max(job.progress, min(99, math.floor(100 * step / steps)))
        if (job.status, job.progress) != (IN_PROGRESS, progress):
            job.status, job.progress = IN_PROGRESS, progress
            self._save(job, self._now(now))

    def complete(
        self,
        job_id: str,
        content: list[bytes],
        result: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> bool:
        """Store the result; False (and the job failed) when it alone exceeds the byte budget, or nothing
        happens because the job was cancelled meanwhile; True again for a job completed already (a report
        sent again after the state replica that took it died)."""
        now = self._now(now)
        job = self.jobs.get(job_id)
        if job is None or job.finished:  # completed already: the same report sent again
            return job is not None and job.status == COMPLETED
        size = sum(len(part) for part in content) + (len(json.dumps(result)) if result else 0)
        if size > self.max_bytes:
            self._finish(
                job,
                FAILED,
                now,
                {
                    "code": "result_too_large",
                    "message": f"the result ({size} bytes) exceeds the router's store "
                    f"(router.max_stored_bytes = {self.max_bytes})",
                },
            )
            return False
        self._expire(now, room=size)
        job.content, job.result, job.bytes = content, result, size
        self.bytes += size
        self.journal.save(self.CONTENT, job.id, pack_parts(content), self.ttl_s)
        job.progress = 100
        self._finish(job, COMPLETED, now)
        return True

    def update_fields(self, job_id: str, fields: dict[str, Any], now: float | None = None) -> bool:
        """Change what the job object shows of it (a batch's counts and files: its driver reports them,
        also once the batch is cancelled); False if the job is gone."""
        job = self.jobs.get(job_id)
        if job is None:
            return False
        job.fields.update(fields)
        self._save(job, self._now(now))
        return True

    def orphans(self, now: float | None = None) -> list[str]:
        """Batches whose driver is gone (their lease lapsed), for another router replica to adopt."""
        now = self._now(now)
        self._expire(now)
        return [
            job.id
            for job in self.jobs.values()
            if job.kind == "batch" and not job.finished and job.lease_expires < now
        ]

    def adopt(
        self, job_id: str, now: float | None = None, driver: str | None = None
    ) -> tuple[dict[str, Any], str] | None:
        """A router replica takes over the orphaned batch ``job_id``: its lease is the caller's now. The job
        object and its owner; None if it is not orphaned (another replica was first, or it ended)."""
        now = self._now(now)
        job = self.jobs.get(job_id)
        if job is None or job.finished or job.kind != "batch" or job.lease_expires >= now:
            return None
        job.lease_expires = now + self.lease_s
        job.fields["adoptions"] = job.fields.get("adoptions", 0) + 1
        if driver is not None:  # at once: the previous driver, if alive after all, learns it on renewal
            job.fields["_driver"] = driver
        self._save(job, now)
        return job.public(self.ttl_s), job.owner

    def fail(self, job_id: str, code: str, message: str, now: float | None = None) -> None:
        job = self.jobs.get(job_id)
        if job is not None and not job.finished:
            self._finish(job, FAILED, self._now(now), {"code": code, "message": message})

    def cancel(
        self, job_id: str, owner: str, kind: str | None = None, now: float | None = None
    ) -> dict[str, Any] | None:
        """DELETE: an unfinished job is cancelled (its driver stops the ranks on its next renewal); a
        finished one is deleted with its result. The job object (``deleted`` true for the latter), None if
        unknown (to ``owner``, or not of ``kind``)."""
        now = self._now(now)
        job = self.get_job(job_id, owner, kind, now)
        if job is None:
            return None
        if job.finished:
            self._drop(job_id)
            return {**job.public(self.ttl_s), "deleted": True}
        self._finish(job, CANCELLED, now)
        return {**job.public(self.ttl_s), "deleted": False}

    def get_job(
        self, job_id: str, owner: str, kind: str | None = None, now: float | None = None
    ) -> Job | None:
        """The job if it exists, belongs to ``owner`` (others' jobs do not exist for a caller) and, when
        given, is of ``kind`` (a video's endpoints do not reach an image job)."""
        self._expire(self._now(now))
        job = self.jobs.get(job_id)
        if job is None or job.owner != owner or kind not in (None, job.kind):
            return None
        return job

    def get(
        self, job_id: str, owner: str, kind: str | None = None, now: float | None = None
    ) -> dict[str, Any] | None:
        job = self.get_job(job_id, owner, kind, now)
        return None if job is None else job.public(self.ttl_s)

    def content(
        self, job_id: str, owner: str, kind: str | None = None, now: float | None = None
    ) -> tuple[dict, list[bytes]] | None:
        """The job object and its stored result (empty until completed), None if unknown."""
        job = self.get_job(job_id, owner, kind, now)
        return None if job is None else (job.public(self.ttl_s), job.content)

    def list(self, owner: str, kind: str, limit: int = 100, now: float | None = None) -> list[dict[str, Any]]:
        """``owner``'s jobs of ``kind``, newest first."""
        self._expire(self._now(now))
        mine = [job for job in reversed(self.jobs.values()) if job.owner == owner and job.kind == kind]
        return [job.public(self.ttl_s) for job in mine[:limit]]

    # ----- internals -------------------------------------------------------------------------------------
    def _finish(self, job: Job, status: str, now: float, error: dict[str, str] | None = None) -> None:
        job.status, job.error = status, error
        job.completed_at = time.time()
        job.finished_at = now
        self.jobs.move_to_end(job.id)  # finished jobs are evicted in the order they finished
        self._save(job, now)

    def _drop(self, job_id: str) -> None:
        job = self.jobs.pop(job_id)
        self.bytes -= job.bytes
        self.journal.drop(self.RECORDS, job_id)
        if job.content:
            self.journal.drop(self.CONTENT, job_id)

    def _save(self, job: Job, now: float) -> None:
        """Write ``job``'s record through to the journal (a finished one expires with its TTL there too)."""
        if not self.journal.durable:
            return
        record = {name: getattr(job, name) for name in RECORD_FIELDS}
        ttl_s = None
        if job.finished_at is not None:  # monotonic clocks differ between hosts: kept as an age
            record["finished_wall"] = job.finished_at + wall_offset(now)
            ttl_s = max(0.001, job.finished_at + self.ttl_s - now)
        self.journal.save(self.RECORDS, job.id, json.dumps(record).encode(), ttl_s)

    def _restore(self, now: float) -> None:
        """The jobs the journal kept (none without a durable one): unfinished ones get a fresh lease (their
        drivers renew it within a second, or it lapses as any other), finished ones their remaining TTL."""
        records = self.journal.load(self.RECORDS)
        if not records:
            return
        contents = self.journal.load(self.CONTENT)
        jobs = []
        for job_id, (value, _) in records.items():
            record = json.loads(value)
            finished_wall = record.pop("finished_wall", None)
            job = Job(**record)
            if finished_wall is not None:
                job.finished_at = min(now, finished_wall - wall_offset(now))
            else:
                job.lease_expires = now + self.lease_s
            if job.status == COMPLETED:
                if job_id not in contents:  # its result expired or was dropped first: the job goes too
                    self.journal.drop(self.RECORDS, job_id)
                    continue
                job.content = unpack_parts(contents[job_id][0])
            jobs.append(job)
        # Unfinished first (by creation), then finished ones in the order they finished (evicted first).
        jobs.sort(key=lambda job: (job.finished_at is not None, job.finished_at or job.created_at))
        for job in jobs:
            self.jobs[job.id] = job
            self.bytes += job.bytes
        logger.info("%d jobs read back from the state's journal", len(jobs))

    def _expire(self, now: float, room: int = 0) -> None:
        """Fail jobs whose driver is gone; drop finished jobs past the TTL, or the oldest finished ones
        while ``room`` more bytes would not fit."""
        for job in list(self.jobs.values()):
            orphan_s = ORPHAN_S if job.kind == "batch" else 0.0  # a batch waits to be adopted
            if not job.finished and job.lease_expires + orphan_s < now:
                self._finish(
                    job,
                    FAILED,
                    now,
                    {
                        "code": "driver_lost",
                        "message": "the router replica driving this job stopped; create it again",
                    },
                )
        finished = [job for job in self.jobs.values() if job.finished]
        for job in finished:
            assert job.finished_at is not None
            if job.finished_at + self.ttl_s < now or (self.bytes + room > self.max_bytes and job.bytes):
                self._drop(job.id)
