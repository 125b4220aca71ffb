"""The HTTP ingress: validates every request before any GPU work, prices it, and sends it to a pool.

Endpoints: ``POST /v1/images/generations`` (OpenAI images API), ``POST /v1/generate`` (returns the PNG
itself), ``GET /v1/images/{id}.png`` (for ``response_format=url``), ``GET /v1/models``, ``GET /healthz``,
and the OpenAPI docs at ``/docs``. Every error is ``{"error": {"message", "type", "param", "code"}}``.

A router replica needs no GPU, no CPU reservation and no model stack: it imports neither torch nor
diffusers, and learns each model's limits and traits from the :class:`ModelCard` the application builder
hands it.
"""

import base64
import json
import secrets
import time
import uuid
from collections import OrderedDict, defaultdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from rayxdit.config import ConfigError, PoolConfig, ServeConfig
from rayxdit.limits import ModelCard
from rayxdit.request import EncodedResult, RequestError
from rayxdit.serve.api import (
    ImageData,
    ImageGenerationRequest,
    ImageGenerationResponse,
    PoolUnavailableError,
    error_payload,
)
from rayxdit.serve.routing import choose_pool, request_cost

RETRY_AFTER_S = 5


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code


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


@app.exception_handler(ApiError)
async def _api_error(_: Request, error: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status in (429, 503) else {}
    return _error(error.status, str(error), error.kind, error.param, error.code, **headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return _error(400, f"request body is not valid JSON: {first.get('msg')}", "invalid_request_error")
    problem = request_error_from_validation(first)
    return _error(400, str(problem), "invalid_request_error", problem.param)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
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
    def __init__(self, config: ServeConfig, pools: dict[str, DeploymentHandle], cards: dict[str, ModelCard]):
        """``cards``: each served model name's card (see :func:`rayxdit.serve.app.build_app`)."""
        self.config = config
        self.handles = pools
        self.pools_by_model: dict[str, list[PoolConfig]] = defaultdict(list)
        for pool in config.pools:
            self.pools_by_model[pool.served_model_name].append(pool)
        self.default_model = config.pools[0].served_model_name
        self.cards = cards
        videos = sorted(name for name, card in cards.items() if card.limits.makes_video)
        if videos:
            raise ConfigError(
                f"{', '.join(videos)}: video models are not served by the images API yet; "
                "use `rayxdit generate --model ... --out clip.mp4`"
            )
        self.in_flight: dict[str, int] = defaultdict(int)
        self.images: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

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

    async def _generate(self, body: ImageGenerationRequest) -> tuple[EncodedResult, dict[str, Any]]:
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
            resolved = self.cards[model].limits.resolve(request)
        except RequestError as error:
            raise ApiError(400, str(error), "invalid_request_error", error.param) from None
        cost = request_cost(resolved, self.cards[model].uses_cfg(request))
        for pool in choose_pool(self.pools_by_model[model], cost, self.in_flight):
            self.in_flight[pool.name] += 1
            try:
                result = await self.handles[pool.name].generate.remote(request)
            except (BackPressureError, DeploymentUnavailableError):
                continue  # this pool is full or down: the next candidate takes it
            except Exception as error:
                raise self._map_pool_error(error) from None
            finally:
                self.in_flight[pool.name] -= 1
            info = {
                "pool": pool.name,
                "ranks": pool.ranks,
                "cost": round(cost, 4),
                "seed": request.seed,
                "width": resolved.width,
                "height": resolved.height,
                "steps": resolved.steps,
                "timings": result.timings,
            }
            return result, info
        raise ApiError(
            429,
            f"all pools serving '{model}' are at capacity; retry later",
            "rate_limit_error",
            code="capacity",
        )

    @staticmethod
    def _map_pool_error(error: Exception) -> ApiError:
        cause = getattr(error, "cause", None) or error
        if isinstance(cause, RequestError):
            return ApiError(400, str(cause), "invalid_request_error", cause.param)
        if isinstance(cause, PoolUnavailableError):
            return ApiError(
                503,
                f"generation failed and the worker group is being rebuilt: {cause}",
                "service_unavailable",
                code="worker_group_failed",
            )
        return ApiError(500, f"internal error: {str(cause).strip().splitlines()[-1]}", "server_error")

    def _store(self, png: bytes) -> str:
        now = time.monotonic()
        while self.images and (
            next(iter(self.images.values()))[1] < now
            or len(self.images) >= self.config.router.max_stored_images
        ):
            self.images.popitem(last=False)
        image_id = uuid.uuid4().hex
        self.images[image_id] = (png, now + self.config.router.image_ttl_s)
        return image_id

    # ----- endpoints ----------------------------------------------------------------------------------------
    @app.post("/v1/images/generations", response_model=ImageGenerationResponse)
    async def images_generations(
        self, body: ImageGenerationRequest, request: Request
    ) -> ImageGenerationResponse:
        """OpenAI-compatible image generation."""
        self._authorize(request)
        result, info = await self._generate(body)
        if body.response_format == "b64_json":
            data = [ImageData(b64_json=base64.b64encode(png).decode()) for png in result.pngs]
        else:
            base = str(request.base_url).rstrip("/")
            data = [ImageData(url=f"{base}/v1/images/{self._store(png)}.png") for png in result.pngs]
        return ImageGenerationResponse(created=int(time.time()), data=data, rayxdit=info)

    @app.post("/v1/generate", responses={200: {"content": {"image/png": {}}}})
    async def generate_png(self, body: ImageGenerationRequest, request: Request) -> Response:
        """The first image as a PNG body (handy for curl -o); metadata in X-Rayxdit-* headers."""
        self._authorize(request)
        result, info = await self._generate(body)
        headers = {
            "X-Rayxdit-Timings": json.dumps(info["timings"]),
            "X-Rayxdit-Pool": info["pool"],
            "X-Rayxdit-Seed": str(info["seed"]),
            "X-Rayxdit-Cost": str(info["cost"]),
        }
        return Response(result.pngs[0], media_type="image/png", headers=headers)

    @app.get("/v1/images/{image_id}.png", responses={200: {"content": {"image/png": {}}}})
    async def stored_image(self, image_id: str) -> Response:
        """An image made with response_format=url (kept for router.image_ttl_s)."""
        entry = self.images.get(image_id)
        if entry is None or entry[1] < time.monotonic():
            raise ApiError(404, f"image {image_id} not found or expired", "invalid_request_error", "image_id")
        return Response(entry[0], media_type="image/png")

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
        """Liveness of the router, with requests in flight per pool."""
        return {
            "status": "ok",
            "models": list(self.pools_by_model),
            "in_flight": {pool.name: self.in_flight[pool.name] for pool in self.config.pools},
        }
