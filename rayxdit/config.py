"""Configuration shared by every layer: how one image is split over ranks, and how an engine is built.

Every field has a default and a docstring; every config validates itself at construction, so a bad value
fails where it is written, not deep inside a collective.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PARALLEL_AXES = ("cfg", "pipefusion", "ring", "ulysses")
"""Mesh axes, outermost first. Ulysses (an all-to-all per attention) is innermost so it lands on the
closest GPUs; cfg (one small all-gather per step) is outermost."""


class ConfigError(ValueError):
    """A configuration that cannot work, with a message that says what to change."""


def describe_validation_error(error: Any) -> str:
    """A pydantic ``ValidationError`` as one line naming where its first problem is, e.g.
    ``pools[1].model: required, but missing``."""
    first = error.errors()[0]
    path = ""
    for part in first.get("loc", ()):
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    if first.get("type") == "missing":
        message = "required, but missing"
    else:
        message = str(first.get("msg", error)).removeprefix("Value error, ")
    return f"{path}: {message}" if path else message


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of the process-group mesh ``cfg x pipefusion x ring x ulysses``; their product is the world size."""

    cfg: int = 1
    """Classifier-free-guidance parallelism: 1, or 2 to run the conditional and unconditional branch on
    different ranks. Pays only for requests with true CFG (a negative prompt and ``true_cfg_scale > 1``)."""
    pipefusion: int = 1
    """PipeFusion stages: transformer blocks split across ranks, image patches pipelined through them."""
    ring: int = 1
    """Ring attention degree: key/value blocks travel rank to rank, overlapped with attention compute."""
    ulysses: int = 1
    """Ulysses degree: an all-to-all turns token shards into head shards around every attention.
    Must divide the model's attention head count."""

    def __post_init__(self) -> None:
        for axis in PARALLEL_AXES:
            degree = getattr(self, axis)
            if not isinstance(degree, int) or isinstance(degree, bool) or degree < 1:
                raise ConfigError(f"parallel degree {axis}={degree!r} must be a positive integer")
        if self.cfg > 2:
            raise ConfigError(f"cfg={self.cfg}: CFG parallelism has two branches, so cfg must be 1 or 2")
        if self.pipefusion > 1 and self.ring > 1:
            raise ConfigError(
                f"pipefusion={self.pipefusion} with ring={self.ring}: inside a PipeFusion stage, split tokens with "
                "ulysses (ring would have to circulate every layer's stale key/value buffer)"
            )

    @property
    def world_size(self) -> int:
        return self.cfg * self.pipefusion * self.ring * self.ulysses

    @property
    def sequence_parallel_size(self) -> int:
        """Ranks that share one image's tokens (ring x ulysses)."""
        return self.ring * self.ulysses

    def describe(self) -> str:
        """``cfg(2) * pipefusion(1) * ring(2) * ulysses(2) = 8``: the whole product, for error messages."""
        factors = " * ".join(f"{axis}({getattr(self, axis)})" for axis in PARALLEL_AXES)
        return f"{factors} = {self.world_size}"

    def __str__(self) -> str:
        parts = [f"{axis}={getattr(self, axis)}" for axis in PARALLEL_AXES if getattr(self, axis) > 1]
        return ",".join(parts) or "single"

    @classmethod
    def parse(cls, text: str) -> ParallelConfig:
        """Parse ``"cfg=2,ring=2,ulysses=2"`` (order free, missing axes are 1; ``""``/``"single"`` is one rank)."""
        text = text.strip()
        if text in ("", "single", "none"):
            return cls()
        degrees: dict[str, int] = {}
        for item in text.split(","):
            name, sep, value = item.strip().partition("=")
            name = name.strip().lower()
            if not sep:
                raise ConfigError(f"'{item.strip()}' is not of the form method=degree (e.g. ulysses=2)")
            if name not in PARALLEL_AXES:
                raise ConfigError(f"unknown parallel method '{name}'; choose from {', '.join(PARALLEL_AXES)}")
            if name in degrees:
                raise ConfigError(f"parallel method '{name}' given twice")
            try:
                degrees[name] = int(value)
            except ValueError:
                raise ConfigError(f"{name}={value.strip()!r}: the degree must be an integer") from None
        return cls(**degrees)

    def check_world_size(self, world_size: int) -> None:
        if self.world_size != world_size:
            raise ConfigError(f"{self.describe()} != world size {world_size}")

    def check_heads(self, num_heads: int) -> None:
        if num_heads % self.ulysses:
            divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
            raise ConfigError(
                f"ulysses={self.ulysses} does not divide the model's {num_heads} attention heads; "
                f"use one of {divisors}, or ring attention for the rest"
            )

    def check_layers(self, num_layers: int) -> None:
        if self.pipefusion > num_layers:
            raise ConfigError(
                f"pipefusion={self.pipefusion} exceeds the model's {num_layers} transformer blocks"
            )


def parse_lora(text: str) -> tuple[str, float]:
    """``"path"`` or ``"path:0.8"`` -> (path, scale)."""
    location, sep, scale = text.rpartition(":")
    if sep and location and not scale.startswith(("/", "\\")):
        try:
            return location, float(scale)
        except ValueError:
            pass
    return text, 1.0


@dataclass(frozen=True)
class EngineConfig:
    """What one worker group loads and how it runs it."""

    model: str
    """A built-in preset (``tiny-flux``), a local diffusers pipeline directory, a hub id, or
    ``package.module:NAME`` (a pipeline recipe built in code). Required: a forgotten model must not
    silently become a random-weight preset."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How each image is split over the group's ranks."""
    dtype: str = "auto"
    """``auto`` (bfloat16 on GPU, float32 on CPU), ``bfloat16``, ``float16`` or ``float32``."""
    compile: bool = False
    """torch.compile the transformer blocks (GPU only pays; the first request of a shape compiles)."""
    attention: str = "auto"
    """Kernel of the sequence-parallel attention on GPU: auto, cudnn, flash or efficient."""
    pipefusion_patches: int = 0
    """PipeFusion: image patches per step (0: as many as stages)."""
    warmup_steps: int = 1
    """PipeFusion: synchronous steps before stale key/values are reused."""
    vae_parallel: bool = True
    """Split the VAE decode into bands of rows over the sequence-parallel ranks (exact: halo exchange and
    synchronized GroupNorm statistics). Off: rank 0 decodes alone."""
    quantize: str | None = None
    """``fp8``: torchao float8 dynamic activations, per-row weight scales, in the transformer blocks' linear
    layers (lossy, opt-in; Ada/Hopper GPUs). None: the model's dtype throughout."""
    cache_threshold: float = 0.0
    """First-Block Cache (lossy, opt-in): steps whose first-block residual changed by less than this
    (relative) reuse the other blocks' last residual; the decision is the whole group's. 0: off, exact."""
    loras: tuple[str, ...] = ()
    """LoRA adapters, each ``PATH_OR_HUB_ID[:SCALE]`` (a directory or ``.safetensors`` file in diffusers'
    LoRA format); loaded on every rank before parallelism is applied, then fused into the weights."""
    ip_adapter: str | None = None
    """An IP-Adapter, loaded with diffusers' ``load_ip_adapter``: Flux's in XLabs' layout
    (``ip_adapter.safetensors``), SDXL's in h94/IP-Adapter's (``ip-adapter_sdxl.safetensors``); a directory or
    hub id holding it, a hub folder or file path (``h94/IP-Adapter/sdxl_models``), a weights file, or the
    ``tiny-flux-ip-adapter`` / ``tiny-sdxl-ip-adapter`` presets."""
    ip_adapter_image_encoder: str | None = None
    """The IP-Adapter's CLIP image encoder (default: its ``image_encoder/`` folder), e.g.
    ``openai/clip-vit-large-patch14`` for XLabs' Flux IP-Adapter."""
    controlnets: tuple[str, ...] = ()
    """ControlNets loaded beside the model (Flux: ``FluxControlNetModel``, union ones too; SDXL:
    ``ControlNetModel``; directories, hub ids or the ``tiny-flux-controlnet``, ``tiny-flux-controlnet-union``
    and ``tiny-sdxl-controlnet`` presets), parallelized like it; a request names one by this string."""

    def __post_init__(self) -> None:
        if self.controlnets and self.parallel.pipefusion > 1:
            raise ConfigError(
                "controlnets with pipefusion: split a pool with ControlNets by cfg, ring or ulysses"
            )
        for lora in self.loras:
            parse_lora(lora)
        if self.attention not in ("auto", "cudnn", "flash", "efficient"):
            raise ConfigError(f"attention={self.attention!r}: choose auto, cudnn, flash or efficient")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ConfigError(f"dtype={self.dtype!r}: choose auto, bfloat16, float16 or float32")
        if self.quantize not in (None, "fp8"):
            raise ConfigError(f"quantize={self.quantize!r}: only fp8 is supported (or none)")
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ConfigError(f"cache_threshold={self.cache_threshold}: use 0 (off) to 1")
        if self.cache_threshold > 0 and self.parallel.pipefusion > 1:
            raise ConfigError(
                "cache_threshold with pipefusion: PipeFusion's stale patches and step caching do not combine "
                "exactly; use one of them"
            )
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if self.pipefusion_patches < 0:
            raise ConfigError(f"pipefusion_patches={self.pipefusion_patches} must be >= 0")

    def replace(self, **changes: object) -> EngineConfig:
        return dataclasses.replace(self, **changes)


DEFAULT_DEPLOYMENT_CONFIG: dict[str, Any] = {
    "autoscaling_config": {
        "min_replicas": 1,
        "max_replicas": 1,
        "target_ongoing_requests": 1.0,
        "upscale_delay_s": 10.0,
        "downscale_delay_s": 120.0,
    },
    "max_queued_requests": 32,
    "health_check_period_s": 10.0,
    # Rebuilding a worker group reloads the model: give check_health the time that takes.
    "health_check_timeout_s": 600.0,
    "graceful_shutdown_wait_loop_s": 2.0,
}
"""Serve options of every pool's deployment unless its ``deployment_config`` says otherwise. Besides these,
``initial_replicas`` defaults to ``min_replicas`` (a pool that may scale to zero starts at zero: no GPU node
is bought for it until a request needs it) and ``graceful_shutdown_timeout_s`` to the pool's
``request_timeout_s`` (in-flight requests finish before a replica goes away on scale-down)."""

RAYXDIT_DEPLOYMENT_KEYS = (
    "name",
    "placement_group_bundles",
    "placement_group_strategy",
    "max_ongoing_requests",
)
"""Serve options that follow from the pool itself and cannot be overridden: its name, one placement-group
bundle per rank, and one request at a time per replica (collectives run in one order on every rank)."""


def _merged(defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` over ``defaults``, nested dicts merged key by key."""
    merged = copy.deepcopy(defaults)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _check_serve_options(pool: str, options: dict[str, Any]) -> None:
    """Validate deployment options with Ray Serve's own schema (which ignores unknown keys: they are
    refused here, since a misspelled option would otherwise be dropped silently)."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema

    def unknown(given: dict[str, Any], known: dict[str, Any], where: str) -> None:
        extra = sorted(set(given) - set(known))
        if extra:
            raise ValueError(
                f"pool {pool}: unknown Serve option(s) {', '.join(extra)} in {where}; known: {', '.join(sorted(known))}"
            )

    unknown(options, DeploymentSchema.model_fields, "deployment_config")
    autoscaling = options.get("autoscaling_config")
    if isinstance(autoscaling, dict):
        unknown(autoscaling, AutoscalingConfig.model_fields, "deployment_config.autoscaling_config")
        AutoscalingConfig.model_validate(autoscaling)
    DeploymentSchema.model_validate({"name": pool, **options})


class PoolConfig(BaseModel):
    """One replica pool: a Serve deployment whose every replica owns a placement group of ``ranks`` bundles
    and drives one worker group (one rank per bundle) that splits each image over ``parallel``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Deployment name, unique in the application (e.g. flux-dev-2gpu).")
    model: str = Field(
        description="Preset (e.g. tiny-flux), local pipeline directory, hub id, or package.module:NAME. "
        "Required: a forgotten model must not silently serve a random-weight preset."
    )
    model_name: str | None = Field(
        default=None,
        description="Name clients use in the API's `model` field; default: the model's last path part.",
    )
    parallel: str = Field(default="ulysses=2", description='Mesh degrees, e.g. "cfg=2,ulysses=2".')
    accelerator: Literal["gpu", "cpu"] = Field(
        default="gpu", description="gpu: one GPU per rank (NCCL); cpu: one CPU slot per rank (gloo)."
    )
    cpus_per_rank: float = Field(
        default=1.0,
        gt=0,
        description="Logical CPUs reserved per rank (fractions let a CPU demo share cores).",
    )
    dtype: str = Field(default="auto", description="auto, bfloat16, float16 or float32.")
    compile: bool = Field(default=False, description="torch.compile the transformer blocks.")
    loras: list[str] = Field(default_factory=list, description="LoRA adapters, PATH[:SCALE] each.")
    ip_adapter: str | None = Field(
        default=None,
        description="An IP-Adapter (Flux: XLabs layout, ip_adapter.safetensors; SDXL: h94 layout, "
        "ip-adapter_sdxl.safetensors; a directory, hub id or path, weights file, or tiny-flux-ip-adapter / "
        "tiny-sdxl-ip-adapter); requests then take ip_adapter_image.",
    )
    ip_adapter_image_encoder: str | None = Field(
        default=None, description="Its CLIP image encoder (default: the adapter's image_encoder/ folder)."
    )
    controlnets: list[str] = Field(
        default_factory=list,
        description="ControlNets loaded beside the model (Flux or SDXL): directories, hub ids or the "
        "tiny-flux-controlnet, tiny-flux-controlnet-union and tiny-sdxl-controlnet presets; requests name one in "
        "'controlnet'. Pools serving one model must load the same ones.",
    )
    vae_parallel: bool = Field(
        default=True, description="Split the VAE decode into bands of rows over the sequence-parallel ranks."
    )
    cache_threshold: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="First-Block Cache threshold (lossy, opt-in; e.g. 0.08): steps whose first block changed "
        "less than this reuse the other blocks' last residual. 0: off (exact). A request may send its own "
        "(0: exact for that request).",
    )
    quantize: Literal["fp8"] | None = Field(
        default=None,
        description="fp8: torchao float8 dynamic-activation quantization of the transformer blocks (lossy, "
        "opt-in; GPUs with float8 tensor cores: Ada, Hopper). Default: none.",
    )
    route_min_cost: float = Field(
        default=0.0,
        ge=0.0,
        description="Until the pools of a model are measured (and without a seconds_per_cost prior), "
        "requests costing at least this much (megapixel x steps x CFG factor x images) prefer this pool; "
        "the pool with the highest threshold not above a request's cost wins. Afterwards requests go "
        "where they finish first.",
    )
    seconds_per_cost: float | None = Field(
        default=None,
        gt=0,
        description="Prior of this pool's service time per cost unit (seconds per megapixel-step), used "
        "for routing and autoscaling until the pool is measured (e.g. 0.09 for FLUX.1-dev on 2 H200).",
    )
    startup_s: float = Field(
        default=60.0,
        gt=0,
        description="Prior of a replica's start-up (load, compile, warm-up) until one is measured: what "
        "a request routed to a cold pool waits first.",
    )
    warmup_sizes: list[str] = Field(
        default_factory=list,
        description='Sizes ("WxH") a replica generates once before it reports ready, so that no user '
        "request pays torch.compile (one compile per resolution).",
    )
    request_timeout_s: float = Field(
        default=900.0,
        gt=0,
        description="Deadline of a request from its arrival (a request's own `timeout` may shorten it): "
        "past it the ranks stop at the next step boundary and the client gets 504.",
    )
    collective_timeout_s: float = Field(
        default=300.0, gt=0, description="torch.distributed timeout: a rank stuck in a collective errors out."
    )
    cancel_grace_s: float = Field(
        default=30.0,
        gt=0,
        description="A cancelled request (or one past its deadline) must stop at a step boundary within "
        "this long; otherwise its ranks count as hung and the worker group is rebuilt.",
    )
    placement_strategy: Literal["STRICT_PACK", "PACK"] = Field(
        default="STRICT_PACK", description="STRICT_PACK keeps a replica's ranks on one node (NVLink)."
    )
    deployment_config: dict[str, Any] = Field(
        default_factory=dict,
        description="Ray Serve deployment options, merged over DEFAULT_DEPLOYMENT_CONFIG and validated by "
        "Serve's schema: autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, "
        "upscale_delay_s, downscale_delay_s, ...), max_queued_requests, health_check_period_s, "
        "graceful_shutdown_timeout_s, ray_actor_options (e.g. runtime_env), ...; num_replicas instead of "
        "autoscaling_config for a fixed size. The name, placement group and max_ongoing_requests follow "
        "from the pool.",
    )

    @field_validator("parallel")
    @classmethod
    def _valid_parallel(cls, value: str) -> str:
        ParallelConfig.parse(value)
        return value

    @field_validator("warmup_sizes")
    @classmethod
    def _valid_sizes(cls, sizes: list[str]) -> list[str]:
        for size in sizes:
            width, sep, height = size.lower().partition("x")
            if not (sep and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
                raise ValueError(f"warmup size {size!r} is not WIDTHxHEIGHT, e.g. 1024x1024")
        return sizes

    @model_validator(mode="after")
    def _valid_deployment_config(self) -> PoolConfig:
        owned = sorted(set(self.deployment_config) & set(RAYXDIT_DEPLOYMENT_KEYS))
        if owned:
            raise ValueError(
                f"pool {self.name}: deployment_config cannot set {', '.join(owned)}: the pool decides it"
            )
        _check_serve_options(self.name, self.serve_options())
        if self.quantize and self.accelerator == "cpu":
            raise ValueError(
                f"pool {self.name}: quantize=fp8 needs GPUs with float8 tensor cores, not CPU ranks"
            )
        if self.cache_threshold > 0 and self.parallel_config.pipefusion > 1:
            raise ValueError(f"pool {self.name}: cache_threshold with pipefusion: use one of them")
        return self

    def serve_options(self) -> dict[str, Any]:
        """This pool's Serve options: ``deployment_config`` over the defaults (without the options that
        follow from the pool's placement; see ``serve.app.pool_deployment_options``)."""
        defaults = copy.deepcopy(DEFAULT_DEPLOYMENT_CONFIG)
        defaults["graceful_shutdown_timeout_s"] = self.request_timeout_s
        fixed_size = self.deployment_config.get("num_replicas") not in (None, "auto")
        if fixed_size or self.deployment_config.get("autoscaling_config", {}) is None:
            defaults.pop("autoscaling_config")
        options = _merged(defaults, self.deployment_config)
        autoscaling = options.get("autoscaling_config")
        if isinstance(autoscaling, dict):
            autoscaling.setdefault("initial_replicas", autoscaling.get("min_replicas", 1))
        return options

    @property
    def min_replicas(self) -> int:
        options = self.serve_options()
        autoscaling = options.get("autoscaling_config")
        return int(autoscaling.get("min_replicas", 1)) if autoscaling else int(options["num_replicas"])

    @property
    def max_replicas(self) -> int:
        options = self.serve_options()
        autoscaling = options.get("autoscaling_config")
        return int(autoscaling.get("max_replicas", 1)) if autoscaling else int(options["num_replicas"])

    @property
    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig.parse(self.parallel)

    @property
    def ranks(self) -> int:
        return self.parallel_config.world_size

    @property
    def served_model_name(self) -> str:
        return self.model_name or self.model.rstrip("/").rsplit("/", 1)[-1]

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            parallel=self.parallel_config,
            dtype=self.dtype,
            compile=self.compile,
            vae_parallel=self.vae_parallel,
            loras=tuple(self.loras),
            controlnets=tuple(self.controlnets),
            ip_adapter=self.ip_adapter,
            ip_adapter_image_encoder=self.ip_adapter_image_encoder,
            cache_threshold=self.cache_threshold,
            quantize=self.quantize,
        )


class RouterConfig(BaseModel):
    """The HTTP ingress."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_keys: list[str] = Field(
        default_factory=list, description="Bearer tokens accepted; empty: no authentication."
    )
    replicas: int = Field(
        default=1,
        ge=1,
        description="Ingress replicas; interchangeable: load and stored images are shared by all of them.",
    )
    image_ttl_s: float = Field(
        default=600.0, gt=0, description="How long response_format=url images stay fetchable."
    )
    max_stored_bytes: int = Field(
        default=1 << 30,
        ge=1 << 20,
        description="Bytes of response_format=url images kept (oldest dropped first); a 2048px noise-like "
        "PNG is about 12 MB.",
    )
    job_ttl_s: float = Field(
        default=3600.0,
        gt=0,
        description="How long a finished job (a video, a background image request) and its result stay "
        "fetchable.",
    )
    max_job_bytes: int = Field(
        default=4 << 30,
        ge=1 << 20,
        description="Bytes of finished jobs' results kept (oldest finished dropped first); a Wan video of 81 "
        "frames at 832x480 is about 60 MB of lossless frames.",
    )


class ElasticConfig(BaseModel):
    """The application's one autoscaling policy (``rayxdit.serve.elastic``): all pools sized together."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    budget_ranks: int | None = Field(
        default=None,
        ge=1,
        description="Ranks (GPUs) the pools may hold together; default: the cluster's GPUs, or with an "
        "autoscaler the most it may have.",
    )


class ServeConfig(BaseModel):
    """A whole rayxdit application: pools, router, HTTP address, autoscaling."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pools: list[PoolConfig] = Field(min_length=1, description="Replica pools, one Serve deployment each.")
    router: RouterConfig = Field(default_factory=RouterConfig)
    elastic: ElasticConfig | None = Field(
        default_factory=ElasticConfig,
        description="One autoscaling policy sizing every pool within a shared budget; null: each pool "
        "scales on its own (Serve's per-deployment policy on its deployment_config).",
    )
    host: str = Field(default="127.0.0.1", description="HTTP bind address (rayxdit serve only).")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port (rayxdit serve only).")

    @model_validator(mode="after")
    def _unique_pool_names(self) -> ServeConfig:
        names = [pool.name for pool in self.pools]
        if len(set(names)) != len(names):
            raise ValueError(f"pool names must be unique: {names}")
        adapters: dict[str, tuple] = {}
        for pool in self.pools:  # any pool of a model may take a request for its ControlNets or IP-Adapter
            loaded = (pool.controlnets, pool.ip_adapter, pool.ip_adapter_image_encoder)
            if adapters.setdefault(pool.served_model_name, loaded) != loaded:
                raise ValueError(
                    f"pools serving '{pool.served_model_name}' load different controlnets or IP-Adapters: give "
                    "them the same"
                )
        if self.elastic is not None:
            fixed = [pool.name for pool in self.pools if "autoscaling_config" not in pool.serve_options()]
            if fixed:
                raise ValueError(
                    f"pools {', '.join(fixed)} have a fixed num_replicas, which the elastic policy cannot size: "
                    "give them autoscaling_config {min_replicas: N, max_replicas: N}, or set elastic: null"
                )
        return self
