"""LoRA adapters on a parallel model: loaded with diffusers' own loader on every rank, fused, and the
output equals the single rank's with the same LoRA (fp32 CPU, max |latents diff| <= 1e-5, as the other
parity tests). The LoRA must also change the output, or the test would pass with the LoRA ignored."""

from __future__ import annotations

import pytest
import torch

from rayxdit.config import EngineConfig, ParallelConfig
from rayxdit.engine import Engine
from rayxdit.models.registry import load_adapter
from rayxdit.parallel.mesh import ParallelState
from rayxdit.request import GenerateRequest
from rayxdit.runtime.local import run_local_group

TOLERANCE = 1e-5
REQUEST = GenerateRequest(prompt="a photo of a red cat", height=36, width=36, steps=3, seed=2)


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory) -> str:
    """A rank-4 LoRA on the tiny Flux's attention projections, with random (non-zero) weights, saved in
    diffusers' LoRA format."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = load_adapter("tiny-flux", torch.device("cpu"), torch.float32).transformer
    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        for name, parameter in transformer.named_parameters():
            if "lora_" in name:
                parameter.normal_(0.0, 0.3)
    folder = tmp_path_factory.mktemp("lora")
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return str(folder / "pytorch_lora_weights.safetensors")


def latents(config: EngineConfig) -> torch.Tensor:
    if config.parallel.world_size == 1:
        return Engine(config, ParallelState.single()).generate(REQUEST, output="latent").latents
    return run_local_group(config, [REQUEST], output="latent")[0].latents


@pytest.mark.slow
def test_lora_on_a_parallel_model_equals_one_rank_with_the_same_lora(lora_file):
    plain = latents(EngineConfig(model="tiny-flux"))
    single = latents(EngineConfig(model="tiny-flux", loras=(f"{lora_file}:0.8",)))
    assert (single - plain).abs().max().item() > 100 * TOLERANCE, "the LoRA did not change the output"
    parallel = latents(
        EngineConfig(
            model="tiny-flux", parallel=ParallelConfig.parse("ulysses=2,ring=2"), loras=(f"{lora_file}:0.8",)
        )
    )
    assert (parallel - single).abs().max().item() <= TOLERANCE
