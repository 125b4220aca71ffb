"""Small helpers shared by the tests."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from rayxdit.runtime.local import LocalExecutor


def free_port() -> int:
    """A port that was free a moment ago, for servers the tests start (Ray, Serve HTTP)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_on_ranks(function: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 600) -> Any:
    """Rank 0's value of ``function(worker, *args)`` run on ``world_size`` local ranks joined in one gloo
    group (the real executor path: spawned processes, every failed rank's traceback on failure).
    ``function`` must be importable: spawned processes import it afresh."""
    with LocalExecutor(world_size, call_timeout_s=timeout_s) as executor:
        return executor.collective_rpc(function, args)[0]
