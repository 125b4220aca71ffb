"""Reading and checking what a client sent, before any GPU work: bodies (JSON or forms), uploaded and base64
images, ControlNet, IP-Adapter and LoRA fields, and the request they make with the model's defaults and limits.

Every problem is an :class:`~rayxdit.serve.api.ApiError` 400 naming the field. Images are decoded off the
event loop, within the upload bounds of :mod:`rayxdit.uploads`.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError

from rayxdit.limits import ResolvedRequest
from rayxdit.loras import LoraNameError, find_lora
from rayxdit.request import GenerateRequest, RequestError, pair_controls
from rayxdit.serve import metrics
from rayxdit.serve.api import (
    ApiError,
    ImageEditJsonRequest,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageReference,
    VideoGenerationRequest,
    invalid,
    request_error_from,
    request_error_from_validation,
    shown_id,
)
from rayxdit.serve.catalog import Catalog
from rayxdit.uploads import MAX_UPLOAD_BYTES, check_mask, inspect_image, size_for

MAX_EDIT_BODY_BYTES = 2 * MAX_UPLOAD_BYTES + (1 << 20)
"""An edit's whole body: an image, a mask and the form fields."""
MAX_FORM_FIELDS = 64
LISTED_EDIT_FIELDS = ("controlnet", "controlnet_scale", "control_mode")
"""Form fields an edit may repeat, one per control image (in their order)."""
IMAGE_PARTS = ("image", "mask", "control_image", "ip_adapter_image")
"""Form parts that are files, not fields."""


def listed(value: Any) -> list:
    """A field that takes one value or a list of them, as a list (none: empty)."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def from_request_error(error: RequestError) -> ApiError:
    return invalid(str(error), error.param)


def validated_body(schema: type[BaseModel], data: dict[str, Any], form: bool = False) -> Any:
    """``data`` as ``schema`` (JSON strictly; a ``form``'s text fields converted); the first problem as the
    400 FastAPI's own bodies get."""
    try:
        return schema.model_validate(data, strict=not form)
    except ValidationError as error:
        problem = request_error_from_validation(error.errors()[0])
        raise from_request_error(problem) from None


async def read_form(http: Request, max_files: int = 1000) -> Any:
    """The request's form (at most ``max_files`` files); 400 when it cannot be read."""
    try:
        return await http.form(max_files=max_files, max_fields=MAX_FORM_FIELDS)
    except Exception as error:
        raise invalid(f"request form unreadable: {error}") from None


async def read_body(http: Request, schema: type[BaseModel]) -> Any:
    """The body as ``schema``, from JSON or a form (OpenAI's client sends forms to some endpoints); 400
    for anything else."""
    content_type = http.headers.get("content-type", "").lower()
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await read_form(http)
        data: Any = {name: value for name, value in form.items() if isinstance(value, str)}
        return validated_body(schema, data, form=True)
    return validated_body(schema, await json_object(http))


async def json_object(http: Request) -> dict[str, Any]:
    """The request's JSON body, which must be an object; 400 otherwise."""
    try:
        data = json.loads(await http.body())
    except ValueError as error:
        raise invalid(f"request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise invalid("request body must be a JSON object")
    return data


async def upload(file: Any, param: str) -> tuple[bytes, tuple[int, int]]:
    """An uploaded image's bytes and size, read within MAX_UPLOAD_BYTES and decoded once off the event
    loop; 400 for anything that is not a usable image."""
    if isinstance(file, str):
        raise invalid(f"{param}: send it as a file part of the form", param)
    data = await file.read(MAX_UPLOAD_BYTES + 1)
    return data, await checked_image(data, param)


def _base64_image(encoded: str, param: str) -> bytes:
    """A base64 image (a data: URL too) as bytes; 400 when it is not base64."""
    try:
        return base64.b64decode(
            encoded.split(",", 1)[1] if encoded.startswith("data:") else encoded, validate=True
        )
    except ValueError:
        raise invalid(f"{param}: not base64", param) from None


async def checked_image(data: bytes, param: str) -> tuple[int, int]:
    """The size of an image a client sent, decoded once off the event loop within the upload bounds; 400 for
    anything that is not a usable image."""
    try:
        return await asyncio.to_thread(inspect_image, data, param)
    except RequestError as error:
        raise from_request_error(error) from None


async def image_field(encoded: str | None, file: Any, param: str) -> bytes | None:
    """An image field: a form's file, or base64 (a data: URL too), checked as uploads are."""
    if file is not None:
        return (await upload(file, param))[0]
    if encoded is None:
        return None
    data = _base64_image(encoded, param)
    await checked_image(data, param)
    return data


FileReader = Callable[[str], Awaitable[bytes | None]]
"""``file_id -> content``: the caller's uploaded file (None: it has none of that id)."""


async def referenced_image(
    reference: ImageReference, param: str, read_file: FileReader
) -> tuple[bytes, tuple[int, int]]:
    """The image a JSON body points at (OpenAI's ``{"image_url"}`` as a data: URL, or ``{"file_id"}``): its
    bytes and size, checked as uploads are. URLs are not fetched: the server would reach wherever a client
    points it."""
    if (reference.image_url is None) == (reference.file_id is None):
        raise invalid(f"{param}: give image_url (a data: URL) or file_id, one of them", param)
    if reference.image_url is not None:
        if not reference.image_url.startswith("data:"):
            raise invalid(
                f"{param}: this server fetches no URLs; send the image as a data: URL (base64), or upload it "
                "(POST /v1/files, purpose=vision) and send its file_id",
                param,
            )
        data = _base64_image(reference.image_url, param)
    else:
        found = await read_file(reference.file_id)
        if found is None:
            raise invalid(
                f"{param}: no file '{shown_id(reference.file_id)}' (upload it with POST /v1/files)", param
            )
        data = found
    return data, await checked_image(data, param)


async def control_inputs(catalog: Catalog, body: ImageGenerationRequest, files: list[Any]) -> dict[str, Any]:
    """A request's ControlNet fields: every control image (``files``, a form's, or the body's base64)
    decodes, and pairs with a ControlNet the model's pools load (:func:`~rayxdit.request.pair_controls`)."""
    if files:
        images = [await image_field(None, file, "control_image") for file in files]
    else:
        images = [await image_field(data, None, "control_image") for data in listed(body.control_image)]
    engine = catalog.engine_of(body.model)
    try:
        controls = pair_controls(
            images,
            listed(body.controlnet),
            listed(body.controlnet_scale),
            listed(body.control_mode),
            None if engine is None else tuple(engine.controlnets),
        )
    except RequestError as error:
        model = body.model or catalog.default_model["image"]
        raise invalid(str(error).replace("this model", f"model '{model}'"), error.param) from None
    return {"controls": controls} if controls else {}


async def conditioning_inputs(
    catalog: Catalog, body: ImageGenerationRequest, form: Any = None
) -> dict[str, Any]:
    """A request's ControlNet and IP-Adapter fields (see :func:`control_inputs`); the model's pools must
    load an IP-Adapter for an image prompt."""
    files = [] if form is None else form.getlist("control_image") + form.getlist("control_image[]")
    inputs = await control_inputs(catalog, body, files)
    file = None if form is None else form.get("ip_adapter_image")
    image_prompt = await image_field(body.ip_adapter_image, file, "ip_adapter_image")
    if image_prompt is None:
        return inputs
    engine = catalog.engine_of(body.model)
    if engine is not None and not engine.ip_adapter:
        model = body.model or catalog.default_model["image"]
        raise invalid(
            f"ip_adapter_image: model '{model}' is served without an IP-Adapter", "ip_adapter_image"
        )
    return {**inputs, "ip_adapter_image": image_prompt, "ip_adapter_scale": body.ip_adapter_scale}


def check_loras(catalog: Catalog, model: str, request: GenerateRequest) -> None:
    """Refuse (RequestError) adapters the model's pools do not serve: none configured, or a name none of its
    sources holds (where this process sees the sources; else the ranks answer the same 400)."""
    if not request.loras:
        return
    sources = catalog.engine_of(model).lora_sources
    if not sources:
        raise RequestError(f"loras: model '{model}' is served without LoRA adapters", "loras")
    if not any(os.path.isdir(source) for source in sources):
        return
    for lora in request.loras:
        try:
            find_lora(sources, lora.name)
        except LoraNameError as error:
            raise RequestError(f"loras: {error}", "loras") from None


def flattened_loras(fields: dict[str, Any]) -> dict[str, Any]:
    """A form's ``loras[0][name]``, ``loras[0][scale]``... (how OpenAI's client sends a list of objects in a
    form) as one ``loras`` list; other fields as they are."""
    items: dict[int, dict[str, Any]] = {}
    rest = {}
    for key, value in fields.items():
        match = _FLAT_LORA.fullmatch(key)
        if match:
            items.setdefault(int(match.group(1)), {})[match.group(2)] = value
        else:
            rest[key] = value
    if items:
        rest["loras"] = [items[index] for index in sorted(items)]
    return rest


_FLAT_LORA = re.compile(r"loras\[(\d{1,2})\]\[(name|scale)\]")


def validated_request(
    catalog: Catalog,
    body: ImageGenerationRequest | VideoGenerationRequest,
    http: Request,
    inputs: dict[str, Any] | None = None,
) -> tuple[str, GenerateRequest, ResolvedRequest]:
    """The model, the request (with ``inputs``: checked input images and their fields) and its resolved
    sizes; 400 before any GPU work. Sets the request's metric labels (:func:`resolve`)."""
    http.state.labels = {"model": "", "pool": "", "size_class": ""}
    model, request, resolved = resolve(catalog, body, inputs, http.state.labels)
    return model, request, resolved


def resolve(
    catalog: Catalog,
    body: ImageGenerationRequest | VideoGenerationRequest,
    inputs: dict[str, Any] | None,
    labels: dict[str, str],
) -> tuple[str, GenerateRequest, ResolvedRequest]:
    """:func:`validated_request` for a body that came without an HTTP request of its own (a batch's line),
    its metric ``labels`` filled in: only served names become labels (a client's typo must not make a new
    time series)."""
    kind = "video" if isinstance(body, VideoGenerationRequest) else "image"
    model = catalog.model_named(body.model, kind)
    version = catalog.version_named(model, body.model_version)
    labels["model"] = model
    limits = catalog.cards[model].limits
    seed = secrets.randbelow(2**31)
    try:
        if isinstance(body, VideoGenerationRequest):
            request = body.to_generate_request(seed, limits.frames_for)
        else:
            request = body.to_generate_request(seed)
        if inputs:
            try:
                request = GenerateRequest.model_validate({**request.model_dump(), **inputs})
            except ValidationError as error:
                raise request_error_from(error) from None
        resolved = dataclasses.replace(limits.resolve(request), model_version=version)
        check_loras(catalog, model, request)
    except RequestError as error:
        param = "frames" if error.param == "num_frames" else error.param
        raise invalid(str(error), param) from None
    labels["size_class"] = metrics.size_class(resolved.width, resolved.height)
    return model, request, resolved


async def edit_inputs(
    catalog: Catalog, http: Request, read_file: FileReader
) -> tuple[ImageEditRequest, dict[str, Any]]:
    """``POST /v1/images/edits``: the form's fields and its checked images (the input image, a mask of its
    size, control images, an image prompt), or the same as a JSON body (:func:`json_edit_inputs`); the size
    defaults to the image's, fitted to the model."""
    content_type = http.headers.get("content-type", "").lower()
    if int(http.headers.get("content-length") or 0) > MAX_EDIT_BODY_BYTES:
        raise invalid(
            f"the request is larger than {MAX_EDIT_BODY_BYTES} bytes (each image at most {MAX_UPLOAD_BYTES})",
            "image",
        )
    if content_type.startswith("application/json"):
        return await json_edit_inputs(catalog, await json_object(http), read_file)
    if not content_type.startswith("multipart/form-data"):
        raise invalid(
            "send a multipart form with an 'image' file, as OpenAI's client does, or a JSON body with "
            '"images": [{"image_url": "data:image/png;base64,..."}]'
        )
    form = await read_form(http, max_files=8)
    images = form.getlist("image") + form.getlist("image[]")
    if len(images) != 1:
        raise invalid(f"image: send one input image ({len(images)} sent)", "image")
    fields: dict[str, Any] = {}
    for name, value in form.multi_items():
        key = name.removesuffix("[]")
        if not isinstance(value, str) or key in IMAGE_PARTS:
            continue
        if key in fields and key in LISTED_EDIT_FIELDS:
            fields[key] = [*listed(fields[key]), value]
        else:
            fields[key] = value
    body: ImageEditRequest = validated_body(ImageEditRequest, flattened_loras(fields), form=True)
    image = await upload(images[0], "image")
    mask = None if form.get("mask") is None else await upload(form["mask"], "mask")
    return await _edit(catalog, body, image, mask, form)


async def json_edit_inputs(
    catalog: Catalog, data: dict[str, Any], read_file: FileReader
) -> tuple[ImageEditRequest, dict[str, Any]]:
    """An edit sent as JSON (OpenAI's JSON form of ``POST /v1/images/edits``, and an edits batch's lines):
    ``images`` (one) and ``mask`` as ``{"image_url": <data: URL>}`` or ``{"file_id"}``, control images and the
    image prompt as base64; checked as the form is."""
    body: ImageEditJsonRequest = validated_body(ImageEditJsonRequest, data)
    image = await referenced_image(body.images[0], "images", read_file)
    mask = None if body.mask is None else await referenced_image(body.mask, "mask", read_file)
    return await _edit(catalog, body, image, mask)


async def _edit(
    catalog: Catalog,
    body: ImageEditRequest,
    image: tuple[bytes, tuple[int, int]],
    mask: tuple[bytes, tuple[int, int]] | None,
    form: Any = None,
) -> tuple[ImageEditRequest, dict[str, Any]]:
    """An edit's request fields and inputs: the mask fits the image, the size defaults to the image's."""
    if mask is not None:
        try:
            check_mask(mask[1], image[1])
        except RequestError as error:
            raise invalid(str(error), "mask") from None
    model = body.model or catalog.default_model["image"]
    if body.size is None and model in catalog.cards:
        width, height = size_for(image[1], catalog.cards[model].limits)
        body = body.model_copy(update={"size": f"{width}x{height}"})
    inputs = {"image": image[0], "mask": None if mask is None else mask[0], "strength": body.strength}
    inputs |= await conditioning_inputs(catalog, body, form)
    return body, inputs


def video_fields(
    catalog: Catalog, model: str, body: VideoGenerationRequest, resolved: ResolvedRequest
) -> dict:
    """What a video job's object shows of its request (size, duration, frames, fps)."""
    fps = catalog.cards[model].limits.fps
    return {
        "prompt": body.prompt,
        "size": f"{resolved.width}x{resolved.height}",
        "seconds": f"{resolved.frames / fps:g}",
        "frames": resolved.frames,
        "fps": fps,
    }
