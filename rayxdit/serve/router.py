"""The HTTP ingress: its endpoints, authentication and error shape. It validates every request before any
GPU work (``serve/inputs.py``), hands it to the dispatcher (``serve/dispatch.py``: routing, the pool call,
failover, deadlines) or the job driver (``serve/job_driver.py``), and renders the answer.

Endpoints: ``POST /v1/images/generations`` (OpenAI images API; with ``background`` a job to poll at
``GET``/``DELETE /v1/images/generations/{id}``), ``POST /v1/images/edits``, ``POST /v1/generate`` (returns
the PNG itself), ``GET /v1/images/{id}.png`` (for ``response_format=url``), the OpenAI videos API
(``POST /v1/videos`` creates a job; ``GET /v1/videos``, ``GET``/``DELETE /v1/videos/{id}``,
``GET /v1/videos/{id}/content``), OpenAI's Files and Batch APIs (``/v1/files``, ``/v1/batches``: a
batch's lines run on the pools' idle replicas, ``serve/batch_driver.py``), ``GET /v1/models``, ``GET /healthz``, ``GET /readyz`` and the OpenAPI
docs at ``/docs``. Every error is ``{"error": {"message", "type", "param", "code"}}``.

The endpoints are plain FastAPI functions over an :class:`Ingress` (``build_ingress_app``): the Serve
deployment :class:`Router` builds one with handles to the pools and the state; tests build one without Ray
to check what is refused before any pool is reached.

A router replica needs no GPU, no CPU reservation and no model stack: it imports neither torch nor
diffusers, and learns each model's limits and traits from the :class:`ModelCard` the application builder
hands it.
"""

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from rayxdit.config import ApiKey, ServeConfig, TenantLimits
from rayxdit.limits import ModelCard, ResolvedRequest
from rayxdit.request import VIDEO_MEDIA_TYPES, EncodedResult, GenerateRequest
from rayxdit.serve import metrics
from rayxdit.serve.api import (
    RETRY_AFTER_S,
    ApiError,
    BatchCreateRequest,
    ImageData,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageGenerationResponse,
    VideoGenerationRequest,
    error_payload,
    invalid,
    request_error_from_validation,
    shown_id,
)
from rayxdit.serve.batch_driver import BatchDriver
from rayxdit.serve.batches import ENDPOINTS, batch_object, window_seconds
from rayxdit.serve.catalog import Catalog
from rayxdit.serve.dispatch import Dispatcher, PartialSink
from rayxdit.serve.files import UPLOAD_PURPOSES
from rayxdit.serve.inputs import (
    conditioning_inputs,
    edit_inputs,
    read_body,
    read_form,
    validated_request,
    video_fields,
)
from rayxdit.serve.job_driver import JobDriver
from rayxdit.serve.jobs import COMPLETED
from rayxdit.serve.keys import KeyRing
from rayxdit.serve.tasks import ask_state, detached, file_reader, keep_cancellations_quiet, quiet
from rayxdit.serve.tenants import UsageQueryError, rows_by_model, usage_window_query

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
logger = logging.getLogger("ray.serve")
MAX_HEADERS = 100
MAX_HEADER_BYTES = 64 << 10
"""Bounds of a request's headers (count, and bytes of names and values together): beyond them, 431 before
anything reads them further. A browser sends about 20 headers of a few KB."""


class QueueingIsExpected(logging.Filter):
    """Serve's handle warns when it has retried to find a pool replica for a request many times; here
    that is the design (each pool replica runs one request at a time and the others queue at the handle),
    so the warning is kept at debug level."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and str(record.msg).startswith("Failed to route request after"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logger.isEnabledFor(logging.DEBUG)
        return True


def request_id_of(request: Request) -> str:
    """The request's id: its ``X-Request-Id`` (the client's, else the one Serve's proxy generated and put
    there; the proxy echoes it in the response) when it is a sane token, else a new one."""
    given = request.headers.get("x-request-id", "")
    return given if REQUEST_ID.match(given) else uuid.uuid4().hex


class Ingress:
    """One router replica's parts: the served models (:class:`Catalog`), the dispatcher, the job driver and
    the application's shared state. ``dispatcher`` and ``state`` are None only where nothing may reach a
    pool (tests of what the ingress refuses)."""

    def __init__(
        self,
        config: ServeConfig,
        catalog: Catalog,
        dispatcher: Dispatcher | None,
        state: DeploymentHandle | None,
        replica: str,
    ):
        self.config = config
        self.catalog = catalog
        self.dispatcher = dispatcher
        self.state = state
        self.replica = replica
        self.jobs = JobDriver(state, dispatcher) if dispatcher is not None else None
        self.batches = (
            BatchDriver(state, dispatcher, catalog, self.image_data, replica)
            if dispatcher is not None
            else None
        )
        self.keys = KeyRing(config.router)

    def caller(self, request: Request) -> ApiKey | None:
        """The accepted key the request carries (matched by its SHA-256); None without one."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        return self.keys.lookup(token)

    def authorized(self, request: Request) -> bool:
        """Whether the request carries one of the API keys (always, without keys)."""
        return not self.keys.required or self.caller(request) is not None

    def authorize(self, request: Request) -> None:
        """401 unless the request carries a key (without keys: anyone); the key goes to
        ``request.state.caller`` (None without keys): its tenant's limits are the request's."""
        key = self.caller(request) if self.keys.required else None
        if self.keys.required and key is None:
            raise ApiError(
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                "authentication_error",
                code="invalid_api_key",
            )
        request.state.caller = key

    @staticmethod
    def owner(request: Request) -> str:
        """Whose jobs a caller sees: a digest of its API key (everyone's alike without keys)."""
        token = request.headers.get("authorization", "").partition(" ")[2]
        return hashlib.sha256(token.encode()).hexdigest()[:24] if token else ""

    async def generate(
        self, body: ImageGenerationRequest, http: Request, inputs: dict[str, Any] | None = None
    ) -> tuple[EncodedResult, dict[str, Any]]:
        model, request, resolved = validated_request(self.catalog, body, http, inputs)
        return await self._run(body, http, model, request, resolved)

    async def _run(
        self,
        body: ImageGenerationRequest,
        http: Request,
        model: str,
        request: GenerateRequest,
        resolved: ResolvedRequest,
        on_partial: PartialSink | None = None,
    ) -> tuple[EncodedResult, dict[str, Any]]:
        """A validated request run by the dispatcher, on the caller's tenant, timed from its arrival."""
        tenant, limits = tenant_of(http.state.caller)
        return await self.dispatcher.run(
            model,
            request,
            resolved,
            http.state.request_id,
            body.timeout,
            http.state.labels,
            tenant=tenant,
            limits=limits,
            arrived=getattr(http.state, "arrived", None),
            on_partial=on_partial,
        )

    async def stream(
        self, body: ImageGenerationRequest, http: Request, inputs: dict[str, Any] | None, events: str
    ) -> StreamingResponse:
        """A streamed request (``stream: true``): server-sent events as OpenAI streams images, ``events``
        naming them (``image_generation``, ``image_edit``): each partial image as the pool makes it, then
        the image. The answer starts with the first event, so that what fails before it (a refusal, a
        deadline, a failed pool) is the plain JSON error of an unstreamed request; a failure after it is
        an ``error`` event. A client that closes the stream cancels the request: its ranks stop at the next
        step."""
        if body.n != 1:
            raise invalid("n: a streamed request makes one image; send n=1 or stream=false", "n")
        model, request, resolved = validated_request(self.catalog, body, http, inputs)
        partials: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        sent: set[int] = set()

        def on_partial(index: int, png: bytes) -> None:
            if index not in sent:  # a retried attempt makes them again
                sent.add(index)
                partials.put_nowait((index, png))

        run = asyncio.ensure_future(self._run(body, http, model, request, resolved, on_partial))
        run.add_done_callback(quiet)
        size = f"{resolved.width}x{resolved.height}"
        try:
            first = await _next_partial(partials, run)
        except BaseException:
            run.cancel()
            raise
        if first is None:
            run.result()  # an error before any event is an ordinary JSON error
        return StreamingResponse(
            _events(first, partials, run, events, size, http.state.request_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def image_data(self, pngs: list[bytes], response_format: str, base_url: str) -> list[ImageData]:
        if response_format == "b64_json":
            return [ImageData(b64_json=base64.b64encode(png).decode()) for png in pngs]
        data = []
        for png in pngs:
            key = await ask_state(lambda png=png: self.state.put_image.remote(png), "storing an image")
            if key is None:
                raise invalid(
                    "the image is larger than the router's image store (router.max_stored_bytes); "
                    "use response_format=b64_json",
                    "response_format",
                )
            data.append(ImageData(url=f"{base_url}/v1/images/{key}.png"))
        return data

    async def start_job(
        self, kind: str, http: Request, model: str, request, resolved, timeout, fields, deliver
    ):
        http.state.job = True
        return await self.jobs.start(
            kind,
            self.owner(http),
            model,
            request,
            resolved,
            timeout,
            fields,
            http.state.labels,
            deliver,
            http.state.request_id,
            *tenant_of(http.state.caller),
        )

    async def job(self, job_id: str, kind: str, http: Request, action: str = "get_job") -> Any:
        return await self.jobs.find(job_id, kind, self.owner(http), action)


async def _next_partial(
    partials: asyncio.Queue[tuple[int, bytes]], run: asyncio.Future
) -> tuple[int, bytes] | None:
    """The next partial image of a streamed request, or None once it has ended (``run`` done) with none
    left."""
    if not partials.empty() or run.done():
        return None if partials.empty() else partials.get_nowait()
    waiting = asyncio.ensure_future(partials.get())
    try:
        await asyncio.wait({waiting, run}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not waiting.done():
            waiting.cancel()
    if waiting.done() and not waiting.cancelled():
        return waiting.result()
    return None if partials.empty() else partials.get_nowait()


def _event(kind: str, payload: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


async def _events(
    first: tuple[int, bytes] | None,
    partials: asyncio.Queue[tuple[int, bytes]],
    run: asyncio.Future,
    events: str,
    size: str,
    request_id: str,
) -> AsyncIterator[bytes]:
    """A streamed request's events (OpenAI's fields; PNG, opaque), from its ``first`` partial image on."""
    shape = {"size": size, "quality": "auto", "background": "opaque", "output_format": "png"}
    try:
        partial = first
        while partial is not None:
            index, png = partial
            yield _event(
                f"{events}.partial_image",
                {
                    "type": f"{events}.partial_image",
                    "b64_json": base64.b64encode(png).decode(),
                    "partial_image_index": index,
                    "created_at": int(time.time()),
                    **shape,
                },
            )
            partial = await _next_partial(partials, run)
        try:
            result, info = run.result()
        except ApiError as error:
            payload = error_payload(str(error), error.kind, error.param, error.code)
            yield _event("error", {"type": "error", **payload})
            return
        except Exception as error:  # pool_error renders every pool failure; anything else is ours
            logger.error("request %s: stream failed: %r", request_id, error)
            message = f"internal error in request {request_id}; the server log has the details"
            yield _event("error", {"type": "error", **error_payload(message, "server_error")})
            return
        yield _event(
            f"{events}.completed",
            {
                "type": f"{events}.completed",
                "b64_json": base64.b64encode(result.pngs[0]).decode(),
                "created_at": int(time.time()),
                **shape,
                "usage": NO_TOKENS,
                "rayxdit": info,
            },
        )
    finally:  # the client closed the stream (or it ended): a request still running stops
        if not run.done():
            run.cancel()


NO_TOKENS = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}
"""OpenAI's completed event has a token count (GPT image models'); diffusion has none."""


def tenant_of(key: ApiKey | None) -> tuple[str | None, TenantLimits | None]:
    """Whom a request counts against: its key's tenant and that tenant's limits (nobody without keys)."""
    return (None, None) if key is None else (key.tenant_name, key.limits())


def ingress_of(request: Request) -> Ingress:
    return request.app.state.ingress


IngressOf = Annotated[Ingress, Depends(ingress_of)]
"""An endpoint's parameter: the ingress of the application serving the request."""


# ----- the answer's shape, its id and its accounting ------------------------------------------------------
def _error(
    status: int, message: str, kind: str, param: str | None = None, code: str | None = None, **headers
):
    return JSONResponse(
        error_payload(message, kind, param, code), status_code=status, headers=headers or None
    )


async def _observe(request: Request, call_next):
    """Every request's headers within bounds (431 beyond them); every generation request: its id (the
    client's ``X-Request-Id`` or a new one) in the response headers and the log, and counted by status and
    error code with its end-to-end time."""
    raw = request.headers.raw
    size = sum(len(name) + len(value) for name, value in raw)
    if len(raw) > MAX_HEADERS or size > MAX_HEADER_BYTES:
        return _error(
            431,
            f"request headers too large: {len(raw)} headers, {size} bytes (at most {MAX_HEADERS} and "
            f"{MAX_HEADER_BYTES})",
            "invalid_request_error",
            code="headers_too_large",
        )
    if request.method != "POST":
        return await call_next(request)
    began = time.monotonic()
    request.state.arrived = time.time()  # a request's timeout counts from here, parsing included
    request.state.request_id = request_id_of(request)
    try:
        response = await call_next(request)
    except asyncio.CancelledError:  # the client went away (or Serve's request timeout fired)
        _account(request, "499", "cancelled", time.monotonic() - began)
        raise
    except RuntimeError as error:
        if str(error) != NO_RESPONSE:
            raise
        # Starlette's way of saying the endpoint ended without an answer: its client went away and Serve
        # cancelled it. Raised on, it would end Serve's request task in an error that nobody reads, logged
        # with a traceback ("Task exception was never retrieved") for an ordinary disconnect.
        _account(request, "499", "cancelled", time.monotonic() - began)
        return Response(status_code=499)
    # No X-Request-Id header here: Serve's proxy adds one to every answer (the client's id, else the one it
    # generated and handed on in the request's headers, which request_id_of takes).
    code = getattr(request.state, "error_code", None) or ("" if response.status_code < 400 else "error")
    seconds = None if getattr(request.state, "job", False) else time.monotonic() - began  # a job's answer
    _account(request, str(response.status_code), code, seconds)
    return response


NO_RESPONSE = "No response returned."
"""What Starlette's ``BaseHTTPMiddleware.call_next`` raises when the endpoint sent no response (cancelled)."""


def _account(request: Request, status: str, code: str, seconds: float | None) -> None:
    """``seconds`` None: the answer is a job, whose time says nothing of the generation's latency."""
    labels = getattr(request.state, "labels", None) or {"model": "", "pool": "", "size_class": ""}
    metrics.inc("rayxdit_requests", **labels, status=status, code=code)
    if status == "200" and seconds is not None:
        metrics.observe("rayxdit_request_seconds", seconds, **labels)
    logger.info(
        "request %s: %s %s -> %s%s in %.3f s (pool %s)",
        request.state.request_id,
        request.method,
        request.url.path,
        status,
        f" {code}" if code else "",
        seconds or 0.0,
        labels["pool"] or "-",
    )


async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    request.state.error_code = error.code or error.kind
    wait = math.ceil(error.retry_after or RETRY_AFTER_S)
    headers = {"Retry-After": str(wait)} if error.status in (429, 503) else {}
    if error.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="rayxdit"'
    return _error(error.status, str(error), error.kind, error.param, error.code, **headers)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    request.state.error_code = "invalid_request"
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return _error(400, f"request body is not valid JSON: {first.get('msg')}", "invalid_request_error")
    problem = request_error_from_validation(first)
    return _error(400, str(problem), "invalid_request_error", problem.param)


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    request.state.error_code = "http_error"
    return _error(error.status_code, str(error.detail), "invalid_request_error")


# ----- endpoints ------------------------------------------------------------------------------------------
api = APIRouter()


@api.post("/v1/images/generations", response_model=ImageGenerationResponse)
async def images_generations(
    ingress: IngressOf, body: ImageGenerationRequest, request: Request
) -> ImageGenerationResponse | JSONResponse:
    """OpenAI-compatible image generation. With ``background`` (or ``Prefer: respond-async``): 202 and a
    job to poll at ``GET /v1/images/generations/{id}``, whose ``result`` is this response once done."""
    ingress.authorize(request)
    base = str(request.base_url).rstrip("/")
    inputs = await conditioning_inputs(ingress.catalog, body)
    if body.background or "respond-async" in request.headers.get("prefer", ""):
        if body.stream:
            raise invalid("stream: a background job is polled, not streamed; send one or the other", "stream")
        model, generate, resolved = validated_request(ingress.catalog, body, request, inputs)

        async def deliver(result: EncodedResult, info: dict[str, Any]):
            data = await ingress.image_data(result.pngs, body.response_format, base)
            shown = ImageGenerationResponse(created=int(time.time()), data=data, rayxdit=info)
            return [], shown.model_dump(exclude_none=True)

        fields = {"prompt": body.prompt, "size": f"{resolved.width}x{resolved.height}", "n": body.n}
        job = await ingress.start_job(
            "image", request, model, generate, resolved, body.timeout, fields, deliver
        )
        location = f"{base}/v1/images/generations/{job['id']}"
        return JSONResponse(job, status_code=202, headers={"Location": location})
    if body.stream:
        return await ingress.stream(body, request, inputs, "image_generation")
    result, info = await ingress.generate(body, request, inputs)
    data = await ingress.image_data(result.pngs, body.response_format, base)
    return ImageGenerationResponse(created=int(time.time()), data=data, rayxdit=info)


@api.get("/v1/images/generations/{job_id}")
async def image_job(ingress: IngressOf, job_id: str, request: Request) -> dict[str, Any]:
    """A background image job: its status and progress; once completed, ``result`` holds the images."""
    ingress.authorize(request)
    return await ingress.job(job_id, "image", request)


@api.delete("/v1/images/generations/{job_id}")
async def delete_image_job(ingress: IngressOf, job_id: str, request: Request) -> dict[str, Any]:
    """Cancel a background image job (its ranks stop at the next step boundary), or delete a finished
    one."""
    ingress.authorize(request)
    return await ingress.job(job_id, "image", request, "cancel_job")


@api.post(
    "/v1/images/edits",
    response_model=ImageGenerationResponse,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": ImageEditRequest.model_json_schema()}},
        }
    },
)
async def images_edits(ingress: IngressOf, request: Request) -> ImageGenerationResponse:
    """OpenAI-compatible image edits (a multipart form, as OpenAI's client sends it): ``image`` (one file)
    and the prompt make an img2img request; a ``mask`` (white: repaint, black: keep; the image's size)
    makes it inpainting. ``size`` defaults to the image's, fitted to the model's limits."""
    ingress.authorize(request)
    request.state.labels = {"model": "", "pool": "", "size_class": ""}
    body, inputs = await edit_inputs(
        ingress.catalog, request, file_reader(ingress.state, ingress.owner(request))
    )
    if body.stream:
        return await ingress.stream(body, request, inputs, "image_edit")
    result, info = await ingress.generate(body, request, inputs)
    base = str(request.base_url).rstrip("/")
    data = await ingress.image_data(result.pngs, body.response_format, base)
    return ImageGenerationResponse(created=int(time.time()), data=data, rayxdit=info)


@api.post("/v1/generate", responses={200: {"content": {"image/png": {}}}})
async def generate_png(ingress: IngressOf, body: ImageGenerationRequest, request: Request) -> Response:
    """The first image as a PNG body (handy for curl -o); metadata in X-Rayxdit-* headers."""
    ingress.authorize(request)
    if body.background:
        raise invalid("background jobs: POST /v1/images/generations", "background")
    if body.stream:
        raise invalid("stream: POST /v1/images/generations streams; this endpoint answers one PNG", "stream")
    result, info = await ingress.generate(body, request, await conditioning_inputs(ingress.catalog, body))
    headers = {
        "X-Rayxdit-Gpu-Seconds": str(info["gpu_seconds"]),
        "X-Rayxdit-Timings": json.dumps(info["timings"]),
        "X-Rayxdit-Pool": info["pool"],
        "X-Rayxdit-Seed": str(info["seed"]),
        "X-Rayxdit-Cost": str(info["cost"]),
    }
    return Response(result.pngs[0], media_type="image/png", headers=headers)


@api.get("/v1/images/{image_id}.png", responses={200: {"content": {"image/png": {}}}})
async def stored_image(ingress: IngressOf, image_id: str, request: Request) -> Response:
    """An image made with response_format=url (kept router.image_ttl_s), from any router replica."""
    ingress.authorize(request)
    data = await ask_state(lambda: ingress.state.get_image.remote(image_id), f"image {shown_id(image_id)}")
    if data is None:
        raise ApiError(
            404, f"image {shown_id(image_id)} not found or expired", "invalid_request_error", "image_id"
        )
    return Response(data, media_type="image/png")


@api.post(
    "/v1/videos",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                media: {"schema": VideoGenerationRequest.model_json_schema()}
                for media in ("application/json", "multipart/form-data")
            },
        }
    },
)
async def create_video(ingress: IngressOf, request: Request) -> dict[str, Any]:
    """OpenAI-compatible video job: validated and priced now, answered at once with the job object
    (``queued``); poll ``GET /v1/videos/{id}``, then fetch ``GET /v1/videos/{id}/content``."""
    ingress.authorize(request)
    body: VideoGenerationRequest = await read_body(request, VideoGenerationRequest)
    model, generate, resolved = validated_request(ingress.catalog, body, request)
    fields = video_fields(ingress.catalog, model, body, resolved)

    async def deliver(result: EncodedResult, info: dict[str, Any]):
        return result.pngs, {"rayxdit": info}

    return await ingress.start_job("video", request, model, generate, resolved, body.timeout, fields, deliver)


@api.get("/v1/videos")
async def list_videos(ingress: IngressOf, request: Request, limit: int = 100) -> dict[str, Any]:
    """The caller's video jobs (those made with its API key), newest first."""
    ingress.authorize(request)
    if not 1 <= limit <= 1000:
        raise invalid("limit must be within 1..1000", "limit")
    owner = ingress.owner(request)
    data = await ask_state(lambda: ingress.state.list_jobs.remote(owner, "video", limit), "listing videos")
    return {"object": "list", "data": data, "has_more": False}


@api.get("/v1/videos/{video_id}")
async def video(ingress: IngressOf, video_id: str, request: Request) -> dict[str, Any]:
    """A video job: ``status`` (queued, in_progress, completed, failed, cancelled) and ``progress``."""
    ingress.authorize(request)
    return await ingress.job(video_id, "video", request)


@api.delete("/v1/videos/{video_id}")
async def delete_video(ingress: IngressOf, video_id: str, request: Request) -> dict[str, Any]:
    """Cancel a queued or running video job (its ranks stop at the next step boundary and its GPUs take
    the next request), or delete a finished one with its content."""
    ingress.authorize(request)
    return await ingress.job(video_id, "video", request, "cancel_job")


@api.get(
    "/v1/videos/{video_id}/content",
    responses={200: {"content": {media: {} for media in VIDEO_MEDIA_TYPES.values()}}},
)
async def video_content(
    ingress: IngressOf, video_id: str, request: Request, format: str = "mp4", variant: str = "video"
) -> Response:
    """The finished video: ``format`` mp4 (default), png (animated, lossless) or gif; 409 until the job
    has completed."""
    ingress.authorize(request)
    if format not in VIDEO_MEDIA_TYPES:
        raise invalid(f"format must be one of {', '.join(VIDEO_MEDIA_TYPES)}", "format")
    if variant != "video":
        raise invalid("only variant=video is served", "variant")
    job, frames = await ingress.job(video_id, "video", request, "job_content")
    if job["status"] != COMPLETED:
        raise ApiError(
            409,
            f"video {shown_id(video_id)} is {job['status']} ({job['progress']}%): its content exists once it has "
            "completed",
            "invalid_request_error",
            "id",
            "job_not_completed",
        )
    from rayxdit.imaging import encode_video  # PIL and imageio: loaded by the first video served

    data = await asyncio.to_thread(encode_video, frames, format, job["fps"])
    return Response(data, media_type=VIDEO_MEDIA_TYPES[format])


# ----- OpenAI's Files and Batch APIs ------------------------------------------------------------------------
MAX_FILE_BYTES = 200 << 20
"""Largest file accepted by ``POST /v1/files`` (OpenAI's limit for a batch's input); the state's store
(``router.max_job_bytes``) may hold less."""


def _not_found(what: str, name: str) -> ApiError:
    return ApiError(404, f"{what} {shown_id(name)} not found or expired", "invalid_request_error", "id")


@api.post("/v1/files")
async def create_file(ingress: IngressOf, request: Request) -> dict[str, Any]:
    """Upload a file (a multipart form: ``file`` and ``purpose``): a batch's input JSONL (``purpose=batch``),
    or an image for edits to name by ``file_id`` (``vision``, ``user_data``)."""
    ingress.authorize(request)
    request.state.job = True  # no generation: its time is no request latency
    if int(request.headers.get("content-length") or 0) > MAX_FILE_BYTES + (1 << 20):
        raise invalid(f"the file is larger than {MAX_FILE_BYTES} bytes", "file")
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise invalid("send a multipart form with 'file' and 'purpose', as OpenAI's client does", "file")
    form = await read_form(request, max_files=1)
    purpose, upload = form.get("purpose"), form.get("file")
    if purpose not in UPLOAD_PURPOSES:
        raise invalid(
            "purpose: 'batch' (a batch's input JSONL), or 'vision' or 'user_data' (an image a JSON edit or an "
            "edits batch's line names by file_id)",
            "purpose",
        )
    if upload is None or isinstance(upload, str):
        raise invalid("file: attach the JSONL file as 'file'", "file")
    content = await upload.read(MAX_FILE_BYTES + 1)
    if len(content) > MAX_FILE_BYTES:
        raise invalid(f"the file is larger than {MAX_FILE_BYTES} bytes", "file")
    owner, name = ingress.owner(request), (upload.filename or "input.jsonl")[:256]
    created = await ask_state(
        lambda: ingress.state.create_file.remote(owner, purpose, name, content), "storing a file"
    )
    if created is None:
        raise invalid("the file is larger than the router's store (router.max_job_bytes)", "file")
    return created


@api.get("/v1/files")
async def list_files(ingress: IngressOf, request: Request, purpose: str | None = None) -> dict[str, Any]:
    """The caller's files, newest first."""
    ingress.authorize(request)
    owner = ingress.owner(request)
    data = await ask_state(lambda: ingress.state.list_files.remote(owner, purpose), "listing files")
    return {"object": "list", "data": data, "has_more": False}


@api.get("/v1/files/{file_id}")
async def get_file(ingress: IngressOf, file_id: str, request: Request) -> dict[str, Any]:
    ingress.authorize(request)
    owner = ingress.owner(request)
    found = await ask_state(lambda: ingress.state.get_file.remote(file_id, owner), "reading a file")
    if found is None:
        raise _not_found("file", file_id)
    return found


@api.get("/v1/files/{file_id}/content", responses={200: {"content": {"application/octet-stream": {}}}})
async def file_content(ingress: IngressOf, file_id: str, request: Request) -> Response:
    """A file's bytes: a batch's input, or its output or error JSONL."""
    ingress.authorize(request)
    owner = ingress.owner(request)
    content = await ask_state(lambda: ingress.state.file_content.remote(file_id, owner), "reading a file")
    if content is None:
        raise _not_found("file", file_id)
    return Response(content, media_type="application/octet-stream")


@api.delete("/v1/files/{file_id}")
async def delete_file(ingress: IngressOf, file_id: str, request: Request) -> dict[str, Any]:
    ingress.authorize(request)
    owner = ingress.owner(request)
    if not await ask_state(lambda: ingress.state.delete_file.remote(file_id, owner), "deleting a file"):
        raise _not_found("file", file_id)
    return {"id": file_id, "object": "file", "deleted": True}


@api.post("/v1/batches")
async def create_batch(ingress: IngressOf, body: BatchCreateRequest, request: Request) -> dict[str, Any]:
    """Run every line of an uploaded JSONL file (OpenAI's Batch API) on the online pools' idle replicas;
    poll ``GET /v1/batches/{id}``, then read its ``output_file_id`` (and ``error_file_id``) with
    ``GET /v1/files/{id}/content``."""
    ingress.authorize(request)
    request.state.job = True
    if body.endpoint not in ENDPOINTS:
        raise invalid(f"endpoint: one of {', '.join(ENDPOINTS)}", "endpoint")
    try:
        window_seconds(body.completion_window)
    except ValueError as error:
        raise invalid(str(error), "completion_window") from None
    base = str(request.base_url).rstrip("/")
    return await ingress.batches.start(
        ingress.owner(request),
        body.input_file_id,
        body.endpoint,
        body.completion_window,
        body.metadata,
        base,
        *tenant_of(request.state.caller),
    )


@api.get("/v1/batches")
async def list_batches(
    ingress: IngressOf, request: Request, limit: int = 20, after: str | None = None
) -> dict[str, Any]:
    """The caller's batches, newest first (``after``: the last id of the previous page)."""
    ingress.authorize(request)
    if not 1 <= limit <= 100:
        raise invalid("limit must be within 1..100", "limit")
    owner = ingress.owner(request)
    jobs = await ask_state(lambda: ingress.state.list_jobs.remote(owner, "batch", 10_000), "listing batches")
    ids = [job["id"] for job in jobs]
    start = ids.index(after) + 1 if after in ids else 0
    page = [batch_object(job, time.time()) for job in jobs[start : start + limit]]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": start + limit < len(jobs),
    }


@api.get("/v1/batches/{batch_id}")
async def get_batch(ingress: IngressOf, batch_id: str, request: Request) -> dict[str, Any]:
    ingress.authorize(request)
    return batch_object(await ingress.job(batch_id, "batch", request), time.time())


@api.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(ingress: IngressOf, batch_id: str, request: Request) -> dict[str, Any]:
    """Cancel a batch: its lines under way stop at their ranks' next step boundary; the output and error
    files then hold what finished (``cancelling``, then ``cancelled``). A finished batch stays as it is."""
    ingress.authorize(request)
    request.state.job = True
    job = await ingress.job(batch_id, "batch", request)
    if job["status"] in ("queued", "in_progress"):
        job = await ingress.job(batch_id, "batch", request, "cancel_job")
    return batch_object(job, time.time())


@api.get("/v1/models")
async def models(ingress: IngressOf, request: Request) -> dict[str, Any]:
    """Models served, each with its pools (ranks, routing threshold, autoscaling bounds, memory per rank as
    measured)."""
    ingress.authorize(request)
    memory = None  # the listing stands without the state (an ingress alone, a state gone for good)
    if ingress.state is not None:
        with contextlib.suppress(ApiError):
            memory = await ask_state(lambda: ingress.state.memory.remote(), "the pools' memory")
    return ingress.catalog.listing(memory)


@api.get("/v1/usage")
async def usage(
    ingress: IngressOf,
    request: Request,
    by: Literal["tenant", "pool", "model"] = "tenant",
    start_time: float | None = None,
    end_time: float | None = None,
    bucket_width: Literal["1m", "1h", "1d"] | None = None,
) -> dict[str, Any]:
    """What the caller's tenant cost since usage is counted (the state replica's start; with state.redis_url,
    the application's first start): its requests and their GPU-seconds, and its share of the pools' idle and
    start-up GPU-seconds (in proportion to its use of each pool). An admin key (or a server without keys)
    sees every tenant, and what no tenant used (``unattributed``). ``?by=pool``: each tenant's rows pool by
    pool, with each pool's model under ``pools``; ``?by=model``: model by model.

    ``start_time`` (seconds since the epoch) with optional ``end_time`` (default: now) and ``bucket_width``
    (``1m``, ``1h``, ``1d``; default: one bucket): the same rows for that time window, in ``buckets`` (each
    with its ``start_time`` and ``end_time``; bounds widened to whole minutes, each bucket's idle and
    start-up time shared among the tenants that used its pools then). Usage is kept minute by minute for
    ``state.usage_kept_days``."""
    ingress.authorize(request)
    caller: ApiKey | None = request.state.caller
    everyone = caller is None or caller.admin
    tenant = None if everyone else caller.tenant_name
    by_pool = by != "tenant"
    shown: dict[str, Any] = {"object": "usage"}
    windowed = not (start_time is None and end_time is None and bucket_width is None)
    if not windowed:
        ask = lambda: ingress.state.usage.remote(tenant, by_pool)  # noqa: E731
    else:
        try:  # a bad window is refused before anything is asked
            start, end, width = usage_window_query(start_time, end_time, bucket_width, time.time())
        except UsageQueryError as error:
            raise invalid(str(error), error.param) from None
        shown.update(start_time=start, end_time=end, bucket_width=bucket_width)
        ask = lambda: ingress.state.usage_windows.remote(start, end, width, tenant, by_pool)  # noqa: E731
    # Both asks at once: one round trip's wait, not two in a row.
    found, since = await asyncio.gather(
        ask_state(ask, "usage"), ask_state(lambda: ingress.state.usage_since.remote(), "usage")
    )
    if windowed:
        shown["buckets"] = [
            {**bucket, "tenants": usage_shown(bucket["tenants"], by, ingress.catalog)} for bucket in found
        ]
    else:
        shown["tenants"] = usage_shown(found, by, ingress.catalog)
    shown["since"] = int(since)
    if by == "pool":
        shown["pools"] = {name: pool.served_model_name for name, pool in ingress.catalog.pools.items()}
    return shown


def usage_shown(rows: dict[str, Any], by: str, catalog: Catalog) -> dict[str, Any]:
    """The state's usage rows as ``/v1/usage`` shows them: model by model for ``by=model``, rounded."""
    if by == "model":
        pools = catalog.pools
        rows = rows_by_model(rows, lambda pool: pools[pool].served_model_name if pool in pools else pool)

    def rounded(row: dict[str, Any]) -> dict[str, Any]:
        return {
            key: rounded(value) if isinstance(value, dict) else round(value, 4) for key, value in row.items()
        }

    return rounded(rows)


@api.get("/healthz")
async def healthz(ingress: IngressOf) -> dict[str, Any]:
    """Liveness of this router replica (answers without asking anyone else)."""
    return {"status": "ok", "models": list(ingress.catalog.pools_by_model)}


@api.get("/readyz")
async def readyz(ingress: IngressOf, request: Request) -> JSONResponse:
    """Readiness: 200 when every served model can take a request (a pool of it has a ready replica, or
    all its pools scale from zero), else 503. A probe without a key gets the status alone; with an API key
    (or without keys configured), also each model's readiness and each pool's replicas, outstanding
    requests and learned rates."""
    readiness = await ingress.state.readiness.remote()
    shown = readiness if ingress.authorized(request) else {"ready": readiness["ready"]}
    return JSONResponse(shown, status_code=200 if readiness["ready"] else 503)


def build_ingress_app(ingress: Ingress) -> FastAPI:
    """The FastAPI application of one router replica, over ``ingress``."""
    app = FastAPI(
        title="rayxdit",
        version="0.1.0",
        description="Images from diffusion transformers split over several GPUs. OpenAI-images compatible.",
    )
    app.state.ingress = ingress
    app.middleware("http")(_observe)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.include_router(api)
    return app


@serve.ingress()
class Router:
    """The Serve deployment of the ingress (any number of interchangeable replicas)."""

    def __init__(
        self,
        config: ServeConfig,
        pools: dict[str, DeploymentHandle],
        cards: dict[str, ModelCard],
        state: DeploymentHandle,
    ):
        """``cards``: each served model name's card (see :func:`rayxdit.serve.app.build_app`); ``state``: the
        application's shared state (load, stored images, jobs), the same for every router replica."""
        replica = serve.get_replica_context().replica_tag
        logging.getLogger("ray.serve").addFilter(QueueingIsExpected())
        keep_cancellations_quiet()
        catalog = Catalog(config, cards)
        self.ingress = Ingress(config, catalog, Dispatcher(catalog, pools, state, replica), state, replica)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_ingress_app(self.ingress)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's in-place update (a deploy whose only change is this ``user_config``): the traffic weights
        of the models' versions (``{"traffic_weights": {model: {version: weight}}}``), e.g. a canary's next
        step. A model or version not served here is refused (the deploy fails, saying which)."""
        self.ingress.catalog.set_weights(user_config.get("traffic_weights") or {})

    async def check_health(self) -> None:
        """Serve's health check of this replica (every ``health_check_period_s``, 10 s): also when it looks
        for batches whose driver (another router replica) died, and adopts them; detached, so that the check
        answers at once."""
        detached(self.ingress.batches.adopt_orphans, "adopting batches whose driver died")
