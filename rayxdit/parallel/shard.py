"""Weights spread over the group: each rank keeps 1/N of the transformer's weights and gathers a module's
just before it runs (FSDP2's ``fully_shard`` over the group's ranks).

Every rank of a sequence- or CFG-parallel group runs every block of the transformer on its own tokens or
branch, in the same order, so the gathers line up across ranks; the gathered weights are the loaded ones,
bit for bit, so the output is exact. A block's gathered weights are freed when it returns: a rank holds its
shards plus one block at a time. PipeFusion (stages run different blocks) cannot share weights this way.

The modules sharded are those that run through their own ``forward`` (FSDP gathers on its pre-forward
hook): each block of the transformer's block lists and each other child with weights, except the ones the
adapter reads weights from directly (``keep_whole``: a patch embedding applied as a linear map), which stay
whole on every rank, as do weights the transformer holds itself (small tables).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard


def shardable_modules(model: torch.nn.Module, keep_whole: Iterable[str] = ()) -> list[torch.nn.Module]:
    """The modules :func:`shard_weights` shards, in the order they are registered: every item of the model's
    module lists (its blocks) and every other direct child with weights, but those named in ``keep_whole``."""
    kept = set(keep_whole)
    chosen = []
    for name, child in model.named_children():
        if name in kept or not any(True for _ in child.parameters()):
            continue
        if isinstance(child, torch.nn.ModuleList):
            chosen += [block for block in child if any(True for _ in block.parameters())]
        else:
            chosen.append(child)
    return chosen


def shard_weights(
    model: torch.nn.Module,
    group: dist.ProcessGroup,
    device: torch.device,
    keep_whole: Iterable[str] = (),
) -> list[torch.nn.Module]:
    """Shard ``model``'s modules (:func:`shardable_modules`) over ``group``'s ranks: a module's weights are
    gathered before it runs and freed after. Weights on the host move to ``device`` a module at a time (a
    rank never holds more than one whole module there). Collective over ``group``. The sharded modules."""
    mesh = DeviceMesh.from_group(group, device.type)
    modules = shardable_modules(model, keep_whole)
    sharded = {id(module) for module in modules}
    for child in model.children():  # what stays whole: kept modules and the model's own tables
        if isinstance(child, torch.nn.ModuleList):
            for block in child:
                if id(block) not in sharded:
                    block.to(device)
        elif id(child) not in sharded:
            child.to(device)
    for tensor in (*model.parameters(recurse=False), *model.buffers(recurse=False)):
        tensor.data = tensor.data.to(device)
    for module in modules:
        fully_shard(module, mesh=mesh, reshard_after_forward=True)  # moves its shard to the mesh's device
    return modules


def held_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters this rank holds, parameters of the whole model): a sharded parameter counts its local
    shard, a whole one all of it."""
    held = total = 0
    for parameter in model.parameters():
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        held += local.numel()
        total += parameter.numel()
    return held, total
