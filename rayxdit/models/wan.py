"""Wan 2.x text-to-video (``WanPipeline`` / ``WanTransformer3DModel``): sequence parallelism over video tokens.

A video's latent ``[B, C, F, H, W]`` is patchified into ``F' * H' * W'`` tokens (frame-major, the model's own
unpatchify order); every rank of the sp group holds a contiguous shard of them, spanning frames as needed.
Per token everything is local: the patch embedding (a stride = kernel Conv3d, applied as the equivalent
linear map), the 3D rotary table (this shard's rows), cross-attention to the full text, the MLP and the output
projection. Only the self-attention is sequence-parallel (ring/Ulysses over the sp group).

Wan 2.2 A14B's second, low-noise transformer (``transformer_2``, switched at ``boundary_ratio``) is
parallelized the same way. CFG: ``guidance`` is the scale (Wan's default 5), a cfg=2 group splits the
branches. The VAE is causal 3D, so rank 0 decodes the whole video.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanAttention, _get_qkv_projections

from rayxdit.limits import ModelLimits
from rayxdit.models.base import DiffusionAdapter, begin_at, compile_repeated_blocks
from rayxdit.models.families import WAN
from rayxdit.models.running import RunningRequest
from rayxdit.parallel.attention import SequenceParallelAttention
from rayxdit.parallel.cfg import CONDITIONAL
from rayxdit.parallel.mesh import ParallelState
from rayxdit.parallel.sequence import shard_bounds, split_sizes


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding on ``[B, S, H, D]``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanSequenceParallelProcessor:
    """diffusers' ``WanAttnProcessor`` for text-to-video self-attention, with sequence-parallel attention.
    ``sizes`` (tokens per rank) is set per request; cross-attention keeps diffusers' processor."""

    def __init__(self, attention: SequenceParallelAttention):
        self.attention = attention
        self.sizes: list[int] = []

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        assert encoder_hidden_states is None and attention_mask is None and attn.add_k_proj is None
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)  # RMS norm across heads: per token, local
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = apply_rotary(query, *rotary_emb), apply_rotary(key, *rotary_emb)
        out = self.attention(query, key, value, self.sizes).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def parallelize_wan(
    transformer: torch.nn.Module, state: ParallelState, attention: str = "auto"
) -> WanSequenceParallelProcessor | None:
    """Make the self-attention of every block of a ``WanTransformer3DModel`` sequence-parallel over
    ``state``'s sp group. Returns the shared processor, whose ``sizes`` the caller sets per request."""
    if state.axis("sp").size == 1:
        return None
    processor = WanSequenceParallelProcessor(SequenceParallelAttention(state, attention))
    for block in transformer.blocks:
        block.attn1.set_processor(processor)
    return processor


@dataclass(frozen=True)
class WanCondition:
    prompt_embeds: torch.Tensor  # (B, text tokens, text_dim), the full text on every rank


@dataclass(frozen=True)
class WanPositions:
    rotary: tuple[torch.Tensor, torch.Tensor]  # this shard's rows of the 3D rotary table
    sizes: tuple[int, ...]  # tokens per rank
    grid: tuple[int, int, int]  # latent frames, rows, columns


class WanAdapter(DiffusionAdapter):
    """``WanPipeline``: Wan 2.1 and Wan 2.2 text-to-video."""

    weights_read_directly = ("patch_embedding",)  # its patch embedding applied as a linear map

    family = WAN
    supports_vae_bands = False  # a causal 3D VAE: rank 0 decodes

    def __init__(self, pipeline: Any, model_dir: str | None = None, limits: ModelLimits | None = None):
        super().__init__(pipeline, model_dir, limits)
        self.processors: list[WanSequenceParallelProcessor] = []

    @property
    def denoisers(self) -> list[torch.nn.Module]:
        return [m for m in (self.pipeline.transformer, self.pipeline.transformer_2) if m is not None]

    def _parallelize(self, state: ParallelState, attention: str) -> None:
        self.processors = [
            p for m in self.denoisers if (p := parallelize_wan(m, state, attention)) is not None
        ]

    def compile(self, backend: str = "inductor") -> None:
        """torch.compile every block of both experts (attention is one custom op: no graph breaks)."""
        for model in self.denoisers:
            compile_repeated_blocks(model, fullgraph=True, backend=backend)

    def encode(self, req: RunningRequest, branch: int) -> WanCondition:
        request = req.request
        prompt = request.prompt if branch == CONDITIONAL else (request.negative_prompt or "")
        embeds, _ = self.pipeline.encode_prompt(
            prompt=prompt,
            do_classifier_free_guidance=False,
            num_videos_per_prompt=req.batch,
            max_sequence_length=self.limits.max_sequence_length,
            device=self.device,
        )
        return WanCondition(embeds.to(self.transformer.dtype))

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.transformer.config.patch_size)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, F, H, W]`` -> ``[B, f*h*w, pt*ph*pw*C]``, the inverse of the model's unpatchify."""
        batch, channels, frames, height, width = latents.shape
        pt, ph, pw = self.patch_size
        latents = latents.reshape(batch, channels, frames // pt, pt, height // ph, ph, width // pw, pw)
        latents = latents.permute(0, 2, 4, 6, 3, 5, 7, 1)
        return latents.reshape(batch, -1, pt * ph * pw * channels)

    def unpack(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        batch = tokens.shape[0]
        pt, ph, pw = self.patch_size
        f, h, w = grid
        tokens = tokens.reshape(batch, f, h, w, pt, ph, pw, -1)
        return tokens.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def initial_latents(self, req: RunningRequest) -> tuple[torch.Tensor, WanPositions]:
        pipe = self.pipeline
        latents = pipe.prepare_latents(
            req.batch,
            self.transformer.config.in_channels,
            req.height,
            req.width,
            req.frames,
            torch.float32,  # the scheduler runs in float32, as diffusers does
            self.device,
            self.noise_generators(req),
        )
        tokens = self.pack(latents)
        sp = self.state.axis("sp")
        start, end = shard_bounds(tokens.shape[1], sp.size, sp.index)
        cos, sin = self.transformer.rope(latents)
        pt, ph, pw = self.patch_size
        grid = (latents.shape[2] // pt, latents.shape[3] // ph, latents.shape[4] // pw)
        sizes = tuple(split_sizes(tokens.shape[1], sp.size))
        return tokens, WanPositions((cos[:, start:end], sin[:, start:end]), sizes, grid)

    def make_scheduler(self, req: RunningRequest, num_tokens: int) -> tuple[Any, torch.Tensor]:
        scheduler = self.new_scheduler(req)
        scheduler.set_timesteps(req.steps, device=self.device)
        begin_at(scheduler, 0)
        return scheduler, scheduler.timesteps

    def _denoiser_at(self, timestep: torch.Tensor) -> torch.nn.Module:
        """Wan 2.2 A14B: the high-noise transformer above the boundary, the low-noise one below."""
        pipe = self.pipeline
        ratio = pipe.config.boundary_ratio
        if ratio is None or timestep >= ratio * pipe.scheduler.config.num_train_timesteps:
            return pipe.transformer
        return pipe.transformer_2

    def predict(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        cond: WanCondition,
        positions: WanPositions,
        req: RunningRequest,
    ) -> torch.Tensor:
        model = self._denoiser_at(timestep)
        for processor in self.processors:
            processor.sizes = list(positions.sizes)
        batch, count, _ = latents.shape
        pt, ph, pw = self.patch_size
        embed = model.patch_embedding
        patches = latents.to(model.dtype).reshape(batch, count, pt, ph, pw, -1).permute(0, 1, 5, 2, 3, 4)
        hidden = F.linear(patches.flatten(2), embed.weight.flatten(1), embed.bias)
        temb, timestep_proj, text, _ = model.condition_embedder(
            timestep.expand(batch), cond.prompt_embeds, None
        )
        timestep_proj = timestep_proj.unflatten(1, (6, -1))
        for block in model.blocks:
            hidden = block(hidden, text, timestep_proj, positions.rotary)
        shift, scale = (model.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden = (model.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        return model.proj_out(hidden)

    def vae_latents(self, latents: torch.Tensor, req: RunningRequest) -> torch.Tensor:
        pipe = self.pipeline
        vae = pipe.vae
        scale = pipe.vae_scale_factor_spatial
        pt, ph, pw = self.patch_size
        latent_frames = (req.frames - 1) // pipe.vae_scale_factor_temporal + 1
        latents = self.unpack(
            latents, (latent_frames // pt, req.height // scale // ph, req.width // scale // pw)
        )
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
        return latents * std + mean

    def decode(self, latents: torch.Tensor, req: RunningRequest) -> list | None:
        """Rank 0 decodes the whole video; the frames of every video, in order."""
        if not self.state.is_driver:
            return None
        vae = self.pipeline.vae
        video = vae.decode(self.vae_latents(latents, req).to(vae.dtype), return_dict=False)[0]
        frames = self.pipeline.video_processor.postprocess_video(video, output_type="pil")
        return [frame for clip in frames for frame in clip]
