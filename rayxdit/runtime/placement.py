"""Placement as a pure function of a worker group's config: bundles, strategy, actor options, rank -> bundle.

A group's placement group (a Serve replica's, or one the batch job creates) holds one bundle per rank. Serve puts the replica actor itself into bundle 0,
so it asks for no resources of its own; each rank actor takes exactly its bundle.
"""

from __future__ import annotations

import math
import os

from rayxdit.config import WorkerGroupConfig

REPLICA_ACTOR_OPTIONS: dict[str, float] = {"num_cpus": 0}
"""The replica only drives its ranks; it must fit in bundle 0 beside rank 0."""

ON_THE_HEAD: dict = {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}}
"""Actor options for what serves the whole cluster (the state, the routers, the compile-artifact store): on
Ray's head node (the resource only it has; Ray Train pins its state actor so), never on a GPU node. An actor
is a leased worker, and Ray's autoscaler does not release a node that holds one: the state replica that Serve
spread onto a GPU node (seen: onto the node a drain then took) kept that node bought, and a head that dies
takes the cluster's control store with it anyway."""


def rank_resources(group: WorkerGroupConfig) -> dict[str, float]:
    """What one rank needs: a GPU (and CPU slots) on GPU groups, CPU slots on CPU groups."""
    resources = {"CPU": group.cpus_per_rank}
    if group.accelerator == "gpu":
        resources["GPU"] = 1.0
    return resources


def group_bundles(group: WorkerGroupConfig) -> list[dict[str, float]]:
    """One bundle per rank; with STRICT_PACK they land on one node, so ulysses stays on NVLink."""
    return [rank_resources(group) for _ in range(group.ranks)]


def rank_actor_options(group: WorkerGroupConfig, rank: int) -> dict:
    """Ray actor options for ``rank`` (bundle ``rank``; the strategy object is added by the caller, which
    knows the placement group)."""
    resources = rank_resources(group)
    return {
        "num_cpus": resources["CPU"],
        "num_gpus": resources.get("GPU", 0.0),
        # A dead rank is not restarted on its own: the whole group is rebuilt, since its peers are stuck in
        # collectives with it.
        "max_restarts": 0,
        "max_task_retries": 0,
        "placement_group_bundle_index": rank,
    }


def _fits(need: dict[str, float], have: dict[str, float]) -> bool:
    return all(have.get(resource, 0.0) >= amount for resource, amount in need.items() if amount > 0)


def _total(bundles: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in bundles:
        for resource, amount in bundle.items():
            total[resource] = total.get(resource, 0.0) + amount
    return total


def never_placeable(
    group: WorkerGroupConfig, nodes: list[dict[str, float]], node_types: list[dict[str, float]] | None = None
) -> str | None:
    """Why ``group``'s placement group can never be placed (None when it can): no node can hold all its
    bundles (STRICT_PACK) or some bundle (PACK), among the cluster's ``nodes`` (total resources of each) and,
    with an autoscaler, the ``node_types`` it may add. A group that merely waits for busy resources is not
    refused here."""
    bundles = group_bundles(group)
    candidates = [*nodes, *(node_types or [])]
    if group.placement_strategy == "STRICT_PACK":
        need = _total(bundles)
        if any(_fits(need, node) for node in candidates):
            return None
        what = f"{group.ranks} ranks x {rank_resources(group)} on one node (STRICT_PACK)"
    else:
        if all(any(_fits(bundle, node) for node in candidates) for bundle in bundles):
            return None
        what = f"ranks of {rank_resources(group)} each"
    largest = max(candidates, key=lambda node: (node.get("GPU", 0.0), node.get("CPU", 0.0)), default={})
    shown = {key: largest.get(key, 0.0) for key in ("CPU", "GPU")}
    if group.accelerator == "gpu" and shown["GPU"] < group.ranks:
        hint = "use fewer ranks, or the CPU (accelerator cpu; batch: --accelerator cpu)"
    else:
        fitting = max(0.25, math.floor(shown["CPU"] / group.ranks * 4) / 4)
        hint = f"set cpus_per_rank to {fitting:g} or less (batch: --cpus-per-rank {fitting:g}), or use fewer ranks"
    return f"a worker group needs {what}, but the largest node has {shown}: {hint}"


def never_placeable_here(group: WorkerGroupConfig) -> str | None:
    """:func:`never_placeable` against this machine's cores, for a local Ray instance not started yet: a
    group of CPU ranks that can never fit is refused without starting Ray (a few seconds). Ray may count
    fewer cores than the OS (cgroup limits), never more, so what passes here is checked again once Ray runs;
    GPU ranks are left to that check (their GPUs are Ray's to detect)."""
    if group.accelerator != "cpu" or any(set(bundle) - {"CPU"} for bundle in group_bundles(group)):
        return None
    return never_placeable(group, [{"CPU": float(os.cpu_count() or 1)}])
