"""asyncio helpers of the serving layer: work that must outlive the request it came from, and futures
whose errors are expected."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger("ray.serve")
_detached_tasks: set[asyncio.Task] = set()


def detached(call: Callable[[], Awaitable[Any]], what: str) -> asyncio.Task:
    """Run ``call()`` in a task of its own, in a fresh context: neither the cancellation of the request it
    comes from (Starlette's middleware cancels every later await of a request whose client went away) nor
    Serve's cancellation of that request's child calls reaches it. Its failure is logged in one line."""

    async def run() -> None:
        try:
            await call()
        except Exception as error:
            logger.warning("%s failed: %r", what, error)

    task = contextvars.Context().run(asyncio.create_task, run())
    _detached_tasks.add(task)  # referenced until done
    task.add_done_callback(_detached_tasks.discard)
    return task


def quiet(future: asyncio.Future) -> None:
    """Retrieve a finished future's exception (a call cancelled on purpose ends in one; unretrieved, asyncio
    prints it with a traceback when the future is collected)."""
    if not future.cancelled():
        future.exception()
