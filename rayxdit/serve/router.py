"""The HTTP ingress: validates every request before any GPU work, prices it, and sends it to a pool.

Endpoints: ``POST /v1/images/generations`` (OpenAI images API), ``POST /v1/generate`` (returns the PNG
itself), ``GET /v1/images/{id}.png`` (for ``response_format=url``), ``GET /v1/models``, ``GET /healthz``,
and the OpenAPI docs at ``/docs``. Every error is ``{"error": {"message", "type", "param", "code"}}``.

A router replica needs no GPU, no CPU reservation and no model stack: it imports neither torch nor
diffusers, and learns each model's limits and traits from the :class:`ModelCard` the application builder
hands it.
"""

import asyncio
import base64
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
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from rayxdit.config import ConfigError, PoolConfig, ServeConfig
from rayxdit.limits import ModelCard, ResolvedRequest
from rayxdit.request import EncodedResult, GenerateRequest, RequestError, RequestStopped, engine_seconds
from rayxdit.serve import metrics
from rayxdit.serve.api import (
    ImageData,
    ImageGenerationRequest,
    ImageGenerationResponse,
    PoolUnavailableError,
    error_payload,
)
from rayxdit.serve.routing import request_cost

RETRY_AFTER_S = 5
BACKSTOP_S = 5.0
"""Beyond a request's deadline and its pool's cancel grace, how long the router still waits for the pool."""
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
logger = logging.getLogger("ray.serve")


GONE_CHECK_S = 2.0
"""How often a request waiting for its pool checks that the pool still has replicas."""


class PoolGone(Exception):
    """The pool a request waited for has no replica left; the request goes to another pool."""


async def _awaited(response):
    return await response


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
    _account(request, str(response.status_code), code, time.monotonic() - began)
    return response


def _account(request: Request, status: str, code: str, seconds: float) -> None:
    labels = getattr(request.state, "labels", None) or {"model": "", "pool": "", "size_class": ""}
    metrics.inc("rayxdit_requests", **labels, status=status, code=code)
    if status == "200":
        metrics.observe("rayxdit_request_seconds", seconds, **labels)
    logger.info(
        "request %s: %s %s -> %s%s in %.3f s (pool %s)",
        request.state.request_id,
        request.method,
        request.url.path,
        status,
        f" {code}" if code else "",
        seconds,
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
        self.default_model = config.pools[0].served_model_name
        self.cards = cards
        self.replica = serve.get_replica_context().replica_tag
        videos = sorted(name for name, card in cards.items() if card.limits.makes_video)
        if videos:
            raise ConfigError(
                f"{', '.join(videos)}: video models are not served by the images API yet; "
                "use `rayxdit generate --model ... --out clip.mp4`"
            )

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

    def _validated(self, body: ImageGenerationRequest) -> tuple[str, GenerateRequest, ResolvedRequest]:
        """The model, the request and its resolved sizes; ApiError 400 before any GPU work."""
        model = body.model or self.default_model
        if model not in self.pools_by_model:
            raise ApiError(
                400,
                f"model '{model}' is not served here; available: {', '.join(self.pools_by_model)}",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        try:
            request = body.to_generate_request(default_seed=secrets.randbelow(2**31))
            return model, request, self.cards[model].limits.resolve(request)
        except RequestError as error:
            raise ApiError(400, str(error), "invalid_request_error", error.param) from None

    async def _generate(
        self, body: ImageGenerationRequest, http: Request
    ) -> tuple[EncodedResult, dict[str, Any]]:
        request_id = http.state.request_id
        served = body.model or self.default_model
        # Only served names become label values (a client's typo must not make a new time series).
        labels = {"model": served if served in self.pools_by_model else "", "pool": "", "size_class": ""}
        http.state.labels = labels
        model, request, resolved = self._validated(body)
        labels["size_class"] = metrics.size_class(resolved.width, resolved.height)
        cost = request_cost(resolved, self.cards[model].uses_cfg(request))
        arrived = time.time()
        pools = self.pools_by_model[model]
        longest = max(pool.request_timeout_s for pool in pools)
        admission_deadline = arrived + min(body.timeout or longest, longest)
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
            deadline = arrived + min(body.timeout or pool.request_timeout_s, pool.request_timeout_s)
            result = None
            try:
                result = await self._call_pool(
                    pool, request, request_id, deadline, cost, decision.get("warm")
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
    ) -> EncodedResult:
        """The pool's answer. Its ranks stop at ``deadline``; should that not come back in time (a rebuild,
        a hang), the call is abandoned at ``deadline + cancel_grace_s + BACKSTOP_S``: the client's bound.

        A request still waiting for a pool that had replicas when it was routed (``warm``) but has none
        now (the autoscaling policy gave its GPUs to other pools, or its replica died), or for a cold pool
        that started no replica within twice its start-up prior, is taken back and raises
        :class:`PoolGone`, for the caller to route it again."""
        response = self.handles[pool.name].generate.remote(request, request_id, deadline, cost)
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

    # ----- endpoints ----------------------------------------------------------------------------------------
    @app.post("/v1/images/generations", response_model=ImageGenerationResponse)
    async def images_generations(
        self, body: ImageGenerationRequest, request: Request
    ) -> ImageGenerationResponse:
        """OpenAI-compatible image generation."""
        self._authorize(request)
        result, info = await self._generate(body, request)
        if body.response_format == "b64_json":
            data = [ImageData(b64_json=base64.b64encode(png).decode()) for png in result.pngs]
        else:
            base = str(request.base_url).rstrip("/")
            data = []
            for png in result.pngs:
                key = await self.state.put_image.remote(png)
                if key is None:
                    raise ApiError(
                        400,
                        "the image is larger than the router's image store (router.max_stored_bytes); "
                        "use response_format=b64_json",
                        "invalid_request_error",
                        "response_format",
                    )
                data.append(ImageData(url=f"{base}/v1/images/{key}.png"))
        return ImageGenerationResponse(created=int(time.time()), data=data, rayxdit=info)

    @app.post("/v1/generate", responses={200: {"content": {"image/png": {}}}})
    async def generate_png(self, body: ImageGenerationRequest, request: Request) -> Response:
        """The first image as a PNG body (handy for curl -o); metadata in X-Rayxdit-* headers."""
        self._authorize(request)
        result, info = await self._generate(body, request)
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
                    "pools": [
                        {
                            "name": pool.name,
                            "ranks": pool.ranks,
                            "parallel": pool.parallel,
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
