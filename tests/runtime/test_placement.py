from rayxdit.config import WorkerGroupConfig
from rayxdit.runtime.placement import REPLICA_ACTOR_OPTIONS, group_bundles, rank_actor_options


def test_gpu_group_has_one_gpu_bundle_per_rank():
    group = WorkerGroupConfig(name="p", model="tiny-flux", parallel="cfg=2,ulysses=2")
    assert group_bundles(group) == [{"CPU": 1.0, "GPU": 1.0}] * 4
    options = rank_actor_options(group, 3)
    assert options["num_gpus"] == 1.0 and options["placement_group_bundle_index"] == 3
    assert options["max_restarts"] == 0 and options["max_task_retries"] == 0


def test_cpu_group_bundles_and_replica_fits_bundle_zero():
    group = WorkerGroupConfig(
        name="p", model="tiny-flux", parallel="ring=2", accelerator="cpu", cpus_per_rank=0.25
    )
    assert group_bundles(group) == [{"CPU": 0.25}, {"CPU": 0.25}]
    assert rank_actor_options(group, 0)["num_gpus"] == 0.0
    # Serve places the replica actor in bundle 0 next to rank 0: together they must fit.
    assert (
        REPLICA_ACTOR_OPTIONS["num_cpus"] + rank_actor_options(group, 0)["num_cpus"]
        <= group_bundles(group)[0]["CPU"]
    )
