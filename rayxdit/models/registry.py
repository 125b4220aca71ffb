"""One registry from a diffusers pipeline class to its adapter, and model loading.

Adding a model family is one small adapter file plus one line in ``ADAPTERS``. A model is named by a preset
(``tiny-flux``), a local diffusers pipeline directory, a hub id (``org/name``), or ``package.module:NAME``: a
:class:`~rayxdit.models.presets.FluxSizes` built in code on the device with random weights (no checkpoint;
the benchmarks' full-size Flux.1-dev is ``benchmarks.models:FLUX_DEV``).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch

from rayxdit.config import ConfigError
from rayxdit.limits import ModelCard, ModelLimits
from rayxdit.models.base import DiffusionAdapter
from rayxdit.models.flux import FluxAdapter, FluxKontextAdapter
from rayxdit.models.presets import (
    CONTROLNET_PRESETS,
    IP_ADAPTER_PRESETS,
    PRESETS,
    FluxSizes,
    build_flux_pipeline,
    materialize_preset,
)
from rayxdit.models.sd3 import SD3Adapter
from rayxdit.models.sdxl import SDXLAdapter
from rayxdit.models.wan import WanAdapter

ADAPTERS: dict[str, type[DiffusionAdapter]] = {
    adapter.pipeline_class: adapter
    for adapter in (FluxAdapter, FluxKontextAdapter, SD3Adapter, SDXLAdapter, WanAdapter)
}


def built_in_code(model: str) -> FluxSizes | None:
    """The :class:`FluxSizes` that ``package.module:NAME`` names, or None when ``model`` is not of that form."""
    module_name, sep, attribute = model.partition(":")
    if not sep or os.path.exists(model) or not module_name or not attribute:
        return None
    try:
        value = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ConfigError(
            f"model '{model}': cannot import {attribute} from {module_name} ({error})"
        ) from None
    if not isinstance(value, FluxSizes):
        raise ConfigError(f"model '{model}' names a {type(value).__name__}, not a FluxSizes recipe")
    return value


def resolve_model(model: str) -> str:
    """A preset name becomes its (built once) directory; a directory or hub id is returned as is."""
    if model in PRESETS:
        return str(materialize_preset(model))
    if os.path.isdir(model):
        return model
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ConfigError(
            f"model '{model}' is neither a preset ({', '.join(PRESETS)}), a local directory, a hub id "
            "(org/name), nor package.module:NAME"
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


def describe_model(model: str) -> ModelCard:
    """The model's :class:`ModelCard`, from its config files alone (no weights are loaded)."""
    sizes = built_in_code(model)
    if sizes is not None:
        return FluxAdapter.card(model, sizes.transformer, ModelLimits().updated(sizes.limits))
    location = resolve_model(model)
    adapter = adapter_class(_read_json(location, "model_index.json").get("_class_name", "?"))
    denoiser = _read_json(location, f"{adapter.denoiser_subfolder}/config.json")
    limits = ModelLimits.for_pipeline(adapter.family_limits, location if os.path.isdir(location) else None)
    return adapter.card(model, denoiser, limits)


def load_controlnets(
    locations: tuple[str, ...], device: torch.device, dtype: torch.dtype
) -> dict[str, torch.nn.Module]:
    """Each ControlNet by the name requests use (its location), loaded with diffusers' ``from_pretrained`` as
    the class its config names (``FluxControlNetModel`` for Flux, ``ControlNetModel`` for SDXL)."""
    from diffusers import ControlNetModel, FluxControlNetModel

    classes = {cls.__name__: cls for cls in (FluxControlNetModel, ControlNetModel)}
    nets = {}
    for location in locations:
        path = component_location(location)
        kind = _read_json(path, "config.json").get("_class_name", "?")
        if kind not in classes:
            raise ConfigError(
                f"controlnet '{location}' is a {kind}; supported: {', '.join(classes)} (diffusers' layout)"
            )
        try:
            nets[location] = classes[kind].from_pretrained(path, torch_dtype=dtype).to(device)
        except OSError as error:
            raise ConfigError(f"controlnet '{location}': {error}") from None
    return nets


def component_location(location: str) -> str:
    """A ControlNet or IP-Adapter preset's (built once) directory; a directory, hub id or path as is."""
    if location in CONTROLNET_PRESETS or location in IP_ADAPTER_PRESETS:
        return str(materialize_preset(location))
    return location


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
    """Load a pipeline with diffusers' own ``from_pretrained`` (or build a recipe on the device) and wrap it
    in its family's adapter."""
    import diffusers
    import transformers
    from diffusers import DiffusionPipeline

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    sizes = built_in_code(model)
    if sizes is not None:
        pipeline = build_flux_pipeline(sizes, device, dtype)
        pipeline.set_progress_bar_config(disable=True)
        return FluxAdapter(pipeline, limits=ModelLimits().updated(sizes.limits))
    location = resolve_model(model)
    adapter = adapter_class(_read_json(location, "model_index.json").get("_class_name", "?"))
    pipeline = DiffusionPipeline.from_pretrained(location, dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(device)
    return adapter(pipeline, location if os.path.isdir(location) else None)
