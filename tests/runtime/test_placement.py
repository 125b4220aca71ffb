from rayxdit.config import PoolConfig
from rayxdit.runtime.placement import REPLICA_ACTOR_OPTIONS, pool_bundles, rank_actor_options


def test_gpu_pool_has_one_gpu_bundle_per_rank():
    pool = PoolConfig(name="p", model="tiny-flux", parallel="cfg=2,ulysses=2")
    assert pool_bundles(pool) == [{"CPU": 1.0, "GPU": 1.0}] * 4
    options = rank_actor_options(pool, 3)
    assert options["num_gpus"] == 1.0 and options["placement_group_bundle_index"] == 3
    assert options["max_restarts"] == 0 and options["max_task_retries"] == 0


def test_cpu_pool_bundles_and_replica_fits_bundle_zero():
    pool = PoolConfig(name="p", model="tiny-flux", parallel="ring=2", accelerator="cpu", cpus_per_rank=0.25)
    assert pool_bundles(pool) == [{"CPU": 0.25}, {"CPU": 0.25}]
    assert rank_actor_options(pool, 0)["num_gpus"] == 0.0
    # Serve places the replica actor in bundle 0 next to rank 0: together they must fit.
    assert (
        REPLICA_ACTOR_OPTIONS["num_cpus"] + rank_actor_options(pool, 0)["num_cpus"]
        <= pool_bundles(pool)[0]["CPU"]
    )
