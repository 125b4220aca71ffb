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
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rayxdit.config import PARALLEL_AXES, ParallelConfig

FLATTENED_AXES: dict[str, tuple[str, ...]] = {"sp": ("ring", "ulysses")}
"""Groups that span several mesh axes. ``sp`` (sequence parallel) is ring x ulysses: the ranks that share
one image's tokens, ordered ring-major, ulysses-minor (the order in which token shards are laid out)."""
MESH_AXES = (*PARALLEL_AXES, *FLATTENED_AXES)
"""Every axis a :class:`ParallelState` holds a group for."""


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
    """Every group of ranks along ``axis`` (a mesh axis or a flattened one such as ``"sp"``), in a fixed order.

    Within a group, ranks are sorted, which for ``sp`` orders them ring-major, ulysses-minor: the order in
    which sequence shards are laid out.
    """
    if axis not in MESH_AXES:
        raise ValueError(f"unknown mesh axis {axis!r}; axes: {', '.join(MESH_AXES)}")
    varying = FLATTENED_AXES.get(axis, (axis,))
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
    """Everything a rank knows about the mesh: its group along every axis, by name. Built once per worker by
    :func:`build_parallel_state`; passed explicitly to whoever needs a group (no process-global state, so two
    engines can coexist). A new axis is one entry in ``PARALLEL_AXES`` (or ``FLATTENED_AXES``), nothing here."""

    config: ParallelConfig
    rank: int
    device: torch.device
    axes: Mapping[str, AxisGroup]
    """This rank's group along each name of ``MESH_AXES``."""
    world: dist.ProcessGroup | None
    control: dist.ProcessGroup | None = None
    """Every rank, on CPU (gloo): for the host-side decisions all ranks must share at step boundaries
    (stop a request, see ``parallel/control.py``) without touching the GPU stream."""

    def axis(self, name: str) -> AxisGroup:
        """This rank's group along ``name`` (``"cfg"``, ``"pipefusion"``, ``"ring"``, ``"ulysses"``, ``"sp"``)."""
        try:
            return self.axes[name]
        except KeyError:
            raise KeyError(f"no mesh axis {name!r}; axes: {', '.join(self.axes)}") from None

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
        return cls(ParallelConfig(), 0, torch.device(device), dict.fromkeys(MESH_AXES, solo), None)


def build_parallel_state(
    config: ParallelConfig, device: torch.device, timeout_s: float | None = None
) -> ParallelState:
    """Create every axis group. Collective: all ranks of the default group must call it together.

    ``timeout_s`` bounds every collective of the new groups: subgroups do not inherit the default group's
    timeout, and a frozen peer must turn into an error within it, not within torch's default (minutes)."""
    if not dist.is_initialized():
        if config.world_size != 1:
            raise RuntimeError(f"{config.describe()} needs torch.distributed to be initialized first")
        return ParallelState.single(device)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    config.check_world_size(world_size)
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    mine: dict[str, AxisGroup] = {}
    for axis in MESH_AXES:
        for members in axis_groups(config, axis):
            # new_group is collective over the default group even for groups this rank is not in.
            group = dist.new_group(members, timeout=timeout) if len(members) > 1 else None
            if rank in members:
                mine[axis] = AxisGroup(group, tuple(members), members.index(rank))
    # One more collective call on every rank: the CPU group for shared decisions (gloo already is CPU).
    control = (
        dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    )
    return ParallelState(
        config=config, rank=rank, device=device, axes=mine, world=dist.group.WORLD, control=control
    )


def open_store(host: str, world_size: int, timeout_s: float = 300.0) -> dist.TCPStore:
    """Rank 0's rendezvous store, listening on a port the OS picks (``store.port``). The port is held from
    the moment it is chosen, unlike a "free port" probed, closed and bound again later."""
    return dist.TCPStore(
        host,
        0,
        world_size,
        is_master=True,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def init_distributed(
    rank: int,
    world_size: int,
    device: torch.device,
    host: str,
    port: int,
    timeout_s: float = 300.0,
    store: dist.TCPStore | None = None,
) -> None:
    """Join the default process group through rank 0's store at ``host:port`` (rank 0 passes the ``store``
    it opened with :func:`open_store`): NCCL when ``device`` is a GPU, gloo otherwise.

    ``timeout_s`` bounds every collective: a rank that stops answering turns into an error on the others
    instead of a hang, which is what lets a supervisor detect and rebuild a broken group.
    """
    if world_size == 1 or dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **kwargs)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
