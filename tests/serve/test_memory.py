"""Memory per rank and the requests a pool cannot hold: the pure functions, then the shared state routing with
them (as the Serve deployment runs it, called directly)."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from rayxdit.config import PoolConfig, RouterConfig, ServeConfig
from rayxdit.limits import request_work
from rayxdit.serve.memory import HEADROOM, MemoryProfile, pool_limit, profile_at_start, too_large
from rayxdit.serve.state import AppState

# Flux.1-dev on a 24 GiB cap as measured on the H200 with offload (benchmarks/results/memory-flux-dev-1xh200.json):
# about 9.4 GiB at the 1024px peak; here 4 GiB resident and 5.4 GiB for one megapixel (1024x1024 = 1.05).
RANKS = [
    {"capacity_gib": 24.0, "resident_gib": 4.0, "work": 1.048576, "peak_gib": 9.4},
    {"capacity_gib": 24.0, "resident_gib": 4.2, "work": 1.048576, "peak_gib": 9.1},
]


def test_work_is_megapixels_times_frames_times_images():
    assert request_work(1024, 1024) == pytest.approx(1.048576)
    assert request_work(832, 480, frames=81, images=2) == pytest.approx(0.39936 * 81 * 2)


def test_a_replica_declares_its_tightest_rank_and_holds_what_its_capacity_leaves():
    profile = profile_at_start(RANKS)
    assert (profile.capacity_gib, profile.resident_gib) == (24.0, 4.2)
    rate = (9.4 - 4.2) / 1.048576  # the largest rate of any rank, against the most resident
    assert profile.gib_per_work == pytest.approx(rate)
    assert profile.max_work == pytest.approx((HEADROOM * 24.0 - 4.2) / rate)  # ~3.4 megapixels
    assert 1.048576 < profile.max_work < request_work(2048, 2048)
    # A larger request measured at a lower rate keeps the higher one: the estimate errs towards refusing.
    assert profile.measured(2.0, 4.2 + 2.0 * rate / 2).gib_per_work == pytest.approx(rate)
    assert profile.measured(0.5, 4.2 + 0.5 * rate * 2).gib_per_work == pytest.approx(2 * rate)
    assert MemoryProfile.of(profile.describe()) == profile


def test_ranks_without_allocator_statistics_declare_nothing_and_refuse_nothing():
    assert profile_at_start([RANKS[0], None]) is None  # CPU ranks report None
    unmeasured = profile_at_start([{"capacity_gib": 80.0, "resident_gib": 30.0}])  # no warm-up
    assert unmeasured.max_work == math.inf and unmeasured.describe()["max_megapixels"] is None
    assert pool_limit([]) == math.inf and not too_large(100.0, {"a": math.inf})
    assert not too_large(100.0, {})  # a model whose pools nobody measured


def test_a_pool_that_ran_out_of_memory_takes_nothing_as_large_again():
    profile = profile_at_start(RANKS)
    assert pool_limit([profile], failed_work=2.0) == pytest.approx(1.98)
    assert pool_limit([profile]) == profile.max_work
    assert too_large(2.5, {"one-gpu": 1.98, "two-gpu": 2.4}) and not too_large(2.2, {"a": 1.98, "b": 2.4})


POOLS = [
    PoolConfig(name="one", model="m", model_name="m", parallel="single"),
    PoolConfig(name="two", model="m", model_name="m", parallel="ulysses=2"),
]


def run(coroutine):
    return asyncio.run(coroutine)


def test_the_state_routes_a_request_only_to_pools_that_hold_it_and_refuses_what_none_does():
    state = AppState(ServeConfig(pools=POOLS, router=RouterConfig()))
    one = profile_at_start(RANKS)
    two = profile_at_start([{**rank, "resident_gib": 2.0, "peak_gib": 4.6} for rank in RANKS])  # halves
    run(state.report("one", "replica-one", True, 30.0, one.describe()))
    run(state.report("two", "replica-two", True, 40.0, two.describe()))
    deadline = time.time() + 600

    def route(ticket: str, work: float) -> dict:
        return run(state.route("m", work * 28, ticket, deadline, [], work=work))

    assert route("small", 0.25)["pool"] in ("one", "two")
    assert route("mid", one.max_work * 1.5)["pool"] == "two"  # past the one-GPU pool's memory
    refused = route("huge", two.max_work * 1.5)
    assert refused["pool"] is None and refused["too_large"] == pytest.approx(two.max_work)
    listing = run(state.memory())
    assert listing["one"]["max_megapixels"] == pytest.approx(one.max_work, abs=1e-3)
    assert listing["two"]["per_rank"]["resident_gib"] == 2.0

    run(state.out_of_memory("two", 3.0))  # an attempt ran out of memory anyway
    assert run(state.memory())["two"]["max_megapixels"] == pytest.approx(min(two.max_work, 2.97), abs=1e-3)
    assert route("again", 3.0)["pool"] == "one"  # no longer "two"
    assert route("larger", 4.0)["too_large"] == pytest.approx(one.max_work)
