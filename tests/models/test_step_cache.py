"""First-Block Cache composes with every exact parallel method: parallel + cache equals one rank + cache
(the same steps skipped, the latents within the parity tolerance), because the whole group takes each skip
decision together. Threshold 0 equals the uncached model bit for bit; a rank-local decision is caught.

Requests: 8 steps of the parity tests' sizes (uneven shards), with and without true CFG; thresholds chosen
so that a few steps are skipped (tiny random models change a lot from step to step). The configurations:
every exact one of test_parity.py for the transformer families (SDXL's UNet has no blocks to cache;
PipeFusion refuses the cache).
"""

from __future__ import annotations

import pytest
import torch

from rayxdit.config import EngineConfig, ParallelConfig
from rayxdit.engine import Engine
from rayxdit.parallel.mesh import ParallelState, build_parallel_state
from rayxdit.request import GenerateRequest, RequestError
from tests.helpers import run_on_ranks

THRESHOLD = {"tiny-flux": 0.45, "tiny-sd3": 0.45, "tiny-wan": 0.0875}
TOLERANCE = 1e-5
REQUESTS = {
    "tiny-flux": {
        "true-cfg": GenerateRequest(
            prompt="a photo of a red cat",
            negative_prompt="blurry",
            true_cfg_scale=3.0,
            height=36,
            width=36,
            steps=8,
            seed=7,
        ),
        "plain": GenerateRequest(prompt="a blue house by the sea", height=36, width=36, steps=8, seed=11),
    },
    "tiny-sd3": {
        "cfg": GenerateRequest(
            prompt="a red cat", negative_prompt="dark", guidance=4.0, height=36, width=36, steps=8, seed=7
        ),
    },
    "tiny-wan": {
        "cfg": GenerateRequest(
            prompt="a red cat",
            negative_prompt="dark",
            guidance=5.0,
            height=48,
            width=80,
            num_frames=9,
            steps=8,
            seed=7,
        ),
    },
}
CONFIGS = {  # (model, parallel, rank-local decision on purpose)
    2: [
        ("tiny-flux", "ulysses=2", False),
        ("tiny-flux", "ring=2", False),
        ("tiny-flux", "cfg=2", False),
        ("tiny-flux", "cfg=2", True),
        ("tiny-sd3", "ulysses=2", False),
        ("tiny-sd3", "ring=2", False),
        ("tiny-sd3", "cfg=2", False),
        ("tiny-wan", "ulysses=2", False),
        ("tiny-wan", "ring=2", False),
        ("tiny-wan", "cfg=2", False),
    ],
    4: [
        ("tiny-flux", "ulysses=4", False),
        ("tiny-flux", "ring=4", False),
        ("tiny-flux", "ulysses=2,ring=2", False),
        ("tiny-flux", "cfg=2,ulysses=2", False),
        ("tiny-flux", "cfg=2,ring=2", False),
        ("tiny-sd3", "ulysses=4", False),
        ("tiny-sd3", "ulysses=2,ring=2", False),
        ("tiny-wan", "ulysses=4", False),
        ("tiny-wan", "ulysses=2,ring=2", False),
    ],
    8: [
        ("tiny-flux", "cfg=2,ring=2,ulysses=2", False),
        ("tiny-sd3", "cfg=2,ring=2,ulysses=2", False),
        ("tiny-wan", "cfg=2,ring=2,ulysses=2", False),
    ],
}


def generate(engine: Engine, request: GenerateRequest) -> tuple[torch.Tensor, int | None] | None:
    result = engine.generate(request, output="latent")
    return None if result is None else (result.latents, result.timings.get("cached_steps"))


def _run(worker, configs):
    results = {}
    for model, spec, rank_local in configs:
        state = build_parallel_state(ParallelConfig.parse(spec), torch.device("cpu"))
        engine = Engine(
            EngineConfig(model=model, parallel=state.config, cache_threshold=THRESHOLD[model]), state
        )
        if rank_local:  # the defect this design prevents: every rank decides from what it sees alone
            engine.adapter.step_cache.group = None
        for name, request in REQUESTS[model].items():
            if (out := generate(engine, request)) is not None:
                results[(model, spec, rank_local, name)] = out
    return results


@pytest.fixture(scope="module")
def single_rank() -> dict[tuple[str, str], tuple[torch.Tensor, int]]:
    results = {}
    for model, requests in REQUESTS.items():
        engine = Engine(EngineConfig(model=model, cache_threshold=THRESHOLD[model]), ParallelState.single())
        for name, request in requests.items():
            results[(model, name)] = generate(engine, request)
    return results


def test_one_rank_skips_steps_and_threshold_zero_is_the_exact_model(single_rank):
    for (model, name), (_, skipped) in single_rank.items():
        steps = REQUESTS[model][name].steps
        assert 1 <= skipped <= steps - 2, f"{model}/{name}: {skipped} of {steps} skipped: retune THRESHOLD"
    exact = Engine(EngineConfig(model="tiny-flux"), ParallelState.single())
    cached = Engine(EngineConfig(model="tiny-flux", cache_threshold=0.5), ParallelState.single())
    request = REQUESTS["tiny-flux"]["true-cfg"]
    reference = exact.generate(request, output="latent").latents
    off = cached.generate(request.model_copy(update={"cache_threshold": 0.0}), output="latent")
    assert torch.equal(off.latents, reference) and "cached_steps" not in off.timings
    on = cached.generate(request, output="latent")
    assert on.timings["cached_steps"] > 0 and not torch.equal(on.latents, reference)  # lossy: measured


def test_requests_cannot_turn_on_a_cache_the_model_runs_without_and_pipefusion_refuses_it():
    exact = Engine(EngineConfig(model="tiny-flux"), ParallelState.single())
    with pytest.raises(RequestError, match="cache_threshold"):
        exact.generate(REQUESTS["tiny-flux"]["plain"].model_copy(update={"cache_threshold": 0.2}))
    with pytest.raises(ValueError, match="pipefusion"):
        EngineConfig(model="tiny-flux", parallel=ParallelConfig.parse("pipefusion=2"), cache_threshold=0.2)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", sorted(CONFIGS))
def test_parallel_plus_cache_equals_one_rank_plus_cache(world_size, single_rank):
    results = run_on_ranks(_run, world_size, CONFIGS[world_size], timeout_s=900)
    for model, spec, rank_local in CONFIGS[world_size]:
        for name in REQUESTS[model]:
            latents, skipped = results[(model, spec, rank_local, name)]
            reference, reference_skipped = single_rank[(model, name)]
            error = (latents - reference).abs().max().item()
            label = f"{model} {spec} / {name}"
            if rank_local:
                if name == "true-cfg":  # the unconditional rank never skips alone: the image differs
                    assert error > 100 * TOLERANCE, (
                        f"{label}: a rank-local decision went unnoticed ({error:.1e})"
                    )
                continue
            assert skipped == reference_skipped, (
                f"{label}: {skipped} steps skipped, one rank {reference_skipped}"
            )
            assert error <= TOLERANCE, f"{label}: max error {error:.2e}"
