from pathlib import Path

import pytest

from rayxdit.serve.app import DEFAULT_LOCAL_CONFIG, load_serve_file, pool_deployment_options

CONFIGS = Path(__file__).resolve().parents[2] / "serve_configs"


def test_local_yaml_is_the_embedded_default():
    config, http_options = load_serve_file(CONFIGS / "local-cpu.yaml")
    assert config == DEFAULT_LOCAL_CONFIG
    assert http_options["port"] == DEFAULT_LOCAL_CONFIG.port


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_serve_config_validates(path):
    config, _ = load_serve_file(path)
    for pool in config.pools:
        options = pool_deployment_options(pool)
        assert len(options["placement_group_bundles"]) == pool.ranks
        assert options["autoscaling_config"]["max_replicas"] >= options["autoscaling_config"]["min_replicas"]


def test_flux_config_has_2_4_8_gpu_pools_that_fit_8_gpu_nodes():
    config, _ = load_serve_file(CONFIGS / "flux-dev-8gpu.yaml")
    assert sorted(pool.ranks for pool in config.pools) == [2, 4, 8]
    for pool in config.pools:
        assert pool.accelerator == "gpu" and pool.placement_strategy == "STRICT_PACK"
        pool.parallel_config.check_heads(24)  # FLUX.1-dev has 24 heads


def test_pool_settings_reach_the_engine():
    from rayxdit.config import PoolConfig

    pool = PoolConfig(
        name="p", parallel="ring=2", loras=["/loras/style:0.8"], vae_parallel=False, compile=True
    )
    engine = pool.engine_config()
    assert engine.loras == ("/loras/style:0.8",)
    assert engine.vae_parallel is False and engine.compile is True
    assert engine.parallel == pool.parallel_config
