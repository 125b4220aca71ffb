"""Single-file checkpoints: a fine-tune shipped as one ``.safetensors`` file in its trainer's key layout,
loaded over a base model's diffusers directory, which gives the configs, text encoders and tokenizers.

- **Flux** files (Black Forest Labs' layout: ``double_blocks.*``, ``single_blocks.*``; the transformer
  alone, as Flux fine-tunes ship) are converted here, by :func:`flux_from_original`, into the base's
  ``FluxTransformer2DModel``. diffusers' own converter fixes Flux.1's width (3072) in its code; this one
  reads it from the base's config, and ``tests/models/test_single_file.py`` holds it equal to diffusers'
  at Flux.1's width.
- **UNet pipelines** (SDXL, SD 1.5: the LDM layout of the whole pipeline, UNet, VAE and text encoders in
  one file) load through diffusers' pipeline ``from_single_file`` with the base as its ``config``; a
  component the file lacks comes from the base.

Only safetensors: a pickled ``.ckpt`` runs code when it is read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from rayxdit.config import ConfigError

FLUX_PREFIX = "model.diffusion_model."
"""ComfyUI and some trainers save the transformer under this prefix; BFL's files have none."""

FLUX_MODULES = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
"""Original module -> diffusers module, outside the blocks (``.weight``/``.bias`` keep their names)."""

FLUX_DOUBLE_BLOCK = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
}
"""Inside ``double_blocks.{i}`` -> inside ``transformer_blocks.{i}``. A tuple: one fused projection split
row-wise in that order (q, k, v of width ``inner_dim`` each)."""

FLUX_SINGLE_BLOCK = {
    "modulation.lin": "norm.linear",
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": "proj_out",
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
}
"""Inside ``single_blocks.{i}`` -> inside ``single_transformer_blocks.{i}``: ``linear1`` fuses q, k, v and
the MLP's input projection (the rest of its rows)."""

FLUX_BLOCKS = {
    "double_blocks": ("transformer_blocks", FLUX_DOUBLE_BLOCK),
    "single_blocks": ("single_transformer_blocks", FLUX_SINGLE_BLOCK),
}
FLUX_PARAMETERS = {"scale": "weight"}
"""The RMSNorms' ``scale`` is diffusers' ``weight``."""
FLUX_SWAPPED_HALVES = {"final_layer.adaLN_modulation.1"}
"""The original's final modulation yields (shift, scale); diffusers' AdaLayerNormContinuous (scale, shift)."""


def flux_module_target(module: str) -> tuple[str, str | tuple[str, ...]]:
    """The diffusers name(s) of an original Flux module: ``(prefix, target)`` where ``target`` is one
    module name, or a tuple of the names a fused projection splits into, each under ``prefix``."""
    block = re.fullmatch(r"(double_blocks|single_blocks)\.(\d+)\.(.+)", module)
    if block:
        kind, index, inside = block.groups()
        name, table = FLUX_BLOCKS[kind]
        prefix, module = f"{name}.{index}.", inside
    else:
        prefix, table = "", FLUX_MODULES
    if module not in table:
        raise KeyError(module)
    return prefix, table[module]


def split_rows(tensor: torch.Tensor, parts: int, inner_dim: int) -> tuple[torch.Tensor, ...]:
    """A fused projection's rows: q, k and v are ``inner_dim`` rows each, a fourth part has the rest."""
    sizes = [inner_dim] * 3 + ([tensor.shape[0] - 3 * inner_dim] if parts == 4 else [])
    if sum(sizes) != tensor.shape[0] or min(sizes) <= 0:
        raise ValueError(f"{tensor.shape[0]} rows cannot be q, k, v of {inner_dim} each and a rest")
    return tensor.split(sizes)


def flux_from_original(state: dict[str, torch.Tensor], inner_dim: int) -> dict[str, torch.Tensor]:
    """A Flux transformer's state dict in Black Forest Labs' layout as diffusers' ``FluxTransformer2DModel``
    names it. ``inner_dim``: the attention width (heads x head dim), from the base model's config."""
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        module, _, parameter = key.removeprefix(FLUX_PREFIX).rpartition(".")
        try:
            prefix, target = flux_module_target(module)
        except KeyError:
            unknown.append(key)
            continue
        parameter = FLUX_PARAMETERS.get(parameter, parameter)
        if module in FLUX_SWAPPED_HALVES:
            shift, scale = tensor.chunk(2)
            tensor = torch.cat([scale, shift])
        if isinstance(target, tuple):
            for name, part in zip(target, split_rows(tensor, len(target), inner_dim), strict=True):
                converted[f"{prefix}{name}.{parameter}"] = part.contiguous()
        else:
            converted[f"{prefix}{target}.{parameter}"] = tensor
    if unknown:
        raise ConfigError(
            f"{len(unknown)} keys of the checkpoint are not Flux's original layout (e.g. {unknown[0]}): is it a "
            "Flux transformer saved by Black Forest Labs' code or a trainer that keeps its names?"
        )
    return converted


def existing_file(path: str) -> Path:
    """``path`` as a file that exists, or a ConfigError saying what to give."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"checkpoint {path}: no such file (give the path of a .safetensors file)")
    return file


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or a ConfigError that says what is wrong with the path."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = existing_file(path)
    try:
        return load_file(file)
    except (SafetensorError, OSError) as error:
        raise ConfigError(f"checkpoint {path} is not a readable safetensors file: {error}") from None


def flux_transformer_from_file(path: str, base: str, dtype: torch.dtype) -> torch.nn.Module:
    """The base's ``FluxTransformer2DModel`` architecture with the weights of a single Flux file, built on
    the meta device and given the file's tensors (a 12B transformer is never initialized twice)."""
    from diffusers import FluxTransformer2DModel

    config = FluxTransformer2DModel.load_config(base, subfolder="transformer")
    inner_dim = config["num_attention_heads"] * config["attention_head_dim"]
    state = flux_from_original(read_safetensors(path), inner_dim)
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise ConfigError(
            f"checkpoint {path} does not fit {base}'s transformer: {len(missing)} weights missing and "
            f"{len(unexpected)} unexpected (e.g. {example}); is it a fine-tune of that model?"
        )
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    wrong = [key for key in expected if tuple(state[key].shape) != shapes[key]]
    if wrong:
        key = wrong[0]
        raise ConfigError(
            f"checkpoint {path} does not fit {base}'s transformer: {key} is {tuple(state[key].shape)}, the "
            f"base's {shapes[key]} (is it a fine-tune of another size of model?)"
        )
    model.load_state_dict({key: value.to(dtype) for key, value in state.items()}, assign=True)
    return model.eval()


def load_single_file_pipeline(family: Any, base: str, path: str, dtype: torch.dtype) -> Any:
    """The base's pipeline with the single file's weights. ``family``: the base's
    :class:`~rayxdit.models.families.Family`, whose ``single_file`` says how its files are laid out (only
    ``.safetensors`` paths reach here: ``EngineConfig.checkpoint`` refuses others)."""
    import diffusers

    if family.single_file == "flux_transformer":
        transformer = flux_transformer_from_file(path, base, dtype)
        return diffusers.DiffusionPipeline.from_pretrained(base, transformer=transformer, dtype=dtype)
    if family.single_file == "ldm_pipeline":
        file = existing_file(path)
        pipeline_class = getattr(diffusers, family.pipeline_class)
        try:
            return pipeline_class.from_single_file(str(file), config=base, torch_dtype=dtype)
        except (ValueError, KeyError, RuntimeError) as error:
            raise ConfigError(f"checkpoint {path} does not load over {base}: {error}") from None
    raise ConfigError(
        f"{family.pipeline_class} models do not load from single files; Flux, Kontext, SDXL and SD 1.5 do "
        "(give a diffusers directory instead)"
    )
