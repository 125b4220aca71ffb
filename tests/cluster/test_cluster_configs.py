"""The cloud configs are valid for Ray's own launcher and cannot drift from serve_configs/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from rayxdit.serve.app import load_serve_file

REPO = Path(__file__).resolve().parents[2]
LAUNCHER_CONFIGS = sorted((REPO / "cluster").glob("*.yaml"))
SERVE_CONFIG = REPO / "serve_configs" / "flux-dev-8gpu.yaml"
GPUS_PER_NODE = 8


def test_committed_configs_are_what_render_produces():
    done = subprocess.run(
        [sys.executable, str(REPO / "cluster" / "render.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_passes_ray_validation(path):
    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(config))  # what `ray up` runs before touching the cloud


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_fits_the_serve_pools(path):
    config = yaml.safe_load(path.read_text())
    serve_config, _ = load_serve_file(SERVE_CONFIG)
    deployed = [c for c in config["head_start_ray_commands"] if c.startswith("serve deploy")]
    assert deployed == [f"serve deploy ~/rayxdit/{SERVE_CONFIG.relative_to(REPO)}"]
    assert config["file_mounts"]["~/rayxdit"] == "."
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["GPU"] == 0, "GPU pools must land on GPU worker nodes"
    gpu_types = [t for name, t in config["available_node_types"].items() if t["resources"].get("GPU")]
    assert all(t["resources"]["GPU"] == GPUS_PER_NODE for t in gpu_types)
    largest = max(pool.ranks for pool in serve_config.pools)
    assert largest <= GPUS_PER_NODE, "a STRICT_PACK replica must fit on one node"
    at_max = sum(pool.max_replicas * pool.ranks for pool in serve_config.pools)
    assert sum(t["max_workers"] for t in gpu_types) * GPUS_PER_NODE >= at_max
    assert config["max_workers"] * GPUS_PER_NODE >= at_max
    # The elastic policy's budget is exactly what the launcher may buy (it cannot see the autoscaler's limit).
    assert serve_config.elastic.budget_ranks == config["max_workers"] * GPUS_PER_NODE
    assert all(pool.placement_strategy == "STRICT_PACK" for pool in serve_config.pools)


def test_rayservice_serves_the_same_application_on_the_same_nodes():
    manifest = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayservice-flux-dev.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    assert yaml.safe_load(manifest["spec"]["serveConfigV2"]) == yaml.safe_load(SERVE_CONFIG.read_text())
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    (workers,) = cluster["workerGroupSpecs"]
    container = workers["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == GPUS_PER_NODE
    assert workers["rayStartParams"]["num-gpus"] == str(GPUS_PER_NODE)
    launcher = yaml.safe_load((REPO / "cluster" / "aws-p5.yaml").read_text())
    assert workers["maxReplicas"] == launcher["available_node_types"]["gpu8"]["max_workers"]
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] == launcher["idle_timeout_minutes"] * 60
