"""rayxdit's Grafana dashboard and Prometheus alert rules, as data (rendered by cluster/render.py).

Ray exports every metric on each node's metrics port (``ray start --metrics-export-port 8080``), prefixed
``ray_``; a counter gains ``_total``, a histogram ``_bucket``/``_sum``/``_count``. Every query below names a
metric that rayxdit exports (``rayxdit/serve/metrics.py``, ``rayxdit/runtime/telemetry.py``): a test
parses both and fails on a name the code does not define.
"""

from __future__ import annotations

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
WINDOW = "5m"


def _quantile(q: float, metric: str, by: str) -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) (rate(ray_{metric}_bucket[{WINDOW}])))"


# (title, unit, [(expr, legend)], description)
PANELS: list[tuple[str, str, list[tuple[str, str]], str]] = [
    (
        "Requests per second by status",
        "reqps",
        [(f"sum by (status, code) (rate(ray_rayxdit_requests_total[{WINDOW}]))", "{{status}} {{code}}")],
        "Every request the routers answered; 499: the client went away.",
    ),
    (
        "End-to-end latency by pool",
        "s",
        [
            (_quantile(0.5, "rayxdit_request_seconds", "pool"), "p50 {{pool}}"),
            (_quantile(0.99, "rayxdit_request_seconds", "pool"), "p99 {{pool}}"),
        ],
        "Arrival at the router to answer, successful requests.",
    ),
    (
        "Queue depth by pool",
        "short",
        [
            ("sum by (pool) (ray_rayxdit_pool_outstanding)", "outstanding {{pool}}"),
            ("sum by (pool) (ray_rayxdit_requests_waiting)", "waiting at replicas {{pool}}"),
        ],
        "Requests routed and not finished (the whole application's view), and those waiting at a replica.",
    ),
    (
        "Replicas by pool",
        "short",
        [("sum by (pool, state) (ray_rayxdit_pool_replicas)", "{{pool}} {{state}}")],
        "Where the elastic policy put the GPUs.",
    ),
    (
        "Queue wait p99 by pool",
        "s",
        [(_quantile(0.99, "rayxdit_queue_wait_seconds", "pool"), "{{pool}}")],
        "Time a request waited at its replica before its ranks started it.",
    ),
    (
        "Engine stages (median)",
        "s",
        [(_quantile(0.5, "rayxdit_stage_seconds", "stage"), "{{stage}}")],
        "Text encoding, the denoising loop, VAE decoding.",
    ),
    (
        "Seconds per denoising step (median) by pool",
        "s",
        [(_quantile(0.5, "rayxdit_step_seconds", "pool"), "{{pool}}")],
        "",
    ),
    (
        "GPU-seconds per image by pool",
        "s",
        [
            (
                f"sum by (pool) (rate(ray_rayxdit_gpu_seconds_total[{WINDOW}])) / "
                f"sum by (pool) (rate(ray_rayxdit_images_total[{WINDOW}]))",
                "{{pool}}",
            )
        ],
        "What an image costs: ranks x engine time (failed attempts included).",
    ),
    (
        "GPU utilization",
        "percent",
        [
            (
                "max by (node, gpu, pool) (ray_rayxdit_gpu_utilization_percent)",
                "{{node}} GPU {{gpu}} ({{pool}})",
            )
        ],
        "NVML: share of time a kernel ran.",
    ),
    (
        "GPU memory used",
        "percentunit",
        [
            (
                "max by (node, gpu) (ray_rayxdit_gpu_memory_used_bytes) / "
                "max by (node, gpu) (ray_rayxdit_gpu_memory_total_bytes)",
                "{{node}} GPU {{gpu}}",
            )
        ],
        "",
    ),
    (
        "GPU power and temperature",
        "short",
        [
            ("max by (node, gpu) (ray_rayxdit_gpu_power_watts)", "W {{node}} GPU {{gpu}}"),
            ("max by (node, gpu) (ray_rayxdit_gpu_temperature_celsius)", "C {{node}} GPU {{gpu}}"),
        ],
        "",
    ),
    (
        "GPU clocks and throttling",
        "short",
        [
            ("max by (node, gpu) (ray_rayxdit_gpu_sm_clock_mhz)", "SM MHz {{node}} GPU {{gpu}}"),
            ("max by (node, gpu) (ray_rayxdit_gpu_throttled)", "throttled {{node}} GPU {{gpu}}"),
        ],
        "Throttled: held down by power, heat or a hardware slowdown (not idling).",
    ),
    (
        "Errors and rebuilds",
        "short",
        [
            (
                f'sum(rate(ray_rayxdit_requests_total{{status=~"5.."}}[{WINDOW}])) / '
                f"sum(rate(ray_rayxdit_requests_total[{WINDOW}]))",
                "5xx share",
            ),
            (
                "sum by (pool, cause) (increase(ray_rayxdit_group_rebuilds_total[1h]))",
                "rebuilds/h {{pool}} {{cause}}",
            ),
            ("max by (node, gpu) (ray_rayxdit_gpu_xid_errors)", "Xid {{node}} GPU {{gpu}}"),
            ("max by (node, gpu) (ray_rayxdit_gpu_ecc_uncorrected_errors)", "ECC {{node}} GPU {{gpu}}"),
        ],
        "",
    ),
    (
        "Routing: fallbacks",
        "percentunit",
        [
            (
                f'sum by (model) (rate(ray_rayxdit_routing_decisions_total{{choice="fallback"}}[{WINDOW}])) / '
                f"sum by (model) (rate(ray_rayxdit_routing_decisions_total[{WINDOW}]))",
                "{{model}}",
            )
        ],
        "Requests sent to another pool after the first choice was full or gone.",
    ),
]


def dashboard() -> dict:
    """The Grafana dashboard (import it, or provision it; pick the Prometheus data source)."""
    panels = []
    for index, (title, unit, queries, description) in enumerate(PANELS):
        panels.append(
            {
                "id": index + 1,
                "type": "timeseries",
                "title": title,
                "description": description,
                "datasource": DATASOURCE,
                "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
                "targets": [
                    {
                        "refId": chr(ord("A") + n),
                        "datasource": DATASOURCE,
                        "expr": expr,
                        "legendFormat": legend,
                    }
                    for n, (expr, legend) in enumerate(queries)
                ],
            }
        )
    return {
        "uid": "rayxdit",
        "title": "rayxdit",
        "description": "rayxdit serving: traffic, latency, queues, replicas, GPU telemetry (NVML), cost.",
        "tags": ["rayxdit", "ray"],
        "timezone": "browser",
        "editable": True,
        "schemaVersion": 39,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                }
            ]
        },
        "panels": panels,
    }


# (name, expr, for, severity, summary)
ALERTS: list[tuple[str, str, str, str, str]] = [
    (
        "RayxditLatencyP99High",
        f"{_quantile(0.99, 'rayxdit_request_seconds', 'pool')} > 60",
        "10m",
        "warning",
        "p99 end-to-end latency of pool {{ $labels.pool }} is {{ $value | humanizeDuration }}",
    ),
    (
        "RayxditErrorRateHigh",
        f'sum(rate(ray_rayxdit_requests_total{{status=~"5.."}}[{WINDOW}])) / '
        f"sum(rate(ray_rayxdit_requests_total[{WINDOW}])) > 0.05",
        "5m",
        "critical",
        "{{ $value | humanizePercentage }} of requests fail with 5xx",
    ),
    (
        "RayxditRequestsRefused",
        f'sum by (model) (rate(ray_rayxdit_requests_total{{status="429"}}[{WINDOW}])) / '
        f"sum by (model) (rate(ray_rayxdit_requests_total[{WINDOW}])) > 0.1",
        "10m",
        "warning",
        "{{ $value | humanizePercentage }} of {{ $labels.model }} requests refused (429): capacity is short",
    ),
    (
        "RayxditQueueBuilding",
        "sum by (pool) (ray_rayxdit_pool_outstanding) > "
        '2 * clamp_min(sum by (pool) (ray_rayxdit_pool_replicas{state="ready"}), 1)',
        "10m",
        "warning",
        "pool {{ $labels.pool }} has more than two requests per ready replica",
    ),
    (
        "RayxditGpuUnderutilizedWhileBusy",
        "avg by (pool) (ray_rayxdit_gpu_utilization_percent) < 90 "
        "and on (pool) sum by (pool) (ray_rayxdit_requests_running) >= 1",
        "15m",
        "info",
        "GPUs of pool {{ $labels.pool }} run kernels {{ $value }}% of the time while serving: "
        "communication or host overhead",
    ),
    (
        "RayxditWorkerGroupRebuilds",
        "sum by (pool, cause) (increase(ray_rayxdit_group_rebuilds_total[15m])) > 2",
        "0m",
        "warning",
        "pool {{ $labels.pool }} rebuilt worker groups {{ $value }} times in 15 min ({{ $labels.cause }})",
    ),
    (
        "RayxditGpuThrottled",
        "max by (node, gpu) (ray_rayxdit_gpu_throttled) == 1",
        "10m",
        "warning",
        "GPU {{ $labels.gpu }} on {{ $labels.node }} is throttled (power, heat or hardware slowdown)",
    ),
    (
        "RayxditGpuHardwareErrors",
        "max by (node, gpu) (increase(ray_rayxdit_gpu_ecc_uncorrected_errors[1h])) > 0 "
        "or max by (node, gpu) (increase(ray_rayxdit_gpu_xid_errors[1h])) > 0",
        "0m",
        "critical",
        "GPU {{ $labels.gpu }} on {{ $labels.node }} reported uncorrected ECC or Xid errors (rayxdit drains "
        "the node itself when the fault is fatal: see RayxditNodeQuarantined)",
    ),
    (
        "RayxditNodeQuarantined",
        "max by (node) (ray_rayxdit_node_quarantined) == 1",
        "0m",
        "critical",
        "node {{ $labels.node }} was taken out of service (drained) for failing hardware: `rayxdit "
        "quarantine list` says why; fix or replace it, restart its Ray, then `rayxdit quarantine return`",
    ),
]


def alert_rules() -> dict:
    """Prometheus rule file (``rule_files:``), or the ``spec`` of a prometheus-operator PrometheusRule."""
    return {
        "groups": [
            {
                "name": "rayxdit",
                "rules": [
                    {
                        "alert": name,
                        "expr": expr,
                        "for": duration,
                        "labels": {"severity": severity},
                        "annotations": {"summary": summary},
                    }
                    for name, expr, duration, severity, summary in ALERTS
                ],
            }
        ]
    }


def kuberay_monitoring() -> list[dict]:
    """For a cluster running prometheus-operator (kube-prometheus-stack): a PodMonitor scraping every Ray
    pod's metrics port (as Ray's KubeRay guide does) and the alert rules as a PrometheusRule."""
    return [
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PodMonitor",
            "metadata": {"name": "rayxdit-ray-pods", "labels": {"release": "prometheus"}},
            "spec": {
                "jobLabel": "ray-workers",
                "namespaceSelector": {"any": True},
                "selector": {"matchLabels": {"ray.io/is-ray-node": "yes"}},
                "podMetricsEndpoints": [{"port": "metrics"}],
            },
        },
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": {"name": "rayxdit-alerts", "labels": {"release": "prometheus"}},
            "spec": alert_rules(),
        },
    ]
