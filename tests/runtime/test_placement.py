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


def test_a_local_group_of_cpu_ranks_that_can_never_fit_is_refused_before_ray_starts():
    """``never_placeable_here`` (the batch command's check before it starts a local Ray instance): this
    machine's cores bound CPU ranks; GPU ranks are left to the check against what Ray detects."""
    import os

    from rayxdit.config import WorkerGroupConfig
    from rayxdit.runtime.placement import never_placeable_here

    cores = os.cpu_count() or 1
    fits = WorkerGroupConfig(
        name="b", model="tiny-flux", parallel="ulysses=2", accelerator="cpu", cpus_per_rank=0.5
    )
    assert never_placeable_here(fits) is None
    too_big = fits.model_copy(update={"cpus_per_rank": float(cores)})  # 2 ranks x all the cores
    problem = never_placeable_here(too_big)
    assert problem and "needs 2 ranks x" in problem and "--cpus-per-rank" in problem, problem
    assert never_placeable_here(too_big.model_copy(update={"accelerator": "gpu"})) is None
