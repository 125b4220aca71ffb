"""Failing hardware out of service: a node whose worker groups keep failing, or whose GPU reports a fatal
fault, is drained through Ray's own API, so that nothing new is placed on it.

Every pool replica reports its group's failures (a rank died, hung or raised; a rebuild failed) and its
ranks' fatal GPU faults to the application's state, which keeps them here. The decision is the pure
:func:`should_quarantine`: ``failures`` of them on one node within ``window_s``, or one fatal fault
(:func:`fatal_gpu_faults`: uncorrected ECC errors since the rank started, pages or rows waiting to be
retired or remapped, a row remapping failure, an Xid in :data:`FATAL_XIDS`).

The head node is never drained (the cluster's control plane, and a one-machine deployment's only node):
its failures are counted and logged, and its groups rebuilt in place as before.

Why a drain, and why of the whole node: Ray places bundles by resources and labels that are fixed when a
node starts. It cannot take one GPU out (``GPU`` is a unit resource: the GCS refuses to resize it), nor
relabel a node at run time. A drain (``DRAIN_NODE_REASON_PREEMPTION``, no deadline: the call a spot notice
makes, so Serve and the autoscaler already act on it) keeps every new placement group off the node, Serve
moves the node's other replicas elsewhere (each keeps serving until its replacement runs), and an
autoscaler may replace the node. The failing replica does not wait: it answers its requests with
:class:`~rayxdit.serve.api.ReplicaQuarantinedError` (the router sends them elsewhere: never again to the
same hardware) and exits. Ray has no undrain: ``rayxdit quarantine return NODE`` forgets the node's record,
and the node serves again once its Ray restarts (``ray stop; ray start --address ...`` on it, or its pod
deleted under KubeRay), as a GPU reset needs anyway.

Records live in Ray's GCS (``durable.ClusterJournal``): they outlive the state replica (which a drain of its
node moves too), and go with the cluster, whose node ids they name.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rayxdit.config import QuarantineConfig
from rayxdit.serve import metrics
from rayxdit.serve.durable import Journal

logger = logging.getLogger("ray.serve")
JOURNAL_SPACE = "quarantine"
DRAIN_TIMEOUT_S = 10.0
"""The drain call's bound: a GCS that does not answer must not hold the application's state."""

FATAL_XIDS = frozenset({48, 63, 64, 74, 79, 92, 94, 95, 119, 120, 140})
"""Xids after which NVIDIA's guidance is to drain and reset the GPU (or replace it): double-bit ECC (48),
row remapping pending or failed (63, 64), NVLink error (74), fallen off the bus (79), high single-bit ECC rate
(92), contained and uncontained ECC errors (94, 95), GSP RPC timeout and error (119, 120), unrecovered ECC
(140). Others (13, 31, 43: an application's fault) say nothing of the hardware."""


def fatal_gpu_faults(report: Mapping[str, Any]) -> list[str]:
    """What in one rank's GPU report (:func:`rayxdit.runtime.telemetry.gpu_health`) takes its GPU out of
    service, in words; empty when nothing does (or the rank has no NVML)."""
    faults = []
    gpu = report.get("gpu", "?")
    new_ecc = report.get("ecc_uncorrected", 0) - report.get("ecc_uncorrected_at_start", 0)
    if new_ecc > 0:
        faults.append(f"GPU {gpu}: {new_ecc:g} uncorrected ECC errors since its rank started")
    if report.get("retired_pages_pending"):
        faults.append(f"GPU {gpu}: pages waiting to be retired (needs a reset)")
    if report.get("remapped_rows_pending"):
        faults.append(f"GPU {gpu}: rows waiting to be remapped (needs a reset)")
    if report.get("remapping_failed"):
        faults.append(f"GPU {gpu}: a row remapping failed")
    fatal = sorted(set(report.get("xids", ())) & FATAL_XIDS)
    if fatal:
        faults.append(f"GPU {gpu}: Xid {', '.join(map(str, fatal))}")
    return faults


@dataclass(frozen=True)
class Failure:
    """One failure of a worker group: when (``time.time()``), on which node and GPUs, of which pool."""

    at: float
    node: str
    gpus: tuple[str, ...]
    pool: str
    cause: str


def should_quarantine(
    failures: Sequence[Failure],
    node: str,
    now: float,
    config: QuarantineConfig,
    faults: Sequence[str] = (),
    head: bool = False,
) -> str | None:
    """Why ``node`` leaves service now (None: it stays): a fatal GPU fault at once, or ``config.failures``
    failures on it within ``config.window_s``. Never the ``head`` node: draining it would stop the cluster's
    control plane with it (and a one-machine deployment's only node); its failures are only counted."""
    if not config.enabled or head:
        return None
    if faults:
        return "; ".join(faults)
    recent = [f for f in failures if f.node == node and now - f.at <= config.window_s]
    if len(recent) >= config.failures:
        causes = sorted({f.cause for f in recent})
        return f"{len(recent)} group failures within {config.window_s:g} s ({', '.join(causes)})"
    return None


@dataclass
class Quarantined:
    """A node out of service: why, since when, its GPUs and pools that failed there."""

    node: str
    reason: str
    since: float
    gpus: list[str] = field(default_factory=list)
    pools: list[str] = field(default_factory=list)
    drained: bool = False
    """Whether Ray accepted the drain (False: refused or failed; the record still keeps rayxdit off it)."""
    drain_error: str | None = None


class QuarantineBook:
    """Failures seen and nodes out of service, for the application's state (plain data and its journal)."""

    def __init__(self, config: QuarantineConfig, journal: Journal):
        self.config = config
        self.journal = journal
        self.failures: deque[Failure] = deque()
        self.nodes: dict[str, Quarantined] = {}
        for key, (value, _) in journal.load(JOURNAL_SPACE).items():
            try:
                self.nodes[key] = Quarantined(**json.loads(value))
            except (TypeError, ValueError) as error:
                logger.warning("quarantine record %s unreadable (%r): dropped", key, error)
        self.publish()

    def failed(
        self, node: str, gpus: Iterable[str], pool: str, cause: str, faults: Sequence[str] = ()
    ) -> Quarantined | None:
        """Record one failure of a group on ``node``; the node's record when it is (now or already) out of
        service, else None. A newly quarantined node is drained here (:func:`drain_node`)."""
        now = time.time()
        failure = Failure(now, node, tuple(gpus), pool, cause)
        self.failures.append(failure)
        while self.failures and now - self.failures[0].at > self.config.window_s:
            self.failures.popleft()
        metrics.inc("rayxdit_group_failures", pool=pool, node=node, cause=cause)
        if node in self.nodes:
            return self.nodes[node]
        reason = should_quarantine(list(self.failures), node, now, self.config, faults, node_is_head(node))
        if reason is None:
            return None
        on_node = [f for f in self.failures if f.node == node]
        record = Quarantined(
            node,
            reason,
            now,
            gpus=sorted({gpu for f in on_node for gpu in f.gpus}),
            pools=sorted({f.pool for f in on_node}),
        )
        record.drained, record.drain_error = drain_node(node, f"rayxdit quarantine: {reason}")
        self.nodes[node] = record
        self.journal.save(JOURNAL_SPACE, node, json.dumps(asdict(record)).encode())
        logger.error(
            "node %s (GPUs %s) out of service: %s; drained: %s%s. `rayxdit quarantine list` shows it, "
            "`rayxdit quarantine return %s` returns it once its Ray has restarted",
            node,
            ", ".join(record.gpus) or "?",
            reason,
            record.drained,
            f" ({record.drain_error})" if record.drain_error else "",
            node,
        )
        metrics.inc("rayxdit_quarantines", node=node)
        self.publish()
        return record

    def give_back(self, node: str) -> Quarantined | None:
        """Forget ``node``'s record and its failures (``rayxdit quarantine return``); the record, or None."""
        record = self.nodes.pop(node, None)
        self.failures = deque(f for f in self.failures if f.node != node)
        self.journal.drop(JOURNAL_SPACE, node)
        if record is not None:
            logger.warning("node %s returned to service", node)
            metrics.set_gauge("rayxdit_node_quarantined", 0, node=node)
            self.publish()
        return record

    def listing(self) -> list[dict[str, Any]]:
        return [asdict(record) for record in sorted(self.nodes.values(), key=lambda r: r.since)]

    def publish(self) -> None:
        """The gauges (set again on every heartbeat: Ray drops a gauge not set for two intervals)."""
        metrics.set_gauge("rayxdit_quarantined_nodes", len(self.nodes))
        for node in self.nodes:
            metrics.set_gauge("rayxdit_node_quarantined", 1, node=node)


def drain_node(node: str, message: str) -> tuple[bool, str | None]:
    """Drain ``node`` with no deadline through the GCS (as a spot notice would); (accepted, why not)."""
    try:
        import ray
        from ray.core.generated import autoscaler_pb2

        gcs = ray._private.worker.global_worker.gcs_client  # Ray's own client; no public drain call yet
        reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
        accepted, rejection = gcs.drain_node(node, reason, message, 0, timeout=DRAIN_TIMEOUT_S)
        return bool(accepted), (rejection or None) if not accepted else None
    except Exception as error:  # the record and the failing replica's exit stand; the log says it
        return False, repr(error)


def node_is_head(node: str) -> bool:
    """Whether ``node`` is the cluster's head (False when Ray cannot tell)."""
    try:
        import ray

        return any(
            entry["NodeID"] == node and "node:__internal_head__" in entry["Resources"]
            for entry in ray.nodes()
        )
    except Exception:
        return False


def node_is_alive(node: str) -> bool:
    """Whether Ray still counts ``node`` among its live nodes (a returned node alive is still drained)."""
    import ray

    return any(entry["NodeID"] == node and entry["Alive"] for entry in ray.nodes())
