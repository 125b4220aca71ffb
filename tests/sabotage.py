"""Deliberate breakage, to prove that the parity tests can fail."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

import rayxdit.parallel.attention as attention_module


def wrong_merge(out, lse, block_out, block_lse):
    """Averages partial attention outputs instead of weighting them by their softmax mass."""
    return (out + block_out.float()) / 2, torch.logaddexp(lse, block_lse)


@contextmanager
def broken_ring_merge(active: bool = True) -> Iterator[None]:
    """Within the block, ring attention merges its blocks with :func:`wrong_merge`."""
    original = attention_module.merge_partial
    if active:
        attention_module.merge_partial = wrong_merge
    try:
        yield
    finally:
        attention_module.merge_partial = original


@contextmanager
def adapters_on_one_rank(active: bool = True) -> Iterator[None]:
    """Per-request LoRA adapters reach the weights of rank 0 only: every other rank keeps the plain model."""
    from rayxdit.models.lora import LoraWeights

    original = LoraWeights.apply

    def rank_zero_only(self, choices):
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return False
        return original(self, choices)

    if active:
        LoraWeights.apply = rank_zero_only
    try:
        yield
    finally:
        LoraWeights.apply = original


def lose_a_shard(model: torch.nn.Module) -> None:
    """Under ``shard_weights``: rank 1's shard of the first sharded module's first weight is zeroed, so every
    rank gathers a weight that is not the loaded one."""
    from rayxdit.parallel.shard import shardable_modules

    if torch.distributed.get_rank() == 1:
        weight = next(shardable_modules(model)[0].parameters())
        with torch.no_grad():
            weight.to_local().zero_()
