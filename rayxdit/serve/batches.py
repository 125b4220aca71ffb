"""OpenAI's Batch API as plain data: a batch's input lines, its output and error lines, and the batch object.

A batch is a job (``serve/jobs.py``) of kind ``batch`` whose ``fields`` hold what the batch object shows
(endpoint, input file, counts, output and error files). Its life as OpenAI names it::

    validating ──▶ in_progress ──▶ finalizing ──▶ completed
         │              │  │                  └──▶ expired     (its completion window passed)
         │              │  └──▶ cancelling ──▶ cancelled   (POST /v1/batches/{id}/cancel)
         └──────────────┴─────────────────────▶ failed      (input unreadable, its driver lost)

Each input line is ``{"custom_id", "method": "POST", "url": <the batch's endpoint>, "body": {...}}``. A line
that is not one, or whose body its endpoint would refuse, goes to the error file with its ``custom_id`` and
never stops the batch; every other line gets one output line, in input order. No Ray, no torch.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from rayxdit.serve.durable import Journal, MemoryJournal
from rayxdit.serve.jobs import CANCELLED, COMPLETED, FAILED, IN_PROGRESS, QUEUED

ENDPOINTS = ("/v1/images/generations", "/v1/images/edits", "/v1/videos")
"""Endpoints a batch may run, as OpenAI's Batch API names them. An edit line's body is the JSON form of an
edit (its image as ``{"image_url": <data: URL>}`` or ``{"file_id"}``); a video line's answer is the completed
video's object (its content at ``GET /v1/videos/{id}/content``)."""
WINDOW = re.compile(r"(\d{1,6})([smh])")
MAX_WINDOW_S = 168 * 3600
"""The longest completion window taken (OpenAI takes "24h" only; rayxdit any window up to a week)."""
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
MAX_LINES = 50_000
"""As OpenAI: at most this many requests in one batch."""
CANCELLING_S = 60.0
"""A cancelled batch shows ``cancelling`` until its driver has written its files, at most this long."""


@dataclass(frozen=True)
class BatchLine:
    """One input line that reads as a request: its position (0-based), ``custom_id`` and body."""

    index: int
    custom_id: str
    body: dict[str, Any]


def parse_lines(content: bytes, endpoint: str) -> tuple[list[BatchLine], list[dict[str, Any]]]:
    """The input file's lines that read as requests to ``endpoint``, and an error line for every other
    (unreadable JSON, no ``custom_id``, a repeated one, another method or URL, a body that is no object).
    Blank lines are skipped. Bodies are checked by the endpoint's own validation later."""
    lines: list[BatchLine] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except ValueError as error:
            errors.append(error_line(None, 400, "invalid_line", f"line {number}: not JSON ({error})"))
            continue
        if not isinstance(item, dict):
            errors.append(error_line(None, 400, "invalid_line", f"line {number}: not a JSON object"))
            continue
        custom_id = item.get("custom_id")
        problem = None
        if not isinstance(custom_id, str) or not custom_id:
            custom_id, problem = None, "custom_id: a non-empty string is required"
        elif custom_id in seen:
            problem = f"custom_id '{custom_id[:64]}' is used by an earlier line; each line needs its own"
        elif item.get("method", "POST") != "POST":
            problem = "method: only POST"
        elif item.get("url") != endpoint:
            problem = f"url: this batch's lines go to {endpoint} (got {str(item.get('url'))[:64]!r})"
        elif not isinstance(item.get("body"), dict):
            problem = "body: a JSON object (the request the endpoint takes) is required"
        if problem is not None:
            errors.append(error_line(custom_id, 400, "invalid_line", f"line {number}: {problem}"))
            continue
        seen.add(custom_id)
        lines.append(BatchLine(len(lines) + len(errors), custom_id, item["body"]))
    return lines, errors


def output_line(custom_id: str, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """A line of the output file: the request's answer as the endpoint gives it."""
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": request_id, "body": body},
        "error": None,
    }


def error_line(
    custom_id: str | None,
    status: int,
    code: str | None,
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
) -> dict[str, Any]:
    """A line of the error file: the error answer the endpoint would have given the request."""
    error = {"message": message, "type": kind, "param": param, "code": code}
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": None, "body": {"error": error}},
        "error": None,
    }


def window_seconds(completion_window: str) -> int:
    """A batch's completion window (``"24h"``, ``"90m"``, ``"30s"``) in seconds; ValueError for anything else
    or a window outside 1 s..168 h."""
    match = WINDOW.fullmatch(completion_window)
    if match is None:
        raise ValueError(
            f'completion_window: "24h" (or another window such as "90m", "30s"), not {completion_window!r}'
        )
    seconds = int(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2)]
    if not 1 <= seconds <= MAX_WINDOW_S:
        raise ValueError(
            f"completion_window: between 1s and {MAX_WINDOW_S // 3600}h, not {completion_window!r}"
        )
    return seconds


def expired_line(custom_id: str) -> dict[str, Any]:
    """A line of the error file for a request the batch did not run within its completion window (OpenAI's
    shape: no response, the error on the line)."""
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": "batch_expired", "message": EXPIRED_MESSAGE},
    }


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line, separators=(",", ":")).encode() + b"\n" for line in lines)


def batch_object(job: dict[str, Any], now_wall: float) -> dict[str, Any]:
    """The batch object OpenAI's client reads, from the job object of a batch (``JobStore.public``)."""
    status = {QUEUED: "validating", IN_PROGRESS: "in_progress", COMPLETED: "completed", FAILED: "failed"}.get(
        job["status"], job["status"]
    )
    if job["status"] == IN_PROGRESS and job.get("finalizing_at"):
        status = "finalizing"
    ended = job.get("completed_at")
    expired = job["status"] == COMPLETED and job.get("expired_at") is not None
    if expired:
        status = "expired"
    if job["status"] == CANCELLED:
        finalized = job.get("finalized") or (ended is not None and now_wall - ended > CANCELLING_S)
        status = "cancelled" if finalized else "cancelling"
    error = job.get("error")
    return {
        "id": job["id"],
        "object": "batch",
        "endpoint": job["endpoint"],
        "errors": None
        if error is None
        else {"object": "list", "data": [{"code": error["code"], "message": error["message"], "line": None}]},
        "input_file_id": job["input_file_id"],
        "completion_window": job["completion_window"],
        "status": status,
        "output_file_id": job.get("output_file_id"),
        "error_file_id": job.get("error_file_id"),
        "created_at": job["created_at"],
        "in_progress_at": job.get("in_progress_at"),
        "expires_at": job["created_at"] + window_seconds(job["completion_window"]),
        "finalizing_at": job.get("finalizing_at"),
        "completed_at": ended if job["status"] == COMPLETED and not expired else None,
        "failed_at": ended if job["status"] == FAILED else None,
        "expired_at": job.get("expired_at"),
        "cancelling_at": job.get("cancelling_at") or (ended if job["status"] == CANCELLED else None),
        "cancelled_at": ended if status == "cancelled" else None,
        "request_counts": job.get("request_counts") or {"total": 0, "completed": 0, "failed": 0},
        "metadata": job.get("metadata"),
        "model": job["model"] or None,
        "rayxdit": {
            "preemptions": job.get("preemptions", 0),
            "adoptions": job.get("adoptions", 0),
            "driver": job.get("_driver"),
        },
    }


class LineStore:
    """The answers of a batch's lines as they finish, kept in the state (and its journal) until the batch's
    files are written: a router replica that adopts a batch whose driver died runs only the lines without
    one, and each line gets exactly one answer in the files."""

    SPACE = "batch-lines"

    def __init__(self, ttl_s: float, journal: Journal | None = None):
        self.ttl_s = ttl_s
        self.journal = journal or MemoryJournal()
        self.lines: dict[str, dict[int, tuple[bool, bytes]]] = {}
        for key, (value, _) in self.journal.load(self.SPACE).items():
            batch_id, _, index = key.rpartition("/")
            self.lines.setdefault(batch_id, {})[int(index)] = (value[:1] == b"1", value[1:])

    def record(self, batch_id: str, index: int, ok: bool, line: bytes) -> None:
        """Line ``index`` of ``batch_id`` answered (``ok``: an output line, else an error line); a repeat
        (the same line reported again) keeps the first answer."""
        kept = self.lines.setdefault(batch_id, {})
        if index in kept:
            return
        kept[index] = (ok, line)
        self.journal.save(self.SPACE, f"{batch_id}/{index}", (b"1" if ok else b"0") + line, self.ttl_s)

    def answered(self, batch_id: str) -> dict[int, tuple[bool, bytes]]:
        return dict(self.lines.get(batch_id, {}))

    def drop(self, batch_id: str) -> None:
        for index in self.lines.pop(batch_id, {}):
            self.journal.drop(self.SPACE, f"{batch_id}/{index}")
