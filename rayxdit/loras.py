"""Per-request LoRA adapters by name, as plain data: no torch, no diffusers.

A pool (or ``rayxdit generate``) names directories it serves adapters from, its ``lora_sources``; a request
names adapters below them (``{"name": "styles/ink", "scale": 0.8}``): the file ``styles/ink.safetensors`` in
the first source that holds it, or a directory ``styles/ink/`` with diffusers' ``pytorch_lora_weights.safetensors``.
The HTTP ingress checks a name's form (this module); the router and the ranks find it in the sources, and
the ranks read and check the weights against the model (``rayxdit.models.lora``). A name never leaves its
source: no ``..``, no absolute paths, no URLs, and a symbolic link pointing out of the source is refused.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MAX_LORAS = 4
"""Adapters stacked on one request (their weight deltas are summed, as diffusers' ``set_adapters``)."""
MAX_LORA_SCALE = 8.0
MAX_LORA_NAME = 200
SUFFIX = ".safetensors"
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""The file diffusers' ``save_lora_weights`` writes into an adapter's directory."""
LISTED_AT_MOST = 10_000
"""Adapters ``list_loras`` returns per model at most (a source may hold more; requests still reach them)."""

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@-]*(/[A-Za-z0-9_][A-Za-z0-9_.+=@-]*)*")


class LoraNameError(ValueError):
    """A name that is not an adapter's name (its text says why), or one no source holds."""


def check_lora_name(name: str) -> str:
    """``name`` if it has an adapter name's form: path segments of letters, digits and ``_.+=@-`` below a
    source, none starting with a dot (so no ``..``), no absolute path, no URL. Raises :class:`LoraNameError`."""
    if not name or len(name) > MAX_LORA_NAME:
        raise LoraNameError(f"an adapter name has 1 to {MAX_LORA_NAME} characters ({len(name)} given)")
    if "://" in name or name.startswith(("/", "\\")) or ":" in name:
        raise LoraNameError(
            f"'{name}' is not an adapter name: name one below the pool's lora_sources, no URL or path"
        )
    if not _NAME.fullmatch(name):
        raise LoraNameError(
            f"'{name}' is not an adapter name: segments of letters, digits and _.+=@- separated by '/', none "
            "starting with '.'"
        )
    return name


def find_lora(sources: tuple[str, ...] | list[str], name: str) -> Path:
    """The weights file of adapter ``name``: ``<source>/<name>.safetensors`` or
    ``<source>/<name>/pytorch_lora_weights.safetensors`` in the first source holding one, its real path
    inside that source. Raises :class:`LoraNameError` (also when no source is configured)."""
    check_lora_name(name)
    if not sources:
        raise LoraNameError("this model is served without LoRA sources (set lora_sources in its pool)")
    for source in sources:
        root = Path(source).resolve()
        for candidate in (root / f"{name}{SUFFIX}", root / name / DIFFUSERS_WEIGHT_NAME):
            if candidate.is_file():
                real = candidate.resolve()
                if not real.is_relative_to(root):
                    raise LoraNameError(f"'{name}' links out of its source {source}")
                return real
    raise LoraNameError(f"no adapter '{name}' in {', '.join(sources)} (GET /v1/models lists them)")


def list_loras(sources: tuple[str, ...] | list[str], at_most: int = LISTED_AT_MOST) -> list[str]:
    """The adapters ``sources`` hold, by the names requests use, sorted; the first source holding a name
    wins, as in :func:`find_lora`. Unreadable or missing sources are skipped."""
    names: set[str] = set()
    for source in sources:
        root = Path(source)
        for folder, subfolders, files in os.walk(root):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            below = Path(folder).relative_to(root)
            for file in files:
                if file == DIFFUSERS_WEIGHT_NAME and below != Path("."):
                    name = below.as_posix()
                elif file.endswith(SUFFIX) and not file.startswith("."):
                    name = (below / file[: -len(SUFFIX)]).as_posix()
                else:
                    continue
                try:
                    names.add(check_lora_name(name))
                except LoraNameError:
                    continue
                if len(names) >= at_most:
                    return sorted(names)
    return sorted(names)


def adapter_set_key(loras: Iterable[Any]) -> str:
    """The id Serve's multiplexed routing knows a request's adapters (its ``loras``, each with a ``name``) by,
    its ``multiplexed_model_id``: a replica that served the same set last holds them on its GPUs, fused or a
    swap away."""
    return "+".join(lora.name for lora in loras)
