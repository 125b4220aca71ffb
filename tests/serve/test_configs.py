from pathlib import Path

import pytest

from rayxdit.config import ConfigError, PoolConfig
from rayxdit.serve.app import DEFAULT_CONFIG_FILE, default_config, load_serve_file, pool_deployment_options

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "serve_configs"
SERVE_FILES = sorted(
    [
        *CONFIGS.glob("*.yaml"),
        # The benchmarks' own Serve configs (bench_load's pools), beside their workloads.
        *(
            path
            for path in (REPO / "benchmarks" / "workloads").glob("*.yaml")
            if "applications:" in path.read_text()
        ),
    ]
)


def test_the_embedded_default_is_the_shipped_local_yaml():
    """One file: the repository's serve_configs/ is the package's, and `rayxdit serve` reads it."""
    assert (CONFIGS / "local-cpu.yaml").resolve() == DEFAULT_CONFIG_FILE.resolve()
    config, http_options = default_config()
    assert [pool.engine.model for pool in config.pools] == ["tiny-flux", "tiny-flux"]
    assert http_options["port"] == 8000


def test_a_pool_without_model_is_refused_with_one_line(tmp_path):
    text = (CONFIGS / "local-cpu.yaml").read_text().replace("          model: tiny-flux\n", "", 1)
    path = tmp_path / "no-model.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_serve_file(path)
    assert str(error.value) == f"{path}: pools[0].model: required, but missing"


def test_serve_options_pass_through_and_are_validated_by_serve():
    pool = PoolConfig(
        name="p",
        model="m",
        deployment_config={
            "autoscaling_config": {"max_replicas": 3, "downscale_delay_s": 7},
            "health_check_period_s": 2,
            "ray_actor_options": {"runtime_env": {"env_vars": {"A": "1"}}},
        },
    )
    options = pool_deployment_options(pool)
    assert (
        options["autoscaling_config"]["max_replicas"] == 3
        and options["autoscaling_config"]["min_replicas"] == 1
    )
    assert options["autoscaling_config"]["downscale_delay_s"] == 7 and options["health_check_period_s"] == 2
    assert options["ray_actor_options"] == {"runtime_env": {"env_vars": {"A": "1"}}, "num_cpus": 0}
    assert options["max_ongoing_requests"] == 1 and (pool.min_replicas, pool.max_replicas) == (1, 3)
    fixed = PoolConfig(name="f", model="m", deployment_config={"num_replicas": 2})
    assert "autoscaling_config" not in pool_deployment_options(fixed) and fixed.max_replicas == 2
    for bad, message in [
        ({"max_replica": 2}, "unknown Serve option"),
        ({"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}, "must be greater than or equal"),
        ({"max_ongoing_requests": 4}, "the pool decides it"),
        ({"health_check_period_s": "often"}, "health_check_period_s"),
    ]:
        with pytest.raises(ValueError, match=message):
            PoolConfig(name="b", model="m", deployment_config=bad)


@pytest.mark.parametrize("path", SERVE_FILES, ids=lambda p: p.name)
def test_every_serve_config_validates(path):
    from rayxdit.serve.policies import delayed_swaps

    config, _ = load_serve_file(path)
    for pool in config.pools:
        options = pool_deployment_options(pool)
        assert len(options["placement_group_bundles"]) == pool.ranks
        assert options["autoscaling_config"]["max_replicas"] >= options["autoscaling_config"]["min_replicas"]
    assert delayed_swaps(config) == [], "a shipped elastic config makes Serve lag its policy"


def test_flux_config_has_2_4_8_gpu_pools_that_fit_8_gpu_nodes():
    config, _ = load_serve_file(CONFIGS / "flux-dev-8gpu.yaml")
    assert sorted(pool.ranks for pool in config.pools) == [2, 4, 8]
    for pool in config.pools:
        assert pool.accelerator == "gpu" and pool.placement_strategy == "STRICT_PACK"
        pool.engine.parallel.check_heads(24)  # FLUX.1-dev has 24 heads


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_carry_the_policy_rayxdit_serve_deploys(path):
    """`serve run FILE` and `rayxdit serve --config FILE` must deploy the same application: the YAML's
    application-level autoscaling policy is the one application_document builds, fed the same args."""
    import yaml

    from rayxdit.serve.app import application_document

    config, _ = load_serve_file(path)
    (declared,) = [
        app for app in yaml.safe_load(path.read_text())["applications"] if app["name"] == "rayxdit"
    ]
    built = application_document(config)
    assert declared["autoscaling_policy"]["policy_function"] == built["autoscaling_policy"]["policy_function"]
    assert declared["autoscaling_policy"]["policy_kwargs"]["app"] == declared["args"]
    assert config.model_validate(declared["args"]) == config


def test_the_elastic_policy_refuses_pools_it_cannot_size():
    from rayxdit.config import ServeConfig

    with pytest.raises(ValueError, match="fixed num_replicas"):
        ServeConfig(pools=[PoolConfig(name="f", model="m", deployment_config={"num_replicas": 2})])
    ServeConfig(pools=[PoolConfig(name="f", model="m", deployment_config={"num_replicas": 2})], elastic=None)


def test_serve_applies_the_elastic_policys_decisions_without_delay_unless_a_pool_says_otherwise():
    """The elastic policy is the hysteresis; Serve's delay on top held a swap's new replicas back for as long
    as the removed ones stayed (the shipped configs' 300-600 s downscale delays)."""
    from rayxdit.config import DEFAULT_DEPLOYMENT_CONFIG, ServeConfig
    from rayxdit.serve.policies import delayed_swaps

    plain = PoolConfig(name="plain", model="m", deployment_config={"autoscaling_config": {"max_replicas": 2}})
    lagged = PoolConfig(
        name="lagged", model="m", deployment_config={"autoscaling_config": {"downscale_delay_s": 300}}
    )
    elastic = ServeConfig(pools=[plain, lagged])
    options = pool_deployment_options(plain, elastic=True)["autoscaling_config"]
    assert (options["upscale_delay_s"], options["downscale_delay_s"], options["max_replicas"]) == (
        0.0,
        0.0,
        2,
    )
    kept = pool_deployment_options(lagged, elastic=True)["autoscaling_config"]
    assert (kept["upscale_delay_s"], kept["downscale_delay_s"]) == (0.0, 300)
    (line,) = delayed_swaps(elastic)
    assert line.startswith("pool lagged: downscale_delay_s 300 delays each elastic decision")
    # A pool sized by Serve's own per-deployment policy keeps Serve's delays.
    alone = pool_deployment_options(plain)["autoscaling_config"]
    defaults = DEFAULT_DEPLOYMENT_CONFIG["autoscaling_config"]
    assert (alone["upscale_delay_s"], alone["downscale_delay_s"]) == (
        defaults["upscale_delay_s"],
        defaults["downscale_delay_s"],
    )
    assert delayed_swaps(ServeConfig(pools=[plain, lagged], elastic=None)) == []


def test_wan_config_fits_8_gpu_nodes_and_wan_14b_heads():
    config, _ = load_serve_file(CONFIGS / "wan-8gpu.yaml")
    for pool in config.pools:
        assert pool.accelerator == "gpu" and pool.placement_strategy == "STRICT_PACK" and pool.ranks <= 8
        pool.engine.parallel.check_heads(40)  # Wan 2.1 14B has 40 heads
        assert pool.request_timeout_s >= 1800, "a 720p video job takes many minutes"
