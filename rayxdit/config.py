"""Configuration shared by every layer: how one image is split over ranks, and how an engine is built.

Every field has a default and a docstring; every config validates itself at construction, so a bad value
fails where it is written, not deep inside a collective.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

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
        if part == "engine":  # engine options are written flat in a pool (or nested: either finds them)
            continue
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


PARALLEL_HELP = (
    "how to split ONE image over ranks, as method=degree pairs joined by commas, e.g. "
    '"cfg=2,ring=2,ulysses=2" (8 ranks). Methods: ulysses (all-to-all over attention heads; the degree must '
    "divide the model's heads), ring (key/values passed rank to rank), cfg (conditional and unconditional "
    "branch on two ranks; pays only with CFG: Flux needs a negative prompt and true_cfg_scale > 1), "
    "pipefusion (transformer blocks as pipeline stages, image patches pipelined through them; combines "
    "with cfg and ulysses; Flux only). For a UNet (SDXL), ring and ulysses split the image into bands of "
    "rows (patch parallelism). Their product is the number of ranks (one GPU each)"
)


def _option(flag: str, metavar: str | None = None) -> dict[str, Any]:
    """How an :class:`EngineConfig` field is spelled on the command line (``rayxdit generate`` and the batch
    job take every field; see :func:`add_engine_arguments`)."""
    return {"flag": flag, **({"metavar": metavar} if metavar else {})}


class EngineConfig(BaseModel):
    """What one worker group loads and how it runs it: the only declaration of the engine's options.

    Every field is reachable, unchanged, from ``rayxdit generate`` (:func:`add_engine_arguments` makes a
    flag of each), from a Serve pool (flat in the pool, as ``parallel: ulysses=2``, or nested under
    ``engine:``) and from the batch job; ``tests/test_config.py`` fails for a field that is not."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(
        description="A built-in preset (tiny-flux, tiny-flux-kontext, tiny-sd3, tiny-sdxl, tiny-wan: random "
        "weights, run on CPU in seconds), a local diffusers pipeline directory, a hub id such as "
        "black-forest-labs/FLUX.1-dev, or package.module:NAME (a pipeline recipe built in code). Required in "
        "a pool: a forgotten model must not silently become a random-weight preset.",
        json_schema_extra=_option("--model", "MODEL"),
    )
    checkpoint: str | None = Field(
        default=None,
        description="A single-file fine-tune (.safetensors) whose weights replace the model's: Flux's "
        "transformer in Black Forest Labs' layout, or a whole SDXL / SD 1.5 pipeline in the LDM layout, as "
        "fine-tunes ship. The model (a diffusers directory, hub id or preset) gives the configs, text encoders "
        "and what the file lacks.",
        json_schema_extra=_option("--checkpoint", "FILE.safetensors"),
    )
    parallel: ParallelConfig = Field(
        default_factory=ParallelConfig,
        description=PARALLEL_HELP + ".",
        json_schema_extra=_option("--parallel", "METHOD=DEGREE,..."),
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        description="Weights and activations: auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16 or "
        "float32.",
        json_schema_extra=_option("--dtype"),
    )
    compile: bool = Field(
        default=False,
        description="torch.compile the transformer blocks (GPU only pays; the first request of a shape "
        "compiles: list its sizes in a pool's warmup_sizes).",
        json_schema_extra=_option("--compile"),
    )
    attention: Literal["auto", "cudnn", "flash", "efficient"] = Field(
        default="auto",
        description="Kernel of the sequence-parallel attention on GPU: auto, cudnn, flash or efficient.",
        json_schema_extra=_option("--attention"),
    )
    pipefusion_patches: int = Field(
        default=0,
        ge=0,
        description="PipeFusion: image patches per step (0: one per stage).",
        json_schema_extra=_option("--patches", "N"),
    )
    warmup_steps: int = Field(
        default=1,
        ge=0,
        description="PipeFusion: synchronous steps before patches reuse one-step-old keys/values; as many as "
        "the request's steps makes PipeFusion exact.",
        json_schema_extra=_option("--warmup-steps", "N"),
    )
    vae_parallel: bool = Field(
        default=True,
        description="Split the VAE decode into bands of rows over the sequence-parallel ranks (exact: halo "
        "exchange and synchronized GroupNorm statistics). Off: rank 0 decodes alone (the same image).",
        json_schema_extra=_option("--no-vae-parallel"),
    )
    host_copy: bool = Field(
        default=True,
        description="Keep one copy of the model's weights per node in shared memory (/dev/shm, or "
        "RAYXDIT_HOST_COPY_DIR), written by the first rank that reads the checkpoint, and start later ranks on "
        "that node from it: parallel reads into pinned buffers, behind a pool's warm-up, instead of the "
        "checkpoint (exact: the same tensors; requests wait for them). Least recently used copies are evicted "
        "when a new one would leave less than a quarter of "
        "the node's memory available. Models from a directory or hub id, and Flux single files; not with "
        "shard_weights or offload.",
        json_schema_extra=_option("--no-host-copy"),
    )
    quantize: Literal["fp8"] | None = Field(
        default=None,
        description="fp8: torchao float8 dynamic activations with per-row weight scales in the transformer "
        "blocks' linear layers (lossy, opt-in; needs torchao and an Ada/Hopper GPU). Default: the model's "
        "dtype throughout.",
        json_schema_extra=_option("--quantize"),
    )
    cache_threshold: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="First-Block Cache (lossy, opt-in; e.g. 0.08): steps whose first-block residual changed "
        "by less than this (relative) reuse the other blocks' last residual; the whole group decides "
        "together. 0: off, exact. A request may send its own (0: exact for that request).",
        json_schema_extra=_option("--cache-threshold", "T"),
    )
    loras: tuple[str, ...] = Field(
        default=(),
        description="LoRA adapters, each PATH_OR_HUB_ID[:SCALE] (a directory or .safetensors file in "
        "diffusers' LoRA format); loaded on every rank before parallelism is applied, then fused into the "
        "weights. Repeat the flag for several.",
        json_schema_extra=_option("--lora", "PATH[:SCALE]"),
    )
    shard_weights: bool = Field(
        default=False,
        description="Spread the transformer's weights over the group's ranks (FSDP2: each rank keeps 1/N of "
        "every block and gathers a block's weights just before it runs; exact): the transformer's share of each "
        "GPU's memory falls to 1/N plus a block; text encoders and VAE stay whole. Transformers (Flux, SD3, "
        "Wan); not with pipefusion, compile, quantize or lora_sources.",
        json_schema_extra=_option("--shard-weights"),
    )
    offload: bool = Field(
        default=False,
        description="Keep the weights in host memory and bring each block to the GPU just before it runs "
        "(diffusers' group offloading, a block at a time on a CUDA stream that overlaps the next block's copy "
        "with compute; exact): a model larger than the GPU's memory runs on it, slower by the weights' copy "
        "every step. Flux; meant for one-GPU pools (each rank keeps its own host copy); not with pipefusion, "
        "shard_weights, compile, quantize or lora_sources.",
        json_schema_extra=_option("--offload"),
    )
    memory_gib: float | None = Field(
        default=None,
        gt=0,
        description="Cap on the GPU memory each rank may use, in GiB (torch's per-process memory fraction; "
        "default: the whole GPU). A pool measures what its ranks hold and what a request adds, and refuses a "
        "request that would not fit with a 400 naming the limit. CPU ranks have no such cap.",
        json_schema_extra=_option("--memory-gib", "GIB"),
    )
    lora_sources: tuple[str, ...] = Field(
        default=(),
        description="Directories of LoRA adapters requests may name (loras: [{name, scale}]): an adapter is "
        "its .safetensors file's path below a directory, without the suffix (or a folder holding diffusers' "
        "pytorch_lora_weights.safetensors), in any layout diffusers' loaders read. Read on first use, fused "
        "into the weights for the requests naming them and taken out exactly. Repeat the flag for several.",
        json_schema_extra=_option("--lora-source", "DIR"),
    )
    lora_max_rank: int = Field(
        default=128,
        ge=1,
        le=4096,
        description="The highest adapter rank served from lora_sources (a higher one is refused with a 400).",
        json_schema_extra=_option("--lora-max-rank", "R"),
    )
    lora_resident: int = Field(
        default=8,
        ge=1,
        description="Adapters from lora_sources kept on each GPU (least recently used leave first).",
        json_schema_extra=_option("--lora-resident", "N"),
    )
    lora_host_cache_gib: float = Field(
        default=4.0,
        ge=0.0,
        description="Host memory for adapters read from lora_sources, per rank process (least recently used "
        "leave first; 0: read from disk on every device miss).",
        json_schema_extra=_option("--lora-host-cache-gib", "GIB"),
    )
    ip_adapter: str | None = Field(
        default=None,
        description="An IP-Adapter, loaded with diffusers' load_ip_adapter: Flux's in XLabs' layout "
        "(ip_adapter.safetensors), SDXL's in h94/IP-Adapter's (ip-adapter_sdxl.safetensors); a directory or "
        "hub id holding it, a hub folder or file path (h94/IP-Adapter/sdxl_models), a weights file, or the "
        "tiny-flux-ip-adapter / tiny-sdxl-ip-adapter presets. Requests then take ip_adapter_image.",
        json_schema_extra=_option("--ip-adapter", "LOCATION"),
    )
    ip_adapter_image_encoder: str | None = Field(
        default=None,
        description="The IP-Adapter's CLIP image encoder (default: its image_encoder/ folder), e.g. "
        "openai/clip-vit-large-patch14 for XLabs' Flux IP-Adapter.",
        json_schema_extra=_option("--ip-adapter-image-encoder", "LOCATION"),
    )
    controlnets: tuple[str, ...] = Field(
        default=(),
        description="ControlNets loaded beside the model (Flux: FluxControlNetModel, union ones too; SDXL: "
        "ControlNetModel; directories, hub ids or the tiny-flux-controlnet, tiny-flux-controlnet-union and "
        "tiny-sdxl-controlnet presets), parallelized like it; a request names one by this string. Repeat the "
        "flag for several.",
        json_schema_extra=_option("--controlnet", "LOCATION"),
    )

    @field_validator("parallel", mode="before")
    @classmethod
    def _parsed_parallel(cls, value: Any) -> Any:
        return ParallelConfig.parse(value) if isinstance(value, str) else value

    @field_serializer("parallel")
    def _parallel_text(self, value: ParallelConfig) -> str:
        return str(value)

    @field_validator("loras")
    @classmethod
    def _valid_loras(cls, loras: tuple[str, ...]) -> tuple[str, ...]:
        for lora in loras:
            parse_lora(lora)
        return loras

    @field_validator("checkpoint")
    @classmethod
    def _safetensors_only(cls, checkpoint: str | None) -> str | None:
        if checkpoint is not None and not checkpoint.endswith(".safetensors"):
            raise ValueError(
                f"checkpoint {checkpoint!r}: give a .safetensors file (a pickled .ckpt runs code when read)"
            )
        return checkpoint

    @model_validator(mode="after")
    def _combinable(self) -> EngineConfig:
        if self.controlnets and self.parallel.pipefusion > 1:
            raise ValueError(
                "controlnets with pipefusion: split a pool with ControlNets by cfg, ring or ulysses"
            )
        if self.lora_sources and self.quantize:
            raise ValueError(
                "lora_sources with quantize: adapters are fused into the weights, which fp8 stores quantized; "
                "serve adapters from a pool without quantize"
            )
        if self.offload and (
            others := self._on("pipefusion", "shard_weights", "compile", "quantize", "lora_sources")
        ):
            raise ValueError(
                f"offload with {', '.join(others)}: not combined (PipeFusion's stages and sharded weights split the "
                "weights already; compiled, fp8 and per-request adapters are measured on weights kept on the GPU); "
                "drop one"
            )
        if self.shard_weights and (others := self._on("pipefusion", "compile", "quantize", "lora_sources")):
            raise ValueError(
                f"shard_weights with {', '.join(others)}: not combined (PipeFusion's stages run different blocks; "
                "compiled, fp8 and per-request adapters are measured on whole weights only); drop one"
            )
        if self.cache_threshold > 0 and self.parallel.pipefusion > 1:
            raise ValueError(
                "cache_threshold with pipefusion: PipeFusion's stale patches and step caching do not combine "
                "exactly; use one of them"
            )
        return self

    def _on(self, *names: str) -> list[str]:
        """Which of the options ``names`` (``pipefusion``: a pipefusion degree above 1) are switched on."""
        return [
            name
            for name in names
            if (
                self.parallel.pipefusion > 1
                if name == "pipefusion"
                else getattr(self, name) not in (False, None, ())
            )
        ]

    def replace(self, **changes: Any) -> EngineConfig:
        """A copy with ``changes``, validated like a new config."""
        return type(self).model_validate({**dict(self), **changes})


ENGINE_FIELDS = tuple(EngineConfig.model_fields)


def add_engine_arguments(
    parser: Any, defaults: dict[str, Any] | None = None, config: type = EngineConfig
) -> None:
    """A flag on ``parser`` (an ``argparse`` parser or group) for every field of ``config``, its help the
    field's description; ``defaults`` overrides a field's default for this command (e.g. the batch job's
    ``parallel``). Read them back with :func:`engine_config_from_args`."""
    defaults = defaults or {}
    for name, info in config.model_fields.items():
        extra = info.json_schema_extra or {}
        flag = extra.get("flag") or "--" + name.replace("_", "-")
        default = defaults.get(
            name, None if info.is_required() else info.get_default(call_default_factory=True)
        )
        shown = "" if default in (None, (), "") else f" (default: {default})"
        options: dict[str, Any] = {"dest": name, "help": (info.description or "") + shown}
        if "metavar" in extra:
            options["metavar"] = extra["metavar"]
        annotation = info.annotation
        choices = _literal_choices(annotation)
        if annotation is bool:
            options["action"] = "store_false" if default else "store_true"
            options.pop("metavar", None)
            options["help"] = ("turn off: " if default else "") + (info.description or "")
        elif _is_sequence(annotation):
            options.update(action="append", default=list(default or ()))
        elif choices:
            options.update(choices=choices, default=default)
        elif annotation in (int, float):
            options.update(type=annotation, default=default)
        else:  # str, str | None, ParallelConfig (parsed from its text by the config)
            options["default"] = str(default) if isinstance(default, ParallelConfig) else default
            if info.is_required() and name not in defaults:
                options["required"] = True
        parser.add_argument(flag, **options)


def engine_config_from_args(args: Any, config: type = EngineConfig) -> EngineConfig:
    """The engine config the flags of :func:`add_engine_arguments` describe; :class:`ConfigError` naming the
    flag when a value is wrong."""
    values = {name: getattr(args, name) for name in config.model_fields if hasattr(args, name)}
    try:
        return config.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        name = str(first["loc"][0]) if first.get("loc") else ""
        message = describe_validation_error(error).removeprefix(f"{name}: ")
        if name in config.model_fields:
            flag = (config.model_fields[name].json_schema_extra or {}).get("flag", name)
            raise ConfigError(f"{flag}: {message}") from None
        raise ConfigError(message) from None


def _literal_choices(annotation: Any) -> list[str] | None:
    """The choices of ``Literal[...]`` or ``Literal[...] | None`` (None: not a literal)."""
    for candidate in (annotation, *get_args(annotation)):
        if get_origin(candidate) is Literal:
            return list(get_args(candidate))
    return None


def _is_sequence(annotation: Any) -> bool:
    return get_origin(annotation) in (tuple, list)


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

ELASTIC_DELAYS: dict[str, float] = {"upscale_delay_s": 0.0, "downscale_delay_s": 0.0}
"""Serve's delays for the pools of an elastic application, unless a pool's ``deployment_config`` sets them.
The elastic policy is the hysteresis (it holds a layout ``dwell_startups`` start-ups and lets its demand
estimate fall over minutes), and Serve applies a delay after it, to every decision: a swap's new replicas
wait for the GPUs of the replicas it removes, so a ``downscale_delay_s`` of 300 s (the shipped configs'
before 2026-12-06) would keep a burst's 2-GPU replicas waiting 300 s behind it, and 30 s cost a simulated
64-GPU fleet 0.6-1.0 points of a burst run's goodput (``benchmarks/simulate_fleet.py``)."""

SERVING_WORKER_PRELOAD = ("ray.serve._private.replica",)
"""What every Ray worker process of a node serving rayxdit imports as it starts, before Ray gives it an actor
(Ray's ``preload_python_modules``; see :func:`worker_preload_env`): Serve's replica actor, ~80% of what a
pool replica's worker imported before its constructor ran (0.78-0.85 of 0.98-1.05 CPU-s on the development machine).
A replica's actor then runs its constructor soon after it is given an idle worker: measured with rayxdit's
pool module preloaded too, on two H100 hosts (2026-12-07, each arm order once), from Serve's creation of a
restarted replica's actor to ready 6.4-7.5 s against 9.9-12.0 s without, and 5.1-5.6 s against 6.8-7.7 s
(``benchmarks/results/serve-restart-workerpreload-*``). rayxdit's own modules are not preloaded: a worker
that sat idle while rayxdit's files changed on disk (a new version put onto a running cluster, which the
fork servers' code version is there for) would run the old code in a new replica, or a mix of old and new
modules. Ray's modules change only with a restart of Ray. A worker Ray starts for an actor when none is
idle pays the import there instead (on two CPU cores, a replica's ready 0.2 s later)."""


WORKER_PRELOAD_VARIABLE = "RAY_preload_python_modules"
"""Ray's setting of the modules its workers import as they start, read by a node's raylet at its start."""


def worker_preload_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment of a node's ``ray start`` (or of a process starting its own Ray) that makes its workers
    import :data:`SERVING_WORKER_PRELOAD` as they start; a value already set in ``environ`` wins (an empty
    one: none)."""
    return {WORKER_PRELOAD_VARIABLE: environ.get(WORKER_PRELOAD_VARIABLE, ",".join(SERVING_WORKER_PRELOAD))}


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


class WorkerGroupConfig(BaseModel):
    """One worker group, as the runtime starts it: an engine on ``ranks`` ranks (one per placement-group
    bundle), what each rank reserves, how its ranks are placed, and the bounds of its calls. Serve pools
    (:class:`PoolConfig`) and the batch job's groups are both one of these.

    The engine's options may be written flat (``model: tiny-flux``, ``parallel: ulysses=2``), as pools have
    always been written, or nested under ``engine:``; either way they are validated once, as
    :class:`EngineConfig`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    DEFAULT_PARALLEL: ClassVar[str] = "ulysses=2"
    """A worker group without ``parallel`` splits each image over two ranks."""

    name: str = Field(default="group", description="Names the group's rank actors, logs and metrics.")
    engine: EngineConfig = Field(description="The model and how it runs (the fields of EngineConfig).")
    accelerator: Literal["gpu", "cpu"] = Field(
        default="gpu", description="gpu: one GPU per rank (NCCL); cpu: one CPU slot per rank (gloo)."
    )
    cpus_per_rank: float = Field(
        default=1.0,
        gt=0,
        description="Logical CPUs reserved per rank (fractions let a CPU demo share cores).",
    )
    placement_strategy: Literal["STRICT_PACK", "PACK"] = Field(
        default="STRICT_PACK", description="STRICT_PACK keeps a group's ranks on one node (NVLink)."
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
    share_compile_artifacts: bool = Field(
        default=True,
        description="With compile: before warming up, the ranks load the compile artifacts another replica "
        "of the same engine published (a node with a cold compile cache then compiles as a warm one does); "
        "after, they publish theirs if none were there.",
    )
    fork_ranks: bool = Field(
        default=True,
        description="Under Ray: each rank runs in a process forked from its node's fork server, which "
        "imported torch and the model stack once (a rank starts in about a second instead of re-importing "
        "them); false: each rank in its own actor process.",
    )
    fork_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="With fork_ranks: a node's fork server that does not fork a rank within this long is "
        "taken for frozen, killed and replaced (once), so a group (re)build never waits on it for ever.",
    )

    @model_validator(mode="before")
    @classmethod
    def _engine_fields_gathered(cls, data: Any) -> Any:
        """Engine options written flat go into ``engine`` (each may be written once, flat or nested)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        engine = data.get("engine", {})
        if isinstance(engine, EngineConfig):
            engine = dict(engine)
        elif not isinstance(engine, dict):
            return data  # pydantic says what is wrong with it
        engine = dict(engine)
        for name in ENGINE_FIELDS:
            if name in data:
                if name in engine:
                    raise ValueError(f"{name} is given both flat and under engine: write it once")
                engine[name] = data.pop(name)
        engine.setdefault("parallel", cls.DEFAULT_PARALLEL)
        data["engine"] = engine
        return data

    @model_validator(mode="after")
    def _engine_fits_the_accelerator(self) -> WorkerGroupConfig:
        if self.engine.quantize and self.accelerator == "cpu":
            raise ValueError(f"{self.name}: quantize=fp8 needs GPUs with float8 tensor cores, not CPU ranks")
        return self

    @property
    def ranks(self) -> int:
        return self.engine.parallel.world_size

    def updated(self, **changes: Any) -> WorkerGroupConfig:
        """A copy with ``changes`` (engine options among them, flat), validated like a new config."""
        data = self.model_dump()
        engine = {**data.pop("engine"), **{k: changes.pop(k) for k in list(changes) if k in ENGINE_FIELDS}}
        return type(self).model_validate({**data, **changes, "engine": engine})


class PoolConfig(WorkerGroupConfig):
    """One replica pool: a Serve deployment whose every replica owns a placement group of ``ranks`` bundles
    and drives one worker group (:class:`WorkerGroupConfig`: the engine and its ranks), plus what routing
    needs to know before the pool is measured and the pool's Serve options."""

    name: str = Field(description="Deployment name, unique in the application (e.g. flux-dev-2gpu).")
    model_name: str | None = Field(
        default=None,
        description="Name clients use in the API's `model` field; default: the model's last path part.",
    )
    model_version: str = Field(
        default="1",
        pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description="The version of the model this pool serves (a fine-tune, a new checkpoint): requests may "
        "pin one (`model_version` in the body), and GET /v1/models lists them.",
    )
    traffic_weight: float = Field(
        default=100.0,
        ge=0.0,
        description="This version's share of its model's unpinned requests, relative to the other versions' "
        "(e.g. 95 and 5 for a canary); every pool of one model and version gives the same. 0: pinned requests "
        "only. Changed by deploying the config again, without restarting the pool's replicas.",
    )
    route_min_cost: float = Field(
        default=0.0,
        ge=0.0,
        description="Until the pools of a model are measured (and without a seconds_per_cost prior), "
        "requests costing at least this much (cost units: megapixels x steps x CFG factor x images, a step "
        "of a one-megapixel image being one, larger ones dearer by the model's attention term) prefer this "
        "pool; the pool with the highest threshold not above a request's cost wins. Afterwards requests go "
        "where they finish first.",
    )
    seconds_per_cost: float | None = Field(
        default=None,
        gt=0,
        description="Prior of this pool's service time per cost unit (seconds per step of a one-megapixel "
        "image), used for routing and autoscaling until the pool is measured (e.g. 0.09 for FLUX.1-dev on 2 "
        "H200).",
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
    deployment_config: dict[str, Any] = Field(
        default_factory=dict,
        description="Ray Serve deployment options, merged over DEFAULT_DEPLOYMENT_CONFIG and validated by "
        "Serve's schema: autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, "
        "upscale_delay_s, downscale_delay_s, ...), max_queued_requests, health_check_period_s, "
        "graceful_shutdown_timeout_s, ray_actor_options (e.g. runtime_env), ...; num_replicas instead of "
        "autoscaling_config for a fixed size. The name, placement group and max_ongoing_requests follow "
        "from the pool.",
    )

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
        return self

    def serve_options(self, elastic: bool = False) -> dict[str, Any]:
        """This pool's Serve options: ``deployment_config`` over the defaults (without the options that
        follow from the pool's placement; see ``serve.app.pool_deployment_options``); ``elastic``: of an
        elastic application, whose policy's decisions Serve applies without delay (``ELASTIC_DELAYS``)."""
        defaults = copy.deepcopy(DEFAULT_DEPLOYMENT_CONFIG)
        if elastic:
            defaults["autoscaling_config"].update(ELASTIC_DELAYS)
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
    def served_model_name(self) -> str:
        return self.model_name or self.engine.model.rstrip("/").rsplit("/", 1)[-1]

    def for_replicas(self) -> PoolConfig:
        """This pool as its replicas get it: without what only routes to it (``traffic_weight``), so that a
        new weight (a rollout's next step) deploys without restarting them."""
        return self.model_copy(update={"traffic_weight": 100.0})


class ApiKey(BaseModel):
    """An API key with the tenant it belongs to and that tenant's limits. Every key of one tenant shares
    its limits (counted together, in the shared state, so every router replica agrees), and must declare
    the same ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str | None = Field(default=None, min_length=1, description="The bearer token itself.")
    key_sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="The token's SHA-256 in hex instead of the token (the config then holds no secret).",
    )
    tenant: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Who the key belongs to (usage, limits and jobs are counted per tenant); default: a "
        "tenant of its own, named by the start of its hash.",
    )
    admin: bool = Field(default=False, description="Sees every tenant's usage at GET /v1/usage.")
    requests_per_minute: int | None = Field(
        default=None, ge=1, description="Requests admitted per minute (a sliding minute); none: no limit."
    )
    max_concurrent: int | None = Field(
        default=None, ge=1, description="Requests admitted and not finished at once; none: no limit."
    )
    gpu_seconds_per_hour: float | None = Field(
        default=None,
        gt=0,
        description="GPU-seconds (ranks x engine time of the requests that finished) over a sliding hour; "
        "none: no limit.",
    )
    weight: float = Field(
        default=1.0,
        gt=0,
        le=1000,
        description="The tenant's share of contended GPUs relative to other tenants' (routing.queue_policy "
        "fair_share): while several tenants have requests waiting, each gets GPU-seconds in proportion.",
    )

    @model_validator(mode="after")
    def _one_key(self) -> ApiKey:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of 'key' and 'key_sha256'")
        return self

    @property
    def digest(self) -> str:
        """The key's SHA-256 (hex): how a presented token is matched, and what the state counts under."""
        import hashlib

        return self.key_sha256 or hashlib.sha256(self.key.encode()).hexdigest()

    @property
    def tenant_name(self) -> str:
        return self.tenant or f"key-{self.digest[:12]}"

    def limits(self) -> TenantLimits:
        return TenantLimits(
            self.requests_per_minute, self.max_concurrent, self.gpu_seconds_per_hour, self.weight
        )


@dataclass(frozen=True)
class TenantLimits:
    """What one tenant may use (``None``: no limit), and its ``weight`` in the fair share of contended GPUs."""

    requests_per_minute: int | None = None
    max_concurrent: int | None = None
    gpu_seconds_per_hour: float | None = None
    weight: float = 1.0


def keys_by_digest(entries: list[Any]) -> dict[str, ApiKey]:
    """API keys (strings, objects or their mappings) by SHA-256; ValueError when one is listed twice or the
    keys of one tenant declare different limits."""
    keys: dict[str, ApiKey] = {}
    limits: dict[str, TenantLimits] = {}
    for entry in entries:
        key = ApiKey(key=entry) if isinstance(entry, str) else ApiKey.model_validate(entry)
        if key.digest in keys:
            raise ValueError(f"a key of tenant '{key.tenant_name}' is listed twice")
        keys[key.digest] = key
        known = limits.setdefault(key.tenant_name, key.limits())
        if known != key.limits():
            raise ValueError(
                f"the keys of tenant '{key.tenant_name}' declare different limits ({known} and "
                f"{key.limits()}); a tenant's limits are shared by its keys: declare them alike"
            )
    return keys


class RouterConfig(BaseModel):
    """The HTTP ingress."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_keys: list[str | ApiKey] = Field(
        default_factory=list,
        description="Bearer tokens accepted: plain strings (a tenant each, no limits) or objects with a "
        "tenant and its limits (rayxdit.config.ApiKey); empty: no authentication.",
    )
    replicas: int = Field(
        default=1,
        ge=1,
        description="Ingress replicas; interchangeable: load and stored images are shared by all of them.",
    )
    api_keys_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="The name of an environment variable with more keys, a YAML or JSON list in api_keys' "
        "shape (e.g. a Kubernetes secret given to the Ray pods as an environment variable); read when a "
        "router replica starts.",
    )
    api_keys_file: str | None = Field(
        default=None,
        description="A YAML or JSON file with more keys, a list in api_keys' shape (e.g. a mounted "
        "Kubernetes secret): read at start and again within seconds of each change, without a restart.",
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
    lease_s: float = Field(
        default=15.0,
        ge=5.0,
        description="How long the shared state keeps counting a request a router replica routed after the "
        "replica's last renewal (every 2 s while it waits for its pool): a router that died stops holding "
        "its requests' share of routing and admission after this.",
    )
    job_lease_s: float = Field(
        default=30.0,
        ge=2.0,
        description="How long a job or batch whose router replica stopped renewing it (twice a second) is "
        "still its: after this a job fails (driver_lost) and a batch is adopted by another router replica at "
        "the next of Serve's health checks of it (every 10 s).",
    )

    @field_validator("api_keys")
    @classmethod
    def _tenants_agree(cls, keys: list[str | ApiKey]) -> list[str | ApiKey]:
        keys_by_digest(keys)
        return keys


class RoutingConfig(BaseModel):
    """Which pool takes a request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str = Field(
        default="line_priced",
        description="A routing policy of rayxdit.serve.policies.ROUTING_POLICIES: line_priced (where the "
        "request finishes first, from measured service times and load, with a request cheaper than the "
        "mean of a pool's line charged its wait there twice, so the fast pools' lines stay for the large "
        "requests; thresholds until measured), finish_first (the same without that charge: the default "
        "until the simulator's grids ran with line_priced, kept for comparison) or thresholds "
        "(route_min_cost alone).",
    )
    queue_policy: str = Field(
        default="fifo",
        description="In which order requests waiting for a pool's replicas start (rayxdit.serve.fairness): "
        "fifo (as they came, in Serve's queues), fair_share (held in the application's state and let in "
        "as replicas free up, in weighted fair order across tenants by GPU-seconds: a tenant flooding a "
        "pool cannot push others back) or shortest_first (held likewise, the cheapest first: under an "
        "overload the most requests stay within their deadlines); the last two need the elastic policy or "
        "pools of a fixed size.",
    )
    admission: Literal["typical_wait", "deadline"] = Field(
        default="typical_wait",
        description="Which requests are refused at once (429 with Retry-After) rather than queued: deadline "
        "(those expected to miss their own deadline) or typical_wait (those too, and any request that would "
        "wait for a replica longer than the model's typical request can, the median over ten minutes of "
        "arrivals of what each could wait and still make its deadline: in an overload the line stays as "
        "long as the typical request tolerates, not filled by the most lenient requests while every typical "
        "one is refused).",
    )


class ElasticConfig(BaseModel):
    """The application's one autoscaling policy (``rayxdit.serve.elastic``): all pools sized together."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str = Field(
        default="cost_aware",
        description="A sizing policy of rayxdit.serve.policies.AUTOSCALING_POLICIES: cost_aware (the layout of "
        "replicas with the lowest expected response time for the smoothed arrival rate, changed only when the "
        "change pays for its replicas' start-up; rayxdit.serve.layouts) or load_aware (the previous policy: "
        "replicas for the outstanding requests in the most efficient pools, spare GPUs upgrading them to "
        "larger ones; rayxdit.serve.sizing).",
    )
    policy_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Knobs of the sizing policy, passed to it as they are: cost_aware takes idle_s (seconds "
        "without a request before a model's replicas go back; 60), dwell_startups (start-ups a new layout is "
        "held; 3), horizon_startups (start-ups within which a change must pay for itself; 10) and "
        "peak_window_s (seconds over which the busiest demand must stay carried; 3600; 0: size for the "
        "demand now alone), give_back (replicas that buy less than this fraction of the expected response "
        "time go back; 0: every layout fills the model's share of the budget), fall_s (the time constant in "
        "seconds of the demand estimate going down; 300) "
        "and trend_window_s (seconds of counts a sustained rise is read from, to size for it ahead; 900; 0: "
        "none read).",
    )

    budget_ranks: int | None = Field(
        default=None,
        ge=1,
        description="Ranks (GPUs) the pools may hold together; default: the cluster's GPUs, or with an "
        "autoscaler the most it may have.",
    )


class QuarantineConfig(BaseModel):
    """When failing hardware leaves service (``rayxdit.serve.quarantine``): its node is drained."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="Take failing nodes out of service at all.")
    failures: int = Field(
        default=3,
        ge=1,
        description="Worker-group failures on one node (a rank died, hung or raised; a rebuild failed) within "
        "window_s that take it out of service. A fatal GPU fault (uncorrected ECC, pending page retirement or "
        "row remapping, a fatal Xid) does at once.",
    )
    window_s: float = Field(
        default=600.0, gt=0, description="Seconds over which a node's group failures are counted."
    )


class StateConfig(BaseModel):
    """Where the application's shared state keeps what must outlive its replica (``rayxdit.serve.durable``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    redis_url: str | None = Field(
        default=None,
        pattern=r"^(redis|rediss|unix)://",
        description="A Redis to write jobs, response_format=url images and tenants' usage through to (redis://"
        "host:port/db; rediss:// with TLS): the state replica reads them back when it starts again, so a "
        "restart loses nothing. Null (and no redis_url_env): they live in the state replica's memory only.",
    )
    redis_url_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="The name of an environment variable holding the Redis URL instead (one with a password: "
        "a Kubernetes secret given to the Ray pods); read when the state replica starts.",
    )
    key_prefix: str = Field(
        default="rayxdit",
        min_length=1,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="The prefix of every Redis key written: applications sharing a Redis give each its own.",
    )
    usage_kept_days: float = Field(
        default=7.0,
        gt=0,
        le=400,
        description="How long usage is kept minute by minute for GET /v1/usage's time windows (start_time, "
        "end_time, bucket_width); the totals since the first start are kept regardless.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> StateConfig:
        if self.redis_url is not None and self.redis_url_env is not None:
            raise ValueError("give redis_url or redis_url_env, not both")
        return self

    def resolved_redis_url(self) -> str | None:
        """The Redis URL to use, None for none; a named environment variable that is unset is an error (a
        store silently not used would lose what the operator asked to keep)."""
        if self.redis_url_env is None:
            return self.redis_url
        url = os.environ.get(self.redis_url_env)
        if not url:
            raise ConfigError(
                f"state.redis_url_env names ${self.redis_url_env}, which is not set in the state replica's "
                "environment (give it to the Ray pods, or set state.redis_url)"
            )
        return url


class ServeConfig(BaseModel):
    """A whole rayxdit application: pools, router, HTTP address, autoscaling."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pools: list[PoolConfig] = Field(min_length=1, description="Replica pools, one Serve deployment each.")
    router: RouterConfig = Field(default_factory=RouterConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    elastic: ElasticConfig | None = Field(
        default_factory=ElasticConfig,
        description="One autoscaling policy sizing every pool within a shared budget; null: each pool "
        "scales on its own (Serve's per-deployment policy on its deployment_config).",
    )
    state: StateConfig = Field(default_factory=StateConfig)
    quarantine: QuarantineConfig = Field(default_factory=QuarantineConfig)
    host: str = Field(default="127.0.0.1", description="HTTP bind address (rayxdit serve only).")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port (rayxdit serve only).")

    def traffic_weights(self) -> dict[str, dict[str, float]]:
        """Each model's versions by their ``traffic_weight``."""
        weights: dict[str, dict[str, float]] = {}
        for pool in self.pools:
            weights.setdefault(pool.served_model_name, {})[pool.model_version] = pool.traffic_weight
        return weights

    def without_traffic_weights(self) -> ServeConfig:
        """This config with every pool's ``traffic_weight`` at its default: what Serve's code version hashes
        (the weights go to the router's ``user_config``, which Serve changes without a restart)."""
        return self.model_copy(update={"pools": [pool.for_replicas() for pool in self.pools]})

    @model_validator(mode="after")
    def _unique_pool_names(self) -> ServeConfig:
        names = [pool.name for pool in self.pools]
        if len(set(names)) != len(names):
            raise ValueError(f"pool names must be unique: {names}")
        adapters: dict[str, tuple] = {}
        for pool in self.pools:  # any pool of a model may take a request for its adapters
            engine = pool.engine
            loaded = (
                engine.controlnets,
                engine.ip_adapter,
                engine.ip_adapter_image_encoder,
                engine.lora_sources,
            )
            if adapters.setdefault(pool.served_model_name, loaded) != loaded:
                raise ValueError(
                    f"pools serving '{pool.served_model_name}' load different controlnets, IP-Adapters or "
                    "lora_sources: give them the same"
                )
        weights: dict[tuple[str, str], float] = {}
        for pool in self.pools:
            version = (pool.served_model_name, pool.model_version)
            if weights.setdefault(version, pool.traffic_weight) != pool.traffic_weight:
                raise ValueError(
                    f"pools serving '{version[0]}' version {version[1]} give different traffic_weight: give "
                    "every pool of one version the same"
                )
        for model in {model for model, _ in weights}:
            if not any(weight > 0 for (name, _), weight in weights.items() if name == model):
                raise ValueError(f"every version of '{model}' has traffic_weight 0: give one a share")
        if self.elastic is not None:
            fixed = [pool.name for pool in self.pools if "autoscaling_config" not in pool.serve_options()]
            if fixed:
                raise ValueError(
                    f"pools {', '.join(fixed)} have a fixed num_replicas, which the elastic policy cannot size: "
                    "give them autoscaling_config {min_replicas: N, max_replicas: N}, or set elastic: null"
                )
        return self
