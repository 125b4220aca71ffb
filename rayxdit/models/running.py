"""One request as it runs on one rank: the resolved request and everything that belongs to it alone.

A :class:`RunningRequest` is made by the engine for every request and passed through every hook of the
loop (encode, initial latents, predict, decode); nothing of one request is kept on the long-lived model
adapter, so hooks may run in any order and a request cannot see another's leftovers. Per-request features
(an input image's latents, ControlNet conditioning, the step control that may stop the request, the step
cache's threshold; later per-request adapters and previews) add a field here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rayxdit.limits import ResolvedRequest
from rayxdit.parallel.control import UNCONTROLLED, StepControl
from rayxdit.request import GenerateRequest


@dataclass
class SourceImage:
    """A request's input image in the loop's latent layout, full size (every rank alike): the encoded
    image's latents (``[B, tokens, C]``) and, for inpainting, the mask per latent (1: repaint, 0: keep)."""

    latents: torch.Tensor
    mask: torch.Tensor | None = None


@dataclass(eq=False)
class RunningRequest:
    """A request on this rank, from its resolution to its decode. Reads like the :class:`ResolvedRequest`
    it runs (``req.width``, ``req.steps``, ``req.request.seed``...) and carries the request's own state."""

    resolved: ResolvedRequest
    control: StepControl = UNCONTROLLED
    """Checked at every step boundary: the group may agree to stop the request (cancelled, deadline)."""
    progress: bool = False
    """Show a progress bar on the driver rank (the CLI)."""
    cache_threshold: float = 0.0
    """This request's First-Block Cache threshold (0: exact), where the model runs with step caching."""
    source: SourceImage | None = None
    """The input image (img2img, inpainting), set by the family's ``initial_latents``."""
    control_condition: Any = None
    """The conditioning ControlNets read (Flux: the prompt's, for either CFG branch), set when encoding."""
    preview_steps: tuple[int, ...] = ()
    """Steps after which the loop hands the prediction of the clean latents to ``preview`` (a streamed
    request's partial images; :func:`~rayxdit.request.preview_steps`)."""
    preview: Callable[[torch.Tensor], None] | None = None
    """Called on every rank with the full predicted clean latents (the loop's layout) at ``preview_steps``."""

    @property
    def request(self) -> GenerateRequest:
        return self.resolved.request

    @property
    def height(self) -> int:
        return self.resolved.height

    @property
    def width(self) -> int:
        return self.resolved.width

    @property
    def steps(self) -> int:
        return self.resolved.steps

    @property
    def frames(self) -> int:
        return self.resolved.frames

    @property
    def batch(self) -> int:
        return self.resolved.batch
