"""asyncio helpers of the serving layer: work that must outlive the request it came from, futures whose
errors are expected, and calls to the application's state that ride out its restart."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError

from rayxdit.serve.api import ApiError

logger = logging.getLogger("ray.serve")
_detached_tasks: set[asyncio.Task] = set()
T = TypeVar("T")
STATE_RETRY_S = 0.5
STATE_RESTART_S = 30.0
"""A call to the application's state that finds its replica dead (killed, or its node lost: Serve starts
another within seconds) is sent again every STATE_RETRY_S for this long, then the client gets 503."""


def state_unavailable(what: str) -> ApiError:
    return ApiError(
        503,
        f"{what}: the application's shared state is restarting; retry",
        "service_unavailable",
        code="state_unavailable",
    )


def file_reader(state: Any, owner: str) -> Callable[[str], Awaitable[bytes | None]]:
    """``file_id -> content`` of ``owner``'s uploaded files, read from the state's handle (a JSON edit's
    ``file_id`` images; None for a file ``owner`` has not)."""
    return lambda file_id: ask_state(lambda: state.file_content.remote(file_id, owner), "reading a file")


async def ask_state(call: Callable[[], Awaitable[T]], what: str) -> T:
    """``call()`` (a call to the state's handle), sent again while the state replica restarts; 503
    ``state_unavailable`` (:func:`state_unavailable`, naming ``what``) after STATE_RESTART_S. A call the dying
    replica may have carried out is sent again: the state's methods take that (a finished attempt is counted
    once, a job completed again is a no-op)."""
    bound = time.monotonic() + STATE_RESTART_S
    while True:
        try:
            return await call()
        except (RayActorError, DeploymentUnavailableError) as error:
            if time.monotonic() + STATE_RETRY_S > bound:
                logger.warning("%s: the shared state is unavailable (%r)", what, error)
                raise state_unavailable(what) from None
            logger.info("%s: sent again, the shared state restarts (%r)", what, error)
            await asyncio.sleep(STATE_RETRY_S)


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


class ExpectedCancellations(logging.Filter):
    """Keeps asyncio's "Task exception was never retrieved" report of a cancelled call (a request whose
    client went away, a job deleted: Serve cancels the calls it had under way, its own queue-length probes
    among them, and leaves their tasks unread) out of the log, in favour of the one line the request's end
    already logs. Every other asyncio error passes."""

    CANCELLATIONS = ("TaskCancelledError", "RequestCancelledError", "CancelledError")

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None and isinstance(record.args, dict):  # the loop's context: {"exception": ...}
            error = record.args.get("exception")
        name = type(error).__name__ if error is not None else ""
        return not (name in self.CANCELLATIONS or any(name.endswith(f"({c})") for c in self.CANCELLATIONS))


def keep_cancellations_quiet() -> None:
    """Install :class:`ExpectedCancellations` on asyncio's logger of this process (once)."""
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, ExpectedCancellations) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(ExpectedCancellations())
