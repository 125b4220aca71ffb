"""Sequence-parallel attention: Ulysses (all-to-all over heads), Ring (key/value blocks passed rank to rank,
merged by log-sum-exp) and their combination, USP (ulysses inside, ring across).

Tensors are ``[B, S, H, D]`` (batch, tokens, heads, head dim) at the boundary, as diffusers' processors
hold them; kernels run on ``[B, H, S, D]``. Every rank holds a contiguous token shard; ``sizes`` gives the
shard length of every sequence-parallel rank in ring-major, ulysses-minor order (the ``sp`` group order),
so uneven shards need no padding and no masking.

Communication is a set of pure functions over :class:`AxisGroup`; :class:`SequenceParallelAttention` routes
through one registered custom op (``rayxdit::usp_attention``) so that ``torch.compile`` sees a single opaque
node per attention instead of a graph break around every collective.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.distributed_c10d import _resolve_process_group

from rayxdit.parallel.mesh import AxisGroup, ParallelState

ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "efficient")
"""Kernels for the sequence-parallel attention blocks on GPU. ``auto``: cuDNN (Hopper-tuned) for 16-bit
inputs, memory-efficient attention for float32. On CPU the fused CPU kernel is always used."""


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``[B, H, Sq, D]`` queries over ``[B, H, Sk, D]`` keys; returns the output and the
    float32 log-sum-exp of the scores, ``[B, H, Sq]``, which ring attention needs to merge blocks."""
    batch, heads, seq, _ = q.shape
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=None, scale=scale
        )
    elif q.dtype == torch.float32 or backend == "efficient":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, False, scale=scale
        )[:2]
    elif backend in ("auto", "cudnn"):
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, False, False, scale=scale
        )[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, False, False, scale=scale
        )[:2]
    return out, lse.reshape(batch, heads, seq).float()


def merge_partial(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint key sets into the attention over their union (fp32).

    ``softmax`` over the union re-weights each part by ``exp(lse_part - lse_union)``.
    """
    new_lse = torch.logaddexp(lse, block_lse)
    merged = out * torch.exp(lse - new_lse).unsqueeze(-1) + block_out.float() * torch.exp(
        block_lse - new_lse
    ).unsqueeze(-1)
    return merged, new_lse


def _ring_exchange(kv: torch.Tensor, ring: AxisGroup, incoming_len: int) -> tuple[torch.Tensor, list]:
    """Send this block to the next ring rank and receive the previous rank's block, asynchronously."""
    _, batch, heads, _, head_dim = kv.shape
    incoming = kv.new_empty((2, batch, heads, incoming_len, head_dim))
    works = dist.batch_isend_irecv(
        [
            dist.P2POp(dist.isend, kv, ring.next_rank, ring.group),
            dist.P2POp(dist.irecv, incoming, ring.prev_rank, ring.group),
        ]
    )
    return incoming, works


def ring_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    ring: AxisGroup,
    block_sizes: Sequence[int],
    scale: float | None = None,
    backend: str = "auto",
    received: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention of local queries ``[B, H, S, D]`` over the keys of every ring rank.

    ``kv`` is this rank's ``(2, B, H, Sk, D)`` key/value block; ``block_sizes[j]`` the key count of ring rank
    ``j`` (blocks may differ). Step ``s`` attends to the block of ring rank ``index - s`` while the next block
    is already in flight (``batch_isend_irecv``), so the transfer hides behind the attention kernel.
    ``received``: the previous rank's block, when the first exchange was done ahead (see :func:`usp_begin`);
    with two ranks both blocks are then attended in one kernel call over the concatenated keys.
    """
    assert kv.shape[3] == block_sizes[ring.index], (kv.shape, block_sizes, ring.index)
    if received is not None and ring.size == 2:
        return attention_with_lse(q, *torch.cat([kv, received], dim=3), scale, backend)[0]
    out = lse = None
    for step in range(ring.size):
        pending: list = []
        if step + 1 < ring.size:
            if step == 0 and received is not None:
                incoming = received
            else:
                incoming, pending = _ring_exchange(kv, ring, block_sizes[(ring.index - step - 1) % ring.size])
        block_out, block_lse = attention_with_lse(q, kv[0], kv[1], scale, backend)
        if out is None:
            out, lse = block_out.float(), block_lse
        else:
            out, lse = merge_partial(out, lse, block_out, block_lse)
        for work in pending:
            work.wait()
        if step + 1 < ring.size:
            kv = incoming
    assert out is not None
    return out.to(q.dtype)


def _ulysses_send_buffer(x: torch.Tensor, ulysses: AxisGroup, seq_sizes: Sequence[int]) -> torch.Tensor:
    """``[B, S_local, H, D]`` -> ``(U * S_local, B, H/U, D)``: row block j holds head shard j for rank j."""
    batch, seq, heads, head_dim = x.shape
    assert seq == seq_sizes[ulysses.index], f"local sequence {seq} != layout {seq_sizes[ulysses.index]}"
    size = ulysses.size
    send = x.reshape(batch, seq, size, heads // size, head_dim).permute(2, 1, 0, 3, 4)
    return send.reshape(size * seq, batch, heads // size, head_dim).contiguous()


def ulysses_scatter_heads(
    x: torch.Tensor, ulysses: AxisGroup, seq_sizes: Sequence[int], async_op: bool = False
) -> tuple[torch.Tensor, object]:
    """All-to-all ``[B, S_local, H, D]`` (token shard, all heads) -> ``(S_group, B, H/U, D)`` (all tokens of
    the ulysses group, a head shard). Returns the receive buffer and the pending work (``None`` if done)."""
    send = _ulysses_send_buffer(x, ulysses, seq_sizes)
    recv = send.new_empty((sum(seq_sizes), *send.shape[1:]))
    work = dist.all_to_all_single(
        recv,
        send,
        output_split_sizes=list(seq_sizes),
        input_split_sizes=[x.shape[1]] * ulysses.size,
        group=ulysses.group,
        async_op=async_op,
    )
    return recv, work


def ulysses_gather_heads(x: torch.Tensor, ulysses: AxisGroup, seq_sizes: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`ulysses_scatter_heads`: ``[B, H/U, S_group, D]`` -> ``[B, S_local, H, D]``."""
    batch, local_heads, seq_group, head_dim = x.shape
    assert seq_group == sum(seq_sizes), f"group sequence {seq_group} != layout {sum(seq_sizes)}"
    size = ulysses.size
    seq = seq_sizes[ulysses.index]
    send = x.permute(2, 0, 1, 3).contiguous()  # (S_group, B, H/U, D): row block j goes back to rank j
    recv = send.new_empty((size * seq, batch, local_heads, head_dim))
    dist.all_to_all_single(
        recv, send, output_split_sizes=[seq] * size, input_split_sizes=list(seq_sizes), group=ulysses.group
    )
    # (U, S, B, H/U, D) -> (B, S, U * H/U, D): source j sent head shard j
    recv = recv.reshape(size, seq, batch, local_heads, head_dim).permute(2, 1, 0, 3, 4)
    return recv.reshape(batch, seq, size * local_heads, head_dim)


def _group_sizes(sizes: Sequence[int], ulysses: AxisGroup, ring: AxisGroup) -> tuple[list[int], list[int]]:
    """Shard lengths inside this rank's ulysses group, and the key count each ring rank holds."""
    size_u = ulysses.size
    assert len(sizes) == size_u * ring.size, f"{len(sizes)} shard sizes for {size_u}x{ring.size} ranks"
    ulysses_sizes = list(sizes[ring.index * size_u : (ring.index + 1) * size_u])
    block_sizes = [sum(sizes[j * size_u : (j + 1) * size_u]) for j in range(ring.size)]
    return ulysses_sizes, block_sizes


def usp_begin(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sizes: Sequence[int],
    ulysses: AxisGroup,
    ring: AxisGroup,
) -> tuple[list[torch.Tensor], list]:
    """Start the first communication of sequence-parallel attention and return at once: the all-to-all of
    q/k/v (ulysses), or the first key/value exchange (ring only). Independent work issued before
    :func:`usp_end` overlaps with the transfer. Returns the buffers for ``usp_end`` and the pending works."""
    ulysses_sizes, block_sizes = _group_sizes(sizes, ulysses, ring)
    if ulysses.size > 1:
        recv, work = ulysses_scatter_heads(torch.cat([q, k, v]), ulysses, ulysses_sizes, async_op=True)
        return [recv], [work]
    kv = torch.stack([k.transpose(1, 2), v.transpose(1, 2)])  # (2, B, H, Sk, D): one message, not two
    incoming, works = _ring_exchange(kv, ring, block_sizes[ring.prev_index])
    return [kv, incoming], works


def usp_end(
    q: torch.Tensor,
    pending: Sequence[torch.Tensor],
    works: Sequence,
    sizes: Sequence[int],
    ulysses: AxisGroup,
    ring: AxisGroup,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Finish what :func:`usp_begin` started; returns this rank's ``[B, S_local, H, D]`` attention output."""
    ulysses_sizes, block_sizes = _group_sizes(sizes, ulysses, ring)
    for work in works:
        work.wait()
    if ulysses.size == 1:
        kv, received = pending
        return ring_attention(q.transpose(1, 2), kv, ring, block_sizes, scale, backend, received).transpose(
            1, 2
        )
    q, k, v = pending[0].permute(1, 2, 0, 3).split(q.shape[0])  # (B, H/U, S_group, D) each
    if ring.size > 1:
        out = ring_attention(q, torch.stack([k, v]), ring, block_sizes, scale, backend)
    elif backend == "auto":
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)  # no log-sum-exp needed: PyTorch's fastest
    else:
        out = attention_with_lse(q, k, v, scale, backend)[0]
    return ulysses_gather_heads(out, ulysses, ulysses_sizes)


def usp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sizes: Sequence[int],
    ulysses: AxisGroup,
    ring: AxisGroup,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Exact attention over the whole sequence for this rank's token shard, ``[B, S_local, H, D]`` in and
    out. Ulysses runs inside ring: after the all-to-all a rank holds its ulysses group's tokens for a head
    shard, and ring attention passes those groups' key/values around the ring."""
    if ulysses.size > 1:
        return usp_end(q, *usp_begin(q, k, v, sizes, ulysses, ring), sizes, ulysses, ring, scale, backend)
    block_sizes = _group_sizes(sizes, ulysses, ring)[1]
    kv = torch.stack([k.transpose(1, 2), v.transpose(1, 2)])
    return ring_attention(q.transpose(1, 2), kv, ring, block_sizes, scale, backend).transpose(1, 2)


def axis_from_group_name(name: str) -> AxisGroup:
    """The :class:`AxisGroup` of a process group known by name (``""``: a group of one)."""
    if not name:
        return AxisGroup(None, (0,), 0)
    group = _resolve_process_group(name)
    return AxisGroup(group, tuple(dist.get_process_group_ranks(group)), dist.get_rank(group))


# Works started by the begin op, keyed by the data pointer of its last output (custom ops pass tensors only).
_IN_FLIGHT: dict[int, list] = {}


@torch.library.custom_op("rayxdit::usp_attention", mutates_args=())
def _usp_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sizes: list[int],
    ulysses_group: str,
    ring_group: str,
    scale: float,
    backend: str,
) -> torch.Tensor:
    return usp_attention(
        q, k, v, sizes, axis_from_group_name(ulysses_group), axis_from_group_name(ring_group), scale, backend
    )


@_usp_attention_op.register_fake
def _(q, k, v, sizes, ulysses_group, ring_group, scale, backend):
    return torch.empty_like(q)


@torch.library.custom_op("rayxdit::usp_attention_begin", mutates_args=())
def _usp_begin_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sizes: list[int], ulysses_group: str, ring_group: str
) -> list[torch.Tensor]:
    pending, works = usp_begin(
        q, k, v, sizes, axis_from_group_name(ulysses_group), axis_from_group_name(ring_group)
    )
    _IN_FLIGHT[pending[-1].data_ptr()] = works
    return pending


@_usp_begin_op.register_fake
def _(q, k, v, sizes, ulysses_group, ring_group):
    ulysses, ring = axis_from_group_name(ulysses_group), axis_from_group_name(ring_group)
    ulysses_sizes, block_sizes = _group_sizes(sizes, ulysses, ring)
    batch, _, heads, head_dim = q.shape
    if ulysses.size > 1:
        return [q.new_empty((sum(ulysses_sizes), 3 * batch, heads // ulysses.size, head_dim))]
    kv = q.new_empty((2, batch, heads, block_sizes[ring.index], head_dim))
    return [kv, q.new_empty((2, batch, heads, block_sizes[ring.prev_index], head_dim))]


@torch.library.custom_op("rayxdit::usp_attention_end", mutates_args=())
def _usp_end_op(
    q: torch.Tensor,
    pending: list[torch.Tensor],
    sizes: list[int],
    ulysses_group: str,
    ring_group: str,
    scale: float,
    backend: str,
) -> torch.Tensor:
    works = _IN_FLIGHT.pop(pending[-1].data_ptr())
    ulysses, ring = axis_from_group_name(ulysses_group), axis_from_group_name(ring_group)
    return usp_end(q, pending, works, sizes, ulysses, ring, scale, backend)


@_usp_end_op.register_fake
def _(q, pending, sizes, ulysses_group, ring_group, scale, backend):
    return torch.empty_like(q)


class SequenceParallelAttention:
    """Attention over the sequence-parallel group of one :class:`ParallelState`.

    Called with this rank's token shard of q/k/v ``[B, S_local, H, D]`` and the shard length of every
    sequence-parallel rank; returns this rank's shard of the output. :meth:`begin` / :meth:`end` split the
    call so that independent work between them overlaps the first transfer.
    """

    def __init__(self, state: ParallelState, backend: str = "auto"):
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend {backend!r}: choose from {', '.join(ATTENTION_BACKENDS)}")
        self.backend = backend
        self.sp_size = state.axis("sp").size
        # Process groups cross the custom-op boundary by name, which torch.compile can treat as a constant.
        self._ulysses_name = (
            state.axis("ulysses").group.group_name if state.axis("ulysses").group is not None else ""
        )
        self._ring_name = state.axis("ring").group.group_name if state.axis("ring").group is not None else ""

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        sizes: Sequence[int],
        scale: float | None = None,
    ) -> torch.Tensor:
        if self.sp_size == 1:
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
            ).transpose(1, 2)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return _usp_attention_op(
            q, k, v, list(sizes), self._ulysses_name, self._ring_name, scale, self.backend
        )

    def begin(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sizes: Sequence[int]
    ) -> list[torch.Tensor]:
        assert self.sp_size > 1, "begin/end split only pays with communication to overlap"
        return _usp_begin_op(q, k, v, list(sizes), self._ulysses_name, self._ring_name)

    def end(
        self, q: torch.Tensor, pending: list[torch.Tensor], sizes: Sequence[int], scale: float | None = None
    ) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return _usp_end_op(q, pending, list(sizes), self._ulysses_name, self._ring_name, scale, self.backend)
