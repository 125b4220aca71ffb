"""What torch.compile traces of a model: one graph per repeated block type, so that a replica's warm-up (and
a restart's, from cached artifacts) pays for each block type once. Counted with dynamo's eager backend (the
graphs dynamo makes, without inductor compiling them)."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from rayxdit.config import EngineConfig
from rayxdit.engine import Engine
from rayxdit.parallel.mesh import ParallelState
from rayxdit.request import GenerateRequest

REQUEST = GenerateRequest(prompt="a fox", width=64, height=64, steps=2, seed=1, num_images=1)


def plain_then_compiled(model: str) -> tuple[Engine, torch.Tensor, torch.Tensor]:
    """``model``'s engine, REQUEST's latents from it plain, then compiled with dynamo's eager backend (the
    counters cleared before the compiled run)."""
    torch._dynamo.reset()
    engine = Engine(EngineConfig(model=model), ParallelState.single())
    plain = engine.generate(REQUEST, output="latent").latents
    engine.adapter.compile(backend="eager")
    counters.clear()
    return engine, plain, engine.generate(REQUEST, output="latent").latents


def test_compiled_flux_traces_each_block_type_once_and_keeps_the_image():
    """Flux's single-stream blocks return views of their joined sequence; without standard strides every
    block but the first would be traced again (three graphs, not two)."""
    engine, plain, compiled = plain_then_compiled("tiny-flux")
    two_images = engine.generate(REQUEST.model_copy(update={"num_images": 2}), output="latent").latents
    assert torch.equal(compiled, plain)
    assert (two_images[:1] - plain).abs().max() <= 1e-5  # batched GEMMs sum in another order
    # Double- and single-stream blocks at batch 1, then again at batch 2 (a new shape): no stride recompile.
    assert counters["stats"]["unique_graphs"] == 4, dict(counters["stats"])


def test_compiled_sd3_traces_its_one_block_type_and_keeps_the_image():
    """diffusers (0.42) declares no repeated blocks for SD3's transformer, and its ``compile_repeated_blocks``
    refuses such a model: a pool with ``compile: true`` failed to start. Its blocks are found in its
    ``transformer_blocks`` list instead, one graph for them all (the last block, context_pre_only, included:
    dynamo guards on it and traces it once more)."""
    _, plain, compiled = plain_then_compiled("tiny-sd3")
    assert torch.equal(compiled, plain)
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
