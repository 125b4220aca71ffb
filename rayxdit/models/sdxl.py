"""Stable Diffusion XL (``StableDiffusionXLPipeline`` / ``UNet2DConditionModel``): patch parallelism for a UNet.

A UNet is convolutional, so its sequence parallelism is patch parallelism: every rank of the sp group holds a
band of latent rows and runs the unchanged UNet on it, made exact by :mod:`rayxdit.parallel.spatial` (halo
rows for every convolution, GroupNorm statistics over all bands). The transformer blocks' self-attention
sees a band as a contiguous run of row-major tokens, so it runs as ring/Ulysses attention over the sp
group; cross-attention to the text is local. Bands are aligned to the UNet's total downsampling so strided
convolutions stay aligned: the latent rows are split in units of ``2 ** downsamplers`` rows.

The loop keeps latents as tokens ``[B, H*W, C]`` (row-major), so a band is a contiguous token shard and the
model-independent loop, scheduler and CFG parallelism apply unchanged. SDXL is trained with CFG: ``guidance``
is its scale (on above 1); an absent negative prompt means zero embeddings, as diffusers does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from rayxdit.config import ConfigError
from rayxdit.limits import ModelLimits, ResolvedRequest
from rayxdit.models.base import DiffusionAdapter, begin_at, decode_image, ip_adapter_weights
from rayxdit.models.families import SD15, SDXL
from rayxdit.models.running import RunningRequest
from rayxdit.parallel.attention import SequenceParallelAttention
from rayxdit.parallel.cfg import CONDITIONAL, UNCONDITIONAL
from rayxdit.parallel.mesh import ParallelState
from rayxdit.parallel.sequence import split_sizes
from rayxdit.parallel.spatial import RowBands, parallelize_bands
from rayxdit.request import GenerateRequest, RequestError


class BandSelfAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` for a transformer block's self-attention on a band's tokens
    ``[B, rows*W, C]``, as sequence-parallel attention. ``sizes`` (every band's tokens at this resolution) is
    set by a hook on the enclosing ``Transformer2DModel``, which sees the band's ``[B, C, rows, W]``."""

    def __init__(self, attention: SequenceParallelAttention):
        self.attention = attention
        self.sizes: list[int] = []

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        assert encoder_hidden_states is None and attention_mask is None, "self-attention only"
        assert attn.group_norm is None and attn.spatial_norm is None and hidden_states.ndim == 3
        batch = hidden_states.shape[0]
        head_dim = attn.inner_dim // attn.heads
        query, key, value = (
            proj(hidden_states).view(batch, -1, attn.heads, head_dim)
            for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        out = self.attention(query, key, value, self.sizes, scale=attn.scale).flatten(2, 3).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def parallelize_unet(unet: torch.nn.Module, state: ParallelState, attention: str = "auto") -> RowBands | None:
    """Make a ``UNet2DConditionModel`` run on bands of latent rows over ``state``'s sp group. Returns the
    bands, whose ``rows`` (at the latent resolution) the caller sets per request."""
    if state.axis("sp").size == 1:
        return None
    bands = RowBands(state.axis("sp"))
    parallelize_bands(unet, state.axis("sp"))
    kernel = SequenceParallelAttention(state, attention)
    for transformer in unet.modules():
        if not isinstance(transformer, Transformer2DModel):
            continue
        processor = BandSelfAttnProcessor(kernel)
        for block in transformer.modules():
            if isinstance(block, BasicTransformerBlock):
                block.attn1.set_processor(processor)

        def set_sizes(module, args, kwargs, processor=processor):
            hidden = args[0] if args else kwargs["hidden_states"]
            processor.sizes = [rows * hidden.shape[3] for rows in bands.at(hidden.shape[2])]

        transformer.register_forward_pre_hook(set_sizes, with_kwargs=True)
    return bands


@dataclass(frozen=True)
class SDXLCondition:
    prompt_embeds: torch.Tensor  # (B, 77, 2048): both CLIP encoders' penultimate states, concatenated
    added: dict[str, torch.Tensor]  # text_embeds (pooled), time_ids and (IP-Adapter) image_embeds


@dataclass(frozen=True)
class SDXLBands:
    rows: tuple[int, ...]  # latent rows per rank of the sp group
    width: int  # latent columns
    # This rank's band of each control image: (B, 3, band rows x VAE factor, width in pixels) each.
    controls: tuple[torch.Tensor, ...] = ()


class SDXLAdapter(DiffusionAdapter):
    """``StableDiffusionXLPipeline``: SDXL base and its fine-tunes."""

    family = SDXL
    ip_adapter_weight = "ip-adapter_sdxl.safetensors"
    """The weights file :meth:`load_ip_adapter` looks for in a directory (h94/IP-Adapter's names)."""

    def __init__(self, pipeline: Any, model_dir: str | None = None, limits: ModelLimits | None = None):
        super().__init__(pipeline, model_dir, limits)
        if pipeline.vae.dtype == torch.float16 and pipeline.vae.config.force_upcast:
            pipeline.vae.to(torch.float32)  # SDXL's VAE overflows in float16, as diffusers knows
        self.unet_bands: RowBands | None = None
        self.controlnet_bands: dict[str, RowBands | None] = {}

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipeline.unet

    @property
    def band_unit(self) -> int:
        """Latent rows per alignment unit: every downsampling halves the rows, so bands keep multiples."""
        return 2 ** sum(1 for block in self.transformer.down_blocks if block.downsamplers)

    def _parallelize(self, state: ParallelState, attention: str) -> None:
        self.unet_bands = parallelize_unet(self.transformer, state, attention)
        # A ControlNet is the UNet's encoder half: the same patch parallelism, on the same bands (its
        # conditioning embedding's convolutions run on the control image's band of pixel rows).
        self.controlnet_bands = {
            name: parallelize_unet(net, state, attention) for name, net in self.controlnets.items()
        }

    # ----- ControlNet and IP-Adapter -----------------------------------------------------------------------
    controlnet_class = "ControlNetModel"

    def check_controlnet(self, name: str, net: torch.nn.Module) -> None:
        if net.config.global_pool_conditions:
            raise ConfigError(
                f"controlnet '{name}' pools its conditions over the whole image (global_pool_conditions): "
                "not exact on bands of rows"
            )

    def control_bands(self, req: RunningRequest, rows: list[int]) -> tuple[torch.Tensor, ...]:
        """This rank's band of each control image, as ``StableDiffusionXLControlNetPipeline`` prepares
        them (resized to the request's size, in 0..1, one per image of the batch): the pixel rows under its
        band of latent rows."""
        processor = VaeImageProcessor(
            vae_scale_factor=self.pipeline.vae_scale_factor, do_convert_rgb=True, do_normalize=False
        )
        scale, index = self.pipeline.vae_scale_factor, self.state.axis("sp").index
        start, end = sum(rows[:index]) * scale, sum(rows[: index + 1]) * scale
        bands = []
        for control in req.request.controls:
            net = self.controlnets[self.controlnet_for(control)]
            pixels = processor.preprocess(decode_image(control.image), height=req.height, width=req.width)
            pixels = pixels.repeat_interleave(req.batch, dim=0)[:, :, start:end]
            bands.append(pixels.to(self.device, net.dtype))
        return tuple(bands)

    def control_residuals(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        cond: SDXLCondition,
        positions: SDXLBands,
        req: RunningRequest,
    ) -> dict[str, Any]:
        """The ControlNets' residuals for this band (per position: local), summed as
        ``MultiControlNetModel`` sums them; each branch runs them on its own conditioning, as diffusers."""
        down = mid = None
        for control, image in zip(req.request.controls, positions.controls, strict=True):
            name = self.controlnet_for(control)
            if self.controlnet_bands.get(name) is not None:
                self.controlnet_bands[name].rows = positions.rows
            net_down, net_mid = self.controlnets[name](
                sample,
                timestep,
                encoder_hidden_states=cond.prompt_embeds,
                controlnet_cond=image,
                conditioning_scale=control.scale,
                added_cond_kwargs=cond.added,
                return_dict=False,
            )
            down = net_down if down is None else [a + b for a, b in zip(down, net_down, strict=True)]
            mid = net_mid if mid is None else mid + net_mid
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def load_ip_adapter(self, location: str, image_encoder: str | None) -> None:
        """diffusers' ``load_ip_adapter`` (h94/IP-Adapter's layout: see :func:`ip_adapter_weights`; the CLIP
        image encoder from ``image_encoder`` or the weights' ``image_encoder/`` folder). Its processors sit
        on the cross-attention, which is local to a band (the image-prompt tokens are replicated): exact
        under patch parallelism as it comes."""
        source, subfolder, weight_name = ip_adapter_weights(location, self.ip_adapter_weight)
        pipe = self.pipeline
        if image_encoder is not None:
            from transformers import CLIPVisionModelWithProjection

            encoder = CLIPVisionModelWithProjection.from_pretrained(
                image_encoder, dtype=self.transformer.dtype
            )
            pipe.register_modules(image_encoder=encoder)
        pipe.load_ip_adapter(
            source,
            subfolder=subfolder,
            weight_name=weight_name,
            image_encoder_folder=None if image_encoder is not None else "image_encoder",
        )
        pipe.image_encoder.to(self.device, self.transformer.dtype)

    def prepare(self, req: RunningRequest) -> None:
        """The IP-Adapter's scale, which diffusers' processors read from themselves: the request's with an
        image prompt, else 0 (see :meth:`image_prompt`)."""
        if self.ip_adapter_loaded:
            prompted = req.request.ip_adapter_image is not None
            self.pipeline.set_ip_adapter_scale(req.request.ip_adapter_scale if prompted else 0.0)

    def image_prompt(self, req: RunningRequest, branch: int) -> list[torch.Tensor]:
        """The IP-Adapter's image embeddings of one branch, as ``StableDiffusionXLPipeline`` makes them (the
        negative branch's: zeros, or for IP-Adapter Plus the encoder's states of an all-zero image). A request
        without an image prompt gets the negative embeddings at scale 0: the adapter then adds exactly zero,
        as if it were not loaded (diffusers' UNet refuses to run without image embeddings once it is)."""
        pipe = self.pipeline
        request = req.request
        prompted = request.ip_adapter_image is not None
        if not prompted:
            branch = UNCONDITIONAL
        adapters = len(pipe.unet.encoder_hid_proj.image_projection_layers)
        image = decode_image(request.ip_adapter_image) if prompted else np.zeros((64, 64, 3), np.uint8)
        embeds = pipe.prepare_ip_adapter_image_embeds([image] * adapters, None, self.device, req.batch, True)
        return [both.chunk(2)[1 if branch == CONDITIONAL else 0] for both in embeds]

    def resolve(self, request: GenerateRequest) -> ResolvedRequest:
        req = super().resolve(request)
        if self.state.axis("sp").size == 1:
            return req
        pixels = self.pipeline.vae_scale_factor * self.band_unit
        if req.height % pixels:
            raise RequestError(
                f"height={req.height}: patch parallelism splits rows in bands of {pixels} px; use a multiple",
                param="size",
            )
        ranks = self.state.axis("sp").size
        if req.height // pixels < ranks:
            raise RequestError(
                f"height={req.height} splits into {req.height // pixels} bands of {pixels} px, fewer than this group's "
                f"{ranks} patch-parallel ranks; use height >= {pixels * ranks}",
                param="size",
            )
        return req

    def encode(self, req: RunningRequest, branch: int) -> SDXLCondition:
        request = req.request
        pipe = self.pipeline
        unconditional = branch != CONDITIONAL
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=request.prompt,
            device=self.device,
            num_images_per_prompt=req.batch,
            do_classifier_free_guidance=unconditional,
            negative_prompt=request.negative_prompt,
        )
        if unconditional:
            embeds, pooled = negative, negative_pooled
        time_ids = pipe._get_add_time_ids(
            (req.height, req.width),
            (0, 0),
            (req.height, req.width),
            dtype=embeds.dtype,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        ).to(self.device)
        added = {"text_embeds": pooled, "time_ids": time_ids.repeat(req.batch, 1)}
        if self.ip_adapter_loaded:  # a UNet with an IP-Adapter wants image embeddings on every call
            added["image_embeds"] = self.image_prompt(req, branch)
        return SDXLCondition(embeds, added)

    def initial_latents(self, req: RunningRequest) -> tuple[torch.Tensor, SDXLBands]:
        # diffusers' prepare_latents, scaled by this request's scheduler (the pipeline's own has no timesteps)
        scale = self.pipeline.vae_scale_factor
        shape = (req.batch, self.transformer.config.in_channels, req.height // scale, req.width // scale)
        generators = self.generators_after_source(req)
        noise = randn_tensor(shape, generator=generators, device=self.device, dtype=self.transformer.dtype)
        # An input image's noise is scaled where it is added to the image (first_latents).
        latents = noise if req.source else noise * self.make_scheduler(req, 0)[0].init_noise_sigma
        batch, channels, height, width = latents.shape
        unit, parts = self.band_unit, self.state.axis("sp").size
        rows = [units * unit for units in split_sizes(height // unit, parts)] if parts > 1 else [height]
        tokens = latents.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        return tokens, SDXLBands(tuple(rows), width, self.control_bands(req, rows))

    def latent_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = latents.shape
        return latents.permute(0, 2, 3, 1).reshape(batch, height * width, channels)

    @staticmethod
    def first_step(steps: int, strength: float) -> int:
        # StableDiffusionXLImg2ImgPipeline.get_timesteps rounds the steps run down (Flux's rounds the start).
        return max(steps - min(int(steps * strength), steps), 0)

    def noised(self, scheduler: Any, clean: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor):
        return scheduler.add_noise(clean, noise, timestep)

    def first_latents(
        self,
        scheduler: Any,
        image: torch.Tensor,
        timestep: torch.Tensor,
        noise: torch.Tensor,
        masked: bool,
        strength: float,
    ) -> torch.Tensor:
        # StableDiffusionXLInpaintPipeline starts a full-strength repaint from pure noise, as text-to-image.
        if masked and strength == 1.0:
            return noise * scheduler.init_noise_sigma
        return super().first_latents(scheduler, image, timestep, noise, masked, strength)

    def token_sizes(self, num_tokens: int, positions: SDXLBands) -> list[int]:
        return [rows * positions.width for rows in positions.rows]

    def make_scheduler(self, req: RunningRequest, num_tokens: int) -> tuple[Any, torch.Tensor]:
        scheduler = self.new_scheduler(req)
        timesteps, _ = retrieve_timesteps(scheduler, req.steps, self.device)
        begin_at(scheduler, 0)
        return scheduler, timesteps

    def model_input(self, scheduler: Any, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return scheduler.scale_model_input(latents, timestep)

    def predict(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        cond: SDXLCondition,
        positions: SDXLBands,
        req: RunningRequest,
    ) -> torch.Tensor:
        batch, tokens, channels = latents.shape
        rows = tokens // positions.width
        if self.unet_bands is not None:
            self.unet_bands.rows = positions.rows
        sample = latents.reshape(batch, rows, positions.width, channels).permute(0, 3, 1, 2)
        residuals = {}
        if positions.controls:
            residuals = self.control_residuals(sample, timestep, cond, positions, req)
        noise = self.transformer(
            sample,
            timestep,
            encoder_hidden_states=cond.prompt_embeds,
            added_cond_kwargs=cond.added,
            return_dict=False,
            **residuals,
        )[0]
        return noise.permute(0, 2, 3, 1).reshape(batch, tokens, channels)

    def vae_latents(self, latents: torch.Tensor, req: RunningRequest) -> torch.Tensor:
        pipe = self.pipeline
        scale = pipe.vae_scale_factor
        batch, _, channels = latents.shape
        latents = latents.reshape(batch, req.height // scale, req.width // scale, channels).permute(
            0, 3, 1, 2
        )
        config = pipe.vae.config
        if (
            getattr(config, "latents_mean", None) is not None
            and getattr(config, "latents_std", None) is not None
        ):
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
            return latents * std / config.scaling_factor + mean
        return latents / config.scaling_factor


class SD15Adapter(SDXLAdapter):
    """``StableDiffusionPipeline``: Stable Diffusion 1.x and 2.x and their fine-tunes. The same UNet, patch
    parallelism and loop as SDXL's; one CLIP text encoder and no added (text-time) conditioning. An absent
    negative prompt is the empty prompt's embeddings, as diffusers encodes it. The seeds' advice stands:
    these models are small, so pools of 1 GPU or ``cfg=2`` are what pays; patch parallelism works too."""

    family = SD15
    ip_adapter_weight = "ip-adapter_sd15.safetensors"

    def encode(self, req: RunningRequest, branch: int) -> SDXLCondition:
        request = req.request
        unconditional = branch != CONDITIONAL
        embeds, negative = self.pipeline.encode_prompt(
            request.prompt,
            self.device,
            req.batch,
            unconditional,
            negative_prompt=request.negative_prompt,
        )
        added = {}
        if self.ip_adapter_loaded:
            added["image_embeds"] = self.image_prompt(req, branch)
        return SDXLCondition(negative if unconditional else embeds, added)
