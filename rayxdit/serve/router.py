"""The HTTP ingress: validates every request before any GPU work, prices it, and sends it to a pool.

Endpoints: ``POST /v1/images/generations`` (OpenAI images API; with ``background`` a job to poll at
``GET``/``DELETE /v1/images/generations/{id}``), ``POST /v1/generate`` (returns the PNG itself),
``GET /v1/images/{id}.png`` (for ``response_format=url``), the OpenAI videos API (``POST /v1/videos``
creates a job; ``GET /v1/videos``, ``GET``/``DELETE /v1/videos/{id}``, ``GET /v1/videos/{id}/content``),
``GET /v1/models``, ``GET /healthz``, ``GET /readyz`` and the OpenAPI docs at ``/docs``. Every error is
``{"error": {"message", "type", "param", "code"}}``.

A job (a video, a background image request) is driven by the router replica that created it: it routes the
request as any other, renews the job's lease in the shared state twice a second and learns there whether a
``DELETE`` (through any replica) cancelled it, then stops the pool's ranks at their next step boundary. The
pool pushes progress; the result goes to the shared state, so any replica answers for it.

A router replica needs no GPU, no CPU reservation and no model stack: it imports neither torch nor
diffusers, and learns each model's limits and traits from the :class:`ModelCard` the application builder
hands it.
"""

import asyncio
import base64
import contextvars
import hashlib
import json
import logging
import math
import re
import secrets
import time
import uuid
from collections import defaultdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from rayxdit.config import PoolConfig, ServeConfig
from rayxdit.limits import ModelCard, ResolvedRequest
from rayxdit.request import (
    VIDEO_MEDIA_TYPES,
    EncodedResult,
    GenerateRequest,
    RequestError,
    RequestStopped,
    engine_seconds,
    pair_controls,
)
from rayxdit.serve import metrics
from rayxdit.serve.api import (
    ImageData,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageGenerationResponse,
    PoolUnavailableError,
    VideoGenerationRequest,
    error_payload,
    request_error_from,
)
from rayxdit.serve.jobs import CANCELLED, COMPLETED
from rayxdit.serve.routing import request_cost
from rayxdit.uploads import MAX_UPLOAD_BYTES, check_mask, inspect_image, size_for

RETRY_AFTER_S = 5
BACKSTOP_S = 5.0
"""Beyond a request's deadline and its pool's cancel grace, how long the router still waits for the pool."""
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
logger = logging.getLogger("ray.serve")


GONE_CHECK_S = 2.0
"""How often a request waiting for its pool checks that the pool still has replicas."""
MAX_EDIT_BODY_BYTES = 2 * MAX_UPLOAD_BYTES + (1 << 20)
"""An edit's whole body: an image, a mask and the form fields."""
RENEW_JOB_S = 0.5
"""How often a job's driver renews its lease (and so how soon it sees a cancellation)."""
MAX_FORM_FIELDS = 64


class PoolGone(Exception):
    """The pool a request waited for has no replica left; the request goes to another pool."""


async def _awaited(response):
    return await response


def _listed(value: Any) -> list:
    """A field that takes one value or a list of them, as a list (none: empty)."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def request_id_of(request: Request) -> str:
    """The request's id: its ``X-Request-Id`` (the client's, else the one Serve's proxy generated and put
    there; the proxy echoes it in the response) when it is a sane token, else a new one."""
    given = request.headers.get("x-request-id", "")
    return given if REQUEST_ID.match(given) else uuid.uuid4().hex


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code
        self.retry_after: float | None = None
        """Seconds for the Retry-After header of a 429 or 503 (default: RETRY_AFTER_S)."""


app = FastAPI(
    title="rayxdit",
    version="0.1.0",
    description="Images from diffusion transformers split over several GPUs. OpenAI-images compatible.",
)


def _error(
    status: int, message: str, kind: str, param: str | None = None, code: str | None = None, **headers
):
    return JSONResponse(
        error_payload(message, kind, param, code), status_code=status, headers=headers or None
    )


@app.middleware("http")
async def _observe(request: Request, call_next):
    """Every generation request: its id (the client's ``X-Request-Id`` or a new one) in the response
    headers and the log, and counted by status and error code with its end-to-end time."""
    if request.method != "POST":
        return await call_next(request)
    began = time.monotonic()
    request.state.request_id = request_id_of(request)
    try:
        response = await call_next(request)
    except asyncio.CancelledError:  # the client went away (or Serve's request timeout fired)
        _account(request, "499", "cancelled", time.monotonic() - began)
        raise
    # No X-Request-Id header here: Serve's proxy adds one to every answer (the client's id, else the one it
    # generated and handed on in the request's headers, which request_id_of takes).
    code = getattr(request.state, "error_code", None) or ("" if response.status_code < 400 else "error")
    seconds = None if getattr(request.state, "job", False) else time.monotonic() - began  # a job's answer
    _account(request, str(response.status_code), code, seconds)
    return response


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


@app.exception_handler(ApiError)
async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    request.state.error_code = error.code or error.kind
    wait = math.ceil(error.retry_after or RETRY_AFTER_S)
    headers = {"Retry-After": str(wait)} if error.status in (429, 503) else {}
    return _error(error.status, str(error), error.kind, error.param, error.code, **headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    request.state.error_code = "invalid_request"
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return _error(400, f"request body is not valid JSON: {first.get('msg')}", "invalid_request_error")
    problem = request_error_from_validation(first)
    return _error(400, str(problem), "invalid_request_error", problem.param)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    request.state.error_code = "http_error"
    return _error(error.status_code, str(error.detail), "invalid_request_error")


def request_error_from_validation(first: dict[str, Any]) -> RequestError:
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if not location:
        return RequestError(f"request body: {first.get('msg')}")
    if first.get("type") == "extra_forbidden":
        return RequestError(f"unknown field '{location[0]}'", location[0])
    return RequestError(f"{location[0]}: {first.get('msg')}", location[0])


@serve.ingress(app)
class Router:
    def __init__(
        self,
        config: ServeConfig,
        pools: dict[str, DeploymentHandle],
        cards: dict[str, ModelCard],
        state: DeploymentHandle,
    ):
        """``cards``: each served model name's card (see :func:`rayxdit.serve.app.build_app`); ``state``: the
        application's shared state (load, stored images), the same for every router replica."""
        self.config = config
        self.handles = pools
        self.state = state
        self.pools = {pool.name: pool for pool in config.pools}
        self.pools_by_model: dict[str, list[PoolConfig]] = defaultdict(list)
        for pool in config.pools:
            self.pools_by_model[pool.served_model_name].append(pool)
        self.cards = cards
        videos = [name for name in self.pools_by_model if cards[name].limits.makes_video]
        images = [name for name in self.pools_by_model if name not in videos]
        self.default_model = {"image": (images or videos)[0], "video": (videos or images)[0]}
        self.replica = serve.get_replica_context().replica_tag
        self.jobs: set[asyncio.Task] = set()  # the jobs this replica drives (referenced until done)

    # ----- helpers ----------------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        keys = self.config.router.api_keys
        if not keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not any(secrets.compare_digest(token, key) for key in keys):
            raise ApiError(
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                "authentication_error",
                code="invalid_api_key",
            )

    @staticmethod
    def _owner(request: Request) -> str:
        """Whose jobs a caller sees: a digest of its API key (everyone's alike without keys)."""
        token = request.headers.get("authorization", "").partition(" ")[2]
        return hashlib.sha256(token.encode()).hexdigest()[:24] if token else ""

    def _validated(
        self,
        body: ImageGenerationRequest | VideoGenerationRequest,
        http: Request,
        inputs: dict[str, Any] | None = None,
    ) -> tuple[str, GenerateRequest, ResolvedRequest]:
        """The model, the request (with ``inputs``: checked input images and their fields) and its resolved
        sizes; ApiError 400 before any GPU work. Only served names become metric labels (a client's typo
        must not make a new time series)."""
        kind = "video" if isinstance(body, VideoGenerationRequest) else "image"
        model = body.model or self.default_model[kind]
        http.state.labels = {"model": "", "pool": "", "size_class": ""}
        if model not in self.pools_by_model:
            raise ApiError(
                400,
                f"model '{model}' is not served here; available: {', '.join(self.pools_by_model)}",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        http.state.labels["model"] = model
        limits = self.cards[model].limits
        if limits.makes_video != (kind == "video"):
            where = "POST /v1/videos" if limits.makes_video else "POST /v1/images/generations"
            raise ApiError(
                400,
                f"model '{model}' makes {'videos' if limits.makes_video else 'images'}: use {where}",
                "invalid_request_error",
                "model",
                "model_kind_mismatch",
            )
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
            resolved = limits.resolve(request)
        except RequestError as error:
            param = "frames" if error.param == "num_frames" else error.param
            raise ApiError(400, str(error), "invalid_request_error", param) from None
        http.state.labels["size_class"] = metrics.size_class(resolved.width, resolved.height)
        return model, request, resolved

    async def _parsed(self, http: Request, schema: type[BaseModel]) -> Any:
        """The body as ``schema``, from JSON or a form (OpenAI's client sends forms to some endpoints);
        ApiError 400 for anything else."""
        content_type = http.headers.get("content-type", "").lower()
        if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            form = await self._form(http)
            data: Any = {name: value for name, value in form.items() if isinstance(value, str)}
        else:
            try:
                data = json.loads(await http.body())
            except ValueError as error:
                raise ApiError(
                    400, f"request body is not valid JSON: {error}", "invalid_request_error"
                ) from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object", "invalid_request_error")
        return self._validated_body(schema, data)

    @staticmethod
    async def _form(http: Request, max_files: int = 1000) -> Any:
        """The request's form (at most ``max_files`` files); ApiError 400 when it cannot be read."""
        try:
            return await http.form(max_files=max_files, max_fields=MAX_FORM_FIELDS)
        except Exception as error:
            raise ApiError(400, f"request form unreadable: {error}", "invalid_request_error") from None

    @staticmethod
    def _validated_body(schema: type[BaseModel], data: dict[str, Any]) -> Any:
        """``data`` as ``schema``; the first problem as the 400 FastAPI's own bodies get."""
        try:
            return schema.model_validate(data)
        except ValidationError as error:
            problem = request_error_from_validation(error.errors()[0])
            raise ApiError(400, str(problem), "invalid_request_error", problem.param) from None

    async def _generate(
        self, body: ImageGenerationRequest, http: Request, inputs: dict[str, Any] | None = None
    ) -> tuple[EncodedResult, dict[str, Any]]:
        model, request, resolved = self._validated(body, http, inputs)
        return await self._run(
            model, request, resolved, http.state.request_id, body.timeout, http.state.labels
        )

    async def _run(
        self,
        model: str,
        request: GenerateRequest,
        resolved: ResolvedRequest,
        request_id: str,
        timeout: float | None,
        labels: dict[str, str],
        report_progress: bool = False,
    ) -> tuple[EncodedResult, dict[str, Any]]:
        """Route a validated request and run it on a pool (another pool if the first is full or gone);
        the result and what the response tells of it. ``labels``: the request's metric labels, its pool
        filled in here."""
        cost = request_cost(resolved, self.cards[model].uses_cfg(request))
        arrived = time.time()
        pools = self.pools_by_model[model]
        longest = max(pool.request_timeout_s for pool in pools)
        admission_deadline = arrived + min(timeout or longest, longest)
        hold_s = longest + max(pool.cancel_grace_s for pool in pools) + BACKSTOP_S
        tried: list[str] = []
        while True:
            decision = await self.state.route.remote(
                model, cost, request_id, admission_deadline, hold_s, tried
            )
            if decision["pool"] is None:
                raise self._refusal(model, decision, request_id)
            pool = self.pools[decision["pool"]]
            labels["pool"] = pool.name
            choice = "fallback" if tried else "first"
            metrics.inc("rayxdit_routing_decisions", model=model, pool=pool.name, choice=choice)
            deadline = arrived + min(timeout or pool.request_timeout_s, pool.request_timeout_s)
            result = None
            try:
                result = await self._call_pool(
                    pool, request, request_id, deadline, cost, decision.get("warm"), report_progress
                )
                break
            except (BackPressureError, DeploymentUnavailableError, PoolGone):
                tried.append(pool.name)  # this pool is full, down or gone: the next candidate takes it
            finally:
                engine_s = None if result is None else engine_seconds(result.timings)
                await self.state.finish.remote(request_id, engine_s)
        info = {
            "request_id": request_id,
            "router": self.replica,
            "pool": pool.name,
            "ranks": pool.ranks,
            "cost": round(cost, 4),
            "estimate_s": None if decision["estimate_s"] is None else round(decision["estimate_s"], 3),
            "seed": request.seed,
            "width": resolved.width,
            "height": resolved.height,
            "steps": resolved.steps,
            **({"frames": resolved.frames} if resolved.frames > 1 else {}),
            "gpu_seconds": result.timings.get("gpu_seconds"),
            "timings": result.timings,
        }
        return result, info

    @staticmethod
    def _refusal(model: str, decision: dict[str, Any], request_id: str) -> ApiError:
        """429 before any GPU work: every pool is full or down, or none can finish before the deadline."""
        wait = decision.get("retry_after_s")
        if wait is None:
            return ApiError(
                429,
                f"all pools serving '{model}' are full or unavailable; retry later",
                "rate_limit_error",
                code="capacity",
            )
        error = ApiError(
            429,
            f"no pool serving '{model}' can finish request {request_id} before its deadline (expected in "
            f"{decision['estimate_s']:.0f} s); retry in {wait:.0f} s, or send a larger 'timeout'",
            "rate_limit_error",
            code="deadline_unreachable",
        )
        error.retry_after = wait
        return error

    async def _call_pool(
        self,
        pool: PoolConfig,
        request: GenerateRequest,
        request_id: str,
        deadline: float,
        cost: float,
        warm: bool | None = False,
        report_progress: bool = False,
    ) -> EncodedResult:
        """The pool's answer. Its ranks stop at ``deadline``; should that not come back in time (a rebuild,
        a hang), the call is abandoned at ``deadline + cancel_grace_s + BACKSTOP_S``: the client's bound.

        A request still waiting for a pool that had replicas when it was routed (``warm``) but has none
        now (the autoscaling policy gave its GPUs to other pools, or its replica died), or for a cold pool
        that started no replica within twice its start-up prior, is taken back and raises
        :class:`PoolGone`, for the caller to route it again."""
        response = self.handles[pool.name].generate.remote(
            request, request_id, deadline, cost, report_progress
        )
        answer = asyncio.ensure_future(_awaited(response))
        began = time.monotonic()
        bound = began + max(0.0, deadline - time.time()) + pool.cancel_grace_s + BACKSTOP_S
        try:
            while True:
                remaining = bound - time.monotonic()
                done, _ = await asyncio.wait({answer}, timeout=max(0.0, min(GONE_CHECK_S, remaining)))
                if answer in done:
                    return answer.result()
                if time.monotonic() >= bound:
                    response.cancel()
                    raise self._deadline_error(request_id)
                may_be_gone = warm or time.monotonic() - began > 2 * pool.startup_s
                if may_be_gone and await self.state.gone.remote(pool.name):
                    response.cancel()
                    raise PoolGone(pool.name)
        except asyncio.CancelledError:  # the client went away: the pool stops the ranks
            response.cancel()
            raise
        except (BackPressureError, DeploymentUnavailableError, PoolGone, ApiError):
            raise
        except RayActorError as error:  # the replica died with the request: another pool may take it
            logger.warning(
                "request %s: the %s replica died (%r); routing it again", request_id, pool.name, error
            )
            raise PoolGone(pool.name) from None
        except Exception as error:
            raise self._map_pool_error(error, request_id) from None
        finally:
            if not answer.done():
                answer.cancel()

    @staticmethod
    def _deadline_error(request_id: str) -> ApiError:
        return ApiError(
            504,
            f"request {request_id} did not finish before its deadline; it was stopped (send a larger "
            "'timeout', or retry later)",
            "timeout_error",
            code="deadline_exceeded",
        )

    def _map_pool_error(self, error: Exception, request_id: str) -> ApiError:
        """What the client sees: the request's own problem (400), a deadline (504) or a failed group (503)
        say what happened; anything else is a 500 naming the request id, details only in the log."""
        cause = getattr(error, "cause", None) or error
        if isinstance(cause, RequestError):
            return ApiError(400, str(cause), "invalid_request_error", cause.param)
        if isinstance(cause, RequestStopped):
            return self._deadline_error(request_id)
        if isinstance(cause, PoolUnavailableError):
            logger.warning("request %s: %s", request_id, cause)
            return ApiError(
                503,
                f"request {request_id} failed on a worker group, which is being rebuilt; retry",
                "service_unavailable",
                code="worker_group_failed",
            )
        logger.error("request %s failed: %r", request_id, error)
        return ApiError(
            500, f"internal error in request {request_id}; the server log has the details", "server_error"
        )

    # ----- jobs ---------------------------------------------------------------------------------------------
    async def _start_job(
        self,
        kind: str,
        http: Request,
        model: str,
        request: GenerateRequest,
        resolved: ResolvedRequest,
        timeout: float | None,
        fields: dict[str, Any],
        deliver: Any,
    ) -> dict[str, Any]:
        """Create a job in the shared state and drive it from this replica; the job object, at once.
        ``deliver(result, info)`` gives what the state keeps of the result: ``(content, result)``."""
        http.state.job = True
        job = await self.state.create_job.remote(kind, self._owner(http), model, fields)
        drive = self._drive(
            job["id"], kind, model, request, resolved, timeout, dict(http.state.labels), deliver
        )
        # A fresh context: the job outlives this HTTP request, and must not be cancelled with it.
        task = contextvars.Context().run(asyncio.create_task, drive)
        self.jobs.add(task)
        task.add_done_callback(self.jobs.discard)
        logger.info("job %s: %s on %s created by request %s", job["id"], kind, model, http.state.request_id)
        return job

    async def _drive(
        self,
        job_id: str,
        kind: str,
        model: str,
        request: GenerateRequest,
        resolved: ResolvedRequest,
        timeout: float | None,
        labels: dict[str, str],
        deliver: Any,
    ) -> None:
        """Run a job to its end: its lease renewed meanwhile; stopped when it is cancelled; its result or its
        error stored in the shared state."""
        run = asyncio.create_task(self._run(model, request, resolved, job_id, timeout, labels, True))
        status = "failed"
        began = time.monotonic()
        try:
            while not run.done():
                await asyncio.wait({run}, timeout=RENEW_JOB_S)
                if run.done():
                    break
                try:
                    now = await self.state.renew_job.remote(job_id)
                except Exception as error:  # the state replica restarting: the next renewal tells
                    logger.debug("job %s: lease not renewed: %r", job_id, error)
                    continue
                if now in (None, CANCELLED):  # deleted through some router replica (or the state forgot it)
                    run.cancel()  # the pool stops its ranks at their next step boundary
                    await asyncio.wait({run})
                    status = CANCELLED
                    return
            result, info = run.result()
            content, shown = await deliver(result, info)
            stored = await self.state.complete_job.remote(job_id, content, shown)
            status = COMPLETED if stored else "failed"
        except ApiError as error:
            await self.state.fail_job.remote(job_id, error.code or error.kind, str(error))
        except Exception as error:
            logger.error("job %s failed: %r", job_id, error)
            message = f"internal error in job {job_id}; the server log has the details"
            await self.state.fail_job.remote(job_id, "server_error", message)
        finally:
            metrics.inc("rayxdit_jobs", model=model, kind=kind, status=status)
            logger.info("job %s: %s after %.3f s", job_id, status, time.monotonic() - began)

    async def _job_or_404(self, job_id: str, kind: str, http: Request, action: str = "get_job") -> Any:
        """The caller's job of ``kind`` through the state's ``action`` (get_job, cancel_job, job_content);
        404 when it does not exist for the caller."""
        found = await getattr(self.state, action).remote(job_id, self._owner(http), kind)
        if found is None:
            raise ApiError(404, f"{kind} job {job_id} not found or expired", "invalid_request_error", "id")
        return found

    async def _image_data(self, pngs: list[bytes], response_format: str, base_url: str) -> list[ImageData]:
        if response_format == "b64_json":
            return [ImageData(b64_json=base64.b64encode(png).decode()) for png in pngs]
        data = []
        for png in pngs:
            key = await self.state.put_image.remote(png)
            if key is None:
                raise ApiError(
                    400,
                    "the image is larger than the router's image store (router.max_stored_bytes); "
                    "use response_format=b64_json",
                    "invalid_request_error",
                    "response_format",
                )
            data.append(ImageData(url=f"{base_url}/v1/images/{key}.png"))
        return data

    # ----- endpoints ----------------------------------------------------------------------------------------
    @app.post("/v1/images/generations", response_model=ImageGenerationResponse)
    async def images_generations(
        self, body: ImageGenerationRequest, request: Request
    ) -> ImageGenerationResponse | JSONResponse:
        """OpenAI-compatible image generation. With ``background`` (or ``Prefer: respond-async``): 202 and a
        job to poll at ``GET /v1/images/generations/{id}``, whose ``result`` is this response once done."""
        self._authorize(request)
        base = str(request.base_url).rstrip("/")
        inputs = await self._conditioning_inputs(body)
        if body.background or "respond-async" in request.headers.get("prefer", ""):
            model, generate, resolved = self._validated(body, request, inputs)

            async def deliver(result: EncodedResult, info: dict[str, Any]):
                data = await self._image_data(result.pngs, body.response_format, base)
                shown = ImageGenerationResponse(created=int(time.time()), data=data, rayxdit=info)
                return [], shown.model_dump(exclude_none=True)

            fields = {"prompt": body.prompt, "size": f"{resolved.width}x{resolved.height}", "n": body.n}
            job = await self._start_job(
                "image", request, model, generate, resolved, body.timeout, fields, deliver
            )
            location = f"{base}/v1/images/generations/{job['id']}"
            return JSONResponse(job, status_code=202, headers={"Location": location})
        result, info = await self._generate(body, request, inputs)
        data = await self._image_data(result.pngs, body.response_format, base)
        return ImageGenerationResponse(created=int(time.time()), data=data, rayxdit=info)

    @app.get("/v1/images/generations/{job_id}")
    async def image_job(self, job_id: str, request: Request) -> dict[str, Any]:
        """A background image job: its status and progress; once completed, ``result`` holds the images."""
        self._authorize(request)
        return await self._job_or_404(job_id, "image", request)

    @app.delete("/v1/images/generations/{job_id}")
    async def delete_image_job(self, job_id: str, request: Request) -> dict[str, Any]:
        """Cancel a background image job (its ranks stop at the next step boundary), or delete a finished
        one."""
        self._authorize(request)
        return await self._job_or_404(job_id, "image", request, "cancel_job")

    @app.post(
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
    async def create_video(self, request: Request) -> dict[str, Any]:
        """OpenAI-compatible video job: validated and priced now, answered at once with the job object
        (``queued``); poll ``GET /v1/videos/{id}``, then fetch ``GET /v1/videos/{id}/content``."""
        self._authorize(request)
        body: VideoGenerationRequest = await self._parsed(request, VideoGenerationRequest)
        model, generate, resolved = self._validated(body, request)
        fps = self.cards[model].limits.fps
        fields = {
            "prompt": body.prompt,
            "size": f"{resolved.width}x{resolved.height}",
            "seconds": f"{resolved.frames / fps:g}",
            "frames": resolved.frames,
            "fps": fps,
        }

        async def deliver(result: EncodedResult, info: dict[str, Any]):
            return result.pngs, {"rayxdit": info}

        return await self._start_job(
            "video", request, model, generate, resolved, body.timeout, fields, deliver
        )

    @app.get("/v1/videos")
    async def list_videos(self, request: Request, limit: int = 100) -> dict[str, Any]:
        """The caller's video jobs (those made with its API key), newest first."""
        self._authorize(request)
        if not 1 <= limit <= 1000:
            raise ApiError(400, "limit must be within 1..1000", "invalid_request_error", "limit")
        data = await self.state.list_jobs.remote(self._owner(request), "video", limit)
        return {"object": "list", "data": data, "has_more": False}

    @app.get("/v1/videos/{video_id}")
    async def video(self, video_id: str, request: Request) -> dict[str, Any]:
        """A video job: ``status`` (queued, in_progress, completed, failed, cancelled) and ``progress``."""
        self._authorize(request)
        return await self._job_or_404(video_id, "video", request)

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(self, video_id: str, request: Request) -> dict[str, Any]:
        """Cancel a queued or running video job (its ranks stop at the next step boundary and its GPUs take
        the next request), or delete a finished one with its content."""
        self._authorize(request)
        return await self._job_or_404(video_id, "video", request, "cancel_job")

    @app.get(
        "/v1/videos/{video_id}/content",
        responses={200: {"content": {media: {} for media in VIDEO_MEDIA_TYPES.values()}}},
    )
    async def video_content(
        self, video_id: str, request: Request, format: str = "mp4", variant: str = "video"
    ) -> Response:
        """The finished video: ``format`` mp4 (default), png (animated, lossless) or gif; 409 until the job
        has completed."""
        self._authorize(request)
        if format not in VIDEO_MEDIA_TYPES:
            raise ApiError(
                400,
                f"format must be one of {', '.join(VIDEO_MEDIA_TYPES)}",
                "invalid_request_error",
                "format",
            )
        if variant != "video":
            raise ApiError(400, "only variant=video is served", "invalid_request_error", "variant")
        job, frames = await self._job_or_404(video_id, "video", request, "job_content")
        if job["status"] != COMPLETED:
            raise ApiError(
                409,
                f"video {video_id} is {job['status']} ({job['progress']}%): its content exists once it has "
                "completed",
                "invalid_request_error",
                "id",
                "job_not_completed",
            )
        from rayxdit.imaging import encode_video  # PIL and imageio: loaded by the first video served

        data = await asyncio.to_thread(encode_video, frames, format, job["fps"])
        return Response(data, media_type=VIDEO_MEDIA_TYPES[format])

    async def _image_field(self, encoded: str | None, upload: Any, param: str) -> bytes | None:
        """An image field: a form's file (``upload``) or base64 (a data: URL too), checked as uploads are."""
        if upload is not None:
            return (await self._upload(upload, param))[0]
        if encoded is None:
            return None
        try:
            data = base64.b64decode(
                encoded.split(",", 1)[1] if encoded.startswith("data:") else encoded, validate=True
            )
            await asyncio.to_thread(inspect_image, data, param)
        except RequestError as error:
            raise ApiError(400, str(error), "invalid_request_error", error.param) from None
        except ValueError:
            raise ApiError(400, f"{param}: not base64", "invalid_request_error", param) from None
        return data

    async def _conditioning_inputs(self, body: ImageGenerationRequest, form: Any = None) -> dict[str, Any]:
        """A request's ControlNet and IP-Adapter fields, checked before any GPU work (see
        :meth:`_control_inputs`); the model's pools must load an IP-Adapter for an image prompt."""
        uploads = [] if form is None else form.getlist("control_image") + form.getlist("control_image[]")
        inputs = await self._control_inputs(body, uploads)
        upload = None if form is None else form.get("ip_adapter_image")
        image_prompt = await self._image_field(body.ip_adapter_image, upload, "ip_adapter_image")
        if image_prompt is None:
            return inputs
        model = body.model or self.default_model["image"]
        if model in self.pools_by_model and not self.pools_by_model[model][0].ip_adapter:
            raise ApiError(
                400,
                f"ip_adapter_image: model '{model}' is served without an IP-Adapter",
                "invalid_request_error",
                "ip_adapter_image",
            )
        return {**inputs, "ip_adapter_image": image_prompt, "ip_adapter_scale": body.ip_adapter_scale}

    async def _control_inputs(self, body: ImageGenerationRequest, uploads: list[Any]) -> dict[str, Any]:
        """A request's ControlNet fields, checked before any GPU work: every control image (``uploads``, a
        form's files, or the body's base64) decodes, and pairs with a ControlNet the model's pools load
        (:func:`~rayxdit.request.pair_controls`)."""
        if uploads:
            images = [await self._image_field(None, upload, "control_image") for upload in uploads]
        else:
            images = [
                await self._image_field(data, None, "control_image") for data in _listed(body.control_image)
            ]
        model = body.model or self.default_model["image"]
        # An unknown model: _validated answers it; here the names are checked where the pools are known.
        loaded = self.pools_by_model[model][0].controlnets if model in self.pools_by_model else None
        try:
            controls = pair_controls(
                images,
                _listed(body.controlnet),
                _listed(body.controlnet_scale),
                _listed(body.control_mode),
                None if loaded is None else tuple(loaded),
            )
        except RequestError as error:
            message = str(error).replace("this model", f"model '{model}'")
            raise ApiError(400, message, "invalid_request_error", error.param) from None
        return {"controls": controls} if controls else {}

    async def _upload(self, file: Any, param: str) -> tuple[bytes, tuple[int, int]]:
        """An uploaded image's bytes and size, read within MAX_UPLOAD_BYTES and decoded once off the event
        loop; ApiError 400 for anything that is not a usable image."""
        if isinstance(file, str):
            raise ApiError(
                400, f"{param}: send it as a file part of the form", "invalid_request_error", param
            )
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        try:
            return data, await asyncio.to_thread(inspect_image, data, param)
        except RequestError as error:
            raise ApiError(400, str(error), "invalid_request_error", error.param) from None

    @app.post(
        "/v1/images/edits",
        response_model=ImageGenerationResponse,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"multipart/form-data": {"schema": ImageEditRequest.model_json_schema()}},
            }
        },
    )
    async def images_edits(self, request: Request) -> ImageGenerationResponse:
        """OpenAI-compatible image edits (a multipart form, as OpenAI's client sends it): ``image`` (one file)
        and the prompt make an img2img request; a ``mask`` (white: repaint, black: keep; the image's size)
        makes it inpainting. ``size`` defaults to the image's, fitted to the model's limits."""
        self._authorize(request)
        request.state.labels = {"model": "", "pool": "", "size_class": ""}
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise ApiError(
                400,
                "send a multipart form with an 'image' file, as OpenAI's client does",
                "invalid_request_error",
            )
        if int(request.headers.get("content-length") or 0) > MAX_EDIT_BODY_BYTES:
            raise ApiError(
                400,
                f"the request is larger than {MAX_EDIT_BODY_BYTES} bytes (each image at most {MAX_UPLOAD_BYTES})",
                "invalid_request_error",
                "image",
            )
        form = await self._form(request, max_files=8)
        images = form.getlist("image") + form.getlist("image[]")
        if len(images) != 1:
            raise ApiError(
                400,
                f"image: send one input image ({len(images)} sent)",
                "invalid_request_error",
                "image",
            )
        fields: dict[str, Any] = {}
        for name, value in form.multi_items():
            key = name.removesuffix("[]")
            if not isinstance(value, str) or key in ("image", "mask", "control_image", "ip_adapter_image"):
                continue
            if key in fields and key in ("controlnet", "controlnet_scale", "control_mode"):
                fields[key] = [*_listed(fields[key]), value]  # one per control image, in their order
            else:
                fields[key] = value
        body: ImageEditRequest = self._validated_body(ImageEditRequest, fields)
        if body.stream:
            raise ApiError(400, "stream: streaming is not offered", "invalid_request_error", "stream")
        image, image_size = await self._upload(images[0], "image")
        mask = None
        if form.get("mask") is not None:
            mask, mask_size = await self._upload(form["mask"], "mask")
            try:
                check_mask(mask_size, image_size)
            except RequestError as error:
                raise ApiError(400, str(error), "invalid_request_error", "mask") from None
        model = body.model or self.default_model["image"]
        if body.size is None and model in self.cards:
            width, height = size_for(image_size, self.cards[model].limits)
            body = body.model_copy(update={"size": f"{width}x{height}"})
        inputs = {"image": image, "mask": mask, "strength": body.strength}
        inputs |= await self._conditioning_inputs(body, form)
        model, generate, resolved = self._validated(body, request, inputs)
        result, info = await self._run(
            model, generate, resolved, request.state.request_id, body.timeout, request.state.labels
        )
        base = str(request.base_url).rstrip("/")
        data = await self._image_data(result.pngs, body.response_format, base)
        return ImageGenerationResponse(created=int(time.time()), data=data, rayxdit=info)

    @app.post("/v1/generate", responses={200: {"content": {"image/png": {}}}})
    async def generate_png(self, body: ImageGenerationRequest, request: Request) -> Response:
        """The first image as a PNG body (handy for curl -o); metadata in X-Rayxdit-* headers."""
        self._authorize(request)
        if body.background:
            raise ApiError(
                400, "background jobs: POST /v1/images/generations", "invalid_request_error", "background"
            )
        result, info = await self._generate(body, request, await self._conditioning_inputs(body))
        headers = {
            "X-Rayxdit-Gpu-Seconds": str(info["gpu_seconds"]),
            "X-Rayxdit-Timings": json.dumps(info["timings"]),
            "X-Rayxdit-Pool": info["pool"],
            "X-Rayxdit-Seed": str(info["seed"]),
            "X-Rayxdit-Cost": str(info["cost"]),
        }
        return Response(result.pngs[0], media_type="image/png", headers=headers)

    @app.get("/v1/images/{image_id}.png", responses={200: {"content": {"image/png": {}}}})
    async def stored_image(self, image_id: str, request: Request) -> Response:
        """An image made with response_format=url (kept router.image_ttl_s), from any router replica."""
        self._authorize(request)
        data = await self.state.get_image.remote(image_id)
        if data is None:
            raise ApiError(404, f"image {image_id} not found or expired", "invalid_request_error", "image_id")
        return Response(data, media_type="image/png")

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        """Models served, each with its pools (ranks, routing threshold, autoscaling bounds)."""
        self._authorize(request)
        data = []
        for name, pools in self.pools_by_model.items():
            limits = self.cards[name].limits
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "owned_by": "rayxdit",
                    "default_size": f"{limits.default_width}x{limits.default_height}",
                    "max_side": limits.max_side,
                    "size_multiple": limits.size_multiple,
                    "default_steps": limits.default_steps,
                    "kind": "video" if limits.makes_video else "image",
                    "controlnets": pools[0].controlnets,
                    "ip_adapter": pools[0].ip_adapter,
                    **(
                        {
                            "default_frames": limits.default_frames,
                            "max_frames": limits.max_frames,
                            "frame_multiple": limits.frame_multiple,
                            "fps": limits.fps,
                        }
                        if limits.makes_video
                        else {}
                    ),
                    "pools": [
                        {
                            "name": pool.name,
                            "ranks": pool.ranks,
                            "parallel": str(pool.engine.parallel),
                            "route_min_cost": pool.route_min_cost,
                            "min_replicas": pool.min_replicas,
                            "max_replicas": pool.max_replicas,
                        }
                        for pool in pools
                    ],
                }
            )
        return {"object": "list", "data": data}

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness of this router replica (answers without asking anyone else)."""
        return {"status": "ok", "models": list(self.pools_by_model)}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Readiness: 200 when every served model can take a request (a pool of it has a ready replica, or
        all its pools scale from zero), else 503; with ready replicas and outstanding requests per pool."""
        readiness = await self.state.readiness.remote()
        return JSONResponse(readiness, status_code=200 if readiness["ready"] else 503)
