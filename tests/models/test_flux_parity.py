"""End-to-end parity of every parallel configuration with the single-process result, for the tiny Flux.

The reference is diffusers' own ``FluxPipeline.__call__`` on the same weights and seeds. The engine runs in
real gloo process groups (spawned processes), several configurations per spawn to keep start-up cheap.

PipeFusion runs with warm-up steps covering the whole request here, so it is exact too; with stale
keys/values its difference is measured in ``test_pipefusion.py``.

Size: 36x36 pixels = 81 image tokens and 29 text tokens, so no shard is even at degree 2, 4 or 8.
Tolerance: fp32 on CPU, max |latents - reference| <= 1e-5 after 3 steps (latents are of unit scale;
observed <= 1e-6, the rounding of reordered softmax sums).
"""

from __future__ import annotations

import pytest
import torch

from rayxdit.config import EngineConfig, ParallelConfig
from rayxdit.engine import Engine
from rayxdit.models.registry import load_adapter
from rayxdit.parallel.mesh import ParallelState, build_parallel_state, init_distributed
from rayxdit.request import GenerateRequest
from rayxdit.runtime.local import spawn_group
from tests.sabotage import broken_ring_merge

TOLERANCE = 1e-5
REQUESTS = {
    "true-cfg": GenerateRequest(
        prompt="a photo of a red cat",
        negative_prompt="blurry dark",
        true_cfg_scale=3.0,
        height=36,
        width=36,
        steps=3,
        seed=7,
        num_images=2,
    ),
    "plain": GenerateRequest(prompt="a blue house by the sea", height=36, width=36, steps=3, seed=11),
}


def diffusers_reference(request: GenerateRequest) -> torch.Tensor:
    pipeline = load_adapter("tiny-flux", torch.device("cpu"), torch.float32).pipeline
    return pipeline(
        request.prompt,
        negative_prompt=request.negative_prompt,
        true_cfg_scale=request.true_cfg_scale,
        height=request.height,
        width=request.width,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance,
        generator=[torch.Generator().manual_seed(request.seed + i) for i in range(request.num_images)],
        num_images_per_prompt=request.num_images,
        max_sequence_length=29,
        output_type="latent",
    ).images


@pytest.fixture(scope="module")
def references() -> dict[str, torch.Tensor]:
    return {name: diffusers_reference(request) for name, request in REQUESTS.items()}


def _run_configs(rank, world_size, init_method, configs):
    """Each (name, parallel spec, sabotage) runs both requests on a fresh mesh inside one process group."""
    init_distributed(rank, world_size, init_method, torch.device("cpu"))
    latents = {}
    for name, spec, sabotage in configs:
        state = build_parallel_state(ParallelConfig.parse(spec), torch.device("cpu"))
        # Warm-up longer than any request: PipeFusion then never uses stale keys/values and must be exact.
        engine = Engine(EngineConfig(model="tiny-flux", parallel=state.config, warmup_steps=100), state)
        with broken_ring_merge(sabotage):
            for request_name, request in REQUESTS.items():
                result = engine.generate(request, output="latent")
                if result is not None:
                    latents[(name, request_name)] = result.latents
    return latents


CONFIGS = {
    2: [
        ("ulysses=2", "ulysses=2", False),
        ("ring=2", "ring=2", False),
        ("cfg=2", "cfg=2", False),
        ("ring=2 with a broken merge", "ring=2", True),
        ("pipefusion=2", "pipefusion=2", False),
    ],
    4: [
        ("ulysses=4", "ulysses=4", False),
        ("ring=4", "ring=4", False),
        ("ulysses=2,ring=2", "ulysses=2,ring=2", False),
        ("cfg=2,ulysses=2", "cfg=2,ulysses=2", False),
        ("cfg=2,ring=2", "cfg=2,ring=2", False),
        ("pipefusion=4", "pipefusion=4", False),
        ("pipefusion=2,cfg=2", "pipefusion=2,cfg=2", False),
        ("pipefusion=2,ulysses=2", "pipefusion=2,ulysses=2", False),
    ],
    8: [
        ("cfg=2,ring=2,ulysses=2", "cfg=2,ring=2,ulysses=2", False),
        ("cfg=2,pipefusion=2,ulysses=2", "cfg=2,pipefusion=2,ulysses=2", False),
    ],
}


def max_error(latents: torch.Tensor, reference: torch.Tensor) -> float:
    assert latents.shape == reference.shape, (latents.shape, reference.shape)
    return (latents - reference).abs().max().item()


def test_single_rank_engine_equals_diffusers_pipeline(references):
    engine = Engine(EngineConfig(model="tiny-flux"), ParallelState.single())
    for name, request in REQUESTS.items():
        assert torch.equal(engine.generate(request, output="latent").latents, references[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("world_size", sorted(CONFIGS))
def test_parallel_configs_match_single_rank(world_size, references):
    latents = spawn_group(_run_configs, world_size, (CONFIGS[world_size],), timeout_s=600)
    for name, _, sabotage in CONFIGS[world_size]:
        for request_name, reference in references.items():
            error = max_error(latents[(name, request_name)], reference)
            if sabotage:
                assert error > 100 * TOLERANCE, (
                    f"{name}/{request_name}: broken merge not detected ({error:.2e})"
                )
            else:
                assert error <= TOLERANCE, f"{name}/{request_name}: max error {error:.2e} > {TOLERANCE}"
