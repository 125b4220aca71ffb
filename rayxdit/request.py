"""One generation request, as every layer (CLI, HTTP, batch, workers) passes it down, and its result.

Imports neither torch nor PIL at run time: the HTTP ingress uses these types without the model stack.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rayxdit.loras import MAX_LORA_NAME, MAX_LORA_SCALE, MAX_LORAS, LoraNameError, check_lora_name

if TYPE_CHECKING:
    import torch
    from PIL import Image

MAX_PROMPT_CHARS = 2000
MAX_STEPS = 200
MAX_IMAGES = 8
MAX_PARTIAL_IMAGES = 3
"""OpenAI's bound on ``partial_images``: previews a streamed request gets before its image."""
MAX_FRAMES = 241
MAX_CONTROLS = 4
"""ControlNet inputs per request (diffusers' MultiControlNet sums their residuals)."""
MAX_CONTROL_SCALE = 4.0
MAX_CONTROL_MODE = 31
VIDEO_MEDIA_TYPES = {"mp4": "video/mp4", "png": "image/apng", "gif": "image/gif"}
"""The formats a video is delivered in (``rayxdit.imaging.encode_video``), with the media type of each."""


class ControlInput(BaseModel):
    """One ControlNet's input: which of the model's ControlNets reads which conditioning image, and how
    strongly (``controlnet_conditioning_scale``). Several make a MultiControlNet: their residuals add up."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")

    image: bytes = Field(
        description="The conditioning image (edges, depth...), resized to the request's size."
    )
    controlnet: str | None = Field(
        default=None,
        max_length=512,
        description="Which of the model's ControlNets reads ``image`` (default: its only one).",
    )
    scale: float = Field(
        default=1.0, ge=0.0, le=MAX_CONTROL_SCALE, description="The weight of its residuals."
    )
    mode: int | None = Field(
        default=None,
        ge=0,
        le=MAX_CONTROL_MODE,
        description="A union ControlNet's control mode (what ``image`` shows: canny, depth...; the "
        "checkpoint's numbering). Required by union ControlNets, refused by the others.",
    )


class LoraChoice(BaseModel):
    """One adapter a request stacks on the model: a name below its pool's ``lora_sources`` and a scale (the
    weight diffusers' ``set_adapters`` gives it)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: str = Field(
        min_length=1,
        max_length=MAX_LORA_NAME,
        description="The adapter, by its path below the pool's lora_sources without .safetensors "
        "(GET /v1/models lists them).",
    )
    scale: float = Field(
        default=1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, description="The weight of its update."
    )

    @field_validator("name")
    @classmethod
    def _adapter_name(cls, name: str) -> str:
        try:
            return check_lora_name(name)
        except LoraNameError as error:
            raise ValueError(str(error)) from None


def pair_controls(
    images: list[bytes],
    names: list[str],
    scales: list[float],
    modes: list[int],
    loaded: tuple[str, ...] | None = None,
) -> tuple[ControlInput, ...]:
    """Control images paired with the ControlNets that read them, as the HTTP API and the CLI take them
    (diffusers' lists): one name, scale and mode per image, or one for all; no name means the model's only
    ControlNet (``loaded``: the ControlNets the model loads, None where not known here). Raises
    :class:`RequestError`."""
    if not images:
        for values, param in ((names, "controlnet"), (modes, "control_mode")):
            if values:
                raise RequestError(f"{param}: send a control_image with it", param)
        return ()
    if len(images) > MAX_CONTROLS:
        raise RequestError(
            f"control_image: at most {MAX_CONTROLS} ControlNet inputs ({len(images)} sent)", "control_image"
        )
    if loaded is not None and not loaded:
        raise RequestError("control_image: this model is served without ControlNets", "control_image")

    def per_image(values: list, param: str, default: Any) -> list:
        if len(values) in (0, 1):
            return [values[0] if values else default] * len(images)
        if len(values) != len(images):
            raise RequestError(
                f"{param}: give one for all control images or one per image ({len(values)} for "
                f"{len(images)})",
                param,
            )
        return list(values)

    if not names and loaded is not None and len(loaded) > 1:
        raise RequestError(f"controlnet: name one of {', '.join(loaded)}", "controlnet")
    if len(names) == 1 and len(images) > 1 and loaded is not None and len(loaded) > 1:
        raise RequestError("controlnet: name the ControlNet of each control image", "controlnet")
    chosen = per_image(names, "controlnet", None if loaded is None else loaded[0])
    for name in chosen:
        if loaded is not None and name not in loaded:
            raise RequestError(
                f"controlnet: '{name}' is not loaded by this model (it loads {', '.join(loaded)})",
                "controlnet",
            )
    for scale in scales:
        if not 0.0 <= scale <= MAX_CONTROL_SCALE:
            raise RequestError(
                f"controlnet_scale={scale} is outside 0..{MAX_CONTROL_SCALE}", "controlnet_scale"
            )
    for mode in modes:
        if not 0 <= mode <= MAX_CONTROL_MODE:
            raise RequestError(f"control_mode={mode} is outside 0..{MAX_CONTROL_MODE}", "control_mode")
    return tuple(
        ControlInput(image=image, controlnet=name, scale=scale, mode=mode)
        for image, name, scale, mode in zip(
            images,
            chosen,
            per_image(scales, "controlnet_scale", 1.0),
            per_image(modes, "control_mode", None),
            strict=True,
        )
    )


class GenerateRequest(BaseModel):
    """Model-independent description of the images to make. Sizes and steps of ``None`` take the model's
    defaults; model-specific limits (size multiples, the largest size) are checked by the model adapter."""

    # Input images travel as their encoded bytes (PNG, JPEG, WebP): small, and the same on every rank; in
    # JSON (the batch job's rows) as base64.
    model_config = ConfigDict(
        frozen=True, extra="forbid", ser_json_bytes="base64", val_json_bytes="base64", allow_inf_nan=False
    )

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw.")
    negative_prompt: str | None = Field(
        default=None, max_length=MAX_PROMPT_CHARS, description="What to steer away from (true CFG)."
    )
    height: int | None = Field(default=None, ge=1, description="Image height in pixels.")
    width: int | None = Field(default=None, ge=1, description="Image width in pixels.")
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS, description="Denoising steps.")
    seed: int = Field(default=0, ge=0, lt=2**63, description="Image i of the request uses seed + i.")
    guidance: float | None = Field(
        default=None,
        ge=0.0,
        le=100.0,
        description="Flux.1-dev: the distilled guidance; SD3, SDXL and Wan: the CFG scale (on above 1). Default: "
        "the model's (its limits' default_guidance: Flux 3.5, SD3 7, SDXL 5, Wan 5).",
    )
    true_cfg_scale: float = Field(
        default=1.0,
        ge=1.0,
        le=100.0,
        description="True classifier-free guidance scale; > 1 with a negative prompt runs two branches.",
    )
    num_images: int = Field(default=1, ge=1, le=MAX_IMAGES, description="Images (or videos) for this prompt.")
    scheduler: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="The sampler (GET /v1/models lists each model's ``schedulers``); default: the "
        "checkpoint's own.",
    )
    num_frames: int | None = Field(
        default=None,
        ge=1,
        le=MAX_FRAMES,
        description="Video models: frames per video (default: the model's).",
    )
    cache_threshold: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="First-Block Cache threshold for this request where the model runs with step caching "
        "(0: exact, no step skipped; default: the model's configured threshold).",
    )
    partial_images: int = Field(
        default=0,
        ge=0,
        le=MAX_PARTIAL_IMAGES,
        description="Previews of the image as it forms (a streamed request's partial images): the prediction "
        "of the clean image decoded at evenly spaced steps (:func:`preview_steps`).",
    )
    image: bytes | None = Field(
        default=None,
        description="An input image (encoded: PNG, JPEG, WebP) to start from (img2img), resized to the "
        "request's size.",
    )
    mask: bytes | None = Field(
        default=None,
        description="With ``image``: where to repaint (white) and what to keep (black), as diffusers' "
        "inpainting pipelines take it.",
    )
    strength: float = Field(
        default=0.6,
        ge=0.0,
        le=1.0,
        description="With ``image``: how much of it is noised away (1: all of it; the last ``steps x "
        "strength`` steps of the schedule run).",
    )

    controls: tuple[ControlInput, ...] = Field(
        default=(),
        max_length=MAX_CONTROLS,
        description="ControlNet inputs (several: a MultiControlNet, their residuals summed).",
    )

    loras: tuple[LoraChoice, ...] = Field(
        default=(),
        max_length=MAX_LORAS,
        description=f"LoRA adapters for this request, at most {MAX_LORAS}, stacked (their updates summed); the "
        "model's pool must serve them (lora_sources).",
    )

    ip_adapter_image: bytes | None = Field(
        default=None, description="An IP-Adapter's image prompt (the model's pool must load an IP-Adapter)."
    )
    ip_adapter_scale: float = Field(
        default=1.0, ge=0.0, le=4.0, description="The weight of the IP-Adapter's attention."
    )

    @field_validator("prompt")
    @classmethod
    def _visible_prompt(cls, prompt: str) -> str:
        if not any(char.isprintable() and not char.isspace() for char in prompt):
            raise ValueError("the prompt is empty (only spaces or control characters)")
        return prompt

    @property
    def uses_true_cfg(self) -> bool:
        return self.true_cfg_scale > 1.0 and self.negative_prompt is not None

    @model_validator(mode="after")
    def _mask_needs_an_image(self) -> GenerateRequest:
        if self.mask is not None and self.image is None:
            raise ValueError("mask: an inpainting mask needs an image")
        return self

    @field_validator("loras")
    @classmethod
    def _each_adapter_once(cls, loras: tuple[LoraChoice, ...]) -> tuple[LoraChoice, ...]:
        names = [lora.name for lora in loras]
        if len(set(names)) < len(names):
            raise ValueError("an adapter is named twice (give it one scale)")
        return loras


class RequestError(ValueError):
    """A request the model cannot serve; ``param`` names the offending field (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


CANCELLED, DEADLINE = "cancelled", "deadline"


class RequestStopped(RuntimeError):
    """Every rank stopped the request at the same step boundary: it was cancelled (the client went away, a
    job was deleted) or its deadline passed. The group is left clean and usable."""

    def __init__(self, reason: str = CANCELLED, step: int | None = None):
        super().__init__(f"request {reason} at step {step}" if step is not None else f"request {reason}")
        self.reason = reason
        self.step = step


@dataclass
class GenerateResult:
    """What rank 0 makes: the images (or final latents) and where the time went."""

    images: list[Image.Image] = field(default_factory=list)
    """Every image; for a video model, every frame of every video in order."""
    latents: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)
    frames_per_video: int = 1
    """Above 1, ``images`` holds videos of this many frames each."""

    @property
    def videos(self) -> list[list[Image.Image]]:
        """The frames of each video (an image is a video of one frame)."""
        step = self.frames_per_video
        return [self.images[i : i + step] for i in range(0, len(self.images), step)]


def engine_seconds(timings: dict[str, float]) -> float | None:
    """The engine's time for a request (encode + denoise + decode): what a pool's service time is learned
    from, and times its ranks, the request's GPU-seconds. None when a part is missing."""
    parts = [timings.get(key) for key in ("encode_s", "denoise_s", "decode_s")]
    return sum(parts) if all(part is not None for part in parts) else None


@dataclass
class EncodedResult:
    """A :class:`GenerateResult` as it travels from rank 0 to its caller: images as PNG bytes (smaller and
    safer to move than PIL objects; the HTTP API sends them as they are)."""

    pngs: list[bytes] = field(default_factory=list)
    latents: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)
    frames_per_video: int = 1
    partials: dict[int, bytes] = field(default_factory=dict)
    """Partial images (PNG, by index) no progress poll fetched before the request ended: a streamed
    request's caller sends them before the image."""

    def decode(self) -> GenerateResult:
        from PIL import Image

        images = [Image.open(io.BytesIO(data)) for data in self.pngs]
        return GenerateResult(images, self.latents, self.timings, self.frames_per_video)


def preview_steps(steps: int, partial_images: int) -> tuple[int, ...]:
    """The steps (0-based) after which a request with ``partial_images`` previews makes them: evenly spaced
    over its ``steps``, never the last (the image itself), distinct (fewer previews when steps are few)."""
    if partial_images <= 0 or steps < 2:
        return ()
    spaced = {round((index + 1) * steps / (partial_images + 1)) - 1 for index in range(partial_images)}
    return tuple(sorted(step for step in spaced if 0 <= step < steps - 1))
