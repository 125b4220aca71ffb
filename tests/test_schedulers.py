"""Which samplers a model offers and what a checkpoint says it is: plain data, no torch (the parity of every
sampler with diffusers at 1, 2, 4 and 8 ranks is in tests/models/test_parity.py)."""

from __future__ import annotations

import json
import re

import pytest

from rayxdit.limits import ModelLimits
from rayxdit.models.catalog import describe_model
from rayxdit.models.families import FLUX, SD3, SDXL, WAN
from rayxdit.request import GenerateRequest, RequestError
from rayxdit.schedulers import FLOW, NOISE, SAMPLERS, offered, options_from, own_sampler, sampler

FLUX_DEV = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": True}
SCHNELL = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0, "use_dynamic_shifting": False}
WAN_UNIPC = {
    "_class_name": "UniPCMultistepScheduler",
    "flow_shift": 5.0,
    "use_flow_sigmas": True,
    "prediction_type": "flow_prediction",
}
SDXL_EULER = {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear"}


def test_each_family_offers_the_samplers_of_its_prediction_and_its_pipeline():
    assert FLUX.limits_for({}, FLUX_DEV, None).schedulers == ("euler", "dpm++2m", "unipc")
    # Flux's pipeline sets custom sigmas, which Heun refuses; SD3 and Wan have no such step
    assert SD3.limits_for({}, {**FLUX_DEV, "use_dynamic_shifting": False}, None).schedulers == (
        "euler",
        "heun",
        "dpm++2m",
        "unipc",
    )
    assert "heun" not in offered(FLOW, FLUX_DEV), "Heun takes no resolution shift (mu)"
    assert WAN.limits_for({}, WAN_UNIPC, None).schedulers == ("euler", "heun", "dpm++2m", "unipc")
    assert SDXL.limits_for({}, SDXL_EULER, None).schedulers == (
        "euler",
        "dpm++2m",
        "dpm++2m-karras",
        "unipc",
        "ddim",
    )
    names = {(entry.name, entry.prediction) for entry in SAMPLERS}
    assert len(names) == len(SAMPLERS), "a name means one sampler per prediction kind"
    assert not any("ancestral" in entry.scheduler_class.lower() for entry in SAMPLERS)


def test_the_checkpoints_own_sampler_is_named_when_it_is_one_of_ours():
    assert own_sampler(FLOW, FLUX_DEV) == "euler"
    assert own_sampler(FLOW, WAN_UNIPC) == "unipc"
    assert own_sampler(NOISE, SDXL_EULER) == "euler"
    # a UniPC that is not the flow variant is not our "unipc" for a flow model
    assert own_sampler(FLOW, {"_class_name": "UniPCMultistepScheduler"}) is None
    assert own_sampler(NOISE, {"_class_name": "LMSDiscreteScheduler"}) is None


def test_a_sampler_of_another_class_keeps_the_checkpoints_shift():
    assert options_from(WAN_UNIPC, sampler("euler", FLOW)) == {"shift": 5.0}
    assert options_from(FLUX_DEV, sampler("dpm++2m", FLOW))["flow_shift"] == 3.0
    assert "shift" not in options_from(FLUX_DEV, sampler("dpm++2m", FLOW)), "DPM has no 'shift' option"
    assert options_from(SDXL_EULER, sampler("ddim", NOISE)) == {"clip_sample": False}
    with pytest.raises(KeyError):
        sampler("dpm++2m-karras", FLOW)


def test_an_unknown_sampler_is_refused_naming_the_field_and_the_choices():
    limits = FLUX.limits_for({}, FLUX_DEV, None)
    assert limits.resolve(GenerateRequest(prompt="a cat", scheduler="unipc")).request.scheduler == "unipc"
    for name in ("heun", "euler-ancestral", "DPM++2M"):
        with pytest.raises(RequestError, match=re.escape("choose one of: euler, dpm++2m, unipc")) as refused:
            limits.resolve(GenerateRequest(prompt="a cat", scheduler=name))
        assert refused.value.param == "scheduler"


def test_a_flux_without_guidance_embeddings_is_served_as_schnell_unless_its_settings_say_otherwise(tmp_path):
    dev = FLUX.limits_for({"guidance_embeds": True}, FLUX_DEV, None)
    assert (dev.default_steps, dev.max_sequence_length, dev.default_guidance) == (28, 512, 3.5)
    schnell = FLUX.limits_for({"guidance_embeds": False}, SCHNELL, None)
    assert (schnell.default_steps, schnell.max_sequence_length, schnell.default_guidance) == (4, 256, 0.0)
    (tmp_path / "rayxdit.json").write_text(json.dumps({"default_steps": 6, "schedulers": ["euler"]}))
    tuned = FLUX.limits_for({"guidance_embeds": False}, SCHNELL, str(tmp_path))
    assert (tuned.default_steps, tuned.max_sequence_length, tuned.schedulers) == (6, 256, ("euler",))
    with pytest.raises(RequestError, match="choose one of: euler "):
        tuned.resolve(GenerateRequest(prompt="a cat", scheduler="unipc"))


def test_cards_read_the_samplers_from_the_checkpoint_files():
    """The ingress's card and the ranks' adapter compute the same limits (``Family.limits_for``)."""
    schnell = describe_model("tiny-flux-schnell")
    assert (schnell.limits.default_steps, schnell.limits.max_sequence_length) == (4, 256)
    assert schnell.limits.default_scheduler == "euler"
    assert describe_model("tiny-wan").limits.default_scheduler == "unipc"
    assert describe_model("tiny-sdxl").limits.schedulers[-1] == "ddim"
    assert describe_model("benchmarks.models:FLUX_DEV").limits.schedulers == ("euler", "dpm++2m", "unipc")
    assert ModelLimits().schedulers == (), "limits not read from a checkpoint offer no named sampler"
