"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline`` / ``SD3Transformer2DModel``): MMDiT, split by tokens.

Like Flux, every rank holds a contiguous shard of the image tokens and of the text tokens, and only the
attention processors change. Three SD3 specifics:

- latents are kept as packed patch tokens ``[B, h*w, p*p*C]`` (the order of the model's own unpatchify), and
  the patch embedding, a stride-``p`` convolution with a ``p x p`` kernel, is applied to a rank's own tokens
  as the equivalent linear map, plus those tokens' rows of the cropped sin-cos position table;
- joint attention orders ``[image, text]``, and SD3.5's second ("dual") attention sees image tokens only, so
  the processor picks the image-only shard sizes when there is no text;
- the model is trained with CFG: ``guidance`` is the CFG scale, the negative prompt defaults to "", and a
  cfg=2 group splits the two branches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    calculate_shift,
    retrieve_timesteps,
)

from rayxdit.models.base import DiffusionAdapter, begin_at
from rayxdit.models.families import SD3
from rayxdit.models.running import RunningRequest
from rayxdit.parallel.attention import SequenceParallelAttention
from rayxdit.parallel.cfg import CONDITIONAL
from rayxdit.parallel.mesh import ParallelState
from rayxdit.parallel.sequence import shard, shard_bounds, split_sizes


class SD3SequenceParallelProcessor:
    """diffusers' ``JointAttnProcessor2_0`` with sequence-parallel attention. ``sequence_sizes`` (joint
    image+text tokens per rank) and ``image_sizes`` (image tokens per rank, for SD3.5's image-only attention)
    arrive through the model's ``joint_attention_kwargs``."""

    def __init__(self, attention: SequenceParallelAttention):
        self.attention = attention

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        sequence_sizes: tuple[int, ...] | None = None,
        image_sizes: tuple[int, ...] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        assert attention_mask is None and sequence_sizes is not None and image_sizes is not None
        image_len = hidden_states.shape[1]
        query, key, value = self._heads(
            attn, attn.to_q, attn.to_k, attn.to_v, hidden_states, attn.norm_q, attn.norm_k
        )
        if encoder_hidden_states is not None:
            text = self._heads(
                attn,
                attn.add_q_proj,
                attn.add_k_proj,
                attn.add_v_proj,
                encoder_hidden_states,
                attn.norm_added_q,
                attn.norm_added_k,
            )
            query, key, value = (
                torch.cat([a, b], dim=1) for a, b in zip((query, key, value), text, strict=True)
            )
        sizes = sequence_sizes if encoder_hidden_states is not None else image_sizes
        hidden_states = self.attention(query, key, value, sizes).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :image_len], hidden_states[:, image_len:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states

    @staticmethod
    def _heads(attn, to_q, to_k, to_v, states, norm_q, norm_k):
        """Projections as ``(B, S, H, D)``, QK-normed where the model norms them."""
        batch = states.shape[0]
        query, key, value = (
            proj(states).view(batch, -1, attn.heads, attn.inner_dim // attn.heads)
            for proj in (to_q, to_k, to_v)
        )
        # diffusers norms (B, H, S, D) tensors over D: the same on (B, S, H, D).
        if norm_q is not None:
            query = norm_q(query)
        if norm_k is not None:
            key = norm_k(key)
        return query, key, value


def parallelize_sd3(transformer: torch.nn.Module, state: ParallelState, attention: str = "auto") -> None:
    """Make every attention of an ``SD3Transformer2DModel`` sequence-parallel over ``state``'s ring x
    ulysses group; the rest of the model is token-wise and runs unchanged on the shard."""
    if state.axis("sp").size == 1:
        return
    processor = SD3SequenceParallelProcessor(SequenceParallelAttention(state, attention))
    for module in transformer.modules():
        if isinstance(module, Attention):
            module.set_processor(processor)


@dataclass(frozen=True)
class SD3Condition:
    prompt_embeds: torch.Tensor  # (B, text_local, joint_dim)
    pooled: torch.Tensor  # (B, pooled_dim)
    text_sizes: tuple[int, ...]


@dataclass(frozen=True)
class SD3Positions:
    image_index: slice  # this rank's tokens of the (h, w) patch grid, row-major
    image_sizes: tuple[int, ...]
    grid: tuple[int, int]  # latent height and width in pixels of the latent image


class SD3Adapter(DiffusionAdapter):
    """``StableDiffusion3Pipeline``: SD3-medium, SD3.5 medium/large."""

    weights_read_directly = ("pos_embed",)  # its patch embedding applied as a linear map

    family = SD3

    def _parallelize(self, state: ParallelState, attention: str) -> None:
        parallelize_sd3(self.transformer, state, attention)

    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    def encode(self, req: RunningRequest, branch: int) -> SD3Condition:
        request = req.request
        prompt = request.prompt if branch == CONDITIONAL else (request.negative_prompt or "")
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=req.batch,
            do_classifier_free_guidance=False,
            max_sequence_length=self.limits.max_sequence_length,
        )
        sp = self.state.axis("sp")
        return SD3Condition(
            shard(embeds, 1, sp.size, sp.index), pooled, tuple(split_sizes(embeds.shape[1], sp.size))
        )

    def latent_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pack(latents)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, h*w, p*p*C]``, the inverse of the model's unpatchify."""
        batch, channels, height, width = latents.shape
        p = self.patch_size
        latents = latents.reshape(batch, channels, height // p, p, width // p, p)
        return latents.permute(0, 2, 4, 3, 5, 1).reshape(
            batch, (height // p) * (width // p), p * p * channels
        )

    def unpack(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch = tokens.shape[0]
        p = self.patch_size
        channels = tokens.shape[-1] // (p * p)
        tokens = tokens.reshape(batch, height // p, width // p, p, p, channels)
        return torch.einsum("nhwpqc->nchpwq", tokens).reshape(batch, channels, height, width)

    def initial_latents(self, req: RunningRequest) -> tuple[torch.Tensor, SD3Positions]:
        pipe = self.pipeline
        generators = self.generators_after_source(req)
        latents = pipe.prepare_latents(
            req.batch,
            self.transformer.config.in_channels,
            req.height,
            req.width,
            self.transformer.dtype,
            self.device,
            generators,
        )
        tokens = self.pack(latents)
        sp = self.state.axis("sp")
        start, end = shard_bounds(tokens.shape[1], sp.size, sp.index)
        positions = SD3Positions(
            slice(start, end), tuple(split_sizes(tokens.shape[1], sp.size)), tuple(latents.shape[-2:])
        )
        return tokens, positions

    def make_scheduler(self, req: RunningRequest, num_tokens: int) -> tuple[Any, torch.Tensor]:
        scheduler = self.new_scheduler(req)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            kwargs["mu"] = calculate_shift(
                num_tokens,
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        timesteps, _ = retrieve_timesteps(scheduler, req.steps, self.device, sigmas=None, **kwargs)
        begin_at(scheduler, 0)
        return scheduler, timesteps

    def _embed_patches(self, tokens: torch.Tensor, positions: SD3Positions) -> torch.Tensor:
        """``PatchEmbed`` on this rank's tokens: the patch convolution as a linear map over each patch's
        ``(c, p, q)`` values, plus the tokens' rows of the cropped position table."""
        embed = self.transformer.pos_embed
        assert not embed.layer_norm and embed.pos_embed_max_size, (
            "SD3's PatchEmbed: no layer norm, cropped table"
        )
        batch, count, _ = tokens.shape
        p = self.patch_size
        patches = tokens.reshape(batch, count, p, p, -1).permute(0, 1, 4, 2, 3).flatten(2)  # (B, n, C*p*p)
        hidden = F.linear(patches, embed.proj.weight.flatten(1), embed.proj.bias)
        table = embed.cropped_pos_embed(*positions.grid)[:, positions.image_index]
        return (hidden + table).to(hidden.dtype)

    def predict(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        cond: SD3Condition,
        positions: SD3Positions,
        req: RunningRequest,
    ) -> torch.Tensor:
        model = self.transformer
        batch = latents.shape[0]
        hidden = self._embed_patches(latents, positions)
        temb = model.time_text_embed(timestep.expand(batch), cond.pooled)
        encoder = model.context_embedder(cond.prompt_embeds)
        kwargs = None
        if self.state.axis("sp").size > 1:
            joint = tuple(i + t for i, t in zip(positions.image_sizes, cond.text_sizes, strict=True))
            kwargs = {"sequence_sizes": joint, "image_sizes": positions.image_sizes}
        for block in model.transformer_blocks:
            encoder, hidden = block(
                hidden_states=hidden, encoder_hidden_states=encoder, temb=temb, joint_attention_kwargs=kwargs
            )
        return model.proj_out(model.norm_out(hidden, temb))

    def vae_latents(self, latents: torch.Tensor, req: RunningRequest) -> torch.Tensor:
        pipe = self.pipeline
        scale = pipe.vae_scale_factor
        latents = self.unpack(latents, req.height // scale, req.width // scale)
        return latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
