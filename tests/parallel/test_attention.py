"""Sequence-parallel attention against single-process SDPA, on real gloo process groups.

Every case uses deliberately uneven token shards. Tolerance: fp32 on CPU, max |parallel - reference| <= 1e-5
for inputs of unit scale (observed ~1e-6: ring merges only reorder the softmax sums).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from rayxdit.config import ParallelConfig
from rayxdit.parallel.attention import SequenceParallelAttention, attention_with_lse, merge_partial
from rayxdit.parallel.mesh import build_parallel_state
from tests.helpers import run_on_ranks
from tests.sabotage import broken_ring_merge

TOLERANCE = 1e-5
BATCH, HEADS, HEAD_DIM = 2, 8, 16


def _attention_cases(worker, cases):
    errors = {}
    for name, degrees, sizes, sabotage in cases:
        state = build_parallel_state(ParallelConfig(**degrees), torch.device("cpu"))
        generator = torch.Generator().manual_seed(len(name))
        q, k, v = (torch.randn(BATCH, sum(sizes), HEADS, HEAD_DIM, generator=generator) for _ in range(3))
        reference = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        start = sum(sizes[: state.axis("sp").index])
        local = slice(start, start + sizes[state.axis("sp").index])
        with broken_ring_merge(sabotage):
            out = SequenceParallelAttention(state)(q[:, local], k[:, local], v[:, local], sizes)
        error = torch.tensor((out - reference[:, local]).abs().max().item())
        dist.all_reduce(error, op=dist.ReduceOp.MAX)
        errors[name] = error.item()
    return errors


CASES = {
    2: [
        ("ulysses=2", {"ulysses": 2}, [7, 4], False),
        ("ring=2", {"ring": 2}, [5, 9], False),
        ("ring=2 wrong merge", {"ring": 2}, [5, 9], True),
    ],
    4: [
        ("ulysses=4", {"ulysses": 4}, [5, 3, 4, 6], False),
        ("ring=4", {"ring": 4}, [2, 7, 3, 5], False),
        ("ulysses=2,ring=2", {"ulysses": 2, "ring": 2}, [4, 6, 5, 3], False),
        ("cfg=2,ring=2", {"cfg": 2, "ring": 2}, [3, 8], False),
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("world_size", sorted(CASES))
def test_sequence_parallel_attention_matches_sdpa(world_size):
    errors = run_on_ranks(_attention_cases, world_size, CASES[world_size], timeout_s=300)
    for name, _, _, sabotage in CASES[world_size]:
        if sabotage:
            assert errors[name] > 100 * TOLERANCE, (
                f"{name}: a broken merge went unnoticed ({errors[name]:.2e})"
            )
        else:
            assert errors[name] <= TOLERANCE, f"{name}: max error {errors[name]:.2e}"


def test_merge_of_two_halves_equals_whole_attention():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=generator) for _ in range(3))
    whole, whole_lse = attention_with_lse(q, k, v)
    first = attention_with_lse(q, k[:, :, :2], v[:, :, :2])
    second = attention_with_lse(q, k[:, :, 2:], v[:, :, 2:])
    merged, merged_lse = merge_partial(first[0].float(), first[1], *second)
    torch.testing.assert_close(merged, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged_lse, whole_lse, rtol=0, atol=1e-6)
