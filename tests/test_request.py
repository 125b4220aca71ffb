"""The request's own rules: how control images pair with ControlNets (HTTP and CLI alike), what an empty
prompt is, and where an absent guidance comes from."""

from __future__ import annotations

import pytest

from rayxdit.request import MAX_CONTROLS, ControlInput, GenerateRequest, RequestError, pair_controls

A, B = b"image a", b"image b"


def test_control_images_pair_with_controlnets_as_diffusers_lists_do():
    # No name: the model's only ControlNet reads every image; one scale for all.
    assert pair_controls([A, B], [], [0.5], [], ("net",)) == (
        ControlInput(image=A, controlnet="net", scale=0.5),
        ControlInput(image=B, controlnet="net", scale=0.5),
    )
    # One name, scale and mode per image.
    assert pair_controls([A, B], ["x", "y"], [0.3, 0.7], [2, 1], ("x", "y")) == (
        ControlInput(image=A, controlnet="x", scale=0.3, mode=2),
        ControlInput(image=B, controlnet="y", scale=0.7, mode=1),
    )
    # Where the pools are not known here, names stay as given (the engine checks them).
    assert pair_controls([A], [], [], [], None) == (ControlInput(image=A),)
    assert pair_controls([], [], [1.0], [], ("net",)) == ()


@pytest.mark.parametrize(
    ("images", "names", "scales", "modes", "loaded", "param"),
    [
        ([], ["net"], [], [], ("net",), "controlnet"),  # a name without an image
        ([], [], [], [1], ("net",), "control_mode"),
        ([A], [], [], [], (), "control_image"),  # a model without ControlNets
        ([A], [], [], [], ("x", "y"), "controlnet"),  # which one?
        ([A, B], ["x"], [], [], ("x", "y"), "controlnet"),  # one name, several nets: say each
        ([A], ["z"], [], [], ("x", "y"), "controlnet"),  # not loaded
        ([A, B], [], [1.0, 1.0, 1.0], [], ("net",), "controlnet_scale"),  # neither one nor one each
        ([A], [], [4.5], [], ("net",), "controlnet_scale"),
        ([A], [], [], [-1], ("net",), "control_mode"),
        ([A] * (MAX_CONTROLS + 1), [], [], [], ("net",), "control_image"),
    ],
)
def test_bad_control_pairings_name_the_field(images, names, scales, modes, loaded, param):
    with pytest.raises(RequestError) as refused:
        pair_controls(images, names, scales, modes, loaded)
    assert refused.value.param == param, str(refused.value)


def test_one_guidance_default_per_model_whatever_the_path():
    """A request that leaves guidance out gets its model's default when resolved (the CLI, HTTP and the
    batch job all resolve through ModelLimits), so the same prompt and seed make the same image."""
    from rayxdit.limits import ModelLimits
    from rayxdit.models.wan import WanAdapter

    request = GenerateRequest(prompt="a fox")
    assert request.guidance is None
    assert WanAdapter.family.limits.resolve(request).request.guidance == 5.0
    assert ModelLimits().resolve(request).request.guidance == 3.5
    assert ModelLimits().resolve(request.model_copy(update={"guidance": 2.0})).request.guidance == 2.0
    assert WanAdapter.uses_cfg(request) and WanAdapter.cfg_scale(request) == 5.0


def test_prompts_of_only_spaces_or_control_characters_are_empty():
    from pydantic import ValidationError

    for prompt in ("   ", "\x00\x00", "\t\n\x1b"):
        with pytest.raises(ValidationError, match="empty"):
            GenerateRequest(prompt=prompt)
    assert GenerateRequest(prompt=" a\x00b ").prompt == " a\x00b "
