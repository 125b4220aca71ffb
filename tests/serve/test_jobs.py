"""The job store's life cycle (pure: no Ray), driven by an explicit clock."""

from __future__ import annotations

import pytest

from rayxdit.limits import ModelLimits
from rayxdit.serve.jobs import CANCELLED, COMPLETED, FAILED, IN_PROGRESS, QUEUED, JobStore


def test_a_job_goes_from_queued_through_progress_to_completed():
    store = JobStore(ttl_s=100, max_bytes=1000, lease_s=10)
    job = store.create("video", "alice", "tiny-wan", {"frames": 9}, now=0)
    assert job["status"] == QUEUED and job["progress"] == 0 and job["object"] == "video"
    assert job["frames"] == 9 and job["id"].startswith("video_")
    seen = []
    for step in (0, 1, 3, 2, 8):  # a late report (2 after 3) must not move progress back
        store.progress(job["id"], step, 8, now=1)
        seen.append(store.get(job["id"], "alice", now=1)["progress"])
    assert seen == [0, 12, 37, 37, 99], "monotonic, and below 100 until the result is stored"
    assert store.get(job["id"], "alice", now=1)["status"] == IN_PROGRESS
    assert store.content(job["id"], "alice", now=1)[1] == []
    assert store.complete(job["id"], [b"a" * 10, b"b" * 5], {"rayxdit": {}}, now=2)
    done, content = store.content(job["id"], "alice", now=3)
    assert done["status"] == COMPLETED and done["progress"] == 100 and content == [b"a" * 10, b"b" * 5]
    assert done["expires_at"] == done["completed_at"] + 100


def test_others_jobs_do_not_exist_for_a_caller():
    store = JobStore(ttl_s=100, max_bytes=1000, lease_s=30)
    job = store.create("video", "alice", "m", {})
    assert store.get(job["id"], "bob") is None and store.cancel(job["id"], "bob") is None
    assert store.list("bob", "video") == [] and [j["id"] for j in store.list("alice", "video")] == [job["id"]]
    assert store.list("alice", "image") == []


def test_cancel_stops_an_unfinished_job_and_deletes_a_finished_one():
    store = JobStore(ttl_s=100, max_bytes=1000, lease_s=30)
    running = store.create("video", "", "m", {}, now=0)
    store.progress(running["id"], 2, 10, now=1)
    cancelled = store.cancel(running["id"], "", now=2)
    assert cancelled["status"] == CANCELLED and cancelled["deleted"] is False
    assert store.renew(running["id"], now=2) == CANCELLED, "the driver learns it on its next renewal"
    assert not store.complete(running["id"], [b"late"], now=3), "a cancelled job stays cancelled"
    assert store.bytes == 0
    finished = store.create("video", "", "m", {}, now=0)
    store.complete(finished["id"], [b"x" * 10], now=1)
    assert store.cancel(finished["id"], "", now=2)["deleted"] is True
    assert store.get(finished["id"], "", now=2) is None and store.bytes == 0


def test_a_job_whose_driver_stops_renewing_fails():
    store = JobStore(ttl_s=100, max_bytes=1000, lease_s=10)
    job = store.create("image", "", "m", {}, now=0)
    assert store.renew(job["id"], now=8) == QUEUED
    assert store.get(job["id"], "", now=17)["status"] == QUEUED, "renewed at 8: leased until 18"
    lost = store.get(job["id"], "", now=19)
    assert lost["status"] == FAILED and lost["error"]["code"] == "driver_lost"


def test_finished_jobs_expire_after_the_ttl_and_the_oldest_go_first_beyond_the_budget():
    store = JobStore(ttl_s=100, max_bytes=25, lease_s=1000)
    first, second, third = (store.create("video", "", "m", {}, now=0) for _ in range(3))
    assert store.complete(first["id"], [b"1" * 10], now=1)
    assert store.complete(second["id"], [b"2" * 10], now=2)
    assert store.complete(third["id"], [b"3" * 10], now=3)  # 30 > 25 bytes: the oldest goes
    assert store.get(first["id"], "", now=3) is None
    assert store.get(second["id"], "", now=3) is not None and store.bytes == 20
    assert store.get(second["id"], "", now=103) is None, "past its TTL"
    too_big = store.create("video", "", "m", {}, now=0)
    assert not store.complete(too_big["id"], [b"x" * 26], now=4)
    assert store.get(too_big["id"], "", now=4)["error"]["code"] == "result_too_large"


@pytest.mark.parametrize(("seconds", "frames"), [(5.0, 81), (0.5, 9), (0.01, 1), (1.0, 17), (0.6, 9)])
def test_seconds_become_the_nearest_frame_count_the_model_takes(seconds, frames):
    wan = ModelLimits(default_frames=81, max_frames=241, frame_multiple=4, fps=16)
    assert wan.frames_for(seconds) == frames
    assert (frames - 1) % 4 == 0


def test_a_jobs_kind_is_part_of_its_address():
    """A video's endpoints do not reach an image job (nor cancel it), and the other way round."""
    store = JobStore(ttl_s=100, max_bytes=1000, lease_s=30)
    job = store.create("image", "", "m", {})
    assert store.get(job["id"], "", "video") is None and store.cancel(job["id"], "", "video") is None
    assert store.content(job["id"], "", "video") is None
    assert store.get(job["id"], "", "image")["status"] == QUEUED
