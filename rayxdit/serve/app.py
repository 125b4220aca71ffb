"""Build the Serve application from a :class:`ServeConfig`: one deployment per pool, one router.

From Python::

    from ray import serve
    from rayxdit.serve.app import build_app, DEFAULT_LOCAL_CONFIG
    serve.run(build_app(DEFAULT_LOCAL_CONFIG))

From a Serve config YAML (``serve run`` / ``serve deploy``)::

    applications:
      - name: rayxdit
        import_path: rayxdit.serve.app:app_builder
        args: {pools: [{name: flux-2gpu, model: black-forest-labs/FLUX.1-dev, parallel: "ulysses=2"}]}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from ray import serve
from ray.serve import Application

from rayxdit.config import PoolConfig, ServeConfig
from rayxdit.runtime.placement import REPLICA_ACTOR_OPTIONS, pool_bundles
from rayxdit.serve.pool import PoolReplica
from rayxdit.serve.router import Router

APP_NAME = "rayxdit"

DEFAULT_LOCAL_CONFIG = ServeConfig(
    pools=[
        PoolConfig(
            name="tiny-flux-2",
            model="tiny-flux",
            parallel="ulysses=2",
            accelerator="cpu",
            cpus_per_rank=0.25,
            route_min_cost=0.0,
        ),
        PoolConfig(
            name="tiny-flux-4",
            model="tiny-flux",
            parallel="ulysses=2,ring=2",
            accelerator="cpu",
            cpus_per_rank=0.25,
            route_min_cost=0.5,
        ),
    ]
)
"""``rayxdit serve`` with no config: tiny-flux on CPU, a 2-rank pool for small requests and a 4-rank pool
for requests of at least 0.5 megapixel-steps (e.g. 256x256 at 8 steps)."""


def pool_deployment_options(pool: PoolConfig) -> dict[str, Any]:
    """Serve options of a pool's deployment: its placement group per replica, autoscaling, load limits."""
    return {
        "name": pool.name,
        "placement_group_bundles": pool_bundles(pool),
        "placement_group_strategy": pool.placement_strategy,
        "ray_actor_options": dict(REPLICA_ACTOR_OPTIONS),
        "max_ongoing_requests": 1,
        "max_queued_requests": pool.max_queued_requests,
        "autoscaling_config": {
            "min_replicas": pool.min_replicas,
            # A pool that may scale to zero also starts at zero: no GPU node is bought for it until a
            # request needs it.
            "initial_replicas": pool.min_replicas,
            "max_replicas": pool.max_replicas,
            "target_ongoing_requests": pool.target_ongoing_requests,
            "upscale_delay_s": pool.upscale_delay_s,
            "downscale_delay_s": pool.downscale_delay_s,
            "look_back_period_s": min(30.0, max(2.0, pool.upscale_delay_s)),
        },
        "health_check_period_s": pool.health_check_period_s,
        # Rebuilding a worker group reloads the model: give check_health the time that takes.
        "health_check_timeout_s": 600.0,
        # In-flight requests finish before a replica goes away on scale-down.
        "graceful_shutdown_timeout_s": pool.request_timeout_s,
        "graceful_shutdown_wait_loop_s": 2.0,
    }


def build_app(config: ServeConfig) -> Application:
    pools = {
        pool.name: serve.deployment(PoolReplica).options(**pool_deployment_options(pool)).bind(pool)
        for pool in config.pools
    }
    router = serve.deployment(Router).options(
        name="router",
        num_replicas=config.router.replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1000,
    )
    return router.bind(config, pools)


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for Serve config files (``import_path: rayxdit.serve.app:app_builder``)."""
    return build_app(ServeConfig.model_validate(args))


def load_serve_file(path: str | Path) -> tuple[ServeConfig, dict[str, Any]]:
    """Read a Serve config YAML written for ``serve run``: the rayxdit app's args and the http_options."""
    document = yaml.safe_load(Path(path).read_text())
    apps = [
        app for app in document.get("applications", []) if app.get("import_path", "").endswith(":app_builder")
    ]
    if len(apps) != 1:
        raise ValueError(f"{path}: expected one application with import_path rayxdit.serve.app:app_builder")
    return ServeConfig.model_validate(apps[0].get("args", {})), document.get("http_options", {})
