"""The quarantine's decisions (pure) and its book, kept in a real Ray cluster's GCS across a state restart."""

from __future__ import annotations

import ray

from rayxdit.config import QuarantineConfig
from rayxdit.runtime.ray_start import init_ray
from rayxdit.serve.durable import ClusterJournal, MemoryJournal
from rayxdit.serve.quarantine import Failure, QuarantineBook, fatal_gpu_faults, should_quarantine

CONFIG = QuarantineConfig(failures=3, window_s=60)


def failures(node: str, *ages: float, now: float = 1000.0) -> list[Failure]:
    return [Failure(now - age, node, ("0",), "tiny-2", "rank_died") for age in ages]


def test_a_node_leaves_after_n_failures_within_the_window_and_only_that_node():
    now = 1000.0
    assert should_quarantine(failures("a", 1, 2), "a", now, CONFIG) is None
    reason = should_quarantine(failures("a", 1, 2, 59), "a", now, CONFIG)
    assert reason is not None and reason.startswith("3 group failures within 60 s (rank_died)")
    # Older than the window, or on another node: not counted.
    assert should_quarantine(failures("a", 1, 2, 61), "a", now, CONFIG) is None
    assert should_quarantine(failures("a", 1, 2) + failures("b", 3), "a", now, CONFIG) is None
    assert should_quarantine(failures("a", 1, 2, 3), "b", now, CONFIG) is None
    # Never the head node (the control plane; a one-machine deployment's only node).
    assert should_quarantine(failures("a", 1, 2, 3), "a", now, CONFIG, head=True) is None
    # A fatal fault at once; nothing at all when disabled.
    assert should_quarantine([], "a", now, CONFIG, ["GPU 0: Xid 79"]) == "GPU 0: Xid 79"
    off = QuarantineConfig(enabled=False, failures=1)
    assert should_quarantine(failures("a", 1, 2, 3), "a", now, off, ["GPU 0: Xid 79"]) is None


def test_fatal_gpu_faults_name_the_hardware_faults_and_ignore_an_applications():
    assert fatal_gpu_faults({"gpu": "3"}) == []  # no NVML: nothing known
    healthy = {"gpu": "3", "ecc_uncorrected": 2.0, "ecc_uncorrected_at_start": 2.0, "xids": [13, 31, 43]}
    assert fatal_gpu_faults(healthy) == []  # old ECC errors, and Xids of an application's own faults
    faults = fatal_gpu_faults(
        {
            "gpu": "3",
            "ecc_uncorrected": 3.0,
            "ecc_uncorrected_at_start": 2.0,
            "retired_pages_pending": True,
            "remapped_rows_pending": True,
            "remapping_failed": True,
            "xids": [13, 79, 48],
        }
    )
    assert faults == [
        "GPU 3: 1 uncorrected ECC errors since its rank started",
        "GPU 3: pages waiting to be retired (needs a reset)",
        "GPU 3: rows waiting to be remapped (needs a reset)",
        "GPU 3: a row remapping failed",
        "GPU 3: Xid 48, 79",
    ]


def test_the_book_quarantines_once_and_returning_forgets_the_failures():
    book = QuarantineBook(QuarantineConfig(failures=2, window_s=60), MemoryJournal())
    assert book.failed("a", ["0", "1"], "tiny-2", "rank_died") is None
    assert book.failed("b", ["0"], "tiny-4", "rank_hung") is None
    record = book.failed("a", ["1"], "tiny-4", "rebuild_failed")
    assert record is not None and record.node == "a"
    assert record.gpus == ["0", "1"] and record.pools == ["tiny-2", "tiny-4"]
    assert not record.drained and record.drain_error  # no Ray here: the drain fails, the record stands
    assert book.failed("a", ["0"], "tiny-2", "rank_died") is record  # already out: the same record
    assert [entry["node"] for entry in book.listing()] == ["a"]
    assert book.give_back("a") is record and book.listing() == []
    assert book.failed("a", ["0"], "tiny-2", "rank_died") is None  # its old failures are forgotten
    assert book.give_back("missing") is None


def test_records_outlive_the_state_in_the_clusters_gcs():
    init_ray(num_cpus=1, include_dashboard=False, logging_level="error")
    try:
        config = QuarantineConfig(failures=1)
        book = QuarantineBook(config, ClusterJournal("q-test"))
        book.failed("a", ["7"], "tiny-2", "rank_died")
        again = QuarantineBook(config, ClusterJournal("q-test"))  # the state replica started again
        assert [(entry["node"], entry["gpus"]) for entry in again.listing()] == [("a", ["7"])]
        assert QuarantineBook(config, ClusterJournal("another-app")).listing() == []
        again.give_back("a")
        assert QuarantineBook(config, ClusterJournal("q-test")).listing() == []
    finally:
        ray.shutdown()
