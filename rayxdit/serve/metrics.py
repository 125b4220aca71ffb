"""The serving metrics, through Ray's own metrics system (``ray.util.metrics``).

Ray exports them on every node's metrics endpoint next to Serve's built-in metrics (Prometheus text, each
name prefixed ``ray_``; ``rayxdit serve --metrics-port N`` puts the local one on a known port): there is
no second metrics server. Labels stay low-cardinality: model, pool, status, error code, size class, stage,
cause; never a request id (those go to logs and response headers).

Each process creates its metrics on first use (Ray must be initialized by then: inside a Serve replica it
is). These and the GPU gauges of ``rayxdit/runtime/telemetry.py`` are every metric rayxdit exports; a test
checks that every query of the Grafana dashboard and the alert rules in ``cluster/`` names one of them.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

ENABLED = os.environ.get("RAYXDIT_METRICS", "1") != "0"
"""``RAYXDIT_METRICS=0`` in the application's environment turns every rayxdit metric (and the ranks' NVML
sampling) off: how the serving benchmark measures what they cost."""
LATENCY_BUCKETS = [0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120, 300, 900]
"""Seconds: from a cached small image to a 2048px video-length request."""
STEP_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2]
"""Seconds per denoising step (Flux.1-dev 1024px on one H200: 0.13 s)."""


def size_class(width: int, height: int) -> str:
    """A label of a few values for a request's size: ``<=512``, ``<=1024``, ``<=2048``, ``>2048`` (by the
    longer side)."""
    side = max(width, height)
    for bound in (512, 1024, 2048):
        if side <= bound:
            return f"<={bound}"
    return ">2048"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # counter, histogram, gauge
    description: str
    tags: tuple[str, ...]
    buckets: tuple[float, ...] | None = None


SERVING_METRICS = (
    MetricSpec(
        "rayxdit_requests",
        "counter",
        "Requests answered by the router, by HTTP status and error code (cancelled: the client went away).",
        ("model", "pool", "status", "code", "size_class"),
    ),
    MetricSpec(
        "rayxdit_request_seconds",
        "histogram",
        "End-to-end seconds of image requests at the router (arrival to answer), successful ones.",
        ("model", "pool", "size_class"),
        tuple(LATENCY_BUCKETS),
    ),
    MetricSpec(
        "rayxdit_routing_decisions",
        "counter",
        "Pools chosen by the router: first (the earliest estimate) or fallback (after a full or gone pool).",
        ("model", "pool", "choice"),
    ),
    MetricSpec(
        "rayxdit_tenant_refusals",
        "counter",
        "Requests refused with 429 because their tenant was over a limit (router.api_keys), by code: "
        "rate_limited, concurrency_limited, quota_exceeded.",
        ("tenant", "code"),
    ),
    MetricSpec(
        "rayxdit_state_store_errors",
        "counter",
        "Writes of the shared state to its Redis (state.redis_url) that failed, by operation: the state "
        "serves on from memory, but what changed meanwhile would not survive its restart.",
        ("operation",),
    ),
    MetricSpec(
        "rayxdit_tenant_gpu_seconds",
        "counter",
        "GPU-seconds of each tenant's finished requests (ranks x engine time; 'anonymous' without keys).",
        ("tenant",),
    ),
    MetricSpec(
        "rayxdit_queue_wait_seconds",
        "histogram",
        "Seconds a request waited at its pool replica before its ranks started it.",
        ("model", "pool"),
        tuple(LATENCY_BUCKETS),
    ),
    MetricSpec(
        "rayxdit_stage_seconds",
        "histogram",
        "Engine seconds per request by stage: encode (text), denoise (the transformer loop), decode (VAE).",
        ("model", "pool", "stage"),
        tuple(LATENCY_BUCKETS),
    ),
    MetricSpec(
        "rayxdit_step_seconds",
        "histogram",
        "Seconds per denoising step (denoise time / steps).",
        ("model", "pool"),
        tuple(STEP_BUCKETS),
    ),
    MetricSpec("rayxdit_images", "counter", "Images (or videos) generated.", ("model", "pool")),
    MetricSpec(
        "rayxdit_jobs",
        "counter",
        "Asynchronous jobs (videos, background images, batches) by how they ended.",
        ("model", "kind", "status"),
    ),
    MetricSpec(
        "rayxdit_batch_preemptions",
        "counter",
        "Batch lines stopped at a step for an online request that would have waited (run again later).",
        ("pool",),
    ),
    MetricSpec(
        "rayxdit_gpu_seconds",
        "counter",
        "GPU-seconds consumed: ranks x engine wall time of each finished request (failed attempts too).",
        ("model", "pool"),
    ),
    MetricSpec(
        "rayxdit_rank_memory",
        "gauge",
        "A pool's memory per rank as its replicas measured it (GPU ranks): capacity_gib (what a rank may use), "
        "resident_gib (weights and buffers), max_megapixels (the largest request, megapixels x frames x "
        "images, it holds).",
        ("pool", "kind"),
    ),
    MetricSpec(
        "rayxdit_group_rebuilds",
        "counter",
        "Worker groups rebuilt, by cause: rank_died, rank_hung, rank_error, out_of_memory, cancel_timeout.",
        ("pool", "cause"),
    ),
    MetricSpec(
        "rayxdit_group_failures",
        "counter",
        "Worker-group failures a pool replica reported to the quarantine (a rank died, hung or raised; a "
        "rebuild failed; a fatal GPU fault), by node: what rayxdit.serve.quarantine counts.",
        ("pool", "node", "cause"),
    ),
    MetricSpec(
        "rayxdit_quarantines",
        "counter",
        "Nodes taken out of service (drained) for failing hardware.",
        ("node",),
    ),
    MetricSpec(
        "rayxdit_quarantined_nodes",
        "gauge",
        "Nodes out of service now (`rayxdit quarantine list` names them).",
        (),
    ),
    MetricSpec(
        "rayxdit_node_quarantined",
        "gauge",
        "1 while the node is out of service, 0 once returned.",
        ("node",),
    ),
    MetricSpec(
        "rayxdit_replica_start_seconds",
        "histogram",
        "Seconds of each stage of a pool replica's start: processes (rank processes up, imports done), "
        "rendezvous (process group), weights (model built and parallelized), warm_up, total.",
        ("pool", "stage"),
        (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
    ),
    MetricSpec(
        "rayxdit_lora_loads",
        "counter",
        "Adapters a request needed (lora_sources), by where they were: device (resident on the GPUs), host "
        "(host memory, copied to the GPUs) or disk (read from its source).",
        ("model", "pool", "source"),
    ),
    MetricSpec(
        "rayxdit_lora_swap_seconds",
        "histogram",
        "Seconds a request spent bringing the weights to its adapters (restore and fuse; loads included).",
        ("model", "pool"),
        (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
    ),
    MetricSpec(
        "rayxdit_lora_resident_bytes",
        "gauge",
        "Bytes of adapters resident on each GPU of a pool replica (with the exact copies of the weights "
        "they touched).",
        ("pool",),
    ),
    MetricSpec(
        "rayxdit_requests_running",
        "gauge",
        "Requests running on a pool replica's ranks (0 or 1 per replica).",
        ("pool",),
    ),
    MetricSpec(
        "rayxdit_requests_waiting",
        "gauge",
        "Requests waiting at a pool replica for its ranks.",
        ("pool",),
    ),
    MetricSpec(
        "rayxdit_pool_outstanding",
        "gauge",
        "Requests routed to a pool and not finished (running or queued), the whole application's view.",
        ("pool",),
    ),
    MetricSpec(
        "rayxdit_pool_replicas",
        "gauge",
        "A pool's replicas by state (ready, starting), as they report to the application's state.",
        ("pool", "state"),
    ),
)


@functools.cache
def metric(name: str) -> Any:
    """The process's ``ray.util.metrics`` object for ``name`` (created on first use)."""
    from ray.util import metrics

    spec = next(spec for spec in SERVING_METRICS if spec.name == name)
    if spec.kind == "counter":
        return metrics.Counter(spec.name, spec.description, tag_keys=spec.tags)
    if spec.kind == "gauge":
        return metrics.Gauge(spec.name, spec.description, tag_keys=spec.tags)
    return metrics.Histogram(spec.name, spec.description, boundaries=list(spec.buckets), tag_keys=spec.tags)


def inc(name: str, value: float = 1.0, **tags: str) -> None:
    if ENABLED and value > 0:
        metric(name).inc(value, tags=tags)


def observe(name: str, value: float, **tags: str) -> None:
    if ENABLED:
        metric(name).observe(value, tags=tags)


def set_gauge(name: str, value: float, **tags: str) -> None:
    if ENABLED:
        metric(name).set(value, tags=tags)


def record_engine_timings(model: str, pool: str, timings: dict[str, Any]) -> None:
    """The stage histograms and the per-step time of one finished request (``timings["steps"]``: the
    engine's resolved step count, also where the request left it to the model's default)."""
    steps = timings.get("steps")
    for stage in ("encode", "denoise", "decode"):
        seconds = timings.get(f"{stage}_s")
        if seconds is not None:
            observe("rayxdit_stage_seconds", seconds, model=model, pool=pool, stage=stage)
    if timings.get("denoise_s") is not None and steps:
        observe("rayxdit_step_seconds", timings["denoise_s"] / steps, model=model, pool=pool)
    for source in ("device", "host", "disk"):
        inc(
            "rayxdit_lora_loads",
            timings.get(f"lora_{source}_loads", 0),
            model=model,
            pool=pool,
            source=source,
        )
    if timings.get("lora_swap_s") is not None:
        observe("rayxdit_lora_swap_seconds", timings["lora_swap_s"], model=model, pool=pool)
    if timings.get("lora_resident_bytes") is not None:
        set_gauge("rayxdit_lora_resident_bytes", timings["lora_resident_bytes"], pool=pool)
