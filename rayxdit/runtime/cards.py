"""Model cards for the layers above the engine (CLI, serving, batch): what a model accepts and how it is
split, read from its config files without loading weights. The one place those layers learn about models,
so the HTTP ingress never imports the model stack: the application builder reads each card once and hands
it to the router as data."""

from __future__ import annotations

from rayxdit.limits import ModelCard


def model_card(model: str) -> ModelCard:
    """The card of ``model`` (a preset, directory, hub id or ``package.module:NAME``), from its config files
    (torch-free; building a preset the first time on a machine imports the model stack). May read two small
    JSON files from a hub (with the forwarded ``HF_TOKEN``)."""
    from rayxdit.models.catalog import describe_model

    return describe_model(model)
