"""What ``shard_weights`` spreads and what it refuses (its parity at 2, 4 and 8 ranks, with each rank's held
parameters: tests/models/test_parity.py)."""

from __future__ import annotations

import pytest
import torch

from rayxdit.config import ConfigError, EngineConfig, ParallelConfig
from rayxdit.models.registry import load_adapter
from rayxdit.parallel.shard import held_parameters, shardable_modules
from rayxdit.runtime.cards import model_card


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(4, 8)
        self.patches = torch.nn.Linear(4, 8)  # applied by its weights, not its forward
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8)])
        self.activation = torch.nn.SiLU()
        self.table = torch.nn.Parameter(torch.zeros(3))


def test_each_block_and_each_other_child_with_weights_is_sharded_but_those_read_directly():
    toy = Toy()
    chosen = shardable_modules(toy, keep_whole=("patches",))
    assert chosen == [toy.embed, toy.blocks[0], toy.blocks[2]]
    assert held_parameters(toy) == (227, 227)  # nothing sharded: all held


def test_shard_weights_refuses_what_it_cannot_spread_exactly():
    for others in (
        {"parallel": "pipefusion=2"},
        {"parallel": "ulysses=2", "compile": True},
        {"parallel": "ulysses=2", "quantize": "fp8"},
        {"parallel": "ulysses=2", "lora_sources": ("/loras",)},
    ):
        with pytest.raises(ValueError, match="shard_weights with"):
            EngineConfig(model="tiny-flux", shard_weights=True, **others)
    flux = model_card("tiny-flux")
    with pytest.raises(ConfigError, match="2\\+ ranks"):  # checked where a pool or command starts
        flux.check_parallel(ParallelConfig(), shard_weights=True)
    flux.check_parallel(ParallelConfig(ulysses=2), shard_weights=True)
    with pytest.raises(ConfigError, match="StableDiffusionXLPipeline's weights are not sharded"):
        model_card("tiny-sdxl").check_parallel(ParallelConfig(ring=2), shard_weights=True)
    unet = load_adapter("tiny-sdxl", torch.device("cpu"), torch.float32)  # and again by the ranks
    with pytest.raises(ConfigError, match="weights are not sharded"):
        unet.shard_weights()
