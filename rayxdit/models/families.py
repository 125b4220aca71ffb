"""What each model family is, as plain data: the diffusers pipeline class it serves, its serving defaults, where
its denoiser's config lives and how attention heads and blocks are read from that config.

Torch-free on purpose: the layers above the engine (the CLI, the Serve application builder, the batch
driver) learn a model's :class:`~rayxdit.limits.ModelCard` from two small JSON files, and refuse a bad
``--parallel`` in a fraction of a second instead of after importing torch, diffusers and transformers (~5 s
a process). Each adapter names its family (``family = FLUX``) and takes these traits from it, so they are
written once.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rayxdit.limits import ModelCard, ModelLimits
from rayxdit.schedulers import FLOW, NOISE, offered, own_sampler


def transformer_heads(denoiser_config: dict[str, Any]) -> int:
    """Attention heads of a transformer denoiser."""
    return denoiser_config["num_attention_heads"]


def transformer_blocks(denoiser_config: dict[str, Any]) -> int:
    """Transformer blocks of a denoiser with one kind of block."""
    return denoiser_config["num_layers"]


def flux_blocks(denoiser_config: dict[str, Any]) -> int:
    """Flux's double-stream plus single-stream blocks."""
    return denoiser_config["num_layers"] + denoiser_config["num_single_layers"]


def unet_heads(denoiser_config: dict[str, Any]) -> int:
    """The gcd of the attention head counts of every UNet level with transformer blocks (Ulysses must divide
    each). diffusers' SDXL config calls the head count ``attention_head_dim``."""
    heads = denoiser_config.get("num_attention_heads") or denoiser_config["attention_head_dim"]
    levels = denoiser_config["down_block_types"]
    heads = [heads] * len(levels) if isinstance(heads, int) else list(heads)
    with_attention = [h for h, kind in zip(heads, levels, strict=True) if "CrossAttn" in kind]
    return math.gcd(*with_attention) if with_attention else 0


def unet_levels(denoiser_config: dict[str, Any]) -> int:
    """A UNet's down levels (what stands in for blocks in its card)."""
    return len(denoiser_config["down_block_types"])


def no_checkpoint_defaults(denoiser_config: dict[str, Any]) -> dict[str, Any]:
    return {}


def flux_checkpoint_defaults(denoiser_config: dict[str, Any]) -> dict[str, Any]:
    """A Flux without guidance embeddings is timestep-distilled (FLUX.1-schnell): 4 steps, 256 text tokens,
    no guidance; with them it is guidance-distilled (FLUX.1-dev: the family's 28 steps, 512 tokens, 3.5)."""
    if denoiser_config.get("guidance_embeds", True):
        return {}
    return {"default_steps": 4, "max_sequence_length": 256, "default_guidance": 0.0}


@dataclass(frozen=True)
class Family:
    """One diffusers pipeline family and the adapter that serves it."""

    pipeline_class: str
    """The diffusers pipeline class name (``model_index.json``'s ``_class_name``)."""
    adapter: str
    """The adapter class as ``module:Class``, imported when a model of the family is loaded."""
    limits: ModelLimits = field(default_factory=ModelLimits)
    """The family's serving defaults; a model directory's ``rayxdit.json`` overrides them."""
    denoiser_subfolder: str = "transformer"
    """Where the denoiser's config.json lives in the pipeline directory."""
    supports_pipefusion: bool = False
    """Whether the adapter implements the PipeFusion stage hooks (transformer blocks as pipeline stages)."""
    supports_offload: bool = False
    """Whether its adapter runs every weighted module through its ``forward`` (offloading brings a module's
    weights to the GPU on its forward hook): Flux's."""
    supports_sharded_weights: bool = False
    """Whether its transformer's weights can be spread over a group (``shard_weights``: transformers, whose
    blocks every rank runs in the same order)."""
    guidance_is_cfg: bool = True
    """Families trained with CFG (SD3, SDXL, Wan): ``guidance`` is the CFG scale, on above 1, and an absent
    negative prompt is the family's empty one. Guidance-distilled Flux: CFG only as true CFG."""
    heads_in: Callable[[dict[str, Any]], int] = transformer_heads
    """Attention heads, read from the denoiser's config (no weights needed)."""
    layers_in: Callable[[dict[str, Any]], int] = transformer_blocks
    """Blocks, read from the denoiser's config."""
    prediction: str = FLOW
    """What the denoiser predicts (a flow velocity, or noise): which samplers fit it."""
    excluded_samplers: tuple[str, ...] = ()
    """Samplers of its prediction kind that its pipeline cannot step (see :mod:`rayxdit.schedulers`)."""
    checkpoint_defaults: Callable[[dict[str, Any]], dict[str, Any]] = no_checkpoint_defaults
    """Serving defaults a checkpoint implies by what it is (read from the denoiser's config)."""
    single_file: str | None = None
    """How a single-file checkpoint of the family is laid out (:mod:`rayxdit.models.single_file`):
    ``flux_transformer`` (Black Forest Labs' transformer alone), ``ldm_pipeline`` (the whole pipeline in
    the LDM layout), or None (not loadable from one file)."""

    def limits_for(
        self, denoiser_config: dict[str, Any], scheduler_config: dict[str, Any], model_dir: str | None
    ) -> ModelLimits:
        """One model's limits: the family's defaults, then what its checkpoint says it is (its samplers, a
        distilled model's steps), then its directory's ``rayxdit.json``. The ingress (through the card) and
        the ranks (through the adapter) both compute them here."""
        samplers = offered(self.prediction, scheduler_config)
        facts = {
            "schedulers": tuple(name for name in samplers if name not in self.excluded_samplers),
            "default_scheduler": own_sampler(self.prediction, scheduler_config),
            **self.checkpoint_defaults(denoiser_config),
        }
        return ModelLimits.for_pipeline(self.limits.updated(facts), model_dir)

    def card(self, location: str, denoiser_config: dict[str, Any], limits: ModelLimits) -> ModelCard:
        """The family's traits and one model's limits as plain data (see :class:`ModelCard`)."""
        return ModelCard(
            location=location,
            pipeline_class=self.pipeline_class,
            num_heads=self.heads_in(denoiser_config),
            num_layers=self.layers_in(denoiser_config),
            limits=limits,
            guidance_is_cfg=self.guidance_is_cfg,
            supports_pipefusion=self.supports_pipefusion,
            supports_sharded_weights=self.supports_sharded_weights,
            supports_offload=self.supports_offload,
            supports_single_file=self.single_file is not None,
        )

    def adapter_class(self) -> type:
        """The adapter class (imports torch, diffusers and the family's pipeline modules)."""
        module_name, _, class_name = self.adapter.partition(":")
        return getattr(importlib.import_module(module_name), class_name)


FLUX_SAMPLERS_EXCLUDED = ("heun",)
"""Flux's pipelines hand the scheduler custom sigmas, which flow-matching Heun's ``set_timesteps`` refuses."""
FLUX_ATTENTION_COST = 0.117
"""Flux's :attr:`~rayxdit.limits.ModelLimits.attention_cost_per_megapixel`, from one H200 (compiled, 28 steps,
benchmarks/results/flux-dev-2xh200.json): 3.736 s at 1024px, 19.831 s at 2048px, 5.31 times as long for 4
times the pixels. Kontext's transformer is Flux's (its references' tokens are not counted)."""
FLUX = Family(
    "FluxPipeline",
    "rayxdit.models.flux:FluxAdapter",
    ModelLimits(image_inputs=True, attention_cost_per_megapixel=FLUX_ATTENTION_COST),
    supports_pipefusion=True,
    supports_sharded_weights=True,
    supports_offload=True,
    guidance_is_cfg=False,  # guidance-distilled: `guidance` is an input of the model, CFG is true CFG
    layers_in=flux_blocks,
    excluded_samplers=FLUX_SAMPLERS_EXCLUDED,
    checkpoint_defaults=flux_checkpoint_defaults,
    single_file="flux_transformer",
)
FLUX_KONTEXT = Family(
    "FluxKontextPipeline",
    "rayxdit.models.flux:FluxKontextAdapter",
    ModelLimits(
        image_inputs=True, kontext_auto_resize=True, attention_cost_per_megapixel=FLUX_ATTENTION_COST
    ),
    supports_sharded_weights=True,
    supports_offload=True,
    guidance_is_cfg=False,
    layers_in=flux_blocks,
    excluded_samplers=FLUX_SAMPLERS_EXCLUDED,
    single_file="flux_transformer",
)
SD3_ATTENTION_COST = 0.201
"""SD3's :attr:`~rayxdit.limits.ModelLimits.attention_cost_per_megapixel`, SD3.5-Large's transformer on one
H100 (compiled, bf16, 77 + 256 text tokens; benchmarks/results/attention-cost-1xh100.json): a step 0.0696 s
at 1024px, 0.424 s at 2048px, 6.09 times as long for 4 times the pixels. SD3 Medium's share of attention
differs: a model directory's ``rayxdit.json`` may set its own."""
SD3 = Family(
    "StableDiffusion3Pipeline",
    "rayxdit.models.sd3:SD3Adapter",
    ModelLimits(
        default_steps=28,
        max_sequence_length=256,
        image_inputs=True,
        default_guidance=7.0,
        attention_cost_per_megapixel=SD3_ATTENTION_COST,
    ),
    supports_sharded_weights=True,
)
SDXL = Family(
    "StableDiffusionXLPipeline",
    "rayxdit.models.sdxl:SDXLAdapter",
    ModelLimits(
        default_steps=30, size_multiple=32, max_sequence_length=77, image_inputs=True, default_guidance=5.0
    ),
    denoiser_subfolder="unet",
    heads_in=unet_heads,
    layers_in=unet_levels,
    prediction=NOISE,
    single_file="ldm_pipeline",
)
SD15 = Family(
    "StableDiffusionPipeline",
    "rayxdit.models.sdxl:SD15Adapter",
    ModelLimits(
        default_height=512,
        default_width=512,
        default_steps=50,
        max_side=1024,
        size_multiple=8,
        max_sequence_length=77,
        image_inputs=True,
        default_guidance=7.5,
    ),
    denoiser_subfolder="unet",
    heads_in=unet_heads,
    layers_in=unet_levels,
    prediction=NOISE,  # SD 2.x's v-prediction is in its scheduler config, which every sampler keeps
    single_file="ldm_pipeline",
)
WAN_ATTENTION_COST = 0.0387
"""Wan 2.1 T2V 14B's :attr:`~rayxdit.limits.ModelLimits.attention_cost_per_megapixel` (megapixels of all
frames: width x height x frames / 1e6), from one H100 (its transformer compiled, bf16, 512 text tokens;
benchmarks/results/attention-cost-1xh100.json): a step 2.82 s at 832x480x81, 11.23 s at 1280x720x81, 3.98
times as long for 2.31 times the pixels. A 720p job costs 3.98 480p ones, not 2.31."""
WAN = Family(
    "WanPipeline",
    "rayxdit.models.wan:WanAdapter",
    ModelLimits(
        default_height=480,
        default_width=832,
        default_steps=50,
        default_guidance=5.0,
        max_side=1280,
        size_multiple=16,
        max_sequence_length=512,
        default_frames=81,
        max_frames=241,
        frame_multiple=4,
        attention_cost_per_megapixel=WAN_ATTENTION_COST,
    ),
    supports_sharded_weights=True,
)

FAMILIES: dict[str, Family] = {
    family.pipeline_class: family for family in (FLUX, FLUX_KONTEXT, SD3, SDXL, SD15, WAN)
}
"""Every supported pipeline class and its family: adding a family is an adapter file plus one entry here."""
