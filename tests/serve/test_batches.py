"""The Batch API's pure parts: reading a batch's input lines, the batch object's states, the file store and
the background routing rule (``routing.idle_pools``). End to end through OpenAI's client:
tests/serve/test_serve.py."""

from __future__ import annotations

import json
import time

import pytest

from rayxdit.config import PoolConfig, RouterConfig, ServeConfig
from rayxdit.serve.batches import (
    CANCELLING_S,
    LineStore,
    batch_object,
    expired_line,
    parse_lines,
    window_seconds,
)
from rayxdit.serve.files import FileStore
from rayxdit.serve.jobs import ORPHAN_S, TAKEN, JobStore
from rayxdit.serve.routing import PoolLoad, PoolSpec, idle_pools
from rayxdit.serve.state import AppState
from tests.serve.test_state import Sync

ENDPOINT = "/v1/images/generations"


def line(custom_id, body=None, **item) -> bytes:
    return json.dumps(
        {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body or {}, **item}
    ).encode()


def test_every_input_line_is_a_request_or_an_error_line_naming_its_problem():
    content = b"\n".join(
        [
            line("a", {"prompt": "x"}),
            b"",  # blank lines are skipped
            b"{not json",
            b"[1, 2]",
            line(None),
            line("a", {"prompt": "again"}),  # a repeated custom_id
            line("b", method="GET"),
            line("c", url="/v1/chat/completions"),
            json.dumps({"custom_id": "d", "url": ENDPOINT, "body": "text"}).encode(),
            line("e", {"prompt": "y"}),
        ]
    )
    lines, errors = parse_lines(content, ENDPOINT)
    assert [(item.custom_id, item.body) for item in lines] == [("a", {"prompt": "x"}), ("e", {"prompt": "y"})]
    assert lines[0].index < lines[1].index
    messages = [error["response"]["body"]["error"]["message"] for error in errors]
    for expected in (
        "not JSON",
        "not a JSON object",
        "custom_id",
        "used by an earlier line",
        "method",
        "url",
        "body",
    ):
        assert any(expected in message for message in messages), (expected, messages)
    assert len(errors) == 7 and all(error["response"]["status_code"] == 400 for error in errors)
    assert [error["custom_id"] for error in errors][-4:] == ["a", "b", "c", "d"]


def test_a_batch_shows_openais_states_from_its_jobs():
    store = JobStore(ttl_s=3600, max_bytes=1 << 20, lease_s=30)
    fields = {"endpoint": ENDPOINT, "input_file_id": "file-1", "completion_window": "24h", "metadata": None}
    job = store.create("batch", "me", "", fields, now=0)
    assert batch_object(job, 0)["status"] == "validating"
    store.progress(job["id"], 0, 3, now=1)
    assert batch_object(store.get(job["id"], "me", now=7), 0)["status"] == "in_progress"
    store.update_fields(
        job["id"], {"finalizing_at": 5, "request_counts": {"total": 3, "completed": 3, "failed": 0}}
    )
    shown = batch_object(store.get(job["id"], "me", now=7), 0)
    assert shown["status"] == "finalizing" and shown["request_counts"]["completed"] == 3
    store.complete(job["id"], [], None, now=6)
    shown = batch_object(store.get(job["id"], "me", now=7), 0)
    assert shown["status"] == "completed" and shown["completed_at"] is not None

    cancelled = store.create("batch", "me", "", fields, now=10)
    store.cancel(cancelled["id"], "me", "batch", now=11)
    ended = store.get(cancelled["id"], "me", now=12)
    assert batch_object(ended, ended["completed_at"])["status"] == "cancelling"  # its files not written yet
    assert (
        batch_object(ended, ended["completed_at"] + CANCELLING_S + 1)["status"] == "cancelled"
    )  # driver gone
    store.update_fields(cancelled["id"], {"finalized": True})
    assert (
        batch_object(store.get(cancelled["id"], "me", now=12), ended["completed_at"])["status"] == "cancelled"
    )


def test_completion_windows_read_as_seconds_and_an_expired_batch_shows_openais_expired_state():
    assert window_seconds("24h") == 86400
    assert (window_seconds("90m"), window_seconds("30s"), window_seconds("168h")) == (5400, 30, 168 * 3600)
    for bad in ("24", "1d", "0s", "169h", " 24h", "24H", "1.5h", ""):
        with pytest.raises(ValueError, match="completion_window"):
            window_seconds(bad)

    store = JobStore(ttl_s=3600, max_bytes=1 << 20, lease_s=30)
    fields = {
        "endpoint": "/v1/videos",
        "input_file_id": "file-1",
        "completion_window": "90m",
        "metadata": None,
    }
    job = store.create("batch", "me", "", fields, now=0)
    assert batch_object(job, 0)["expires_at"] == job["created_at"] + 5400
    store.progress(job["id"], 1, 3, now=1)
    store.update_fields(job["id"], {"finalizing_at": 5})
    assert batch_object(store.get(job["id"], "me", now=1), 0)["status"] == "finalizing"
    store.update_fields(job["id"], {"expired_at": 1234, "finalized": True})
    store.complete(job["id"], [], None, now=2)
    shown = batch_object(store.get(job["id"], "me", now=3), 0)
    assert (shown["status"], shown["expired_at"], shown["completed_at"]) == ("expired", 1234, None)

    expired = expired_line("row-7")  # OpenAI's shape: no response, the error on the line
    assert expired["custom_id"] == "row-7" and expired["response"] is None
    assert expired["error"]["code"] == "batch_expired" and expired["id"].startswith("batch_req_")


def test_files_belong_to_their_owner_expire_and_go_oldest_first_past_the_budget():
    """(Kept across a state restart with Redis: tests/serve/test_durable.py.)"""
    files = FileStore(ttl_s=100, max_bytes=1000)
    first = files.create("me", "batch", "a.jsonl", b"x" * 400, now=0)
    assert first["bytes"] == 400 and first["purpose"] == "batch" and first["object"] == "file"
    assert files.get(first["id"], "someone else", now=1) is None  # others' files do not exist for a caller
    assert files.content(first["id"], "me", now=1) == b"x" * 400
    assert files.create("me", "batch", "huge.jsonl", b"x" * 1001, now=1) is None
    second = files.create("me", "batch_output", "b.jsonl", b"y" * 700, now=2)  # the oldest goes to fit it
    assert files.get(first["id"], "me", now=2) is None and [f["id"] for f in files.list("me", now=2)] == [
        second["id"]
    ]
    assert files.content(second["id"], "me", now=200) is None  # past its TTL
    third = files.create("me", "batch", "c.jsonl", b"z", now=300)
    assert files.delete(third["id"], "me", now=301) and not files.delete(third["id"], "me", now=301)


def test_background_work_goes_only_to_pools_with_a_replica_nothing_runs_on_or_waits_for():
    pools = [PoolSpec(name=name, model="m", ranks=2) for name in ("busy", "idle", "cold")]
    loads = {
        "busy": PoolLoad(ready_replicas=2, starting_replicas=0, outstanding=2),
        "idle": PoolLoad(ready_replicas=2, starting_replicas=0, outstanding=1),
        "cold": PoolLoad(ready_replicas=0, starting_replicas=1, outstanding=0),
    }
    assert [pool.name for pool in idle_pools(pools, loads)] == ["idle"]


def test_an_online_request_that_would_wait_preempts_the_newest_batch_line():
    """Batch lines fill idle replicas only; an online request that finds none free takes the newest line's
    replica (its driver stops it at a step and runs it again), one line per waiting online request."""
    pool = PoolConfig(name="small", model="m", model_name="m", parallel="ulysses=2", route_min_cost=0)
    app = Sync(AppState(ServeConfig(pools=[pool], router=RouterConfig())))
    app.report("small", "replica-a", ready=True)
    app.report("small", "replica-b", ready=True)
    later = time.time() + 600

    def line(ticket):
        return app.route("m", 1.0, ticket, later, [], None, None, False, True)

    assert line("line-1#0")["pool"] == line("line-2#0")["pool"] == "small"
    assert line("line-3#0") == {"pool": None, "busy": True}  # no idle replica left
    assert app.wait_preempted("line-1#0", 0) is False
    assert app.route("m", 1.0, "online-1#0", later, [])["pool"] == "small"
    assert app.wait_preempted("line-2#0", 0) and not app.wait_preempted("line-1#0", 0)  # the newest
    app.finish("line-2#0")  # its driver stopped it
    assert line("line-2#1") == {"pool": None, "busy": True}  # the online request has that replica now
    assert app.route("m", 1.0, "online-2#0", later, [])["pool"] == "small"
    assert app.wait_preempted("line-1#0", 0)
    app.finish("online-1#0")
    app.finish("online-2#0")
    app.finish("line-1#0")
    assert line("line-1#1")["pool"] == "small"  # idle again: the batch goes on


def test_a_batch_whose_driver_is_gone_waits_to_be_adopted_once_and_keeps_its_answers():
    """A batch's lapsed lease makes it an orphan (a video's fails at once); one replica adopts it; one that
    nobody adopts within ORPHAN_S fails ``driver_lost``. Its lines' answers are kept, the first of each."""
    store = JobStore(ttl_s=3600, max_bytes=1 << 20, lease_s=30)
    fields = {"endpoint": ENDPOINT, "input_file_id": "file-1", "completion_window": "24h", "metadata": None}
    batch = store.create("batch", "me", "", {**fields, "_driver": "router-a"}, now=0)
    store.progress(batch["id"], 0, 5, now=0)
    video = store.create("video", "me", "m", {}, now=0)
    assert store.orphans(now=10) == []
    assert store.orphans(now=31) == [batch["id"]]
    assert store.get(video["id"], "me", now=31)["status"] == "failed"
    adopted = store.adopt(batch["id"], now=32, driver="router-b")
    assert adopted is not None and adopted[1] == "me" and adopted[0]["adoptions"] == 1
    assert store.adopt(batch["id"], now=33) is None and store.orphans(now=33) == []  # one replica has it
    # The first driver was alive after all (it could not reach the state for a lease): it learns it lost it.
    assert store.renew(batch["id"], now=33, driver="router-a") == TAKEN
    assert store.renew(batch["id"], now=33, driver="router-b") == "in_progress"
    assert store.orphans(now=64) == [batch["id"]]  # that one died too
    assert store.get(batch["id"], "me", now=63 + ORPHAN_S + 1)["status"] == "failed"

    lines = LineStore(ttl_s=3600)
    lines.record("b", 2, True, b"two\n")
    lines.record("b", 0, False, b"zero\n")
    lines.record("b", 2, True, b"again\n")  # a repeat keeps the first answer
    assert lines.answered("b") == {2: (True, b"two\n"), 0: (False, b"zero\n")}
    lines.drop("b")
    assert lines.answered("b") == {}
