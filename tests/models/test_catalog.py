"""Model cards without the model stack, and the family table's integrity."""

from __future__ import annotations

import pytest

from rayxdit.config import ConfigError
from rayxdit.models.catalog import describe_model, family_of
from rayxdit.models.families import FAMILIES
from rayxdit.models.presets import materialize_preset
from tests.helpers import fresh_python

CARD_IN_A_FRESH_PROCESS = """
import dataclasses, json, sys
from rayxdit.runtime.cards import model_card
cards = {name: model_card(name) for name in sys.argv[1:]}
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers'))
print(json.dumps({"heavy": heavy[:5], "cards": {n: dataclasses.asdict(c) for n, c in cards.items()}}))
"""


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_names_an_adapter_that_names_it_back(family):
    assert FAMILIES[family].adapter_class().family is FAMILIES[family]


def test_an_unknown_pipeline_class_is_refused_with_the_supported_ones():
    with pytest.raises(ConfigError, match="StableDiffusion3Pipeline"):
        family_of("KandinskyPipeline")


def test_a_card_is_read_without_importing_torch_and_equals_the_loaded_models_traits():
    """The CLI, the Serve builder and the batch driver validate against cards: reading one in a fresh process
    imports neither torch, diffusers nor transformers (once the preset is built), and says what the loaded
    adapter says."""
    import json

    from rayxdit.config import EngineConfig
    from rayxdit.engine import Engine
    from rayxdit.parallel.mesh import ParallelState

    models = ["tiny-flux", "tiny-sdxl", "tiny-wan"]
    for model in models:
        materialize_preset(model)
    report = json.loads(fresh_python(CARD_IN_A_FRESH_PROCESS, *models))
    assert report["heavy"] == [], f"reading a card imported {report['heavy']}"
    adapter = Engine(EngineConfig(model="tiny-sdxl"), ParallelState.single()).adapter
    card = report["cards"]["tiny-sdxl"]
    assert (card["num_heads"], card["num_layers"]) == (adapter.num_heads, adapter.num_layers)
    assert card["pipeline_class"] == "StableDiffusionXLPipeline" and card["guidance_is_cfg"]
    assert (
        describe_model("tiny-flux").supports_pipefusion
        and not report["cards"]["tiny-wan"]["supports_pipefusion"]
    )
