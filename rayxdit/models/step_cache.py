"""First-Block Cache (ParaAttention's dynamic caching, as in diffusers' ``FirstBlockCacheConfig``), with the
skip decision taken on the whole image by every rank of the group together.

Each step runs the transformer's first block; if its residual (output minus input) differs from the one of
the last fully computed step by less than ``threshold`` (relative mean absolute difference), the other
blocks are skipped and the step reuses their last residual. Lossy, so opt-in, and measured
(``benchmarks/bench_flux.py`` reports skipped steps and the error against the exact output).

Why not diffusers' hooks as they are: under sequence parallelism each rank sees only its shard of the
image, so a rank-local decision lets ranks skip different steps, and a rank that skips while its peers
compute leaves them waiting in a collective (a hang) or mixes stale and fresh shards. Here the two sums
behind the decision are all-reduced over the group, so the decision is the single-rank one, and every rank
takes it at the same step. With true CFG both branches follow the conditional branch's decision: a rank
computing both decides at its first branch; under cfg parallelism the unconditional rank contributes
nothing to the sums and takes the result. Blocks are wrapped (not their ``forward`` replaced), so
``compile_repeated_blocks`` still compiles the blocks themselves and the decision stays outside the graph.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from diffusers.hooks._helpers import TransformerBlockRegistry

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")
"""The transformer's block lists, in the order its forward runs them (Flux: double then single)."""


class CachedBlock(torch.nn.Module):
    """One transformer block under the cache: ``role`` is head (decides), middle, or tail (records)."""

    def __init__(self, block: torch.nn.Module, cache: FirstBlockCache, role: str):
        super().__init__()
        self.block = block
        self.role = role
        object.__setattr__(self, "cache", cache)  # not a submodule: the cache holds tensors, not weights
        self.meta = TransformerBlockRegistry.get(type(block))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.cache.run(self, args, kwargs)


class FirstBlockCache:
    """The cache state of one model on one rank, reset per request (:meth:`start`)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        """Every rank of the worker group (the cfg x sequence-parallel ranks); None: a single rank."""
        self.threshold = 0.0
        self.branch = 0
        self.decides = False
        self.skip = False
        self.skipped_steps = 0
        self.changes: list[float] = []
        """This request's measured relative change at each decision (what a threshold is tuned from)."""
        self.previous: torch.Tensor | None = None  # head residual of the last computed step (deciding branch)
        self.head_output: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.tail_residual: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @property
    def active(self) -> bool:
        return self.threshold > 0

    def start(self, threshold: float) -> None:
        """A new request: nothing cached, ``threshold`` (0: the exact model, nothing skipped)."""
        self.threshold = threshold
        self.skip = False
        self.skipped_steps = 0
        self.changes = []
        self.previous = None
        self.head_output.clear()
        self.tail_residual.clear()

    def begin(self, branch: int, first_of_step: bool) -> None:
        """The denoising loop is about to run ``branch``; the first branch a rank runs in a step decides."""
        self.branch = branch
        self.decides = first_of_step

    # ----- the blocks -------------------------------------------------------------------------------------
    def run(self, wrapped: CachedBlock, args: tuple, kwargs: dict) -> Any:
        if not self.active:
            return wrapped.block(*args, **kwargs)
        meta = wrapped.meta
        if wrapped.role == "head":
            return self._head(wrapped, args, kwargs)
        if self.skip:  # skipped: the block passes its inputs through; the head already added the residual
            hidden = meta._get_parameter_from_args_kwargs("hidden_states", args, kwargs)
            if meta.return_encoder_hidden_states_index is None:
                return hidden
            encoder = meta._get_parameter_from_args_kwargs("encoder_hidden_states", args, kwargs)
            return _pack(meta, hidden, encoder)
        output = wrapped.block(*args, **kwargs)
        if wrapped.role == "tail":
            hidden, encoder = _unpack(meta, output)
            head_hidden, head_encoder = self.head_output[self.branch]
            self.tail_residual[self.branch] = (
                hidden - head_hidden,
                None if encoder is None or head_encoder is None else encoder - head_encoder,
            )
        return output

    def _head(self, wrapped: CachedBlock, args: tuple, kwargs: dict) -> Any:
        meta = wrapped.meta
        hidden_in = meta._get_parameter_from_args_kwargs("hidden_states", args, kwargs)
        output = wrapped.block(*args, **kwargs)
        hidden, encoder = _unpack(meta, output)
        residual = hidden - hidden_in
        if self.decides:
            self.skip = not self._compute_remaining(residual)
            if self.skip:
                self.skipped_steps += 1
            elif self.branch == 0:
                self.previous = residual
        if self.skip and self.branch in self.tail_residual:
            cached_hidden, cached_encoder = self.tail_residual[self.branch]
            encoder = encoder if cached_encoder is None or encoder is None else encoder + cached_encoder
            return _pack(meta, hidden + cached_hidden, encoder)
        self.head_output[self.branch] = (hidden, encoder)
        return output

    def _compute_remaining(self, residual: torch.Tensor) -> bool:
        """The group's decision: relative mean absolute change of the conditional branch's head residual
        over the whole image, against the threshold. Sums in float64, all-reduced (a rank without the
        conditional branch adds zeros); no previous residual anywhere means compute."""
        sums = torch.zeros(3, dtype=torch.float64, device=residual.device)
        if self.branch == 0 and self.previous is not None:
            sums[0] = (residual - self.previous).abs().sum(dtype=torch.float64)
            sums[1] = self.previous.abs().sum(dtype=torch.float64)
            sums[2] = 1.0
        if self.group is not None:
            dist.all_reduce(sums, group=self.group)
        changed, magnitude, contributors = sums.tolist()
        if contributors == 0 or magnitude == 0:
            return True
        self.changes.append(changed / magnitude)
        return changed / magnitude > self.threshold


def _unpack(meta: Any, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not isinstance(output, tuple):
        return output, None
    encoder_index = meta.return_encoder_hidden_states_index
    return output[meta.return_hidden_states_index], None if encoder_index is None else output[encoder_index]


def _pack(meta: Any, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
    if meta.return_encoder_hidden_states_index is None:
        return hidden
    packed: list[Any] = [None, None]
    packed[meta.return_hidden_states_index] = hidden
    packed[meta.return_encoder_hidden_states_index] = encoder
    return tuple(packed)


def apply_first_block_cache(transformer: torch.nn.Module, group: dist.ProcessGroup | None) -> FirstBlockCache:
    """Wrap every block of ``transformer``'s block lists (the first is the head, the last the tail); the
    returned cache does nothing until :meth:`FirstBlockCache.start` gets a positive threshold."""
    cache = FirstBlockCache(group)
    places = [
        (blocks, index)
        for name in BLOCK_LISTS
        if isinstance(blocks := getattr(transformer, name, None), torch.nn.ModuleList)
        for index in range(len(blocks))
    ]
    if len(places) < 2:
        raise ValueError("First-Block Cache needs a transformer with at least two blocks")
    for position, (blocks, index) in enumerate(places):
        role = "head" if position == 0 else "tail" if position == len(places) - 1 else "middle"
        blocks[index] = CachedBlock(blocks[index], cache, role)
    return cache
