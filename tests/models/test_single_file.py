"""Single-file checkpoints (``checkpoint``): a fine-tune saved as one ``.safetensors`` file in its original key
layout, loaded over a base model, makes the image its diffusers-format twin makes. The fine-tunes here are
the tiny presets with every weight moved (so an image made from the base's own weights would differ)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rayxdit.config import ConfigError, EngineConfig
from rayxdit.engine import Engine
from rayxdit.models.presets import materialize_preset
from rayxdit.models.registry import load_adapter
from rayxdit.models.single_file import flux_from_original
from rayxdit.parallel.mesh import ParallelState
from rayxdit.request import GenerateRequest
from rayxdit.runtime.cards import model_card
from tests.single_files import flux_to_original, sdxl_to_single_file

REQUEST = GenerateRequest(prompt="a lighthouse at dusk", width=40, height=40, steps=3, seed=7)


def fine_tune(pipeline, components: tuple[str, ...]) -> None:
    """Move every weight of ``components`` a little, deterministically: a stand-in for a fine-tune."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name in components:
            for parameter in getattr(pipeline, name).parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


def image(config: EngineConfig) -> np.ndarray:
    engine = Engine(config, ParallelState.single())
    return np.asarray(engine.generate(REQUEST).images[0], dtype=np.int16)


def twins(tmp_path, preset: str, components: tuple[str, ...], to_single_file) -> tuple[str, str]:
    """A fine-tune of ``preset`` as a diffusers directory and as a single file: (directory, file)."""
    pipeline = load_adapter(preset, torch.device("cpu"), torch.float32).pipeline
    fine_tune(pipeline, components)
    directory = tmp_path / "diffusers"
    shutil.copytree(materialize_preset(preset), directory)
    pipeline.save_pretrained(directory)
    single_file = tmp_path / "fine-tune.safetensors"
    save_file(to_single_file(pipeline), single_file)
    return str(directory), str(single_file)


def test_the_flux_layout_read_is_the_one_diffusers_reads_at_flux1_width():
    """The tables that read Black Forest Labs' names give, key for key and value for value, what diffusers'
    own converter gives, on a Flux of Flux.1's width (3072, which diffusers' converter fixes) with one block
    of each kind; bytes stand in for weights (a converter only moves them)."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        model = FluxTransformer2DModel(
            num_layers=1,
            num_single_layers=1,
            num_attention_heads=24,
            attention_head_dim=128,
            in_channels=16,
            joint_attention_dim=64,
            pooled_projection_dim=64,
            guidance_embeds=True,
        )
    generator = torch.Generator().manual_seed(0)
    state = {
        key: torch.empty(value.shape, dtype=torch.int8).random_(-128, 127, generator=generator)
        for key, value in model.state_dict().items()
    }
    original = flux_to_original(state)
    ours = flux_from_original(original, inner_dim=24 * 128)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    assert set(ours) == set(theirs) == set(state)
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert all(torch.equal(ours[key], state[key]) for key in ours)


def test_a_single_file_flux_fine_tune_makes_its_diffusers_twins_image(tmp_path):
    directory, single_file = twins(
        tmp_path, "tiny-flux", ("transformer",), lambda p: flux_to_original(p.transformer.state_dict())
    )
    from_file = image(EngineConfig(model="tiny-flux", checkpoint=single_file))
    assert np.array_equal(from_file, image(EngineConfig(model=directory)))
    assert np.abs(from_file - image(EngineConfig(model="tiny-flux"))).max() > 10, "the file's weights unused"


def test_a_single_file_sdxl_fine_tune_makes_its_diffusers_twins_image(tmp_path):
    """The whole pipeline in one file (UNet, VAE, both text encoders, all fine-tuned), read by diffusers'
    ``from_single_file`` over the base's configs."""
    components = ("unet", "vae", "text_encoder", "text_encoder_2")
    directory, single_file = twins(tmp_path, "tiny-sdxl", components, sdxl_to_single_file)
    from_file = image(EngineConfig(model="tiny-sdxl", checkpoint=single_file))
    assert np.array_equal(from_file, image(EngineConfig(model=directory)))
    assert np.abs(from_file - image(EngineConfig(model="tiny-sdxl"))).max() > 10, "the file's weights unused"


def test_a_file_that_is_not_the_models_fine_tune_is_refused_with_what_it_is(tmp_path):
    transformer = load_adapter("tiny-flux", torch.device("cpu"), torch.float32).pipeline.transformer
    original = flux_to_original(transformer.state_dict())
    narrow = tmp_path / "other-size.safetensors"
    save_file({**original, "img_in.weight": original["img_in.weight"][:, :8].contiguous()}, narrow)
    with pytest.raises(ConfigError, match=r"img_in|x_embedder.*is \("):
        Engine(EngineConfig(model="tiny-flux", checkpoint=str(narrow)), ParallelState.single())
    foreign = tmp_path / "foreign.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, foreign)
    with pytest.raises(ConfigError, match="not Flux's original layout"):
        Engine(EngineConfig(model="tiny-flux", checkpoint=str(foreign)), ParallelState.single())
    with pytest.raises(ConfigError, match="no such file"):
        Engine(
            EngineConfig(model="tiny-flux", checkpoint=str(tmp_path / "gone.safetensors")),
            ParallelState.single(),
        )


def test_a_pickle_or_a_family_without_single_files_is_refused_before_loading():
    with pytest.raises(ValueError, match=r"give a \.safetensors file"):
        EngineConfig(model="tiny-flux", checkpoint="model.ckpt")
    with pytest.raises(ConfigError, match="do not load from single files"):
        model_card("tiny-wan").check_engine(EngineConfig(model="tiny-wan", checkpoint="wan.safetensors"))
    model_card("tiny-sdxl").check_engine(EngineConfig(model="tiny-sdxl", checkpoint="sdxl.safetensors"))
