"""Token sharding for sequence parallelism: uneven splits, shard, and gather back.

Shards are contiguous and uneven when the token count does not divide: the first ``n % parts`` shards get
one token more. Nothing is padded, so no key ever needs masking and results stay exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from rayxdit.parallel.mesh import AxisGroup


def split_sizes(total: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous shards of ``total`` items, differing by at most one."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def shard_bounds(total: int, parts: int, index: int) -> tuple[int, int]:
    sizes = split_sizes(total, parts)
    start = sum(sizes[:index])
    return start, start + sizes[index]


def shard(x: torch.Tensor, dim: int, parts: int, index: int) -> torch.Tensor:
    """This rank's contiguous shard of ``x`` along ``dim``."""
    start, end = shard_bounds(x.shape[dim], parts, index)
    return x.narrow(dim, start, end - start)


def gather_shards(x: torch.Tensor, dim: int, axis: AxisGroup, sizes: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`shard` over ``axis``: every rank gets the whole tensor.

    Uneven shards are padded to the largest for the all-gather and trimmed after it.
    """
    if axis.size == 1:
        return x
    assert x.shape[dim] == sizes[axis.index], (
        f"shard has {x.shape[dim]} items, layout says {sizes[axis.index]}"
    )
    longest = max(sizes)
    if x.shape[dim] < longest:
        pad_shape = list(x.shape)
        pad_shape[dim] = longest - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    parts = [torch.empty_like(x) for _ in range(axis.size)]
    dist.all_gather(parts, x.contiguous(), group=axis.group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes, strict=True)], dim=dim)
