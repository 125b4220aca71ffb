"""Build the Serve application from a :class:`ServeConfig`: one deployment per pool, one router.

From Python::

    from ray import serve
    from rayxdit.serve.app import build_app, load_serve_file
    config, _ = load_serve_file("serve_configs/local-cpu.yaml")
    serve.run(build_app(config))

From a Serve config YAML (``serve run`` / ``serve deploy``)::

    applications:
      - name: rayxdit
        import_path: rayxdit.serve.app:app_builder
        args:
          pools:
            - name: flux-2gpu
              model: black-forest-labs/FLUX.1-dev
              parallel: "ulysses=2"
              deployment_config: {autoscaling_config: {min_replicas: 1, max_replicas: 4}}
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from ray import serve
from ray.serve import Application

from rayxdit.config import ConfigError, PoolConfig, ServeConfig, describe_validation_error
from rayxdit.limits import ModelCard
from rayxdit.runtime.cards import model_card
from rayxdit.runtime.placement import ON_THE_HEAD, REPLICA_ACTOR_OPTIONS, group_bundles
from rayxdit.serve.policies import check_policies, delayed_swaps
from rayxdit.serve.pool import PoolReplica
from rayxdit.serve.replica_router import ROUTER_CLASS
from rayxdit.serve.router import Router
from rayxdit.serve.state import STATE_DEPLOYMENT, AppState

logger = logging.getLogger(__name__)

APP_NAME = "rayxdit"
CONFIG_DIR = Path(__file__).resolve().parents[1] / "serve_configs"
"""The Serve configs shipped with the package (``serve_configs/`` in the repository links here)."""
DEFAULT_CONFIG_FILE = CONFIG_DIR / "local-cpu.yaml"
"""``rayxdit serve`` with no config: tiny-flux on CPU, a 2-rank pool for small requests and a 4-rank pool
for requests of at least 0.45 cost units (256x256 at 8 steps and up; :func:`~rayxdit.serve.routing.sample_cost`
prices them)."""


def pool_deployment_options(pool: PoolConfig, elastic: bool = False) -> dict[str, Any]:
    """Serve options of a pool's deployment: the pool's ``serve_options()`` (its ``deployment_config`` over
    the defaults; ``elastic``: the pool of an elastic application, ``config.ELASTIC_DELAYS``) plus what
    follows from the pool itself: a placement group of one bundle per rank, the replica actor in bundle 0
    asking for nothing, one request at a time."""
    options = pool.serve_options(elastic)
    return {
        **options,
        "name": pool.name,
        "placement_group_bundles": group_bundles(pool),
        "placement_group_strategy": pool.placement_strategy,
        "ray_actor_options": {**options.get("ray_actor_options", {}), **REPLICA_ACTOR_OPTIONS},
        "max_ongoing_requests": 1,
        # Pools serving adapters per request route to where a request's adapters are (serve/replica_router.py).
        **(
            {"request_router_config": {"request_router_class": ROUTER_CLASS}}
            if pool.engine.lora_sources
            else {}
        ),
    }


def model_cards(config: ServeConfig) -> dict[str, ModelCard]:
    """Each served model's card, read once here (from config files, no weights) so that router replicas
    never load the model stack. Every pool of a model must be able to split it."""
    cards: dict[str, ModelCard] = {}
    for pool in config.pools:
        name = pool.served_model_name
        card = cards.setdefault(name, model_card(pool.engine.model))
        try:
            card.check_engine(pool.engine)
        except ConfigError as error:
            raise ConfigError(f"pool {pool.name}: {error}") from None
    return cards


def router_user_config(config: ServeConfig) -> dict[str, Any]:
    """What the router's replicas take without a restart (``Router.reconfigure``): the versions' weights."""
    return {"traffic_weights": config.traffic_weights()}


def fixed_size(replicas: int) -> dict[str, int]:
    """An autoscaling config that never scales: every deployment of the application has one, so that an
    application-level autoscaling policy sees all of them (and Serve warns about none)."""
    return {"min_replicas": replicas, "max_replicas": replicas, "initial_replicas": replicas}


def build_app(config: ServeConfig) -> Application:
    """The application: the shared state, one deployment per pool, the router in front."""
    check_policies(config)
    for line in delayed_swaps(config):
        logger.warning(line)
    state = (
        serve.deployment(AppState)
        .options(
            name=STATE_DEPLOYMENT,
            # Its metrics are its own windows already (arrivals over 20 s, seconds since the last arrival):
            # Serve's default 30 s mean on top would read a model's quiet seconds ~15 s short and delay
            # idle replicas' return by as much; the window's maximum is the quiet time as it is now.
            autoscaling_config={**fixed_size(1), "aggregation_function": "max"},
            ray_actor_options=ON_THE_HEAD,
            max_ongoing_requests=10000,
            # Heartbeats every second from every pool replica: not worth an access-log line each.
            logging_config={"enable_access_log": False},
        )
        .bind(config)
    )
    pools = {
        pool.name: serve.deployment(PoolReplica)
        .options(**pool_deployment_options(pool, elastic=config.elastic is not None))
        .bind(pool.for_replicas(), state)
        for pool in config.pools
    }
    router = serve.deployment(Router).options(
        name="router",
        autoscaling_config=fixed_size(config.router.replicas),
        ray_actor_options=ON_THE_HEAD,
        max_ongoing_requests=1000,
        user_config=router_user_config(config),
    )
    return router.bind(config, pools, model_cards(config), state)


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for Serve config files (``import_path: rayxdit.serve.app:app_builder``)."""
    try:
        config = ServeConfig.model_validate(args)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error)) from None
    return build_app(config)


ELASTIC_POLICY = "rayxdit.serve.elastic:ElasticPolicy"


def application_document(
    config: ServeConfig,
    runtime_env: dict[str, Any] | None = None,
    logging_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The rayxdit application as a Serve config entry (what ``serve run``/``serve deploy`` read from YAML),
    with the application-level autoscaling policy when ``config.elastic`` is set: the policy gets the same
    args, from which it knows every pool."""
    # The versions' traffic weights go to the router's user_config, not the args: Serve restarts every
    # replica of an application whose args change (its code version hashes them), and changes a user_config
    # in place (``Router.reconfigure``). A rollout's next weight restarts nothing.
    args = config.without_traffic_weights().model_dump(mode="json")
    document: dict[str, Any] = {
        "name": APP_NAME,
        "route_prefix": "/",
        "import_path": "rayxdit.serve.app:app_builder",
        "args": args,
        "deployments": [{"name": "router", "user_config": router_user_config(config)}],
    }
    if config.elastic is not None:
        document["autoscaling_policy"] = {"policy_function": ELASTIC_POLICY, "policy_kwargs": {"app": args}}
    if runtime_env:
        document["runtime_env"] = runtime_env
    if logging_config:
        document["logging_config"] = logging_config
    return document


def deploy(
    config: ServeConfig,
    runtime_env: dict[str, Any] | None = None,
    logging_config: dict[str, Any] | None = None,
    timeout_s: float = 1800.0,
) -> None:
    """Deploy the application the way ``serve deploy`` does, through Serve's config path: in Ray 2.60 the
    only one that carries an application-level autoscaling policy. Serve must be started (``serve.start``).
    Other applications declared on the cluster are kept as they are; waits until the application runs."""
    import time

    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    client = _get_global_client()
    others = [
        app["deployed_app_config"]
        for name, app in client.get_serve_details().get("applications", {}).items()
        if name != APP_NAME and app.get("deployed_app_config")
    ]
    document = {"applications": [*others, application_document(config, runtime_env, logging_config)]}
    client.deploy_apps(ServeDeploySchema.model_validate(document))
    began = time.monotonic()
    while True:
        status = serve.status().applications.get(APP_NAME)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            raise ConfigError(f"deploying the application failed: {status.message}")
        if time.monotonic() - began > timeout_s:
            raise ConfigError(f"the application did not start within {timeout_s:.0f} s: {status}")
        time.sleep(0.5)


def load_serve_file(path: str | Path) -> tuple[ServeConfig, dict[str, Any]]:
    """Read a Serve config YAML written for ``serve run``: the rayxdit app's args and the http_options.
    Raises :class:`ConfigError` with one line naming the file and the offending field."""
    document = yaml.safe_load(Path(path).read_text()) or {}
    apps = [
        app for app in document.get("applications", []) if app.get("import_path", "").endswith(":app_builder")
    ]
    if len(apps) != 1:
        raise ConfigError(f"{path}: expected one application with import_path rayxdit.serve.app:app_builder")
    try:
        config = ServeConfig.model_validate(apps[0].get("args", {}))
    except ValidationError as error:
        raise ConfigError(f"{path}: {describe_validation_error(error)}") from None
    return config, document.get("http_options", {})


def default_config() -> tuple[ServeConfig, dict[str, Any]]:
    """The embedded default of ``rayxdit serve`` (``serve_configs/local-cpu.yaml``)."""
    return load_serve_file(DEFAULT_CONFIG_FILE)
