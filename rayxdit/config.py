"""Configuration shared by every layer: how one image is split over ranks, and how an engine is built.

Every field has a default and a docstring; every config validates itself at construction, so a bad value
fails where it is written, not deep inside a collective.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

PARALLEL_AXES = ("cfg", "pipefusion", "ring", "ulysses")
"""Mesh axes, outermost first. Ulysses (an all-to-all per attention) is innermost so it lands on the
closest GPUs; cfg (one small all-gather per step) is outermost."""


class ConfigError(ValueError):
    """A configuration that cannot work, with a message that says what to change."""


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


@dataclass(frozen=True)
class EngineConfig:
    """What one worker group loads and how it runs it."""

    model: str = "tiny-flux"
    """A built-in preset (``tiny-flux``), a local diffusers pipeline directory, or a hub id."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How each image is split over the group's ranks."""
    dtype: str = "auto"
    """``auto`` (bfloat16 on GPU, float32 on CPU), ``bfloat16``, ``float16`` or ``float32``."""
    compile: bool = False
    """torch.compile the transformer blocks (GPU only pays; the first request of a shape compiles)."""
    pipefusion_patches: int = 0
    """PipeFusion: image patches per step (0: as many as stages)."""
    warmup_steps: int = 1
    """PipeFusion: synchronous steps before stale key/values are reused."""

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ConfigError(f"dtype={self.dtype!r}: choose auto, bfloat16, float16 or float32")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if self.pipefusion_patches < 0:
            raise ConfigError(f"pipefusion_patches={self.pipefusion_patches} must be >= 0")

    def replace(self, **changes: object) -> EngineConfig:
        return dataclasses.replace(self, **changes)
