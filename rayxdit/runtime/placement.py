"""Placement as a pure function of a pool's config: bundles, strategy, actor options, rank -> bundle.

A replica's placement group holds one bundle per rank. Serve puts the replica actor itself into bundle 0,
so it asks for no resources of its own; each rank actor takes exactly its bundle.
"""

from __future__ import annotations

from rayxdit.config import PoolConfig

REPLICA_ACTOR_OPTIONS: dict[str, float] = {"num_cpus": 0}
"""The replica only drives its ranks; it must fit in bundle 0 beside rank 0."""


def rank_resources(pool: PoolConfig) -> dict[str, float]:
    """What one rank needs: a GPU (and CPU slots) on GPU pools, CPU slots on CPU pools."""
    resources = {"CPU": pool.cpus_per_rank}
    if pool.accelerator == "gpu":
        resources["GPU"] = 1.0
    return resources


def pool_bundles(pool: PoolConfig) -> list[dict[str, float]]:
    """One bundle per rank; with STRICT_PACK they land on one node, so ulysses stays on NVLink."""
    return [rank_resources(pool) for _ in range(pool.ranks)]


def rank_actor_options(pool: PoolConfig, rank: int) -> dict:
    """Ray actor options for ``rank`` (bundle ``rank``; the strategy object is added by the caller, which
    knows the placement group)."""
    resources = rank_resources(pool)
    return {
        "num_cpus": resources["CPU"],
        "num_gpus": resources.get("GPU", 0.0),
        # A dead rank is not restarted on its own: the whole group is rebuilt, since its peers are stuck in
        # collectives with it.
        "max_restarts": 0,
        "max_task_retries": 0,
        # generate() blocks its thread for a whole request; ping() must still answer health checks.
        "max_concurrency": 2,
        "placement_group_bundle_index": rank,
    }
