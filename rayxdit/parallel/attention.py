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


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ring: AxisGroup,
    block_sizes: Sequence[int],
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Exact attention of local queries over the keys of every ring rank, ``[B, H, S, D]`` in and out.

    Step ``s`` attends to the key/value block of ring rank ``index - s`` while the next block is already in
    flight (``batch_isend_irecv``), so the transfer hides behind the attention kernel. ``block_sizes[j]`` is
    the key count ring rank ``j`` holds; blocks may differ in length.
    """
    assert k.shape[2] == block_sizes[ring.index], (k.shape, block_sizes, ring.index)
    batch, heads, _, head_dim = k.shape
    kv = torch.stack([k, v])  # (2, B, H, Sk, D): one message per step instead of two
    out = lse = None
    for step in range(ring.size):
        pending = []
        if step + 1 < ring.size:
            source = (ring.index - step - 1) % ring.size
            incoming = kv.new_empty((2, batch, heads, block_sizes[source], head_dim))
            pending = dist.batch_isend_irecv(
                [
                    dist.P2POp(dist.isend, kv, ring.next_rank, ring.group),
                    dist.P2POp(dist.irecv, incoming, ring.prev_rank, ring.group),
                ]
            )
        block_out, block_lse = attention_with_lse(q, kv[0], kv[1], scale, backend)
        if out is None:
            out, lse = block_out.float(), block_lse
        else:
            # Looked up at call time (not bound at import) so a test can prove that a wrong merge is caught.
            out, lse = merge_partial(out, lse, block_out, block_lse)
        for request in pending:
            request.wait()
        if pending:
            kv = incoming
    assert out is not None
    return out.to(q.dtype)


def ulysses_scatter_heads(x: torch.Tensor, ulysses: AxisGroup, seq_sizes: Sequence[int]) -> torch.Tensor:
    """All-to-all ``[B, S_local, H, D]`` (token shard, all heads) -> ``[B, H/U, S_group, D]`` (all tokens of
    the ulysses group, a head shard)."""
    batch, seq, heads, head_dim = x.shape
    size = ulysses.size
    assert seq == seq_sizes[ulysses.index], f"local sequence {seq} != layout {seq_sizes[ulysses.index]}"
    local_heads = heads // size
    # (U, S, B, H/U, D): row block j holds head shard j, which goes to ulysses rank j.
    send = x.reshape(batch, seq, size, local_heads, head_dim).permute(2, 1, 0, 3, 4)
    send = send.reshape(size * seq, batch, local_heads, head_dim).contiguous()
    recv = send.new_empty((sum(seq_sizes), batch, local_heads, head_dim))
    dist.all_to_all_single(
        recv, send, output_split_sizes=list(seq_sizes), input_split_sizes=[seq] * size, group=ulysses.group
    )
    return recv.permute(1, 2, 0, 3)  # (B, H/U, S_group, D)


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
    size_u = ulysses.size
    assert len(sizes) == size_u * ring.size, f"{len(sizes)} shard sizes for {size_u}x{ring.size} ranks"
    if size_u > 1:
        group_sizes = sizes[ring.index * size_u : (ring.index + 1) * size_u]
        batch = q.shape[0]
        qkv = ulysses_scatter_heads(torch.cat([q, k, v]), ulysses, group_sizes)  # one all-to-all for three
        q, k, v = qkv.split(batch)
    else:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if ring.size > 1:
        block_sizes = [sum(sizes[j * size_u : (j + 1) * size_u]) for j in range(ring.size)]
        out = ring_attention(q, k, v, ring, block_sizes, scale, backend)
    else:
        out = attention_with_lse(q, k, v, scale, backend)[0]
    if size_u > 1:
        return ulysses_gather_heads(out, ulysses, group_sizes)
    return out.transpose(1, 2)


def _axis_from_name(name: str) -> AxisGroup:
    if not name:
        return AxisGroup(None, (0,), 0)
    group = _resolve_process_group(name)
    return AxisGroup(group, tuple(dist.get_process_group_ranks(group)), dist.get_rank(group))


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
        q, k, v, sizes, _axis_from_name(ulysses_group), _axis_from_name(ring_group), scale, backend
    )


@_usp_attention_op.register_fake
def _(q, k, v, sizes, ulysses_group, ring_group, scale, backend):
    return torch.empty_like(q)


class SequenceParallelAttention:
    """Attention over the sequence-parallel group of one :class:`ParallelState`.

    Called with this rank's token shard of q/k/v ``[B, S_local, H, D]`` and the shard length of every
    sequence-parallel rank; returns this rank's shard of the output.
    """

    def __init__(self, state: ParallelState, backend: str = "auto"):
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend {backend!r}: choose from {', '.join(ATTENTION_BACKENDS)}")
        self.backend = backend
        self.ulysses = state.ulysses
        self.ring = state.ring
        self.sp_size = state.sp.size
        # Process groups cross the custom-op boundary by name, which torch.compile can treat as a constant.
        self._ulysses_name = state.ulysses.group.group_name if state.ulysses.group is not None else ""
        self._ring_name = state.ring.group.group_name if state.ring.group is not None else ""

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
