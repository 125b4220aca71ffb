"""One registry from a diffusers pipeline class to its adapter, and model loading.

Adding a model family is one small adapter file plus one line in ``ADAPTERS``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from rayxdit.config import ConfigError, ParallelConfig
from rayxdit.models.base import DiffusionAdapter, ModelLimits, check_parallel
from rayxdit.models.flux import FluxAdapter
from rayxdit.models.presets import IN_MEMORY_PRESETS, PRESETS, build_flux_pipeline, materialize_preset
from rayxdit.models.sd3 import SD3Adapter
from rayxdit.models.sdxl import SDXLAdapter
from rayxdit.models.wan import WanAdapter

ADAPTERS: dict[str, type[DiffusionAdapter]] = {
    adapter.pipeline_class: adapter for adapter in (FluxAdapter, SD3Adapter, SDXLAdapter, WanAdapter)
}


@dataclass(frozen=True)
class ModelInfo:
    """What can be known about a model from its config files alone, before any weights load."""

    location: str
    pipeline_class: str
    num_heads: int
    num_layers: int
    limits: ModelLimits

    def check_parallel(self, config: ParallelConfig) -> None:
        """Raise :class:`ConfigError` when ``config`` cannot split this model."""
        check_parallel(config, adapter_class(self.pipeline_class), self.num_heads, self.num_layers)


def resolve_model(model: str) -> str:
    """A preset name becomes its (built once) directory; a directory or hub id is returned as is."""
    if model in PRESETS:
        return str(materialize_preset(model))
    if model in IN_MEMORY_PRESETS:
        return model
    if os.path.isdir(model):
        return model
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ConfigError(
            f"model '{model}' is neither a preset ({', '.join([*PRESETS, *IN_MEMORY_PRESETS])}), "
            "a local directory, nor a hub id (org/name)"
        )
    return model


def _read_json(location: str, filename: str) -> dict:
    if os.path.isdir(location):
        path = Path(location) / filename
        if not path.is_file():
            raise ConfigError(f"{path} not found: is '{location}' a diffusers pipeline directory?")
        return json.loads(path.read_text())
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(location, filename)).read_text())
    except Exception as error:  # network, auth, missing repo: all mean the same to the user
        raise ConfigError(f"cannot read {filename} of hub model '{location}': {error}") from None


def describe_model(model: str) -> ModelInfo:
    if model in IN_MEMORY_PRESETS:
        sizes = IN_MEMORY_PRESETS[model]
        limits = ModelLimits().updated(sizes.limits)
        config = sizes.transformer
        return ModelInfo(
            model, "FluxPipeline", FluxAdapter.heads_in(config), FluxAdapter.layers_in(config), limits
        )
    location = resolve_model(model)
    pipeline_class = _read_json(location, "model_index.json").get("_class_name", "?")
    adapter = adapter_class(pipeline_class)
    transformer = _read_json(location, f"{adapter.denoiser_subfolder}/config.json")
    limits = ModelLimits.for_pipeline(adapter.family_limits, location if os.path.isdir(location) else None)
    return ModelInfo(
        location, pipeline_class, adapter.heads_in(transformer), adapter.layers_in(transformer), limits
    )


def adapter_class(pipeline_class: str) -> type[DiffusionAdapter]:
    if pipeline_class not in ADAPTERS:
        raise ConfigError(
            f"pipeline {pipeline_class} is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[pipeline_class]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_adapter(model: str, device: torch.device, dtype: torch.dtype) -> DiffusionAdapter:
    """Load a pipeline with diffusers' own ``from_pretrained`` and wrap it in its family's adapter."""
    import diffusers
    import transformers
    from diffusers import DiffusionPipeline

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if model in IN_MEMORY_PRESETS:
        sizes = IN_MEMORY_PRESETS[model]
        pipeline = build_flux_pipeline(sizes, device, dtype)
        pipeline.set_progress_bar_config(disable=True)
        return FluxAdapter(pipeline, limits=ModelLimits().updated(sizes.limits))
    location = resolve_model(model)
    adapter = adapter_class(_read_json(location, "model_index.json").get("_class_name", "?"))
    pipeline = DiffusionPipeline.from_pretrained(location, dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(device)
    return adapter(pipeline, location if os.path.isdir(location) else None)
