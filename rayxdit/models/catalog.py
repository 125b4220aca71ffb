"""Naming a model, and its card: a preset (``tiny-flux``), a local diffusers pipeline directory, a hub id
(``org/name``), or ``package.module:NAME``, a :class:`~rayxdit.models.presets.FluxSizes` built in code with
random weights (the benchmarks' full-size Flux.1-dev is ``benchmarks.models:FLUX_DEV``).

Torch-free: a card is read from ``model_index.json`` and the denoiser's ``config.json`` alone, so the CLI, the
Serve application builder and the batch driver validate a request or a layout without importing the model
stack (only a preset not yet built on this machine imports it, once, to build it).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from rayxdit.config import ConfigError
from rayxdit.limits import ModelCard, ModelLimits
from rayxdit.models.families import FAMILIES, FLUX, Family
from rayxdit.models.presets import (
    CONTROLNET_PRESETS,
    IP_ADAPTER_PRESETS,
    PRESETS,
    FluxSizes,
    materialize_preset,
)


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


def built_in_limits(sizes: FluxSizes) -> ModelLimits:
    """The limits of a Flux built in code: Flux's, what its transformer says it is, then the recipe's own."""
    return FLUX.limits_for(sizes.transformer, sizes.scheduler, None).updated(sizes.limits)


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


def read_model_json(location: str, filename: str) -> dict:
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
        return FLUX.card(model, sizes.transformer, built_in_limits(sizes))
    location = resolve_model(model)
    family = family_of(read_model_json(location, "model_index.json").get("_class_name", "?"))
    denoiser = read_model_json(location, f"{family.denoiser_subfolder}/config.json")
    scheduler = read_model_json(location, "scheduler/scheduler_config.json")
    limits = family.limits_for(denoiser, scheduler, location if os.path.isdir(location) else None)
    return family.card(model, denoiser, limits)


def component_location(location: str) -> str:
    """A ControlNet or IP-Adapter preset's (built once) directory; a directory, hub id or path as is."""
    if location in CONTROLNET_PRESETS or location in IP_ADAPTER_PRESETS:
        return str(materialize_preset(location))
    return location


def family_of(pipeline_class: str) -> Family:
    """The family of a diffusers pipeline class, or a ConfigError naming the supported ones."""
    if pipeline_class not in FAMILIES:
        raise ConfigError(
            f"pipeline {pipeline_class} is not supported; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[pipeline_class]
