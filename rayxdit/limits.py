"""What a model accepts and how it treats guidance, as plain data: no torch, no diffusers.

A :class:`ModelCard` is read from a model's config files alone (no weights). The HTTP ingress, the batch
driver and the CLI validate and price requests with it before any rank is involved; the model adapters use
the same :class:`ModelLimits` and the same CFG rules, so the two sides cannot disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rayxdit.config import ConfigError, ParallelConfig
from rayxdit.request import GenerateRequest, RequestError

if TYPE_CHECKING:
    from rayxdit.config import EngineConfig

SETTINGS_FILE = "rayxdit.json"
"""A model directory may hold this file with serving defaults and limits (the fields of ModelLimits)."""


def request_work(width: int, height: int, frames: int = 1, images: int = 1) -> float:
    """Megapixels x frames x images: what a request's activation memory grows with, and (times its steps and
    CFG branches) its routing cost."""
    return width * height / 1e6 * frames * images


@dataclass(frozen=True)
class ResolvedRequest:
    """A request with the model's defaults filled in and its limits checked."""

    request: GenerateRequest
    height: int
    width: int
    steps: int
    frames: int = 1
    model_version: str | None = None
    """The version of the model the request pins (None: the versions share it by their weights)."""

    @property
    def batch(self) -> int:
        return self.request.num_images

    @property
    def work(self) -> float:
        """:func:`request_work` of this request."""
        return request_work(self.width, self.height, self.frames, self.batch)


@dataclass(frozen=True)
class ModelLimits:
    """Serving defaults and limits of one model; a ``rayxdit.json`` in the model directory overrides them."""

    default_height: int = 1024
    """Height when a request gives none."""
    default_width: int = 1024
    """Width when a request gives none."""
    default_steps: int = 28
    """Denoising steps when a request gives none."""
    max_side: int = 2048
    """Largest height or width accepted."""
    size_multiple: int = 16
    """Height and width must be multiples of this (VAE factor x patch size)."""
    max_sequence_length: int = 512
    """Text tokens fed to the transformer."""
    default_frames: int = 1
    """Video models: frames when a request gives none (1: an image model)."""
    max_frames: int = 1
    """Video models: most frames accepted."""
    frame_multiple: int = 1
    """Video models: ``frames - 1`` must be a multiple of this (the VAE's temporal factor)."""
    fps: int = 16
    """Video models: frames per second of the output (and of a request's ``seconds``)."""
    default_guidance: float = 3.5
    """``guidance`` when a request gives none: one default per model, whatever path the request takes
    (HTTP, CLI, batch). Flux.1-dev's distilled guidance; the CFG scale of SD3, SDXL and Wan."""
    image_inputs: bool = False
    """Whether the family takes input images (img2img, inpainting, Kontext's references); set by the adapter."""
    kontext_auto_resize: bool | None = None
    """Kontext models (else None): resize a reference image to the nearest resolution Kontext was trained at
    (diffusers' default), or keep its size (False)."""
    schedulers: tuple[str, ...] = ()
    """Samplers a request may name (``scheduler``, from :mod:`rayxdit.schedulers`); set from the checkpoint's
    scheduler config, a ``rayxdit.json`` may narrow the list."""
    default_scheduler: str | None = None
    """The name of the checkpoint's own sampler, which a request naming none runs (None: a scheduler of
    the checkpoint's that is not in the list; it still runs by default)."""
    attention_cost_per_megapixel: float = 0.0
    """How much dearer a denoising step gets per megapixel of one sample's sequence (width x height x frames),
    from attention's quadratic part: routing prices a step of ``s`` such megapixels at ``s x (1 + a x s) / (1
    + a)`` cost units (one unit: a step of a one-megapixel image). 0: linear in pixels (families not
    measured); Flux's is measured (:data:`rayxdit.models.families.FLUX`)."""

    @property
    def makes_video(self) -> bool:
        return self.max_frames > 1

    def frames_for(self, seconds: float) -> int:
        """The frame count closest to ``seconds`` at :attr:`fps` that the model accepts (``1 + k x
        frame_multiple``); may exceed :attr:`max_frames`, which :meth:`resolve` then refuses."""
        frames = max(1, round(seconds * self.fps))
        return 1 + self.frame_multiple * max(0, round((frames - 1) / self.frame_multiple))

    def updated(self, overrides: dict[str, Any]) -> ModelLimits:
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"{SETTINGS_FILE}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        if isinstance(overrides.get("schedulers"), list):  # JSON has no tuples
            overrides = {**overrides, "schedulers": tuple(overrides["schedulers"])}
        attention = overrides.get("attention_cost_per_megapixel", 0.0)
        if isinstance(attention, bool) or not isinstance(attention, int | float) or attention < 0:
            raise ValueError(
                f"{SETTINGS_FILE}: attention_cost_per_megapixel must be a number >= 0 (0: a request's cost "
                f"linear in its pixels), got {attention!r}"
            )
        return ModelLimits(**{**self.__dict__, **overrides})

    def resolve(self, request: GenerateRequest) -> ResolvedRequest:
        """Fill in defaults and check limits; raises :class:`RequestError` naming the field."""
        height = request.height or self.default_height
        width = request.width or self.default_width
        for name, value in (("height", height), ("width", width)):
            if value % self.size_multiple:
                raise RequestError(f"{name}={value} must be a multiple of {self.size_multiple}", param="size")
            if not self.size_multiple <= value <= self.max_side:
                raise RequestError(
                    f"{name}={value} is outside {self.size_multiple}..{self.max_side}", param="size"
                )
        frames = request.num_frames or self.default_frames
        if not self.makes_video and frames > 1:
            raise RequestError(f"frames={frames}: this model makes images, not videos", param="num_frames")
        if frames > self.max_frames or (frames - 1) % self.frame_multiple:
            raise RequestError(
                f"frames={frames} must be 1 + a multiple of {self.frame_multiple}, at most {self.max_frames}",
                param="num_frames",
            )
        steps = request.steps or self.default_steps
        if request.scheduler is not None and request.scheduler not in self.schedulers:
            choices = ", ".join(self.schedulers) or "none"
            raise RequestError(
                f"scheduler '{request.scheduler}' is not offered for this model; choose one of: {choices} "
                "(or send none: the checkpoint's own)",
                "scheduler",
            )
        if request.image is not None:
            if not self.image_inputs:
                raise RequestError("image: this model takes no input images", "image")
            if request.controls and self.kontext_auto_resize is not None:
                raise RequestError("control_image: Kontext edits take no ControlNet", "control_image")
            if self.kontext_auto_resize is not None and request.mask is not None:
                raise RequestError("mask: Kontext edits follow the prompt, without a mask", "mask")
            if self.kontext_auto_resize is None and int(steps * request.strength) < 1:
                raise RequestError(
                    f"strength={request.strength} x steps={steps} leaves no denoising step: raise either",
                    "strength",
                )
        if request.guidance is None:
            request = request.model_copy(update={"guidance": self.default_guidance})
        return ResolvedRequest(request, height, width, steps, frames)

    @classmethod
    def for_pipeline(cls, family_defaults: ModelLimits, model_dir: str | None) -> ModelLimits:
        if model_dir is None:
            return family_defaults
        path = Path(model_dir) / SETTINGS_FILE
        return family_defaults.updated(json.loads(path.read_text())) if path.is_file() else family_defaults


def guidance_of(request: GenerateRequest, default_guidance: float | None) -> float:
    """The request's guidance, or the model's default when it gives none."""
    if request.guidance is not None:
        return request.guidance
    if default_guidance is None:
        raise ValueError("the request's guidance is the model's default: resolve the request first")
    return default_guidance


def uses_cfg(guidance_is_cfg: bool, request: GenerateRequest, default_guidance: float | None = None) -> bool:
    """Whether ``request`` runs two branches per step. Families trained with CFG (SD3, SDXL, Wan) take
    ``guidance`` as the CFG scale, on above 1; guidance-distilled Flux runs CFG only as true CFG (a negative
    prompt and ``true_cfg_scale > 1``)."""
    if not guidance_is_cfg:
        return request.uses_true_cfg
    return guidance_of(request, default_guidance) > 1.0


def cfg_scale(
    guidance_is_cfg: bool, request: GenerateRequest, default_guidance: float | None = None
) -> float:
    """The scale of the guidance formula for ``request`` (see :func:`uses_cfg`)."""
    return guidance_of(request, default_guidance) if guidance_is_cfg else request.true_cfg_scale


def check_parallel(
    config: ParallelConfig,
    pipeline_class: str,
    supports_pipefusion: bool,
    num_heads: int,
    num_layers: int,
    shard_weights: bool = False,
    supports_sharded_weights: bool = False,
    offload: bool = False,
    supports_offload: bool = False,
) -> None:
    """Raise :class:`ConfigError` when ``config`` cannot split a model of these traits (with
    ``shard_weights``: spread its weights too; with ``offload``: keep them in host memory)."""
    config.check_heads(num_heads)
    if config.pipefusion > 1 and not supports_pipefusion:
        raise ConfigError(
            f"pipefusion={config.pipefusion}: PipeFusion is implemented for Flux; split "
            f"{pipeline_class} with cfg, ring and ulysses"
        )
    config.check_layers(num_layers)
    if shard_weights and not supports_sharded_weights:
        raise ConfigError(
            f"shard_weights: {pipeline_class}'s weights are not sharded (transformer families' are: Flux, SD3, "
            "Wan; a UNet fits one GPU)"
        )
    if shard_weights and config.world_size == 1:
        raise ConfigError("shard_weights spreads the weights over a group's ranks: give parallel 2+ ranks")
    if offload and not supports_offload:
        raise ConfigError(f"offload: {pipeline_class}'s weights are not offloaded (Flux's are)")


@dataclass(frozen=True)
class ModelCard:
    """Everything serving needs to know about one model, read from its config files (no weights, no torch):
    its limits and its family's traits. Computed once where an application is built and handed to the HTTP
    ingress as data, so a router replica never loads the model stack."""

    location: str
    """The preset name, directory or hub id the ranks load."""
    pipeline_class: str
    """The diffusers pipeline class (the key of `rayxdit.models.families.FAMILIES`)."""
    num_heads: int
    num_layers: int
    limits: ModelLimits = field(default_factory=ModelLimits)
    guidance_is_cfg: bool = True
    """``guidance`` is the CFG scale (SD3, SDXL, Wan); False for guidance-distilled Flux."""
    supports_pipefusion: bool = False
    supports_sharded_weights: bool = False
    supports_offload: bool = False
    supports_single_file: bool = False

    def uses_cfg(self, request: GenerateRequest) -> bool:
        return uses_cfg(self.guidance_is_cfg, request, self.limits.default_guidance)

    def check_parallel(
        self, config: ParallelConfig, shard_weights: bool = False, offload: bool = False
    ) -> None:
        """Raise :class:`ConfigError` when ``config`` cannot split this model (or spread its weights, or
        offload them)."""
        check_parallel(
            config,
            self.pipeline_class,
            self.supports_pipefusion,
            self.num_heads,
            self.num_layers,
            shard_weights,
            self.supports_sharded_weights,
            offload,
            self.supports_offload,
        )

    def check_engine(self, engine: EngineConfig) -> None:
        """Raise :class:`ConfigError` when ``engine`` cannot run this model: its split, its memory mode, or a
        single-file checkpoint its family does not load."""
        self.check_parallel(engine.parallel, engine.shard_weights, engine.offload)
        if engine.checkpoint and not self.supports_single_file:
            raise ConfigError(
                f"checkpoint: {self.pipeline_class} models do not load from single files (Flux, Kontext, SDXL "
                "and SD 1.5 do); give a diffusers directory as the model instead"
            )
