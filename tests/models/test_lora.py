"""LoRA adapters on a parallel model: loaded with diffusers' own loader on every rank, fused, and the
output equals the single rank's with the same LoRA (fp32 CPU, max |latents diff| <= 1e-5, as the other
parity tests). The LoRA must also change the output, or the test would pass with the LoRA ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rayxdit.config import EngineConfig, ParallelConfig
from rayxdit.engine import Engine
from rayxdit.models.registry import load_adapter
from rayxdit.parallel.mesh import ParallelState
from rayxdit.request import GenerateRequest, LoraChoice, RequestError
from rayxdit.runtime.local import run_local_group
from tests.lora_files import lora_source

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


def latents(config: EngineConfig, request: GenerateRequest = REQUEST) -> torch.Tensor:
    if config.parallel.world_size == 1:
        return Engine(config, ParallelState.single()).generate(request, output="latent").latents
    return run_local_group(config, [request], output="latent")[0].latents


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


# ----- adapters per request (lora_sources) ------------------------------------------------------------------
def _choose(*adapters: tuple[str, float]) -> GenerateRequest:
    chosen = tuple(LoraChoice(name=f"tiny-flux/{name}", scale=scale) for name, scale in adapters)
    return REQUEST.model_copy(update={"loras": chosen, "steps": 2})


def test_a_hundred_swaps_leave_the_weights_bit_identical_and_requests_equal_loras_fused_at_load():
    """Per-request adapters are fused with diffusers' own arithmetic: a request equals a model that fused
    the same adapters at load bit for bit; after 100 swaps between adapters (stacked too), with requests
    between them, the plain model's weights are bit-identical to a fresh load."""
    source = lora_source()
    engine = Engine(
        EngineConfig(model="tiny-flux", lora_sources=(source,), lora_resident=2), ParallelState.single()
    )
    loaded = {key: value.clone() for key, value in engine.adapter.transformer.state_dict().items()}
    plain = engine.generate(_choose(), output="latent").latents
    stacked = (("ink", 0.8), ("glow", -1.5))
    fused = latents(
        EngineConfig(
            model="tiny-flux",
            loras=tuple(f"{source}/tiny-flux/{name}.safetensors:{scale}" for name, scale in stacked),
        ),
        _choose(),
    )
    assert (fused - plain).abs().max().item() > 100 * TOLERANCE, "the adapters did not change the output"
    assert torch.equal(engine.generate(_choose(*stacked), output="latent").latents, fused)
    choices = [(("ink", 0.8),), (("styles/sketch", 1.0),), stacked, (), (("glow", 2.0),)]
    for index in range(100):
        engine.loras.apply(_choose(*choices[index % len(choices)]).loras)
        if index % 25 == 0:
            engine.generate(_choose(*choices[(index + 1) % len(choices)]), output="latent")
    assert torch.equal(engine.generate(_choose(*stacked), output="latent").latents, fused)
    assert torch.equal(engine.generate(_choose(), output="latent").latents, plain)
    after = engine.adapter.transformer.state_dict()
    assert all(torch.equal(loaded[key], after[key]) for key in loaded)
    # Three adapters through a device cache of two: read from disk once each, then from host memory.
    assert len(engine.loras.resident_names) == 2
    assert engine.loras.counts["disk_loads"] == 3 and engine.loras.counts["host_loads"] > 0


def test_adapters_that_do_not_fit_are_refused_naming_loras_and_the_model_still_serves(tmp_path):
    source = Path(lora_source())
    own = tmp_path / "own"
    own.mkdir()
    (own / "garbage.safetensors").write_bytes(b"not a safetensors file")
    (own / "escape.safetensors").symlink_to(source / "tiny-flux" / "ink.safetensors")
    weights = load_file(source / "tiny-flux" / "ink.safetensors")
    key = next(k for k in weights if k.endswith("lora_A.weight"))
    magnitude = {key.replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(weights[key].shape[1])}
    save_file({**weights, **magnitude}, own / "dora.safetensors")
    engine = Engine(
        EngineConfig(model="tiny-flux", lora_sources=(str(own), str(source)), lora_max_rank=4),
        ParallelState.single(),
    )
    plain = engine.generate(_choose(), output="latent").latents
    for name, reason in (
        ("tiny-wan/ink", "does not have"),  # another model's adapter
        ("tiny-sdxl/ink", "adapts unet"),
        ("tiny-flux/glow", "rank 8"),  # above lora_max_rank
        ("garbage", "is not a LoRA"),
        ("dora", "lora_magnitude_vector"),
        ("escape", "links out"),
        ("tiny-flux/nope", "no adapter"),
    ):
        request = REQUEST.model_copy(update={"loras": (LoraChoice(name=name),), "steps": 2})
        with pytest.raises(RequestError, match=reason) as refused:
            engine.generate(request, output="latent")
        assert refused.value.param == "loras"
    assert torch.equal(engine.generate(_choose(), output="latent").latents, plain)
    plain_model = Engine(EngineConfig(model="tiny-flux"), ParallelState.single())
    with pytest.raises(RequestError, match="without LoRA sources"):
        plain_model.generate(_choose(("ink", 1.0)), output="latent")


def test_a_kohya_adapter_updates_both_sdxl_text_encoders_as_its_alphas_say(tmp_path):
    """Kohya's layout (``lora_te1_text_model_...``, ``lora_down``/``lora_up``, an ``alpha`` per layer), converted
    by diffusers' own loaders: the request's text encoders get ``W += up @ down x alpha / rank x scale`` (here
    written out by hand), both of SDXL's, and a plain request after it sees them as loaded."""
    engine = Engine(EngineConfig(model="tiny-sdxl", lora_sources=(str(tmp_path),)), ParallelState.single())
    pipeline = engine.adapter.pipeline
    generator = torch.Generator().manual_seed(5)
    weights, updates = {}, []
    for prefix, encoder in (("lora_te1", pipeline.text_encoder), ("lora_te2", pipeline.text_encoder_2)):
        for name, module in encoder.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(
                ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
            ):
                key = f"{prefix}_text_model_{name.removeprefix('text_model.').replace('.', '_')}"
                down, up = (
                    torch.randn(2, module.in_features, generator=generator),
                    torch.randn(module.out_features, 2, generator=generator),
                )
                weights |= {
                    f"{key}.lora_down.weight": down,
                    f"{key}.lora_up.weight": up,
                    f"{key}.alpha": torch.tensor(1.0),
                }
                updates.append((module, up @ down * (1.0 / 2) * 0.7))
    save_file(weights, tmp_path / "kohya-te.safetensors")
    request = GenerateRequest(
        prompt="a red cat", negative_prompt="dark", guidance=5.0, height=40, width=40, steps=2, seed=4
    )
    plain = engine.generate(request, output="latent").latents
    chosen = request.model_copy(update={"loras": (LoraChoice(name="kohya-te", scale=0.7),)})
    adapted = engine.generate(chosen, output="latent").latents
    assert (adapted - plain).abs().max().item() > 1e-3, "the text encoders' adapter did not change the output"
    assert torch.equal(engine.generate(request, output="latent").latents, plain)
    by_hand = Engine(EngineConfig(model="tiny-sdxl"), ParallelState.single())
    named = dict(by_hand.adapter.pipeline.text_encoder.named_modules()) | {
        f"2.{name}": module for name, module in by_hand.adapter.pipeline.text_encoder_2.named_modules()
    }
    own = {id(module): name for name, module in pipeline.text_encoder.named_modules()} | {
        id(module): f"2.{name}" for name, module in pipeline.text_encoder_2.named_modules()
    }
    with torch.no_grad():
        for module, update in updates:
            named[own[id(module)]].weight.add_(update)
    assert (by_hand.generate(request, output="latent").latents - adapted).abs().max().item() <= 1e-6
