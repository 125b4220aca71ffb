"""End-to-end parity of every parallel configuration with the single-process result, per model family.

The reference is diffusers' own pipeline (``FluxPipeline``, ``StableDiffusion3Pipeline``,
``StableDiffusionXLPipeline``) on the same weights and seeds. The engine runs in real gloo process groups (spawned processes), every configuration
of both families in one spawn per world size to keep start-up cheap.

PipeFusion runs with warm-up steps covering the whole request here, so it is exact too; with stale
keys/values its difference is measured in ``test_pipefusion.py``.

Size: 36x36 pixels = 81 image tokens (Flux) / 81 patch tokens (SD3) and 29 text tokens, so no shard is
even at degree 2, 4 or 8. Tolerance: fp32 on CPU, max |latents - reference| <= 1e-5 after 3 steps (latents
are of unit scale; observed <= 2.4e-6). One Flux rank equals diffusers bit for bit; one SD3 rank is within
1.7e-6 (diffusers batches SD3's two CFG branches into one call and convolves the patches, the engine runs
the branches one by one and applies the patch embedding as the equivalent linear map).

SDXL (a UNet, split into bands of latent rows) runs at 40x40 px (20 latent rows in 5 bands of 4). Its
latents are in the Euler scheduler's sigma-scaled units (|latents| up to ~11), so its tolerance is 1e-4
absolute, the same 1e-5 relative; observed <= 2.3e-5 for one rank and every parallel configuration alike
(diffusers batches the CFG branches; GroupNorm sums over bands are reordered).

Wan (text-to-video) runs 9 frames of 48x80 px: 45 video tokens; one rank is within 3e-6 of diffusers
(the patch embedding as a linear map), tolerance 1e-5 as for the other transformers.

Flux, SD3 and SDXL also start from an input image (img2img, e.g. strength 0.7: the last 5 of 6 steps for Flux, with CFG)
and repaint a masked half of one (inpainting), against ``FluxImg2ImgPipeline``, ``FluxInpaintPipeline``,
``StableDiffusion3Img2ImgPipeline``, ``StableDiffusion3InpaintPipeline``, ``StableDiffusionXLImg2ImgPipeline``
and ``StableDiffusionXLInpaintPipeline``: the image's latents and the mask are sharded like the noise. A
Kontext edit's reference tokens (``FluxKontextPipeline``) are sharded beside the noisy ones.

ControlNets: Flux's (``FluxControlNetPipeline``; a union and a plain one at once through
``FluxMultiControlNetModel``) and SDXL's (``StableDiffusionXLControlNetPipeline`` with ``MultiControlNetModel``,
two control images) have per-token (per-position) residuals that stay on their rank. IP-Adapters (diffusers'
``load_ip_adapter`` on ``FluxPipeline`` and ``StableDiffusionXLPipeline``): the image-prompt tokens are
replicated. SDXL's ControlNet and IP-Adapter are within 2e-5 at one rank, as SDXL alone.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rayxdit.config import ConfigError, EngineConfig, ParallelConfig
from rayxdit.engine import Engine
from rayxdit.models.presets import materialize_preset
from rayxdit.models.registry import load_adapter
from rayxdit.parallel.mesh import ParallelState, build_parallel_state
from rayxdit.parallel.shard import held_parameters, shardable_modules
from rayxdit.request import ControlInput, GenerateRequest, LoraChoice, RequestError
from tests.helpers import run_on_ranks
from tests.lora_files import lora_source
from tests.sabotage import adapters_on_one_rank, broken_ring_merge, lose_a_shard

TOLERANCE = {
    "tiny-flux": 1e-5,
    "tiny-flux-controlnet": 1e-5,
    "tiny-flux-controlnets": 1e-5,
    "tiny-flux-ip-adapter": 1e-5,
    "tiny-flux-kontext": 1e-5,
    "tiny-sd3": 1e-5,
    "tiny-sdxl": 1e-4,
    "tiny-sd15": 1e-4,
    "tiny-sdxl-controlnet": 1e-4,
    "tiny-sdxl-ip-adapter": 1e-4,
    "tiny-wan": 1e-5,
}


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


_RANDOM = np.random.default_rng(3)
SOURCE = _png(_RANDOM.integers(0, 256, (44, 52, 3), dtype=np.uint8))
"""An input image of another size than the requests' (the pipelines resize it)."""
CONTROL = _png(_RANDOM.integers(0, 256, (36, 36, 3), dtype=np.uint8))
CONTROL_2 = _png(_RANDOM.integers(0, 256, (30, 50, 3), dtype=np.uint8))
HALF_MASK = _png(np.where(np.arange(36)[None, :] < 18, 255, 0).astype(np.uint8).repeat(36, 0))
"""Repaint the left half, keep the right."""
REQUESTS = {
    "tiny-flux": {
        "true-cfg": GenerateRequest(
            prompt="a photo of a red cat",
            negative_prompt="blurry dark",
            true_cfg_scale=3.0,
            height=36,
            width=36,
            steps=3,
            seed=7,
            num_images=2,
        ),
        "plain": GenerateRequest(prompt="a blue house by the sea", height=36, width=36, steps=3, seed=11),
        "img2img": GenerateRequest(
            prompt="a watercolor",
            negative_prompt="dark",
            true_cfg_scale=2.0,
            image=SOURCE,
            strength=0.7,
            height=36,
            width=36,
            steps=6,
            seed=5,
        ),
        "inpaint": GenerateRequest(
            prompt="a green field",
            image=SOURCE,
            mask=HALF_MASK,
            strength=1.0,
            height=36,
            width=36,
            steps=4,
            seed=9,
            num_images=2,
        ),
    },
    # tiny-flux with a ControlNet beside it (its residuals per token, the control image sharded like the
    # latents); under true CFG both branches take the residuals computed on the prompt, as diffusers does.
    "tiny-flux-controlnet": {
        "control": GenerateRequest(
            prompt="a house",
            negative_prompt="dark",
            true_cfg_scale=2.0,
            controls=(ControlInput(image=CONTROL, scale=0.8),),
            height=36,
            width=36,
            steps=3,
            seed=21,
            num_images=2,
        ),
        # With an input image to repaint (FluxControlNetInpaintPipeline): the control image's sample is drawn
        # first, then the input image's, then the noise.
        "control-inpaint": GenerateRequest(
            prompt="a watercolor",
            image=SOURCE,
            mask=HALF_MASK,
            strength=0.75,
            controls=(ControlInput(image=CONTROL, scale=0.8),),
            height=36,
            width=36,
            steps=4,
            seed=5,
        ),
    },
    # tiny-flux with a union ControlNet (its mode's embedding one more text token, held by the first rank of
    # the sp group) and a plain one at once: their residuals summed, as FluxMultiControlNetModel sums them.
    "tiny-flux-controlnets": {
        "union-and-plain": GenerateRequest(
            prompt="a house",
            negative_prompt="dark",
            true_cfg_scale=2.0,
            controls=(
                ControlInput(image=CONTROL, controlnet="tiny-flux-controlnet-union", scale=0.8, mode=2),
                ControlInput(image=CONTROL_2, controlnet="tiny-flux-controlnet", scale=0.5),
            ),
            height=36,
            width=36,
            steps=3,
            seed=23,
        ),
    },
    # tiny-flux with an IP-Adapter: its image-prompt tokens are replicated, the attention over them local to
    # each shard's queries; the negative branch of true CFG takes a black image prompt, as diffusers does.
    "tiny-flux-ip-adapter": {
        "image-prompt": GenerateRequest(
            prompt="a portrait",
            negative_prompt="dark",
            true_cfg_scale=2.0,
            ip_adapter_image=SOURCE,
            ip_adapter_scale=0.8,
            height=36,
            width=36,
            steps=3,
            seed=17,
            num_images=2,
        ),
    },
    # The reference (52x44 px: 143 tokens) joins the 81 noisy tokens; uneven at 2, 4 and 8 ranks.
    "tiny-flux-kontext": {
        "edit": GenerateRequest(
            prompt="make it blue",
            negative_prompt="blurry",
            true_cfg_scale=2.0,
            image=SOURCE,
            height=36,
            width=36,
            steps=3,
            seed=13,
            num_images=2,
        ),
    },
    "tiny-sd3": {
        "cfg": GenerateRequest(
            prompt="a photo of a red cat",
            negative_prompt="dark",
            guidance=4.0,
            height=36,
            width=36,
            steps=3,
            seed=7,
            num_images=2,
        ),
        "no-cfg": GenerateRequest(
            prompt="a blue house by the sea", guidance=1.0, height=36, width=36, steps=3, seed=11
        ),
        "img2img": GenerateRequest(
            prompt="a watercolor",
            negative_prompt="dark",
            guidance=4.0,
            image=SOURCE,
            strength=0.6,
            height=36,
            width=36,
            steps=5,
            seed=3,
        ),
        "inpaint": GenerateRequest(
            prompt="a green field",
            image=SOURCE,
            mask=HALF_MASK,
            strength=0.8,
            guidance=3.0,
            height=36,
            width=36,
            steps=4,
            seed=9,
        ),
    },
    # 40x40 px = 20x20 latent rows: 5 bands of 4 rows (the UNet's two downsamplings), uneven at 2 and 4
    # ranks; the widths 20 -> 10 -> 5 also exercise the UNet's forced upsample sizes.
    "tiny-sdxl": {
        "cfg": GenerateRequest(
            prompt="a photo of a red cat",
            negative_prompt="dark",
            guidance=5.0,
            height=40,
            width=40,
            steps=3,
            seed=7,
            num_images=2,
        ),
        "zero-negative": GenerateRequest(
            prompt="a blue house by the sea", guidance=5.0, height=40, width=40, steps=3, seed=11
        ),
        "img2img": GenerateRequest(
            prompt="a watercolor",
            negative_prompt="dark",
            guidance=5.0,
            image=SOURCE,
            strength=0.6,
            height=40,
            width=40,
            steps=5,
            seed=3,
        ),
        "inpaint": GenerateRequest(
            prompt="a green field",
            image=SOURCE,
            mask=HALF_MASK,
            strength=1.0,
            guidance=4.0,
            height=40,
            width=40,
            steps=3,
            seed=9,
            num_images=2,
        ),
    },
    # SD 1.5's layout: the UNet of SDXL's loop without text-time conditioning, an absent negative prompt is
    # the empty prompt's embeddings, PNDM (PLMS) as SD 1.5 ships it. 40x40 px: 5 bands of 4 latent rows.
    "tiny-sd15": {
        "cfg": GenerateRequest(
            prompt="a photo of a red cat",
            negative_prompt="dark",
            guidance=7.0,
            height=40,
            width=40,
            steps=3,
            seed=7,
            num_images=2,
        ),
        "empty-negative": GenerateRequest(
            prompt="a blue house", guidance=7.0, height=40, width=40, steps=3, seed=11
        ),
        "img2img": GenerateRequest(
            prompt="a watercolor",
            negative_prompt="dark",
            guidance=7.0,
            image=SOURCE,
            strength=0.6,
            height=40,
            width=40,
            steps=5,
            seed=3,
        ),
    },
    # tiny-sdxl with its ControlNet (the UNet's encoder half, on the same bands; the control images' bands
    # of pixel rows under them), read twice at once (MultiControlNetModel: residuals summed).
    "tiny-sdxl-controlnet": {
        "two-controls": GenerateRequest(
            prompt="a house",
            negative_prompt="dark",
            guidance=5.0,
            controls=(ControlInput(image=CONTROL, scale=0.8), ControlInput(image=CONTROL_2, scale=0.5)),
            height=40,
            width=40,
            steps=3,
            seed=21,
            num_images=2,
        ),
        "control-img2img": GenerateRequest(
            prompt="a watercolor",
            negative_prompt="dark",
            guidance=5.0,
            image=SOURCE,
            strength=0.6,
            controls=(ControlInput(image=CONTROL, scale=0.8),),
            height=40,
            width=40,
            steps=5,
            seed=3,
        ),
    },
    # tiny-sdxl with an IP-Adapter: its processors sit on the cross-attention, local to a band; the negative
    # branch's image embeddings are zeros, as diffusers makes them.
    "tiny-sdxl-ip-adapter": {
        "image-prompt": GenerateRequest(
            prompt="a portrait",
            negative_prompt="dark",
            guidance=5.0,
            ip_adapter_image=SOURCE,
            ip_adapter_scale=0.8,
            height=40,
            width=40,
            steps=3,
            seed=17,
        ),
    },
    # 9 frames of 48x80 px = 3 latent frames of 3x5 patch tokens: 45 video tokens, uneven at 2, 4 and 8.
    "tiny-wan": {
        "cfg": GenerateRequest(
            prompt="a photo of a red cat",
            negative_prompt="dark",
            guidance=5.0,
            height=48,
            width=80,
            num_frames=9,
            steps=3,
            seed=7,
            num_images=2,
        ),
        "no-cfg": GenerateRequest(
            prompt="a blue house", guidance=1.0, height=48, width=80, num_frames=9, steps=3, seed=11
        ),
    },
}


# Every offered sampler (``scheduler``, rayxdit/schedulers.py) but each checkpoint's own, which the requests
# above run; a model key ending in SAMPLERS is its preset. 3 steps each: the multistep solvers' second
# order takes over at the second step, Heun calls the model twice a step.
SAMPLERS = "+samplers"


def _named(scheduler: str, **fields) -> GenerateRequest:
    return GenerateRequest(prompt="a photo of a red cat", steps=3, seed=31, scheduler=scheduler, **fields)


_FLUX_SIZE, _SDXL_SIZE, _WAN_SIZE = (
    dict(height=36, width=36),
    dict(height=40, width=40),
    dict(height=48, width=80),
)
REQUESTS.update(
    {
        "tiny-flux" + SAMPLERS: {
            "dpm++2m": _named("dpm++2m", negative_prompt="dark", true_cfg_scale=3.0, **_FLUX_SIZE),
            "unipc": _named("unipc", num_images=2, **_FLUX_SIZE),
        },
        "tiny-sd3" + SAMPLERS: {
            **{
                name: _named(name, negative_prompt="dark", guidance=4.0, **_FLUX_SIZE)
                for name in ("heun", "dpm++2m", "unipc")
            },
            # img2img counts its start in steps, not timesteps (Heun has two a step)
            "heun-img2img": _named("heun", image=SOURCE, strength=0.6, guidance=4.0, **_FLUX_SIZE),
        },
        "tiny-sdxl" + SAMPLERS: {
            **{
                name: _named(name, negative_prompt="dark", guidance=5.0, **_SDXL_SIZE)
                for name in ("dpm++2m", "dpm++2m-karras", "unipc", "ddim")
            },
            # img2img: the solver's add_noise starts the loop, its begin index set past the skipped steps
            "dpm++2m-img2img": _named("dpm++2m", image=SOURCE, strength=0.7, guidance=5.0, **_SDXL_SIZE),
        },
        "tiny-wan" + SAMPLERS: {
            name: _named(name, negative_prompt="dark", guidance=5.0, num_frames=9, **_WAN_SIZE)
            for name in ("euler", "heun", "dpm++2m")
        },
    }
)
# Twice the family's: Heun calls the model twice a step, and SD3's one-rank difference from diffusers
# (1.7e-6 a call, see above) accumulates to 1.0e-5 over Heun's 5 calls.
TOLERANCE.update(
    {model + SAMPLERS: 2 * TOLERANCE[model] for model in ("tiny-flux", "tiny-sd3", "tiny-sdxl", "tiny-wan")}
)


# LoRA adapters per request (``loras``, rayxdit/models/lora.py) against diffusers' own adapters (peft layers
# beside the weights, chosen with ``set_adapters``): stacked (with CFG), none, one; in this order, so every
# request after the first swaps the weights and the plain one must find them as loaded. A model key ending in
# LORAS is its preset served with the test adapters (tests/lora_files.py) as lora_sources.
LORAS = "+loras"
LORA_SABOTAGE = "adapters on one rank"


def _adapted(model: str, *adapters: tuple[str, float], **fields) -> GenerateRequest:
    chosen = tuple(LoraChoice(name=f"{model}/{name}", scale=scale) for name, scale in adapters)
    return GenerateRequest(prompt="a photo of a red cat", steps=3, seed=41, loras=chosen, **fields)


REQUESTS.update(
    {
        model + LORAS: {
            "stacked": _adapted(
                model, ("ink", 0.8), ("styles/sketch", 1.5), negative_prompt="dark", **cfg, **size
            ),
            "plain": _adapted(model, **size),
            "ink": _adapted(model, ("ink", 0.8), **size),
        }
        for model, size, cfg in (
            ("tiny-flux", _FLUX_SIZE, dict(true_cfg_scale=3.0)),
            ("tiny-sdxl", _SDXL_SIZE, dict(guidance=5.0)),
            ("tiny-wan", dict(num_frames=9, **_WAN_SIZE), dict(guidance=5.0)),
        )
    }
)
TOLERANCE.update({model + LORAS: TOLERANCE[model] for model in ("tiny-flux", "tiny-sdxl", "tiny-wan")})


# Weights spread over the group (``shard_weights``, rayxdit/parallel/shard.py): the model's requests, on
# ranks that each hold 1/N of the transformer (checked from their own parameter storage) and gather a
# block's weights before it runs. A model key ending in SHARDED is its preset served that way.
SHARDED = "+sharded"
REQUESTS.update(
    {
        "tiny-flux" + SHARDED: {name: REQUESTS["tiny-flux"][name] for name in ("true-cfg", "inpaint")},
        "tiny-sd3" + SHARDED: {"cfg": REQUESTS["tiny-sd3"]["cfg"]},
        "tiny-wan" + SHARDED: {"cfg": REQUESTS["tiny-wan"]["cfg"]},
    }
)
TOLERANCE.update({model + SHARDED: TOLERANCE[model] for model in ("tiny-flux", "tiny-sd3", "tiny-wan")})
HELD = "parameters held"
SHARD_SABOTAGE = "a shard lost"


def reference_scheduler(model: str, own, name: str):
    """The sampler ``name`` made as a diffusers user would, from the checkpoint's scheduler config (written
    out here, not read from rayxdit's table, so the table is checked too)."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        FlowMatchHeunDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    config = own.config
    if model == "tiny-sdxl":
        return {
            "dpm++2m": lambda: DPMSolverMultistepScheduler.from_config(config),
            "dpm++2m-karras": lambda: DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True),
            "unipc": lambda: UniPCMultistepScheduler.from_config(config),
            "ddim": lambda: DDIMScheduler.from_config(config, clip_sample=False),
        }[name]()
    shift = config.get("shift", config.get("flow_shift"))
    flow = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)
    return {
        "euler": lambda: FlowMatchEulerDiscreteScheduler.from_config(config, shift=shift),
        "heun": lambda: FlowMatchHeunDiscreteScheduler.from_config(config, shift=shift),
        "dpm++2m": lambda: DPMSolverMultistepScheduler.from_config(config, **flow),
        "unipc": lambda: UniPCMultistepScheduler.from_config(config, **flow),
    }[name]()


def engine_config(model: str, **options) -> EngineConfig:
    """A test model's engine: a preset, or a preset with ControlNets or an IP-Adapter beside it, or serving
    the test LoRA adapters."""
    model = model.removesuffix(SAMPLERS)
    if model.endswith(SHARDED):
        return EngineConfig(model=model.removesuffix(SHARDED), shard_weights=True, **options)
    if model.endswith(LORAS):
        return EngineConfig(model=model.removesuffix(LORAS), lora_sources=(lora_source(),), **options)
    if model == "tiny-flux-controlnets":
        nets = ("tiny-flux-controlnet-union", "tiny-flux-controlnet")
        return EngineConfig(model="tiny-flux", controlnets=nets, **options)
    if model.endswith("-ip-adapter"):
        return EngineConfig(model=model.removesuffix("-ip-adapter"), ip_adapter=model, **options)
    if model.endswith("-controlnet"):
        return EngineConfig(model=model.removesuffix("-controlnet"), controlnets=(model,), **options)
    return EngineConfig(model=model, **options)


def _image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def diffusers_reference(model: str, request: GenerateRequest) -> torch.Tensor:
    """The final latents of diffusers' own pipeline, in the engine's latent layout."""
    model = model.removesuffix(SAMPLERS).removesuffix(LORAS).removesuffix(SHARDED)
    adapter = load_adapter(engine_config(model).model, torch.device("cpu"), torch.float32)
    for lora in request.loras:
        path = Path(lora_source()) / f"{lora.name}.safetensors"
        adapter.pipeline.load_lora_weights(path.parent, weight_name=path.name, adapter_name=lora.name)
    if request.loras:
        adapter.pipeline.set_adapters(
            [lora.name for lora in request.loras], [lora.scale for lora in request.loras]
        )
    if request.scheduler is not None:
        adapter.pipeline.scheduler = reference_scheduler(model, adapter.pipeline.scheduler, request.scheduler)
    guidance = adapter.limits.resolve(request).request.guidance  # the model's default when it sends none
    common = dict(
        negative_prompt=request.negative_prompt,
        height=request.height,
        width=request.width,
        num_inference_steps=request.steps,
        generator=[torch.Generator().manual_seed(request.seed + i) for i in range(request.num_images)],
        num_images_per_prompt=request.num_images,
        output_type="latent",
    )
    if model in ("tiny-flux-controlnet", "tiny-flux-controlnets") and request.image is not None:
        from diffusers import FluxControlNetInpaintPipeline, FluxControlNetModel

        net = FluxControlNetModel.from_pretrained(materialize_preset(model))
        (control,) = request.controls
        return FluxControlNetInpaintPipeline.from_pipe(adapter.pipeline, controlnet=net)(
            request.prompt,
            image=_image(request.image),
            mask_image=Image.open(io.BytesIO(request.mask)),
            control_image=_image(control.image),
            strength=request.strength,
            controlnet_conditioning_scale=control.scale,
            guidance_scale=guidance,
            max_sequence_length=29,
            **{key: value for key, value in common.items() if key != "negative_prompt"},  # no true CFG
        ).images
    if model in ("tiny-flux-controlnet", "tiny-flux-controlnets"):
        from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxMultiControlNetModel

        nets = [
            FluxControlNetModel.from_pretrained(materialize_preset(name))
            for name in engine_config(model).controlnets
        ]
        controls = request.controls
        several = len(controls) > 1
        return FluxControlNetPipeline.from_pipe(
            adapter.pipeline, controlnet=FluxMultiControlNetModel(nets) if several else nets[0]
        )(
            request.prompt,
            control_image=[_image(c.image) for c in controls] if several else _image(controls[0].image),
            control_mode=[c.mode for c in controls] if several else controls[0].mode,
            controlnet_conditioning_scale=[c.scale for c in controls] if several else controls[0].scale,
            true_cfg_scale=request.true_cfg_scale,
            guidance_scale=guidance,
            max_sequence_length=29,
            **common,
        ).images
    if model == "tiny-sdxl-controlnet" and request.image is not None:
        from diffusers import ControlNetModel, StableDiffusionXLControlNetImg2ImgPipeline

        net = ControlNetModel.from_pretrained(materialize_preset(model))
        (control,) = request.controls
        latents = StableDiffusionXLControlNetImg2ImgPipeline.from_pipe(adapter.pipeline, controlnet=net)(
            request.prompt,
            # SDXL's img2img keeps the input's size: resize it as the engine does
            image=adapter.pipeline.image_processor.preprocess(
                _image(request.image), height=request.height, width=request.width
            ),
            control_image=_image(control.image),
            strength=request.strength,
            controlnet_conditioning_scale=control.scale,
            guidance_scale=guidance,
            **common,
        ).images
        return latents.permute(0, 2, 3, 1).flatten(1, 2)
    if model == "tiny-sdxl-controlnet":
        from diffusers import ControlNetModel, MultiControlNetModel, StableDiffusionXLControlNetPipeline

        net = ControlNetModel.from_pretrained(materialize_preset(model))
        latents = StableDiffusionXLControlNetPipeline.from_pipe(
            adapter.pipeline, controlnet=MultiControlNetModel([net] * len(request.controls))
        )(
            request.prompt,
            image=[_image(c.image) for c in request.controls],
            controlnet_conditioning_scale=[c.scale for c in request.controls],
            guidance_scale=guidance,
            **common,
        ).images
        return latents.permute(0, 2, 3, 1).flatten(1, 2)
    if model == "tiny-sdxl-ip-adapter":
        adapter.pipeline.load_ip_adapter(
            str(materialize_preset(model)), subfolder="", weight_name="ip-adapter_sdxl.safetensors"
        )
        adapter.pipeline.set_ip_adapter_scale(request.ip_adapter_scale)
        latents = adapter.pipeline(
            request.prompt,
            ip_adapter_image=_image(request.ip_adapter_image),
            guidance_scale=guidance,
            **common,
        ).images
        return latents.permute(0, 2, 3, 1).flatten(1, 2)
    if model == "tiny-flux-ip-adapter":
        location = materialize_preset("tiny-flux-ip-adapter")
        pipeline = adapter.pipeline
        pipeline.load_ip_adapter(
            str(location),
            weight_name="ip_adapter.safetensors",
            image_encoder_pretrained_model_name_or_path=str(location / "image_encoder"),
            image_encoder_dtype=torch.float32,
        )
        pipeline.set_ip_adapter_scale(request.ip_adapter_scale)
        return pipeline(
            request.prompt,
            ip_adapter_image=Image.open(io.BytesIO(request.ip_adapter_image)).convert("RGB"),
            true_cfg_scale=request.true_cfg_scale,
            guidance_scale=guidance,
            max_sequence_length=29,
            **common,
        ).images
    if model == "tiny-flux-kontext":
        return adapter.pipeline(
            prompt=request.prompt,
            image=Image.open(io.BytesIO(request.image)).convert("RGB"),
            true_cfg_scale=request.true_cfg_scale,
            guidance_scale=guidance,
            max_sequence_length=29,
            max_area=request.height * request.width,  # the requested size, as the engine takes it
            _auto_resize=False,  # the preset's kontext_auto_resize
            **common,
        ).images
    if model in ("tiny-sdxl", "tiny-sd15") and request.image is not None:
        from diffusers import (
            StableDiffusionImg2ImgPipeline,
            StableDiffusionXLImg2ImgPipeline,
            StableDiffusionXLInpaintPipeline,
        )

        pipeline_class = (
            StableDiffusionImg2ImgPipeline
            if model == "tiny-sd15"
            else StableDiffusionXLInpaintPipeline
            if request.mask
            else StableDiffusionXLImg2ImgPipeline
        )
        extra = {} if request.mask is None else {"mask_image": Image.open(io.BytesIO(request.mask))}
        image = Image.open(io.BytesIO(request.image)).convert("RGB")
        if request.mask is None:  # SDXL's img2img keeps the input's size: resize it as the engine does
            image = adapter.pipeline.image_processor.preprocess(
                image, height=request.height, width=request.width
            )
        latents = pipeline_class.from_pipe(adapter.pipeline)(
            request.prompt,
            image=image,
            strength=request.strength,
            guidance_scale=guidance,
            **extra,
            **common,
        ).images
        return latents.permute(0, 2, 3, 1).flatten(1, 2)
    if model == "tiny-sd3" and request.image is not None:
        from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline

        pipeline_class = StableDiffusion3InpaintPipeline if request.mask else StableDiffusion3Img2ImgPipeline
        extra = {} if request.mask is None else {"mask_image": Image.open(io.BytesIO(request.mask))}
        latents = pipeline_class.from_pipe(adapter.pipeline)(
            request.prompt,
            image=_image(request.image),
            strength=request.strength,
            guidance_scale=guidance,
            max_sequence_length=13,
            **extra,
            **common,
        ).images
        return adapter.pack(latents)
    if model == "tiny-flux" and request.image is not None:
        from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline

        pipeline_class = FluxInpaintPipeline if request.mask is not None else FluxImg2ImgPipeline
        extra = {} if request.mask is None else {"mask_image": Image.open(io.BytesIO(request.mask))}
        return pipeline_class.from_pipe(adapter.pipeline)(
            request.prompt,
            image=Image.open(io.BytesIO(request.image)).convert("RGB"),
            strength=request.strength,
            true_cfg_scale=request.true_cfg_scale,
            guidance_scale=guidance,
            max_sequence_length=29,
            **extra,
            **common,
        ).images
    if model == "tiny-flux":
        return adapter.pipeline(
            request.prompt,
            true_cfg_scale=request.true_cfg_scale,
            guidance_scale=guidance,
            max_sequence_length=29,
            **common,
        ).images
    if model == "tiny-wan":
        common["num_videos_per_prompt"] = common.pop("num_images_per_prompt")
        latents = adapter.pipeline(
            request.prompt,
            num_frames=request.num_frames,
            guidance_scale=guidance,
            max_sequence_length=16,
            **common,
        ).frames
        return adapter.pack(latents)
    if model in ("tiny-sdxl", "tiny-sd15"):
        latents = adapter.pipeline(request.prompt, guidance_scale=guidance, **common).images
        return latents.permute(0, 2, 3, 1).flatten(1, 2)  # the engine's row-major tokens
    latents = adapter.pipeline(
        request.prompt, guidance_scale=guidance, max_sequence_length=13, **common
    ).images
    return adapter.pack(latents)


@pytest.fixture(scope="module")
def references() -> dict[tuple[str, str], torch.Tensor]:
    return {
        (model, name): diffusers_reference(model, request)
        for model, requests in REQUESTS.items()
        for name, request in requests.items()
    }


def _run_configs(worker, configs):
    """Each (model, parallel spec, sabotage) runs its model's requests on a fresh mesh in one process group."""
    latents = {}
    for model, spec, sabotage in configs:
        state = build_parallel_state(ParallelConfig.parse(spec), torch.device("cpu"))
        # Warm-up longer than any request: PipeFusion then never uses stale keys/values and must be exact.
        engine = Engine(engine_config(model, parallel=state.config, warmup_steps=100), state)
        if sabotage == SHARD_SABOTAGE:
            lose_a_shard(engine.adapter.transformer)
        if model.endswith(SHARDED):  # this rank's parameters, and the largest block's
            blocks = [
                sum(p.numel() for p in m.parameters()) for m in shardable_modules(engine.adapter.transformer)
            ]
            latents[(model, spec, sabotage, HELD)] = (
                *held_parameters(engine.adapter.transformer),
                max(blocks),
            )
        with broken_ring_merge(sabotage is True), adapters_on_one_rank(sabotage == LORA_SABOTAGE):
            for request_name, request in REQUESTS[model].items():
                if request.image is not None and state.config.pipefusion > 1:
                    continue  # input images are not implemented for PipeFusion (refused with a 400)
                if request.scheduler not in (None, "euler") and state.config.pipefusion > 1:
                    try:  # PipeFusion steps each patch apart: a solver with a history is refused
                        engine.generate(request, output="latent")
                    except RequestError as error:
                        latents[(model, spec, sabotage, request_name)] = error.param
                    continue
                result = engine.generate(request, output="latent")
                if result is not None:
                    latents[(model, spec, sabotage, request_name)] = result.latents
    return latents


CONFIGS = {
    2: [
        ("tiny-flux", "ulysses=2", False),
        ("tiny-flux", "ring=2", False),
        ("tiny-flux", "cfg=2", False),
        ("tiny-flux", "ring=2", True),  # a broken ring merge must be caught
        ("tiny-flux", "pipefusion=2", False),
        ("tiny-flux-controlnet", "ulysses=2", False),
        ("tiny-flux-controlnet", "ring=2", False),
        ("tiny-flux-controlnet", "cfg=2", False),
        ("tiny-flux-controlnets", "ulysses=2", False),
        ("tiny-flux-controlnets", "ring=2", False),
        ("tiny-flux-controlnets", "cfg=2", False),
        ("tiny-flux-ip-adapter", "ulysses=2", False),
        ("tiny-flux-ip-adapter", "ring=2", False),
        ("tiny-flux-ip-adapter", "cfg=2", False),
        ("tiny-flux-kontext", "ulysses=2", False),
        ("tiny-flux-kontext", "ring=2", False),
        ("tiny-flux-kontext", "cfg=2", False),
        ("tiny-sd3", "ulysses=2", False),
        ("tiny-sd3", "ring=2", False),
        ("tiny-sd3", "cfg=2", False),
        ("tiny-sdxl", "ulysses=2", False),
        ("tiny-sdxl", "ring=2", False),
        ("tiny-sdxl", "cfg=2", False),
        ("tiny-sd15", "cfg=2", False),
        ("tiny-sdxl-controlnet", "ulysses=2", False),
        ("tiny-sdxl-controlnet", "ring=2", False),
        ("tiny-sdxl-controlnet", "cfg=2", False),
        ("tiny-sdxl-ip-adapter", "ulysses=2", False),
        ("tiny-sdxl-ip-adapter", "ring=2", False),
        ("tiny-sdxl-ip-adapter", "cfg=2", False),
        ("tiny-wan", "ulysses=2", False),
        ("tiny-wan", "ring=2", False),
        ("tiny-wan", "cfg=2", False),
        ("tiny-flux" + SAMPLERS, "ulysses=2", False),
        ("tiny-flux" + SAMPLERS, "pipefusion=2", False),  # refused: no single-step sampler among them
        ("tiny-sd3" + SAMPLERS, "ring=2", False),
        ("tiny-sdxl" + SAMPLERS, "cfg=2", False),
        ("tiny-wan" + SAMPLERS, "ulysses=2", False),
        ("tiny-flux" + LORAS, "ulysses=2", False),
        ("tiny-flux" + LORAS, "ring=2", False),
        ("tiny-flux" + LORAS, "cfg=2", False),
        ("tiny-flux" + LORAS, "pipefusion=2", False),  # each stage updates its own blocks only
        ("tiny-flux" + LORAS, "ulysses=2", LORA_SABOTAGE),  # an adapter on one rank must be caught
        ("tiny-sdxl" + LORAS, "ulysses=2", False),
        ("tiny-sdxl" + LORAS, "ring=2", False),  # 3x3 convolutions' updates under halo exchange
        ("tiny-sdxl" + LORAS, "cfg=2", False),
        ("tiny-wan" + LORAS, "ulysses=2", False),
        ("tiny-wan" + LORAS, "ring=2", False),
        ("tiny-wan" + LORAS, "cfg=2", False),
        ("tiny-flux" + SHARDED, "ulysses=2", False),
        ("tiny-flux" + SHARDED, "ulysses=2", SHARD_SABOTAGE),  # a rank's shard wrong must be caught
        ("tiny-sd3" + SHARDED, "cfg=2", False),
        ("tiny-wan" + SHARDED, "ring=2", False),
    ],
    4: [
        ("tiny-flux", "ulysses=4", False),
        ("tiny-flux", "ring=4", False),
        ("tiny-flux", "ulysses=2,ring=2", False),
        ("tiny-flux", "cfg=2,ulysses=2", False),
        ("tiny-flux", "cfg=2,ring=2", False),
        ("tiny-flux", "pipefusion=4", False),
        ("tiny-flux", "pipefusion=2,cfg=2", False),
        ("tiny-flux", "pipefusion=2,ulysses=2", False),
        ("tiny-flux-kontext", "ulysses=2,ring=2", False),
        ("tiny-flux-controlnet", "cfg=2,ulysses=2", False),
        ("tiny-flux-ip-adapter", "ulysses=2,ring=2", False),
        ("tiny-sd3", "ulysses=4", False),
        ("tiny-sd3", "ulysses=2,ring=2", False),
        ("tiny-sdxl", "ring=4", False),
        ("tiny-sdxl", "ulysses=2,ring=2", False),
        ("tiny-sd15", "cfg=2,ring=2", False),
        ("tiny-sdxl-controlnet", "ring=4", False),
        ("tiny-wan", "ulysses=4", False),
        ("tiny-wan", "ulysses=2,ring=2", False),
        # Every family's offered samplers at 4 and 8 ranks too, each on a mesh of two axes.
        ("tiny-flux" + SAMPLERS, "cfg=2,ulysses=2", False),
        ("tiny-sd3" + SAMPLERS, "ulysses=2,ring=2", False),
        ("tiny-sdxl" + SAMPLERS, "ring=4", False),
        ("tiny-wan" + SAMPLERS, "ring=2,ulysses=2", False),
        ("tiny-flux" + LORAS, "ulysses=2,ring=2", False),
        ("tiny-flux" + LORAS, "pipefusion=2,cfg=2", False),
        ("tiny-sdxl" + LORAS, "ring=4", False),
        ("tiny-wan" + LORAS, "cfg=2,ulysses=2", False),
        ("tiny-flux" + SHARDED, "cfg=2,ring=2", False),
    ],
    8: [
        ("tiny-flux", "cfg=2,ring=2,ulysses=2", False),
        ("tiny-flux", "cfg=2,pipefusion=2,ulysses=2", False),
        ("tiny-flux-kontext", "cfg=2,ring=2,ulysses=2", False),
        ("tiny-flux-controlnet", "cfg=2,ring=2,ulysses=2", False),
        ("tiny-flux-ip-adapter", "cfg=2,ring=2,ulysses=2", False),
        ("tiny-sd3", "cfg=2,ring=2,ulysses=2", False),
        ("tiny-sdxl", "cfg=2,ring=2,ulysses=2", False),
        ("tiny-sd15", "cfg=2,ring=2,ulysses=2", False),
        ("tiny-flux-controlnets", "cfg=2,ring=2,ulysses=2", False),
        ("tiny-sdxl-controlnet", "cfg=2,ring=2,ulysses=2", False),
        ("tiny-sdxl-ip-adapter", "cfg=2,ring=2,ulysses=2", False),
        ("tiny-wan", "cfg=2,ring=2,ulysses=2", False),
        ("tiny-flux" + SHARDED, "cfg=2,ring=2,ulysses=2", False),
        ("tiny-flux" + SAMPLERS, "cfg=2,ring=2,ulysses=2", False),
        ("tiny-sd3" + SAMPLERS, "cfg=2,ring=2,ulysses=2", False),
        ("tiny-sdxl" + SAMPLERS, "cfg=2,ring=2,ulysses=2", False),
        ("tiny-wan" + SAMPLERS, "cfg=2,ring=2,ulysses=2", False),
        # LoRA adapters not again: an adapter updates each rank's weights alone, whatever the mesh; 2 and 4
        # ranks show them on every axis, and each of their models' meshes is shown here (8 gloo ranks on 2
        # cores: ~25 ms a collective).
    ],
}


def max_error(latents: torch.Tensor, reference: torch.Tensor) -> float:
    assert latents.shape == reference.shape, (latents.shape, reference.shape)
    return (latents - reference).abs().max().item()


def test_single_rank_engine_equals_diffusers_pipeline(references):
    for model, requests in REQUESTS.items():
        if model.endswith(SHARDED):
            continue  # one rank has nothing to spread its weights over (refused)
        engine = Engine(engine_config(model), ParallelState.single())
        for name, request in requests.items():
            latents = engine.generate(request, output="latent").latents
            if model == "tiny-flux":
                assert torch.equal(latents, references[(model, name)]), name
            else:
                assert max_error(latents, references[(model, name)]) <= TOLERANCE[model], name


@pytest.mark.slow
@pytest.mark.parametrize("world_size", sorted(CONFIGS))
def test_parallel_configs_match_single_rank(world_size, references):
    latents = run_on_ranks(_run_configs, world_size, CONFIGS[world_size], timeout_s=900)
    for model, spec, sabotage in CONFIGS[world_size]:
        if model.endswith(SHARDED):  # at most 1/N of the transformer, plus one block's worth of padding
            held, total, block = latents[(model, spec, sabotage, HELD)]
            assert held <= total / world_size + block, f"{model} {spec}: rank 0 holds {held} of {total}"
        for request_name, request in REQUESTS[model].items():
            if request.image is not None and "pipefusion" in spec:
                continue
            if request.scheduler not in (None, "euler") and "pipefusion" in spec:
                refused = latents[(model, spec, sabotage, request_name)]
                assert refused == "scheduler", f"{model} {spec} / {request_name}: not refused ({refused!r})"
                continue
            error = max_error(
                latents[(model, spec, sabotage, request_name)], references[(model, request_name)]
            )
            label = f"{model} {spec}{' sabotaged' if sabotage else ''} / {request_name}"
            tolerance = TOLERANCE[model]
            if sabotage == LORA_SABOTAGE and not request.loras:
                assert error <= tolerance, f"{label}: max error {error:.2e} > {tolerance}"
            elif sabotage:
                assert error > 100 * tolerance, f"{label}: broken merge not detected ({error:.2e})"
            else:
                assert error <= tolerance, f"{label}: max error {error:.2e} > {tolerance}"


def test_control_inputs_a_model_cannot_take_are_refused_before_any_step():
    engine = Engine(engine_config("tiny-flux-controlnets"), ParallelState.single())
    base = GenerateRequest(prompt="a house", height=36, width=36, steps=2)
    union, plain = "tiny-flux-controlnet-union", "tiny-flux-controlnet"
    cases = {
        "control_mode": [
            (ControlInput(image=CONTROL, controlnet=union),),  # a union ControlNet needs its mode
            (ControlInput(image=CONTROL, controlnet=union, mode=4),),  # it has 4: 0..3
            (ControlInput(image=CONTROL, controlnet=plain, mode=1),),  # no union ControlNet here
        ],
        "controlnet": [
            (ControlInput(image=CONTROL),),  # two are loaded: which one?
            (ControlInput(image=CONTROL, controlnet="canny"),),
        ],
    }
    for param, variants in cases.items():
        for controls in variants:
            with pytest.raises(RequestError) as refused:
                engine.generate(base.model_copy(update={"controls": controls}), output="latent")
            assert refused.value.param == param, (controls, str(refused.value))
    with pytest.raises(RequestError, match="without an IP-Adapter"):
        engine.generate(base.model_copy(update={"ip_adapter_image": SOURCE}), output="latent")
    kontext = Engine(EngineConfig(model="tiny-flux-kontext"), ParallelState.single())
    with pytest.raises(RequestError, match="without ControlNets"):
        edit = base.model_copy(update={"image": SOURCE, "controls": (ControlInput(image=CONTROL),)})
        kontext.generate(edit, output="latent")
    with pytest.raises(
        ConfigError, match="tiny-flux-controlnet' is a FluxControlNetModel; StableDiffusionXL"
    ):
        Engine(EngineConfig(model="tiny-sdxl", controlnets=("tiny-flux-controlnet",)), ParallelState.single())


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sdxl"])
def test_a_model_with_an_ip_adapter_serves_requests_without_an_image_prompt_as_without_it(model):
    """A pool loads its IP-Adapter for every request: one without an image prompt must be the plain model's
    (diffusers' SDXL UNet refuses to run without image embeddings once an adapter is loaded)."""
    request = next(iter(REQUESTS[model].values()))
    plain = Engine(engine_config(model), ParallelState.single()).generate(request, output="latent")
    adapted = Engine(engine_config(f"{model}-ip-adapter"), ParallelState.single())
    assert torch.equal(adapted.generate(request, output="latent").latents, plain.latents)
    prompted = adapted.generate(request.model_copy(update={"ip_adapter_image": SOURCE}), output="latent")
    assert max_error(prompted.latents, plain.latents) > 100 * TOLERANCE[model], "the image prompt must matter"


def test_a_schnell_shaped_checkpoint_runs_with_its_own_defaults_as_diffusers_does():
    """No guidance embeddings and no rayxdit.json: 4 steps, 256 text tokens and no guidance, as FLUX.1-schnell
    is run with diffusers' FluxPipeline."""
    engine = Engine(EngineConfig(model="tiny-flux-schnell"), ParallelState.single())
    request = GenerateRequest(prompt="a photo of a red cat", height=32, width=32, seed=3)
    latents = engine.generate(request, output="latent").latents
    pipeline = load_adapter("tiny-flux-schnell", torch.device("cpu"), torch.float32).pipeline
    reference = pipeline(
        request.prompt,
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=0.0,
        max_sequence_length=256,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
    ).images
    assert torch.equal(latents, reference)
