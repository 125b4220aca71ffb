"""Small helpers shared by the tests."""

from __future__ import annotations

import io
import socket
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

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


def random_png(width: int, height: int, seed: int) -> bytes:
    """A PNG of seeded noise (an input image, a control image)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def left_half_mask(width: int, height: int) -> bytes:
    """An inpainting mask: white (repaint) on the left half, black (keep) on the right."""
    buffer = io.BytesIO()
    Image.fromarray(
        np.where(np.arange(width) < width // 2, 255, 0).astype(np.uint8)[None].repeat(height, 0)
    ).save(buffer, format="PNG")
    return buffer.getvalue()
