"""HTTP schema: the OpenAI images API (``POST /v1/images/generations``) plus rayxdit's own fields, and the
one error shape every failure uses: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rayxdit.loras import MAX_LORAS
from rayxdit.request import (
    MAX_IMAGES,
    MAX_PARTIAL_IMAGES,
    MAX_PROMPT_CHARS,
    MAX_STEPS,
    GenerateRequest,
    LoraChoice,
    RequestError,
)
from rayxdit.uploads import MAX_UPLOAD_BYTES

SIZE_PATTERN = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")
SCHEDULER_FIELD = Field(
    default=None,
    max_length=64,
    description="The sampler, one of the model's (GET /v1/models: schedulers); default: the checkpoint's own "
    "(rayxdit).",
)
"""The ``scheduler`` field of the images and videos APIs, declared once."""
LORAS_FIELD = Field(
    default_factory=list,
    max_length=MAX_LORAS,
    description=f'LoRA adapters, at most {MAX_LORAS}, stacked: [{{"name": ..., "scale": 0.8}}] with names '
    "from GET /v1/models (loras) (rayxdit; forms: the list as JSON text, or loras[0][name]...).",
)
"""The ``loras`` field of the images and videos APIs, declared once."""


def _loras_from_text(value: Any) -> Any:
    """A form's ``loras`` (JSON text) as the list JSON bodies send."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise ValueError("loras: send a JSON list of {name, scale}") from None
    return value


class ImageGenerationRequest(BaseModel):
    """Body of ``POST /v1/images/generations``. OpenAI's fields keep their meaning; ``quality``, ``style``
    and ``user`` are accepted and ignored so that OpenAI clients work unchanged. JSON is read strictly (a
    number sent as a string is refused); forms, whose fields are all text, are read with conversions."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: str = Field(description="What to draw.", max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(
        default=None, description="A name from GET /v1/models; default: the first model."
    )
    model_version: str | None = Field(
        default=None,
        description="Pin a version of the model (GET /v1/models lists them, rayxdit); default: the versions "
        "share the requests by their traffic weights.",
    )
    n: int = Field(default=1, ge=1, le=MAX_IMAGES, description="Number of images.")
    size: str | None = Field(
        default=None, description='"WIDTHxHEIGHT", e.g. "1024x1024"; default: the model\'s.'
    )
    response_format: Literal["b64_json", "url"] = Field(
        default="b64_json", description="How images come back."
    )
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS, description="Denoising steps (rayxdit).")
    scheduler: str | None = SCHEDULER_FIELD
    loras: list[LoraChoice] = LORAS_FIELD
    seed: int | None = Field(default=None, ge=0, description="Random seed; image i uses seed + i (rayxdit).")
    guidance: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description="Flux.1-dev: distilled guidance; SD3, SDXL: the CFG scale (rayxdit). Default: the model's "
        "(GET /v1/models: default_guidance).",
    )
    negative_prompt: str | None = Field(
        default=None, max_length=MAX_PROMPT_CHARS, description="For true CFG."
    )
    true_cfg_scale: float = Field(
        default=1.0, ge=1, le=100, description="True CFG scale (> 1 with a negative prompt)."
    )
    timeout: float | None = Field(
        default=None,
        gt=0,
        le=86400,
        description="Seconds after which the request is stopped and answered 504 (rayxdit); default and "
        "upper bound: the pool's request_timeout_s.",
    )
    cache_threshold: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="First-Block Cache threshold (rayxdit; lossy): only on pools configured with step caching; "
        "0 turns it off for this request.",
    )
    quality: str | None = Field(default=None, description="Accepted for OpenAI compatibility; ignored.")
    style: str | None = Field(default=None, description="Accepted for OpenAI compatibility; ignored.")
    user: str | None = Field(default=None, description="Accepted for OpenAI compatibility; ignored.")
    background: bool = Field(
        default=False,
        description="Answer at once with a job to poll at GET /v1/images/generations/{id} (rayxdit; also "
        "by the header 'Prefer: respond-async').",
    )
    control_image: str | list[str] | None = Field(
        default=None,
        description="A ControlNet's conditioning image, base64 (or a data: URL), or a list of them: several "
        "ControlNets at once, their residuals summed (rayxdit; edits take them as files).",
    )
    controlnet: str | list[str] | None = Field(
        default=None,
        description="Which ControlNet of the model (GET /v1/models) reads the control image; a list: one per "
        "image. Default: the model's only one.",
    )
    controlnet_scale: float | list[float] = Field(
        default=1.0,
        description="controlnet_conditioning_scale, 0..4: one for all control images or one each (rayxdit).",
    )
    control_mode: int | list[int] | None = Field(
        default=None,
        description="Union ControlNets: what each control image shows (the checkpoint's numbering) (rayxdit).",
    )
    ip_adapter_image: str | None = Field(
        default=None,
        description="An IP-Adapter's image prompt, base64 (or a data: URL) (rayxdit; edits take it as a file); "
        "on models whose pools load an IP-Adapter.",
    )
    ip_adapter_scale: float = Field(
        default=1.0, ge=0, le=4, description="The image prompt's weight (rayxdit)."
    )
    stream: bool = Field(
        default=False,
        description="Answer as server-sent events, as OpenAI streams images: `partial_images` previews "
        "(`image_generation.partial_image`, `image_edit.partial_image` for edits), then the image "
        "(`...completed`), each as b64_json; n must be 1.",
    )
    partial_images: int = Field(
        default=0,
        ge=0,
        le=MAX_PARTIAL_IMAGES,
        description="With stream: previews at evenly spaced steps, each the clean image as predicted there "
        "(fewer when the request has few steps; none on PipeFusion pools).",
    )

    _loras_text = field_validator("loras", mode="before")(_loras_from_text)

    def to_generate_request(self, default_seed: int) -> GenerateRequest:
        width, height = parse_size(self.size)
        try:
            return GenerateRequest(
                prompt=self.prompt,
                negative_prompt=self.negative_prompt,
                height=height,
                width=width,
                steps=self.steps,
                seed=default_seed if self.seed is None else self.seed,
                guidance=self.guidance,
                true_cfg_scale=self.true_cfg_scale,
                num_images=self.n,
                cache_threshold=self.cache_threshold,
                scheduler=self.scheduler,
                loras=tuple(self.loras),
                partial_images=self.partial_images if self.stream else 0,
            )
        except ValidationError as error:
            raise request_error_from(error) from None


class ImageEditRequest(ImageGenerationRequest):
    """The form fields of ``POST /v1/images/edits`` (OpenAI's; the files ``image`` and ``mask`` come
    beside them): those of generations plus ``strength``. OpenAI's output options (``background``,
    ``input_fidelity``, ``output_format``...) are accepted and ignored so that its client works unchanged."""

    strength: float = Field(
        default=0.6,
        ge=0,
        le=1,
        description="How much of the image is noised away (1: all; the last steps x strength steps run).",
    )
    background: str | None = Field(default=None, description="Accepted for OpenAI compatibility; ignored.")
    input_fidelity: str | None = Field(
        default=None, description="Accepted for OpenAI compatibility; ignored."
    )
    output_format: str | None = Field(default=None, description="Accepted for OpenAI compatibility; ignored.")
    output_compression: int | None = Field(
        default=None, description="Accepted for OpenAI compatibility; ignored."
    )


MAX_DATA_URL_CHARS = 4 * (MAX_UPLOAD_BYTES // 3) + 1024
"""The longest base64 image (a data: URL) a JSON body may hold: an upload's bound, encoded."""


class ImageReference(BaseModel):
    """An input image of a JSON edit, as OpenAI's API takes one: ``{"image_url": "data:image/png;base64,..."}``
    or ``{"file_id": "file-..."}`` (a file uploaded with POST /v1/files, purpose ``vision`` or ``user_data``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    image_url: str | None = Field(
        default=None, max_length=MAX_DATA_URL_CHARS, description="The image as a data: URL (base64)."
    )
    file_id: str | None = Field(default=None, max_length=128, description="An uploaded image file's id.")


class ImageEditJsonRequest(ImageEditRequest):
    """``POST /v1/images/edits`` as a JSON body (OpenAI's JSON form of it, and the lines of an edits batch):
    the fields of the form, with the input image in ``images`` (one) and the mask as references to images
    instead of file parts."""

    images: list[ImageReference] = Field(
        min_length=1, max_length=1, description="The image to edit (one): [{image_url} or {file_id}]."
    )
    mask: ImageReference | None = Field(
        default=None,
        description="White: repaint, black: keep; the image's size (rayxdit reads it as a form's).",
    )


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """``"WIDTHxHEIGHT"`` as (width, height); (None, None) for no size."""
    if size is None:
        return None, None
    match = SIZE_PATTERN.match(size)
    if not match:
        raise RequestError(f"size '{size}' is not of the form WIDTHxHEIGHT, e.g. 1024x1024", "size")
    width, height = int(match.group(1)), int(match.group(2))
    if width == 0 or height == 0:
        raise RequestError(f"size '{size}' has a zero side", "size")
    return width, height


class VideoGenerationRequest(BaseModel):
    """Body of ``POST /v1/videos`` (JSON or a multipart form, as OpenAI's client sends it). OpenAI's fields
    keep their meaning (``seconds``, ``size``); ``frames``, ``steps``, ``seed``, ``guidance`` and
    ``negative_prompt`` are rayxdit's. JSON is read strictly, forms with conversions."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: str = Field(description="What to film.", max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(
        default=None, description="A video model from GET /v1/models; default: the first one."
    )
    model_version: str | None = Field(
        default=None,
        description="Pin a version of the model (GET /v1/models lists them, rayxdit); default: the versions "
        "share the requests by their traffic weights.",
    )
    size: str | None = Field(default=None, description='"WIDTHxHEIGHT"; default: the model\'s.')
    seconds: float | None = Field(
        default=None,
        gt=0,
        le=60,
        description="Duration; becomes the nearest frame count the model takes at its fps. Not with frames.",
    )
    frames: int | None = Field(
        default=None,
        ge=1,
        description="Frames (1 + a multiple of the model's frame_multiple); default: the model's.",
    )
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS, description="Denoising steps.")
    scheduler: str | None = SCHEDULER_FIELD
    loras: list[LoraChoice] = LORAS_FIELD
    seed: int | None = Field(default=None, ge=0, lt=2**63, description="Random seed.")
    guidance: float | None = Field(
        default=None, ge=0, le=100, description="CFG scale (on above 1); default: the model's (Wan: 5)."
    )
    negative_prompt: str | None = Field(
        default=None, max_length=MAX_PROMPT_CHARS, description="What to steer away from."
    )
    timeout: float | None = Field(
        default=None,
        gt=0,
        le=86400,
        description="Seconds after which the job is stopped and fails with deadline_exceeded; default and "
        "upper bound: the pool's request_timeout_s.",
    )
    user: str | None = Field(default=None, description="Accepted for OpenAI compatibility; ignored.")

    _loras_text = field_validator("loras", mode="before")(_loras_from_text)

    def to_generate_request(self, default_seed: int, frames_for_seconds: Any) -> GenerateRequest:
        """The request; ``frames_for_seconds``: the model's ``ModelLimits.frames_for``."""
        width, height = parse_size(self.size)
        if self.seconds is not None and self.frames is not None:
            raise RequestError("give seconds or frames, not both", "seconds")
        frames = self.frames if self.seconds is None else frames_for_seconds(self.seconds)
        try:
            return GenerateRequest(
                prompt=self.prompt,
                negative_prompt=self.negative_prompt,
                height=height,
                width=width,
                steps=self.steps,
                seed=default_seed if self.seed is None else self.seed,
                guidance=self.guidance,
                num_frames=frames,
                scheduler=self.scheduler,
                loras=tuple(self.loras),
            )
        except ValidationError as error:
            raise request_error_from(error) from None


_FIELD_TO_PARAM = {"num_images": "n", "height": "size", "width": "size", "num_frames": "frames"}


def request_error_from(error: ValidationError) -> RequestError:
    """The first problem of a pydantic error as a RequestError naming the API field."""
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = _FIELD_TO_PARAM.get(location[0], location[0]) if location else None
    where = f"{param}: " if param else ""
    return RequestError(f"{where}{first['msg']}", param)


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class BatchCreateRequest(BaseModel):
    """Body of ``POST /v1/batches`` (OpenAI's Batch API)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    input_file_id: str = Field(
        max_length=128, description="A JSONL file uploaded with POST /v1/files, purpose=batch."
    )
    endpoint: str = Field(
        description="Where every line goes: /v1/images/generations, /v1/images/edits or /v1/videos."
    )
    completion_window: str = Field(
        default="24h",
        max_length=16,
        description='"24h", as OpenAI; rayxdit also takes other windows up to 168h ("90m", "30s"): lines not '
        "run by then end in the error file as batch_expired.",
    )
    metadata: dict[str, str] | None = Field(
        default=None, max_length=16, description="Up to 16 key-value pairs, shown with the batch."
    )


class ImageGenerationResponse(BaseModel):
    created: int
    data: list[ImageData]
    rayxdit: dict[str, Any] = Field(
        default_factory=dict, description="Which pool served the request, its cost and where the time went."
    )


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


SHOWN_ID_CHARS = 64
"""An id longer than this is cut short where an answer repeats it."""


def shown_id(text: str) -> str:
    """``text`` as an answer may repeat it: at most SHOWN_ID_CHARS characters."""
    return text if len(text) <= SHOWN_ID_CHARS else text[:SHOWN_ID_CHARS] + "..."


RETRY_AFTER_S = 5
"""The Retry-After of a 429 or 503 that knows no better wait."""


class ApiError(Exception):
    """An answer other than 200, raised anywhere in the ingress and rendered as the one error shape (with
    ``Retry-After`` on 429 and 503)."""

    def __init__(
        self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code
        self.retry_after: float | None = None
        """Seconds for the Retry-After header of a 429 or 503 (default: RETRY_AFTER_S)."""


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 ``invalid_request_error``: the request itself is wrong, before any GPU work."""
    return ApiError(400, message, "invalid_request_error", param, code)


def request_error_from_validation(first: dict[str, Any]) -> RequestError:
    """A pydantic (or FastAPI) validation problem as a RequestError naming the body's field (or the query's
    or path's parameter: FastAPI's location says where it is, the name is what a client can act on)."""
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    if not location:
        return RequestError(f"request body: {first.get('msg')}")
    if first.get("type") == "extra_forbidden":
        return RequestError(f"unknown field '{location[0]}'", location[0])
    return RequestError(f"{location[0]}: {first.get('msg')}", location[0])


class PoolOutOfMemoryError(RuntimeError):
    """A request needed more memory than its pool's ranks have (HTTP 507): not retried, since the same
    ranks would fail the same way; the group is rebuilt before the pool's next request."""


class PoolUnavailableError(RuntimeError):
    """A pool replica could not run a request even after rebuilding its worker group (HTTP 503). Defined
    here, not beside the replica, so that the router can recognize it without importing the runtime."""


class ReplicaQuarantinedError(RuntimeError):
    """The replica's node left service for failing hardware (``rayxdit.serve.quarantine``) before or while
    it ran the request, which did not run there again: the router routes it again, as for a replica that
    died (the replica exits right after)."""


def error_payload(
    message: str, kind: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=code)).model_dump()
