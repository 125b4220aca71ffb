"""Render the Ray cluster launcher configs in this folder from one spec, so that the AWS/GCP and
spot/on-demand variants cannot drift apart. A test checks the committed YAMLs against this script.

    python cluster/render.py            # rewrite cluster/*.yaml
    python cluster/render.py --check    # exit 1 if a committed file differs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from rayxdit.config import worker_preload_env

sys.path.insert(0, str(Path(__file__).resolve().parent))
import monitoring

HERE = Path(__file__).resolve().parent
SERVE_CONFIG = "serve_configs/flux-dev-8gpu.yaml"
RAY_IMAGE = "rayproject/ray:2.60.0-py311-gpu"
PINNED = '"torch==2.11.0" "ray[serve,data]==2.60.0" "diffusers==0.42.1" "transformers==5.17.0"'
PRELOAD_ENV = worker_preload_env({})  # the shipped default, whatever this shell sets
"""Every node's Ray workers import Serve's replica module as they start: a replica started in an idle worker
runs its constructor soon after (rayxdit.config.SERVING_WORKER_PRELOAD)."""
PRELOAD = " ".join(f"{name}={value}" for name, value in PRELOAD_ENV.items())
GPU_WORKER = "gpu8"
"""Every GPU worker type is one 8-GPU machine: pools of 2, 4 and 8 GPUs pack onto it with STRICT_PACK."""

CLOUDS = {
    "aws": {
        "provider": {"type": "aws", "region": "us-east-1", "cache_stopped_nodes": False},
        "auth": {"ssh_user": "ubuntu"},
        "head": {
            "InstanceType": "m6i.4xlarge",
            "ImageId": "ami-0dd6adfad4ad37eec",
            "BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 200}}],
        },
        "head_cpus": 16,
        "gpus": {
            "p5": {"InstanceType": "p5.48xlarge", "cpus": 192, "accelerator": "H100"},
            "p4d": {"InstanceType": "p4d.24xlarge", "cpus": 96, "accelerator": "A100"},
        },
        "disk": {"BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 1000}}]},
        "spot": {"InstanceMarketOptions": {"MarketType": "spot"}},
    },
    "gcp": {
        "provider": {
            "type": "gcp",
            "region": "us-central1",
            "availability_zone": "us-central1-a",
            "project_id": "YOUR-PROJECT-ID",
        },
        "auth": {"ssh_user": "ubuntu"},
        "head": {
            "machineType": "n2-standard-16",
            "disks": [
                {
                    "boot": True,
                    "autoDelete": True,
                    "type": "PERSISTENT",
                    "initializeParams": {
                        "diskSizeGb": 200,
                        "sourceImage": "projects/deeplearning-platform-release/global/images/family/common-cu124",
                    },
                }
            ],
        },
        "head_cpus": 16,
        "gpus": {"a3": {"machineType": "a3-highgpu-8g", "cpus": 208, "accelerator": "H100"}},
        "disk": {
            "disks": [
                {
                    "boot": True,
                    "autoDelete": True,
                    "type": "PERSISTENT",
                    "initializeParams": {
                        "diskSizeGb": 1000,
                        "sourceImage": "projects/deeplearning-platform-release/global/images/family/common-cu124",
                    },
                }
            ],
            "scheduling": [{"onHostMaintenance": "TERMINATE"}],
        },
        "spot": {
            "scheduling": [
                {
                    "provisioningModel": "SPOT",
                    "onHostMaintenance": "TERMINATE",
                    "instanceTerminationAction": "DELETE",
                }
            ]
        },
    },
}

# name -> (cloud, gpu machine, spot)
VARIANTS = {
    "aws-p5": ("aws", "p5", False),
    "aws-p5-spot": ("aws", "p5", True),
    "aws-p4d": ("aws", "p4d", False),
    "gcp-a3": ("gcp", "a3", False),
    "gcp-a3-spot": ("gcp", "a3", True),
}


def render(name: str) -> dict:
    cloud_name, machine, spot = VARIANTS[name]
    cloud = CLOUDS[cloud_name]
    gpu = cloud["gpus"][machine]
    node_config = {k: v for k, v in gpu.items() if k not in ("cpus", "accelerator")}
    node_config.update(cloud["disk"])
    if spot:
        node_config.update(cloud["spot"])
    return {
        "cluster_name": f"rayxdit-{name}",
        # Enough 8-GPU nodes for every pool of serve_configs/flux-dev-8gpu.yaml at its maximum:
        # 4 x 2 + 2 x 4 + 1 x 8 = 24 GPUs = 3 nodes.
        "max_workers": 3,
        "upscaling_speed": 1.0,
        # A node with no replica left goes back after this long (Serve has already drained it).
        "idle_timeout_minutes": 10,
        "docker": {
            "image": RAY_IMAGE,
            "container_name": "ray_container",
            "pull_before_run": True,
            "run_options": ["--ulimit nofile=65536:65536", "--shm-size=64g", "--gpus all"],
        },
        "provider": cloud["provider"],
        "auth": cloud["auth"],
        "available_node_types": {
            "head": {
                # No GPUs on the head: GPU pools always land on worker nodes, which the autoscaler adds.
                "resources": {"CPU": cloud["head_cpus"], "GPU": 0},
                "node_config": cloud["head"],
                "min_workers": 0,
                "max_workers": 0,
            },
            GPU_WORKER: {
                "resources": {"CPU": gpu["cpus"], "GPU": 8, f"accelerator_type:{gpu['accelerator']}": 1},
                "node_config": node_config,
                "min_workers": 0,
                "max_workers": 3,
            },
        },
        "head_node_type": "head",
        "file_mounts": {"~/rayxdit": "."},
        "rsync_exclude": [".git", "**/__pycache__", ".offline", ".whl"],
        "initialization_commands": [],
        "setup_commands": [
            f"pip install -q {PINNED}",
            "pip install -q -e ~/rayxdit",
        ],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [
            "ray stop",
            f"ulimit -n 65536; {PRELOAD} ray start --head --port=6379 --object-manager-port=8076 "
            f"--autoscaling-config=~/ray_bootstrap_config.yaml --dashboard-host=0.0.0.0 {METRICS_FLAG}",
            f"serve deploy ~/rayxdit/{SERVE_CONFIG}",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            f"ulimit -n 65536; {PRELOAD} ray start --address=$RAY_HEAD_IP:6379 --object-manager-port=8076 {METRICS_FLAG}",
        ],
    }


METRICS_PORT = 8080
METRICS_FLAG = f"--metrics-export-port={METRICS_PORT}"
"""Every node exports Ray's metrics (rayxdit_* included) here, for Prometheus (cluster/README.md)."""
KUBERAY_IMAGE = "ghcr.io/YOUR-ORG/rayxdit:0.1.0"  # built from cluster/Dockerfile
READINESS_PROBE = {
    # rayxdit's readiness: every served model has a ready replica (or scales from zero). Until then the pod
    # takes no traffic from the serve Service.
    "httpGet": {"path": "/readyz", "port": 8000},
    "periodSeconds": 5,
    "timeoutSeconds": 3,
    "failureThreshold": 3,
}


def render_rayservice() -> dict:
    """A KubeRay RayService with the same pools (serveConfigV2 is serve_configs/flux-dev-8gpu.yaml verbatim)
    and the same node shape and bounds as the launcher configs."""
    launcher = render("aws-p5")
    gpu_type = launcher["available_node_types"][GPU_WORKER]
    ports = [
        {"containerPort": 6379, "name": "gcs"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 8000, "name": "serve"},
        {"containerPort": METRICS_PORT, "name": "metrics"},
    ]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "rayxdit-flux-dev"},
        "spec": {
            # Replicas load a 12B model (and compile): give them time before KubeRay calls them unhealthy.
            "serviceUnhealthySecondThreshold": 1800,
            "deploymentUnhealthySecondThreshold": 1800,
            "serveConfigV2": (HERE.parent / SERVE_CONFIG).read_text(),
            "rayClusterConfig": {
                "rayVersion": "2.60.0",
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "upscalingMode": "Default",
                    "idleTimeoutSeconds": launcher["idle_timeout_minutes"] * 60,
                },
                "headGroupSpec": {
                    "rayStartParams": {
                        "dashboard-host": "0.0.0.0",
                        "num-gpus": "0",
                        "metrics-export-port": str(METRICS_PORT),
                    },
                    "template": {
                        "spec": {
                            "containers": [
                                {
                                    "name": "ray-head",
                                    "image": KUBERAY_IMAGE,
                                    "env": [{"name": k, "value": v} for k, v in PRELOAD_ENV.items()],
                                    "ports": ports,
                                    "readinessProbe": READINESS_PROBE,
                                    "resources": {
                                        "limits": {"cpu": "16", "memory": "64Gi"},
                                        "requests": {"cpu": "16", "memory": "64Gi"},
                                    },
                                }
                            ]
                        }
                    },
                },
                "workerGroupSpecs": [
                    {
                        "groupName": GPU_WORKER,
                        "replicas": gpu_type["min_workers"],
                        "minReplicas": gpu_type["min_workers"],
                        "maxReplicas": gpu_type["max_workers"],
                        "rayStartParams": {"num-gpus": "8", "metrics-export-port": str(METRICS_PORT)},
                        "template": {
                            "spec": {
                                "containers": [
                                    {
                                        "name": "ray-worker",
                                        "image": KUBERAY_IMAGE,
                                        "env": [{"name": k, "value": v} for k, v in PRELOAD_ENV.items()],
                                        "ports": [{"containerPort": METRICS_PORT, "name": "metrics"}],
                                        "readinessProbe": READINESS_PROBE,
                                        "resources": {
                                            "limits": {"cpu": "180", "memory": "1800Gi", "nvidia.com/gpu": 8},
                                            "requests": {
                                                "cpu": "180",
                                                "memory": "1800Gi",
                                                "nvidia.com/gpu": 8,
                                            },
                                        },
                                        # NCCL needs a large shared memory segment between the ranks of a replica.
                                        "volumeMounts": [{"mountPath": "/dev/shm", "name": "dshm"}],
                                    }
                                ],
                                "volumes": [
                                    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}}
                                ],
                                "tolerations": [
                                    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                                ],
                            }
                        },
                    }
                ],
            },
        },
    }


class _LiteralString(str):
    pass


def _literal(dumper: yaml.SafeDumper, value: _LiteralString):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")


yaml.SafeDumper.add_representer(_LiteralString, _literal)


def rayservice_text() -> str:
    document = render_rayservice()
    document["spec"]["serveConfigV2"] = _LiteralString(document["spec"]["serveConfigV2"])
    header = (
        "# Generated by cluster/render.py. KubeRay RayService: kubectl apply -f this file "
        "(see cluster/README.md).\n"
    )
    return header + yaml.safe_dump(document, sort_keys=False, width=110)


def monitoring_texts() -> dict[Path, str]:
    """The Grafana dashboard, the Prometheus alert rules, and both for prometheus-operator on KubeRay."""
    generated = "# Generated by cluster/render.py from cluster/monitoring.py.\n"
    return {
        HERE / "grafana" / "rayxdit-dashboard.json": json.dumps(monitoring.dashboard(), indent=2) + "\n",
        HERE / "prometheus" / "rayxdit-alerts.yaml": generated
        + yaml.safe_dump(monitoring.alert_rules(), sort_keys=False, width=110),
        HERE / "kuberay" / "monitoring.yaml": generated
        + "# kubectl apply -f this file where prometheus-operator runs (see cluster/README.md).\n"
        + yaml.safe_dump_all(monitoring.kuberay_monitoring(), sort_keys=False, width=110),
    }


def text(name: str) -> str:
    header = (
        f"# Generated by cluster/render.py (edit that, then run it). {name}: see cluster/README.md.\n"
        f"#   ray up cluster/{name}.yaml        # head + autoscaler; deploys {SERVE_CONFIG}\n"
    )
    return header + yaml.safe_dump(render(name), sort_keys=False, width=110)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    stale = []
    outputs = {HERE / f"{name}.yaml": text(name) for name in VARIANTS}
    outputs[HERE / "kuberay" / "rayservice-flux-dev.yaml"] = rayservice_text()
    outputs.update(monitoring_texts())
    for path, content in outputs.items():
        if args.check:
            if not path.is_file() or path.read_text() != content:
                stale.append(str(path.relative_to(HERE)))
        else:
            path.parent.mkdir(exist_ok=True)
            path.write_text(content)
    if stale:
        print(f"out of date: {', '.join(stale)}; run python cluster/render.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
