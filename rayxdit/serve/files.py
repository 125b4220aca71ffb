"""Files as OpenAI's Files API keeps them (``/v1/files``): a batch's input JSONL, and its output and error
files, as plain data held by the application's state replica.

A file belongs to the caller that uploaded it (a digest of its API key; everyone alike without keys), as jobs
do: another caller's file does not exist for it. Files are kept ``ttl_s`` seconds within ``max_bytes``: past
the budget the oldest go first (a client then gets 404, as after the TTL). Each file is written through to
the state's journal (``serve/durable.py``), so with a Redis journal a batch's files outlive the state replica.
No Ray, no torch: tests drive a :class:`FileStore` with their own clock.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

from rayxdit.serve.durable import Journal, MemoryJournal

UPLOAD_PURPOSES = frozenset({"batch", "vision", "user_data"})
"""What a client uploads a file for: ``batch`` (a batch's input JSONL), ``vision`` or ``user_data`` (an image
that a JSON edit, or an edits batch's line, names by ``file_id``)."""
PURPOSES = UPLOAD_PURPOSES | {"batch_output"}
"""What a file is for: what clients upload, or ``batch_output`` (a batch's output or error file, written by
the application)."""


@dataclass
class StoredFile:
    """One file's record (its bytes are kept apart). ``expires_at``: seconds since the epoch."""

    id: str
    owner: str
    purpose: str
    filename: str
    bytes: int
    created_at: int
    expires_at: int

    def public(self) -> dict[str, Any]:
        """The file object of OpenAI's Files API."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


class FileStore:
    """Every file of the application by id (see the module docstring). Methods take ``now`` (monotonic
    seconds) for tests."""

    RECORDS, CONTENT = "files", "file-content"

    def __init__(self, ttl_s: float, max_bytes: int, journal: Journal | None = None):
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.journal = journal or MemoryJournal()
        self.files: OrderedDict[str, tuple[StoredFile, bytes, float]] = OrderedDict()
        """id -> (record, content, monotonic expiry), oldest first."""
        self.bytes = 0
        self._restore(time.monotonic())

    def create(
        self, owner: str, purpose: str, filename: str, content: bytes, now: float | None = None
    ) -> dict[str, Any] | None:
        """Store a file; its file object, or None when it alone exceeds the budget."""
        now = time.monotonic() if now is None else now
        if len(content) > self.max_bytes:
            return None
        self._expire(now, room=len(content))
        record = StoredFile(
            id=f"file-{uuid.uuid4().hex}",
            owner=owner,
            purpose=purpose,
            filename=filename,
            bytes=len(content),
            created_at=int(time.time()),
            expires_at=int(time.time() + self.ttl_s),
        )
        self.files[record.id] = (record, content, now + self.ttl_s)
        self.bytes += len(content)
        self.journal.save(self.RECORDS, record.id, json.dumps(asdict(record)).encode(), self.ttl_s)
        self.journal.save(self.CONTENT, record.id, content, self.ttl_s)
        return record.public()

    def get(self, file_id: str, owner: str, now: float | None = None) -> dict[str, Any] | None:
        found = self._find(file_id, owner, now)
        return None if found is None else found[0].public()

    def content(self, file_id: str, owner: str, now: float | None = None) -> bytes | None:
        found = self._find(file_id, owner, now)
        return None if found is None else found[1]

    def delete(self, file_id: str, owner: str, now: float | None = None) -> bool:
        if self._find(file_id, owner, now) is None:
            return False
        self._drop(file_id)
        return True

    def list(self, owner: str, purpose: str | None = None, now: float | None = None) -> list[dict[str, Any]]:
        """``owner``'s files (of ``purpose``, when given), newest first."""
        self._expire(time.monotonic() if now is None else now)
        return [
            record.public()
            for record, _, _ in reversed(self.files.values())
            if record.owner == owner and purpose in (None, record.purpose)
        ]

    # ----- internals -------------------------------------------------------------------------------------
    def _find(self, file_id: str, owner: str, now: float | None) -> tuple[StoredFile, bytes] | None:
        self._expire(time.monotonic() if now is None else now)
        entry = self.files.get(file_id)
        if entry is None or entry[0].owner != owner:  # others' files do not exist for a caller
            return None
        return entry[0], entry[1]

    def _drop(self, file_id: str) -> None:
        _, content, _ = self.files.pop(file_id)
        self.bytes -= len(content)
        self.journal.drop(self.RECORDS, file_id)
        self.journal.drop(self.CONTENT, file_id)

    def _expire(self, now: float, room: int = 0) -> None:
        """Drop files past their TTL, then the oldest while ``room`` more bytes would not fit."""
        for file_id in [key for key, (_, _, expires) in self.files.items() if expires < now]:
            self._drop(file_id)
        while self.files and self.bytes + room > self.max_bytes:
            self._drop(next(iter(self.files)))

    def _restore(self, now: float) -> None:
        """The files the journal kept (none without a durable one), oldest first."""
        records = self.journal.load(self.RECORDS)
        if not records:
            return
        contents = self.journal.load(self.CONTENT)
        kept = []
        for file_id, (value, left_s) in records.items():
            if file_id not in contents:
                self.journal.drop(self.RECORDS, file_id)
                continue
            kept.append(
                (StoredFile(**json.loads(value)), contents[file_id][0], now + min(left_s, self.ttl_s))
            )
        for record, content, expires in sorted(kept, key=lambda entry: entry[0].created_at):
            self.files[record.id] = (record, content, expires)
            self.bytes += len(content)
