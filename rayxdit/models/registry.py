"""Loading a model: diffusers' own ``from_pretrained`` (or a recipe built on the device) wrapped in its
family's adapter, and ControlNets beside it. Naming a model and reading its card without loading it:
:mod:`rayxdit.models.catalog`. Adding a model family is one small adapter file plus one entry in
:data:`rayxdit.models.families.FAMILIES`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from rayxdit.config import ConfigError
from rayxdit.models.base import DiffusionAdapter
from rayxdit.models.catalog import (
    built_in_code,
    built_in_limits,
    component_location,
    family_of,
    read_model_json,
    resolve_model,
)
from rayxdit.models.families import FLUX, Family
from rayxdit.models.host_copy import copy_key, keep_copy, read_copy, snapshot
from rayxdit.models.presets import FluxSizes, build_flux_pipeline, save_with_limits
from rayxdit.models.single_file import load_single_file_pipeline


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
        kind = read_model_json(path, "config.json").get("_class_name", "?")
        if kind not in classes:
            raise ConfigError(
                f"controlnet '{location}' is a {kind}; supported: {', '.join(classes)} (diffusers' layout)"
            )
        try:
            nets[location] = classes[kind].from_pretrained(path, torch_dtype=dtype).to(device)
        except OSError as error:
            raise ConfigError(f"controlnet '{location}': {error}") from None
    return nets


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


ALL_COMPONENTS = ("*",)
"""``keep_on_host`` for a pipeline all of whose components stay in host memory (weights offloaded)."""


def load_adapter(
    model: str,
    device: torch.device,
    dtype: torch.dtype,
    keep_on_host: tuple[str, ...] = (),
    checkpoint: str | None = None,
    host_copy: bool = False,
    defer_weights: bool = False,
) -> DiffusionAdapter:
    """Load a pipeline with diffusers' own ``from_pretrained`` (or build a recipe on the device) and wrap it
    in its family's adapter. Components named in ``keep_on_host`` (every one: :data:`ALL_COMPONENTS`) stay in
    host memory: a transformer whose weights are then sharded onto the device, or offloaded weights. A
    single-file ``checkpoint`` replaces the model's weights (:mod:`rayxdit.models.single_file`).
    ``host_copy``: read the weights from this node's host copy where it has one, and write one where it has
    not (:mod:`rayxdit.models.host_copy`). ``defer_weights``: return while the copy's tensors are still
    arriving, with :attr:`DiffusionAdapter.weights_arriving` set (wait on it before the weights' values count)."""
    import diffusers
    import transformers
    from diffusers import DiffusionPipeline

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    sizes = built_in_code(model)
    if sizes is not None and checkpoint:
        raise ConfigError(f"checkpoint with {model}: a single file loads over a model's directory or hub id")
    read = None
    if sizes is not None:
        pipeline = build_flux_pipeline(sizes, torch.device("cpu") if keep_on_host else device, dtype)
    else:
        location = resolve_model(model)
        family = family_of(read_model_json(location, "model_index.json").get("_class_name", "?"))
        # Whole modules on the device only, and single files that load as modules over the model's directory.
        copied = (
            host_copy and not keep_on_host and (not checkpoint or family.single_file == "flux_transformer")
        )
        key = copy_key(_local_files(location), checkpoint, dtype) if copied else None
        read = read_copy(key, device) if key else None
        if read is not None:
            if not defer_weights:
                read.wait()
            # The rest (tokenizers, scheduler) from the model's directory, given the modules.
            pipeline = DiffusionPipeline.from_pretrained(location, dtype=dtype, **read.modules)
        else:
            pipeline = _from_checkpoint(family, location, checkpoint, dtype)
            if key:
                # On a CPU the pipeline keeps these very tensors: written before anything (a LoRA) changes them.
                name = f"{model}{f' + {checkpoint}' if checkpoint else ''}"
                keep_copy(key, snapshot(pipeline), name, background=device.type != "cpu")
    pipeline.set_progress_bar_config(disable=True)
    for name, component in pipeline.components.items():
        if isinstance(component, torch.nn.Module) and not {name, "*"} & set(keep_on_host):
            component.to(device)
    if sizes is not None:
        return FLUX.adapter_class()(pipeline, limits=built_in_limits(sizes))
    adapter = family.adapter_class()(pipeline, location if os.path.isdir(location) else None)
    adapter.weights_arriving = read
    return adapter


def check_export(model: str, path: Path) -> FluxSizes:
    """The recipe :func:`export_recipe` would write, or a ConfigError saying why it would not."""
    sizes = built_in_code(model)
    if sizes is None:
        raise ConfigError(
            f"model '{model}' is not a recipe built in code (package.module:NAME); presets, directories and "
            "hub ids are diffusers directories already"
        )
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"{path} exists and is not an empty directory: name a new one")
    return sizes


def export_recipe(model: str, path: Path, device: torch.device, dtype: torch.dtype) -> int:
    """Write the recipe ``model`` (``package.module:NAME``) as a diffusers directory at ``path`` with its serving
    limits, and return the bytes written: the very weights the recipe draws on ``device`` in ``dtype``, so
    ``--model path`` there serves the images ``--model model`` does, but from a checkpoint (what a restart
    reads, what a node's host copy holds). Written beside ``path`` and renamed into place at the end, so an
    interrupted export leaves no directory that looks whole."""
    sizes = check_export(model, path)
    pipeline = build_flux_pipeline(sizes, device, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        save_with_limits(pipeline, staging, sizes.limits)
        if path.exists():
            path.rmdir()  # empty, checked above
        staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def _local_files(location: str) -> str:
    """The directory a model's files are in: a hub id's snapshot in the local cache (fetched as
    ``from_pretrained`` would; its path names the revision), so that the copy's key follows the files."""
    if os.path.isdir(location):
        return location
    from diffusers import DiffusionPipeline

    return str(DiffusionPipeline.download(location))


def _from_checkpoint(family: Family, location: str, checkpoint: str | None, dtype: torch.dtype) -> Any:
    from diffusers import DiffusionPipeline

    if checkpoint:
        return load_single_file_pipeline(family, location, checkpoint, dtype)
    return DiffusionPipeline.from_pretrained(location, dtype=dtype)
