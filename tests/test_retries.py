"""Backoff before a client-visible retry: doubling, bounded, jittered, never shorter than half its step."""

from __future__ import annotations

import random

import pytest

from rayxdit.retries import backoff_s


def test_the_wait_doubles_up_to_the_cap_and_half_of_it_is_random():
    rng = random.Random(0)
    for attempt, (low, high) in enumerate([(1, 2), (2, 4), (4, 8), (8, 16), (15, 30), (15, 30)], start=1):
        waits = [backoff_s(attempt, 2.0, 30.0, rng) for _ in range(2000)]
        assert low <= min(waits) and max(waits) <= high, attempt
        # spread over the whole upper half (routers failing together come back apart)
        assert max(waits) - min(waits) > 0.9 * (high - low), attempt
    assert backoff_s(10_000, 2.0, 30.0, rng) <= 30.0  # no overflow for absurd attempt counts
    with pytest.raises(ValueError):
        backoff_s(0, 2.0, 30.0)
