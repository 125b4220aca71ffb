"""PipeFusion: transformer blocks split into stages, the image into patches pipelined through them.

After synchronous warm-up steps (the whole sequence at once, exact), step t processes patch m on each stage
while attention reads the fresh keys/values of the patches already done this step and the one-step-old
keys/values of the rest, from a per-layer buffer of the whole sequence. Stages pass activations
point-to-point; the last stage applies the scheduler to each finished patch and sends it back to stage 0,
which starts the next step's patch as soon as it arrives, so with at least as many patches as stages the
pipeline never drains between steps.

Tokens have canonical indices (text ``0..T-1``, then image ``T..T+N-1``). A unit of work (one patch, or the
whole sequence during warm-up) gives every sequence-parallel rank a list of canonical indices; buffers are
written by index, so processing order never matters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from rayxdit.parallel.attention import axis_from_group_name, ulysses_gather_heads, ulysses_scatter_heads
from rayxdit.parallel.mesh import AxisGroup
from rayxdit.parallel.sequence import split_sizes

WARMUP = -1
"""The unit index of a warm-up step: the whole sequence at once."""


def stage_bounds(num_blocks: int, stages: int, index: int) -> tuple[int, int]:
    """Blocks ``[start, end)`` of stage ``index`` (equal counts: Flux's double and single blocks cost about
    the same per token)."""
    sizes = split_sizes(num_blocks, stages)
    start = sum(sizes[:index])
    return start, start + sizes[index]


@dataclass(frozen=True)
class PatchPlan:
    """Which tokens each sequence-parallel rank handles in each unit of work."""

    text_len: int
    image_len: int
    patches: int
    sp_size: int

    def __post_init__(self) -> None:
        if not 1 <= self.patches <= self.image_len:
            raise ValueError(f"{self.patches} patches for {self.image_len} image tokens")

    def _ranges(self, total: int, patch: int, rank: int) -> range:
        patch_sizes = split_sizes(total, self.patches)
        start = sum(patch_sizes[:patch])
        rank_sizes = split_sizes(patch_sizes[patch], self.sp_size)
        start += sum(rank_sizes[:rank])
        return range(start, start + rank_sizes[rank])

    def text(self, unit: int, rank: int) -> list[int]:
        patches = range(self.patches) if unit == WARMUP else (unit,)
        return [i for p in patches for i in self._ranges(self.text_len, p, rank)]

    def image(self, unit: int, rank: int) -> list[int]:
        patches = range(self.patches) if unit == WARMUP else (unit,)
        return [i for p in patches for i in self._ranges(self.image_len, p, rank)]

    def canonical(self, unit: int, rank: int) -> list[int]:
        """Canonical indices of the joint ``[text, image]`` sequence this rank holds in ``unit``, in order."""
        return self.text(unit, rank) + [self.text_len + i for i in self.image(unit, rank)]

    def group_canonical(self, unit: int, ranks: Sequence[int]) -> list[int]:
        """The same for a ulysses group after its all-to-all: the members' tokens one after another."""
        return [i for rank in ranks for i in self.canonical(unit, rank)]

    def sizes(self, unit: int) -> list[int]:
        """Joint token count of every sequence-parallel rank in ``unit``."""
        return [len(self.canonical(unit, rank)) for rank in range(self.sp_size)]


def allocate_kv_buffers(
    modules: Sequence[torch.nn.Module],
    branches: int,
    batch: int,
    heads: int,
    total_len: int,
    head_dim: int,
    like: torch.Tensor,
) -> None:
    """Give every attention module of this stage fresh key/value buffers of the whole sequence,
    ``(branches, B, H_local, T + N, D)``, for one request. They live on the module so that a compiled
    block reads them like a parameter: no guard, no recompile per layer or per request."""
    shape = (branches, batch, heads, total_len, head_dim)
    for module in modules:
        module.rayxdit_keys = like.new_zeros(shape)
        module.rayxdit_values = like.new_zeros(shape)


def release_kv_buffers(modules: Sequence[torch.nn.Module]) -> None:
    for module in modules:
        module.rayxdit_keys = module.rayxdit_values = None


@torch.library.custom_op("rayxdit::patch_attention", mutates_args=("keys", "values"))
def patch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    branch: int,
    positions: torch.Tensor,
    sizes: list[int],
    ulysses_group: str,
) -> torch.Tensor:
    """``[B, S_local, H, D]`` q/k/v of this rank's tokens in one unit of work -> their attention over the
    whole sequence: the unit's fresh keys/values are written into the layer's buffers at their canonical
    ``positions`` (the ulysses group's tokens, after the all-to-all), the rest are what the buffers hold."""
    ulysses = axis_from_group_name(ulysses_group)
    if ulysses.size > 1:
        batch = q.shape[0]
        qkv, _ = ulysses_scatter_heads(torch.cat([q, k, v]), ulysses, sizes)
        q, k, v = qkv.permute(1, 2, 0, 3).split(batch)  # (B, H/U, S_group, D)
    else:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    keys[branch].index_copy_(2, positions, k)
    values[branch].index_copy_(2, positions, v)
    out = F.scaled_dot_product_attention(q, keys[branch], values[branch])
    if ulysses.size > 1:
        return ulysses_gather_heads(out, ulysses, sizes)
    return out.transpose(1, 2).contiguous()


@patch_attention.register_fake
def _(q, k, v, keys, values, branch, positions, sizes, ulysses_group):
    return torch.empty_like(q)


class StageLink:
    """Point-to-point traffic of one pipeline stage: activations to the next stage, finished latents from
    the last stage back to the first. Sends are asynchronous; :meth:`drain` waits for all of them."""

    def __init__(self, pipefusion: AxisGroup):
        self.axis = pipefusion
        self.pending: list = []

    @property
    def is_first(self) -> bool:
        return self.axis.index == 0

    @property
    def is_last(self) -> bool:
        return self.axis.index == self.axis.size - 1

    def send_next(self, tensor: torch.Tensor) -> None:
        """To the next stage (from the last stage: back to the first)."""
        tensor = tensor.contiguous()
        self.pending.append((dist.isend(tensor, self.axis.next_rank, group=self.axis.group), tensor))

    def recv_prev(self, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """From the previous stage (on the first stage: from the last)."""
        buffer = like.new_empty(tuple(shape))
        dist.recv(buffer, self.axis.prev_rank, group=self.axis.group)
        return buffer

    def drain(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()
