"""Previews of a request on local ranks (what ``rayxdit generate --preview`` shows): handed over while the
request runs, not after it."""

from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image

from rayxdit.config import EngineConfig
from rayxdit.request import GenerateRequest
from rayxdit.runtime.local import PREVIEW_POLL_S, run_local_with_previews


def test_previews_arrive_while_the_request_runs_and_in_order():
    """One rank in this process, 140 steps: the first of three previews (made after step 35) is handed over
    well before the request ends; all three in order, PNGs of the request's size, and none repeated."""
    request = GenerateRequest(prompt="a fox", width=64, height=64, steps=140, seed=2, partial_images=3)
    seen: list[tuple[int, float, tuple[int, int]]] = []

    def on_preview(index: int, png: bytes) -> None:
        seen.append((index, time.monotonic(), Image.open(io.BytesIO(png)).size))

    result = run_local_with_previews(EngineConfig(model="tiny-flux"), request, on_preview)
    ended = time.monotonic()
    assert [index for index, _, _ in seen] == [0, 1, 2]
    assert all(size == (64, 64) for _, _, size in seen)
    assert ended - seen[0][1] > 3 * PREVIEW_POLL_S, "the first preview came only with the result"
    assert np.asarray(result.decode().images[0]).shape == (64, 64, 3)
