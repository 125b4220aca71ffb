"""The process-group mesh ``cfg x pipefusion x ring x ulysses``: the one owner of distributed state.

Rank layout, outermost axis first: ``rank = ((cfg * P + pipefusion) * R + ring) * U + ulysses``. Ulysses
is innermost because its all-to-all runs in every attention and must stay on NVLink neighbours.

Groups are built with ``dist.new_group`` from the pure layout functions below rather than through
``DeviceMesh``: the sequence-parallel group spans two axes (ring x ulysses), which ``DeviceMesh`` only gives
through a private ``_flatten``, and the layout stays unit-testable without any process group.
"""

from __future__ import annotations

import datetime
import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rayxdit.config import PARALLEL_AXES, ParallelConfig

AXES_WITH_SP = (*PARALLEL_AXES, "sp")


def rank_coords(config: ParallelConfig, rank: int) -> dict[str, int]:
    """Coordinates of ``rank`` along each axis."""
    coords: dict[str, int] = {}
    for axis in reversed(PARALLEL_AXES):
        degree = getattr(config, axis)
        coords[axis] = rank % degree
        rank //= degree
    return {axis: coords[axis] for axis in PARALLEL_AXES}


def coords_rank(config: ParallelConfig, coords: dict[str, int]) -> int:
    rank = 0
    for axis in PARALLEL_AXES:
        rank = rank * getattr(config, axis) + coords[axis]
    return rank


def axis_groups(config: ParallelConfig, axis: str) -> list[list[int]]:
    """Every group of ranks along ``axis`` (``"sp"`` is ring x ulysses), in a fixed order.

    Within a group, ranks are sorted, which for ``sp`` orders them ring-major, ulysses-minor: the order in
    which sequence shards are laid out.
    """
    varying = ("ring", "ulysses") if axis == "sp" else (axis,)
    fixed = [a for a in PARALLEL_AXES if a not in varying]
    groups = []
    for fixed_values in itertools.product(*(range(getattr(config, a)) for a in fixed)):
        base = dict(zip(fixed, fixed_values, strict=True))
        members = []
        for varying_values in itertools.product(*(range(getattr(config, a)) for a in varying)):
            members.append(coords_rank(config, {**base, **dict(zip(varying, varying_values, strict=True))}))
        groups.append(sorted(members))
    return groups


@dataclass(frozen=True)
class AxisGroup:
    """This rank's group along one axis: the process group (``None`` when the axis has size 1), its
    members' global ranks, and this rank's index among them."""

    group: dist.ProcessGroup | None
    ranks: tuple[int, ...]
    index: int

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def next_rank(self) -> int:
        return self.ranks[(self.index + 1) % self.size]

    @property
    def prev_rank(self) -> int:
        return self.ranks[self.prev_index]

    @property
    def prev_index(self) -> int:
        return (self.index - 1) % self.size


@dataclass(frozen=True)
class ParallelState:
    """Everything a rank knows about the mesh. Built once per worker by :func:`build_parallel_state`;
    passed explicitly to whoever needs a group (no process-global state, so two engines can coexist)."""

    config: ParallelConfig
    rank: int
    device: torch.device
    cfg: AxisGroup
    pipefusion: AxisGroup
    ring: AxisGroup
    ulysses: AxisGroup
    sp: AxisGroup
    world: dist.ProcessGroup | None

    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def is_driver(self) -> bool:
        """Rank 0 returns the images."""
        return self.rank == 0

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> ParallelState:
        """A one-rank state that needs no process group."""
        solo = AxisGroup(None, (0,), 0)
        return cls(ParallelConfig(), 0, torch.device(device), solo, solo, solo, solo, solo, None)


def build_parallel_state(config: ParallelConfig, device: torch.device) -> ParallelState:
    """Create every axis group. Collective: all ranks of the default group must call it together."""
    if not dist.is_initialized():
        if config.world_size != 1:
            raise RuntimeError(f"{config.describe()} needs torch.distributed to be initialized first")
        return ParallelState.single(device)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    config.check_world_size(world_size)
    mine: dict[str, AxisGroup] = {}
    for axis in AXES_WITH_SP:
        for members in axis_groups(config, axis):
            # new_group is collective over the default group even for groups this rank is not in.
            group = dist.new_group(members) if len(members) > 1 else None
            if rank in members:
                mine[axis] = AxisGroup(group, tuple(members), members.index(rank))
    return ParallelState(config=config, rank=rank, device=device, world=dist.group.WORLD, **mine)


def init_distributed(
    rank: int,
    world_size: int,
    init_method: str,
    device: torch.device,
    timeout_s: float = 300.0,
) -> None:
    """Join the default process group: NCCL when ``device`` is a GPU, gloo otherwise.

    ``timeout_s`` bounds every collective: a rank that stops answering turns into an error on the others
    instead of a hang, which is what lets a supervisor detect and rebuild a broken group.
    """
    if world_size == 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
