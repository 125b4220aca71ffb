"""The Grafana dashboard and the Prometheus alert rules in cluster/: Grafana's own schema takes the
dashboard without dropping anything, and every query names a metric the code exports, with the suffix
Ray's exporter gives its kind."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from rayxdit.runtime.telemetry import GPU_METRICS
from rayxdit.serve.metrics import SERVING_METRICS

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
sys.path.insert(0, str(CLUSTER))
import monitoring  # noqa: E402

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported_samples() -> set[str]:
    """Every sample name Ray's Prometheus endpoint shows for rayxdit's metrics."""
    names = {f"ray_{spec.name}{suffix}" for spec in SERVING_METRICS for suffix in SUFFIXES[spec.kind]}
    return names | {f"ray_{name}" for name in GPU_METRICS}


def unknown_metrics(queries: list[str]) -> set[str]:
    used = {name for query in queries for name in re.findall(r"\bray_rayxdit_[a-z_]+", query)}
    return used - exported_samples()


def dashboard_queries(document: dict) -> list[str]:
    return [target["expr"] for panel in document["panels"] for target in panel["targets"]]


def alert_queries(document: dict) -> list[str]:
    return [rule["expr"] for group in document["groups"] for rule in group["rules"]]


def contained(ours, theirs, path="") -> list[str]:
    """Where ``ours`` is not found in ``theirs`` (dict keys and values, recursively)."""
    if isinstance(ours, dict):
        if not isinstance(theirs, dict):
            return [path or "/"]
        return [p for key, value in ours.items() for p in contained(value, theirs.get(key), f"{path}/{key}")]
    if isinstance(ours, list):
        if not isinstance(theirs, list) or len(theirs) != len(ours):
            return [path]
        return [
            p
            for n, (a, b) in enumerate(zip(ours, theirs, strict=True))
            for p in contained(a, b, f"{path}/{n}")
        ]
    return [] if ours == theirs else [path]


def test_the_dashboard_loads_in_grafanas_schema_without_losing_a_field():
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    document = json.loads((CLUSTER / "grafana" / "rayxdit-dashboard.json").read_text())
    decoded = json.loads(json.dumps(Dashboard.from_json(document), cls=JSONEncoder))
    assert contained(document, decoded) == []
    # The check itself: a field Grafana's schema does not have is dropped by the decoder, and found.
    planted = {**document, "panels": [{**document["panels"][0], "querys": []}, *document["panels"][1:]]}
    decoded = json.loads(json.dumps(Dashboard.from_json(planted), cls=JSONEncoder))
    assert contained(planted, decoded) == ["/panels/0/querys"]


def test_every_dashboard_and_alert_query_names_an_exported_metric():
    dashboard = json.loads((CLUSTER / "grafana" / "rayxdit-dashboard.json").read_text())
    rules = yaml.safe_load((CLUSTER / "prometheus" / "rayxdit-alerts.yaml").read_text())
    queries = dashboard_queries(dashboard) + alert_queries(rules)
    assert len(queries) >= 20 and unknown_metrics(queries) == set()
    used = {name for query in queries for name in re.findall(r"\bray_rayxdit_[a-z_]+", query)}
    # The panels the issue asks for: latency by pool, queue depth, GPU utilization, errors, rebuilds,
    # throttling.
    for needed in (
        "request_seconds_bucket",
        "pool_outstanding",
        "gpu_utilization_percent",
        "requests_total",
        "group_rebuilds_total",
        "gpu_throttled",
    ):
        assert f"ray_rayxdit_{needed}" in used
    # The check itself catches a misspelled name, and a gauge queried as a counter.
    assert unknown_metrics(["rate(ray_rayxdit_request_total[5m])", "ray_rayxdit_pool_outstanding_total"]) == {
        "ray_rayxdit_request_total",
        "ray_rayxdit_pool_outstanding_total",
    }


@pytest.mark.parametrize("document", ["prometheus/rayxdit-alerts.yaml", "kuberay/monitoring.yaml"])
def test_alert_rules_are_well_formed(document):
    documents = list(yaml.safe_load_all((CLUSTER / document).read_text()))
    rules = next(d.get("spec", d) for d in documents if "groups" in d.get("spec", d))
    names = set()
    for rule in rules["groups"][0]["rules"]:
        assert rule.keys() == {"alert", "expr", "for", "labels", "annotations"}
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert re.fullmatch(r"\d+[smh]", rule["for"])
        assert rule["expr"].count("(") == rule["expr"].count(")")
        names.add(rule["alert"])
    assert len(names) == len(monitoring.ALERTS)
