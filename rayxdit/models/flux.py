"""Flux (``FluxPipeline`` / ``FluxTransformer2DModel``): joint text+image attention, split by tokens.

How the plain diffusers model is parallelized: every rank feeds the transformer its contiguous shard of the
image tokens *and* of the text tokens (with the matching rows of ``img_ids``/``txt_ids``, so RoPE is sliced
with the same index map). Every layer but attention is token-wise, so only the attention processors change:
:func:`parallelize_flux` swaps them for one that runs sequence-parallel attention. Attention is invariant
to the order of keys once RoPE is applied per token, so the global sequence may be laid out rank by rank
(``[text_0, image_0, text_1, image_1, ...]``): exact, and text keys are counted exactly once.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxAttention,
    FluxIPAdapterAttnProcessor,
    FluxSingleTransformerBlock,
    _get_qkv_projections,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

from rayxdit.config import ConfigError
from rayxdit.limits import ModelLimits, ResolvedRequest
from rayxdit.models.base import DiffusionAdapter, begin_at, ip_adapter_weights
from rayxdit.models.families import FLUX, FLUX_KONTEXT
from rayxdit.models.running import RunningRequest
from rayxdit.parallel.attention import SequenceParallelAttention
from rayxdit.parallel.cfg import CONDITIONAL
from rayxdit.parallel.mesh import ParallelState
from rayxdit.parallel.pipefusion import StageLink, patch_attention, stage_bounds
from rayxdit.parallel.sequence import shard, split_sizes
from rayxdit.request import GenerateRequest, RequestError


class FluxSequenceParallelProcessor:
    """diffusers' ``FluxAttnProcessor`` with its attention call replaced by sequence-parallel attention.

    ``sequence_sizes`` (every sequence-parallel rank's joint text+image token count) arrives through the
    model's ``joint_attention_kwargs``, which diffusers forwards to processors that name it; models that do
    not forward them (``FluxControlNetModel``) get them set on the processor (:attr:`sequence_sizes`).
    """

    def __init__(self, attention: SequenceParallelAttention):
        self.attention = attention
        self.sequence_sizes: tuple[int, ...] | None = None

    def __call__(
        self,
        attn: FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        sequence_sizes: tuple[int, ...] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        assert attention_mask is None, "Flux attention is unmasked"
        sequence_sizes = sequence_sizes or self.sequence_sizes
        assert sequence_sizes is not None, (
            "call the transformer with joint_attention_kwargs={'sequence_sizes': ...}"
        )
        query, key, value = self.project(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        hidden_states = self.attention(query, key, value, sequence_sizes).flatten(2, 3).to(query.dtype)
        return self.output(attn, hidden_states, encoder_hidden_states)

    @staticmethod
    def project(
        attn: FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v ``(B, S_text + S_image, H, D)``: projected, QK-normed, text first, RoPE applied."""
        return FluxSequenceParallelProcessor.project_all(
            attn, hidden_states, encoder_hidden_states, image_rotary_emb
        )[:3]

    @staticmethod
    def project_all(
        attn: FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`project`'s q, k, v and the image tokens' QK-normed queries before RoPE (an IP-Adapter's)."""
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        image_query = query
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        return query, key, value, image_query

    @staticmethod
    def output(
        attn: FluxAttention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:
            return hidden_states
        text_len = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [text_len, hidden_states.shape[1] - text_len], dim=1
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


class FluxSequenceParallelIPProcessor(torch.nn.Module):
    """An IP-Adapter block's attention under sequence parallelism (in place of diffusers'
    ``FluxIPAdapterAttnProcessor``, whose weights and scale it keeps): the joint attention is the sequence-
    parallel one; the image prompt's attention (this shard's image queries over the IP tokens, which are few
    and replicated on every rank) needs no communication, so it runs on the shard as diffusers runs it."""

    def __init__(self, main: FluxSequenceParallelProcessor, ip: torch.nn.Module):
        super().__init__()
        self.main = main
        self.ip = ip

    def __call__(
        self,
        attn: FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        sequence_sizes: tuple[int, ...] | None = None,
        ip_hidden_states: list[torch.Tensor] | None = None,
        ip_adapter_masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        assert attention_mask is None and ip_adapter_masks is None, "Flux attention is unmasked"
        sizes = sequence_sizes or self.main.sequence_sizes
        query, key, value, image_query = self.main.project_all(
            attn, hidden_states, encoder_hidden_states, image_rotary_emb
        )
        joint = self.main.attention(query, key, value, sizes).flatten(2, 3).to(query.dtype)
        hidden_states, encoder_hidden_states = self.main.output(attn, joint, encoder_hidden_states)
        batch = hidden_states.shape[0]
        image_prompt = torch.zeros_like(hidden_states)
        for states, scale, to_k, to_v in zip(
            ip_hidden_states or [], self.ip.scale, self.ip.to_k_ip, self.ip.to_v_ip, strict=False
        ):
            ip_key = to_k(states).view(batch, -1, attn.heads, attn.head_dim)
            ip_value = to_v(states).view(batch, -1, attn.heads, attn.head_dim)
            attended = torch.nn.functional.scaled_dot_product_attention(
                image_query.transpose(1, 2), ip_key.transpose(1, 2), ip_value.transpose(1, 2)
            ).transpose(1, 2)
            image_prompt += scale * attended.reshape(batch, -1, attn.heads * attn.head_dim).to(
                image_query.dtype
            )
        return hidden_states, encoder_hidden_states, image_prompt


def _overlapped_single_block_forward(
    self: FluxSingleTransformerBlock,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    joint_attention_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``FluxSingleTransformerBlock.forward`` with one change of order: the attention's first transfer is
    started before the MLP branch, which does not depend on attention, so the MLP GEMM hides the transfer.
    Same operations, same results."""
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
    processor: FluxSequenceParallelProcessor = self.attn.processor
    sizes = (joint_attention_kwargs or {}).get("sequence_sizes") or processor.sequence_sizes
    query, key, value = processor.project(self.attn, norm_hidden_states, None, image_rotary_emb)
    pending = processor.attention.begin(query, key, value, sizes)
    mlp_hidden_states = self.act_mlp(self.proj_mlp(norm_hidden_states))
    attn_output = processor.attention.end(query, pending, sizes).flatten(2, 3).to(query.dtype)
    hidden_states = torch.cat([attn_output, mlp_hidden_states], dim=2)
    hidden_states = gate.unsqueeze(1) * self.proj_out(hidden_states)
    hidden_states = residual + hidden_states
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


class FluxPatchProcessor:
    """PipeFusion attention: this unit's fresh keys/values go into the layer's buffers of the whole
    sequence (on the attention module), and queries attend to all of it. The unit arrives as
    ``joint_attention_kwargs={"patch": {"branch", "positions", "sizes"}}``."""

    def __init__(self, ulysses_group: str):
        self.ulysses_group = ulysses_group

    def __call__(
        self,
        attn: FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        patch: dict[str, Any] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        assert patch is not None, "PipeFusion stages are called with joint_attention_kwargs={'patch': ...}"
        query, key, value = FluxSequenceParallelProcessor.project(
            attn, hidden_states, encoder_hidden_states, image_rotary_emb
        )
        hidden_states = patch_attention(
            query,
            key,
            value,
            attn.rayxdit_keys,
            attn.rayxdit_values,
            patch["branch"],
            patch["positions"],
            list(patch["sizes"]),
            self.ulysses_group,
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        return FluxSequenceParallelProcessor.output(attn, hidden_states, encoder_hidden_states)


def stage_blocks(transformer: torch.nn.Module, state: ParallelState) -> list[torch.nn.Module]:
    """This PipeFusion stage's share of the blocks (double blocks first, then single, in model order)."""
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    start, end = stage_bounds(len(blocks), state.axis("pipefusion").size, state.axis("pipefusion").index)
    return blocks[start:end]


def parallelize_flux(
    transformer: torch.nn.Module, state: ParallelState, attention: str = "auto"
) -> FluxSequenceParallelProcessor | None:
    """Apply ``state``'s parallelism to a ``FluxTransformer2DModel`` in place.

    Sequence parallel (ring x ulysses): every attention becomes sequence-parallel; the rest of the model is
    token-wise and runs unchanged on the shard, except that single blocks start their attention transfer
    before computing their (independent) MLP branch. PipeFusion: the model keeps only this stage's blocks
    (memory drops with the stage count) and their attention reads and writes per-layer buffers. Returns the
    sequence-parallel processor (None without sequence parallelism).
    """
    if state.axis("pipefusion").size > 1:
        kept = stage_blocks(transformer, state)
        transformer.transformer_blocks = torch.nn.ModuleList(
            [b for b in transformer.transformer_blocks if any(b is k for k in kept)]
        )
        transformer.single_transformer_blocks = torch.nn.ModuleList(
            [b for b in transformer.single_transformer_blocks if any(b is k for k in kept)]
        )
        processor = FluxPatchProcessor(
            state.axis("ulysses").group.group_name if state.axis("ulysses").group is not None else ""
        )
        for block in kept:
            block.attn.set_processor(processor)
        return
    if state.axis("sp").size == 1:
        return
    processor = FluxSequenceParallelProcessor(SequenceParallelAttention(state, attention))
    for module in transformer.modules():
        if isinstance(module, FluxAttention) and isinstance(module.processor, FluxIPAdapterAttnProcessor):
            module.set_processor(FluxSequenceParallelIPProcessor(processor, module.processor))
        elif isinstance(module, FluxAttention):
            module.set_processor(processor)
        if isinstance(module, FluxSingleTransformerBlock):
            module.forward = types.MethodType(_overlapped_single_block_forward, module)
    return processor


@dataclass(frozen=True)
class FluxCondition:
    """One branch's text conditioning, sharded for this rank."""

    prompt_embeds: torch.Tensor  # (B, text_local, joint_dim)
    pooled: torch.Tensor  # (B, pooled_dim)
    text_ids: torch.Tensor  # (text_local, 3)
    text_sizes: tuple[int, ...]  # text tokens of every sequence-parallel rank
    ip_embeds: list[torch.Tensor] | None = None  # IP-Adapter image embeddings (replicated), this branch's


@dataclass(frozen=True)
class FluxPositions:
    """This rank's image token positions for one request."""

    image_ids: torch.Tensor  # (image_local, 3): this rank's latents, then its reference tokens (Kontext)
    image_sizes: tuple[int, ...]  # image-stream tokens of every sequence-parallel rank
    reference: torch.Tensor | None = None  # (B, reference_local, C): Kontext's reference image, this shard
    controls: tuple[torch.Tensor, ...] = ()  # (B, image_local, C) each: the control images, this shard


def _standard_strides(forward):
    """A single-stream block's bound ``forward``, its (text, image) outputs fresh tensors of standard strides:
    diffusers' block returns views of its joined sequence, whose stride along the batch reads the joined
    length even at batch 1 (where ``contiguous()`` keeps the view, and where inductor returned the view for
    a reshaped one too). Inductor writes both clones from the block's last kernel instead of the joined
    sequence."""

    def forward_with_standard_strides(*args, **kwargs):
        text, image = forward(*args, **kwargs)
        return text.clone(memory_format=torch.contiguous_format), image.clone(
            memory_format=torch.contiguous_format
        )

    return forward_with_standard_strides


class FluxAdapter(DiffusionAdapter):
    """``FluxPipeline``: Flux.1-dev/schnell and compatible checkpoints."""

    family = FLUX

    def __init__(self, pipeline: Any, model_dir: str | None = None, limits: ModelLimits | None = None):
        super().__init__(pipeline, model_dir, limits)
        self.controlnet_processors: dict[str, FluxSequenceParallelProcessor | None] = {}
        """Each ControlNet's sequence-parallel processor (None without sequence parallelism): the net does
        not forward attention kwargs, so each call's sequence sizes are handed to it just before the call."""

    def _parallelize(self, state: ParallelState, attention: str) -> None:
        parallelize_flux(self.transformer, state, attention)
        # The same blocks: the same sequence parallelism (a ControlNet does not forward attention kwargs:
        # its processors are told the sequence sizes before each call).
        self.controlnet_processors = {
            name: parallelize_flux(net, state, attention) for name, net in self.controlnets.items()
        }

    def compile(self, backend: str = "inductor") -> None:
        """As the base class, with every single-stream block returning its streams in standard strides: else
        every block but the first sees other strides than the first (which gets the double-stream blocks'
        output), and dynamo traces and compiles the block type twice: a third graph, a third of the compile
        and of a warm restart's warm-up."""
        for block in self.transformer.single_transformer_blocks:
            block.forward = _standard_strides(block.forward)  # the bound one: maybe the overlapped forward
        super().compile(backend)

    controlnet_class = "FluxControlNetModel"

    def check_controlnet(self, name: str, net: torch.nn.Module) -> None:
        if net.input_hint_block is not None:
            raise ConfigError(
                f"controlnet '{name}': XLabs ControlNets (an input hint block) are not supported; "
                "InstantX-style FluxControlNetModel checkpoints (union ones too) are"
            )

    def _union_mode(
        self, mode: int, latents: torch.Tensor, inputs: dict[str, Any], sizes: tuple[int, ...] | None
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...] | None]:
        """A union ControlNet prepends its mode's embedding to the text as one token (and repeats the first
        text id: Flux's text ids are all zeros). Under sequence parallelism that token must be in the
        sequence once: the sp group's first rank holds it; the others pass an empty mode and one text id
        fewer, which the net's repeat restores. Returns the mode, the text ids and the sequence sizes."""
        first = self.state.axis("sp").index == 0
        modes = torch.full((latents.shape[0], int(first)), mode, dtype=torch.long, device=self.device)
        text_ids = inputs["txt_ids"] if first else inputs["txt_ids"][1:]
        return modes, text_ids, None if sizes is None else (sizes[0] + 1, *sizes[1:])

    def resolve(self, request: GenerateRequest) -> ResolvedRequest:
        req = super().resolve(request)  # every control names a loaded ControlNet
        for control in request.controls:
            name = self.controlnet_for(control)
            modes = self.controlnets[name].config.num_mode
            if modes is not None and not (control.mode is not None and 0 <= control.mode < modes):
                raise RequestError(
                    f"control_mode: '{name}' is a union ControlNet: say what the control image shows, "
                    f"0..{modes - 1} in the checkpoint's numbering (got {control.mode})",
                    "control_mode",
                )
        return req

    def encode_branches(self, req: RunningRequest) -> dict[int, Any]:
        conditions = super().encode_branches(req)
        if req.request.controls:  # diffusers runs the ControlNets on the prompt alone
            req.control_condition = conditions.get(CONDITIONAL) or self.encode(req, CONDITIONAL)
        return conditions

    def encode_control(
        self, req: RunningRequest, generators: list[torch.Generator]
    ) -> tuple[torch.Tensor, ...]:
        """The control images as ``FluxControlNetPipeline`` prepares them for InstantX ControlNets: resized,
        one latent sample per image from its generator (each control image in turn, before the noise),
        packed like the latents."""
        from rayxdit.models.base import decode_image

        pipe = self.pipeline
        encoded = []
        for control in req.request.controls:
            pixels = pipe.image_processor.preprocess(
                decode_image(control.image), height=req.height, width=req.width
            )
            latents = self.encode_pixels(pixels.repeat_interleave(req.batch, dim=0), generators)
            encoded.append(self.latent_tokens(latents))
        return tuple(encoded)

    def encode(self, req: RunningRequest, branch: int) -> FluxCondition:
        request = req.request
        prompt = request.prompt if branch == CONDITIONAL else request.negative_prompt
        embeds, pooled, text_ids = self.pipeline.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            device=self.device,
            num_images_per_prompt=req.batch,
            max_sequence_length=self.limits.max_sequence_length,
        )
        condition = self.condition(embeds, pooled, text_ids)
        if not self.ip_adapter_loaded:
            return condition
        return dataclasses.replace(condition, ip_embeds=self.image_prompt(req, branch))

    # ----- IP-Adapter ------------------------------------------------------------------------------------
    def load_ip_adapter(self, location: str, image_encoder: str | None) -> None:
        """diffusers' ``load_ip_adapter`` (XLabs layout: ``ip_adapter.safetensors``, located as
        :func:`ip_adapter_weights` says; the CLIP image encoder from ``image_encoder`` or the weights'
        ``image_encoder/`` folder); before :meth:`parallelize`, which keeps its weights in sequence-parallel
        processors."""
        source, subfolder, weight_name = ip_adapter_weights(location, "ip_adapter.safetensors")
        self.pipeline.load_ip_adapter(
            source,
            weight_name=weight_name,
            subfolder=subfolder,
            image_encoder_pretrained_model_name_or_path=image_encoder or source,
            image_encoder_subfolder="" if image_encoder else f"{subfolder}/image_encoder".lstrip("/"),
            image_encoder_dtype=self.transformer.dtype,
        )
        self.pipeline.image_encoder.to(self.device)

    def prepare(self, req: RunningRequest) -> None:
        """The IP-Adapter's scale, which its processors read from themselves: the request's with an image
        prompt, else 0 (see :meth:`image_prompt`)."""
        if not self.ip_adapter_loaded:
            return
        prompted = req.request.ip_adapter_image is not None
        for processor in self.transformer.attn_processors.values():
            ip = getattr(processor, "ip", processor)
            if isinstance(ip, FluxIPAdapterAttnProcessor):
                ip.scale = [req.request.ip_adapter_scale if prompted else 0.0] * len(ip.scale)

    def image_prompt(self, req: RunningRequest, branch: int) -> list[torch.Tensor]:
        """The IP-Adapter's image embeddings of one branch, as ``FluxPipeline`` makes them: the request's
        image for the prompt, an all-black image of the output's size for the negative branch. A request
        without an image prompt gets the black image's at scale 0: the adapter then adds exactly zero, as if
        it were not loaded (diffusers' IP processors fail without image embeddings once they are)."""
        from rayxdit.models.base import decode_image

        pipe = self.pipeline
        prompted = req.request.ip_adapter_image is not None
        if branch == CONDITIONAL and prompted:
            image = decode_image(req.request.ip_adapter_image)
        else:
            image = np.zeros((req.width, req.height, 3), dtype=np.uint8)
        adapters = pipe.transformer.encoder_hid_proj.num_ip_adapters
        return pipe.prepare_ip_adapter_image_embeds([image] * adapters, None, self.device, req.batch)

    def condition(
        self, embeds: torch.Tensor, pooled: torch.Tensor, text_ids: torch.Tensor | None = None
    ) -> FluxCondition:
        """This rank's shard of text embeddings ``[B, text, joint_dim]`` (T5) and pooled ``[B, dim]`` (CLIP)."""
        if text_ids is None:
            text_ids = torch.zeros(embeds.shape[1], 3, device=embeds.device, dtype=embeds.dtype)
        parts, index = self._token_split()
        return FluxCondition(
            prompt_embeds=shard(embeds, 1, parts, index),
            pooled=pooled,
            text_ids=shard(text_ids, 0, parts, index),
            text_sizes=tuple(split_sizes(embeds.shape[1], parts)),
        )

    def _token_split(self) -> tuple[int, int]:
        """How sequences are cut for this rank up front: sequence-parallel shards, or (PipeFusion, which
        picks tokens per unit of work) not at all."""
        if self.state.axis("pipefusion").size > 1:
            return 1, 0
        return self.state.axis("sp").size, self.state.axis("sp").index

    def initial_latents(self, req: RunningRequest) -> tuple[torch.Tensor, FluxPositions]:
        pipe = self.pipeline
        # diffusers' ControlNet pipelines draw the control images' samples first, then the input image's
        # (img2img, inpainting), then the noise.
        generators = self.noise_generators(req)
        controls = self.encode_control(req, generators)
        if req.request.image is not None:
            req.source = self.encode_source(req, generators)
        latents, image_ids = pipe.prepare_latents(
            req.batch,
            self.transformer.config.in_channels // 4,
            req.height,
            req.width,
            self.transformer.dtype,
            self.device,
            generators,
        )
        parts, index = self._token_split()
        positions = FluxPositions(
            image_ids=shard(image_ids, 0, parts, index),
            image_sizes=tuple(split_sizes(latents.shape[1], parts)),
            controls=tuple(shard(control, 1, parts, index) for control in controls),
        )
        return latents, positions

    def latent_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = latents.shape
        return self.pipeline._pack_latents(latents, batch, channels, height, width)

    def make_scheduler(self, req: RunningRequest, num_tokens: int) -> tuple[Any, torch.Tensor]:
        scheduler = self.new_scheduler(req)
        config = scheduler.config
        steps = req.steps
        # As FluxPipeline: custom sigmas unless the scheduler makes flow sigmas itself; the shift from the
        # resolution (FlowMatchEuler ignores it without dynamic shifting; the solvers refuse it then).
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(
            num_tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        shift = {"mu": mu} if config.get("use_dynamic_shifting") or sigmas is not None else {}
        timesteps, _ = retrieve_timesteps(scheduler, steps, self.device, sigmas=sigmas, **shift)
        begin_at(scheduler, 0)
        return scheduler, timesteps

    def predict(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        cond: FluxCondition,
        positions: FluxPositions,
        req: RunningRequest,
    ) -> torch.Tensor:
        attention_kwargs = None
        if self.state.axis("sp").size > 1:
            sizes = tuple(t + i for t, i in zip(cond.text_sizes, positions.image_sizes, strict=True))
            attention_kwargs = {"sequence_sizes": sizes}
        residuals = {}
        if positions.controls:
            residuals = self.control_residuals(latents, timestep, positions, req, attention_kwargs)
        hidden = latents
        if positions.reference is not None:  # Kontext: the reference tokens follow, predictions are dropped
            hidden = torch.cat([latents, positions.reference.to(latents.dtype)], dim=1)
        inputs = self._model_inputs(
            self.transformer, latents, timestep, cond, positions, req, attention_kwargs
        )
        if cond.ip_embeds is not None:  # the transformer projects them into each IP block's tokens
            inputs["joint_attention_kwargs"] = {
                **(attention_kwargs or {}),
                "ip_adapter_image_embeds": cond.ip_embeds,
            }
        return self.transformer(hidden, **inputs, **residuals)[0][:, : latents.shape[1]]

    def _model_inputs(
        self,
        model: torch.nn.Module,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        cond: FluxCondition,
        positions: FluxPositions,
        req: RunningRequest,
        attention_kwargs: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """What a Flux transformer (or ControlNet) takes beside the hidden states, for this shard."""
        batch = latents.shape[0]
        guidance = None
        if model.config.guidance_embeds:
            guidance = torch.full([batch], req.request.guidance, device=self.device, dtype=torch.float32)
        return {
            "timestep": timestep.expand(batch).to(latents.dtype) / 1000,
            "guidance": guidance,
            "pooled_projections": cond.pooled,
            "encoder_hidden_states": cond.prompt_embeds,
            "txt_ids": cond.text_ids,
            "img_ids": positions.image_ids,
            "joint_attention_kwargs": attention_kwargs,
            "return_dict": False,
        }

    def control_residuals(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        positions: FluxPositions,
        req: RunningRequest,
        attention_kwargs: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """The ControlNets' per-block residuals for this shard (per token: they stay local), computed as
        ``FluxControlNetPipeline`` does, on the prompt's conditioning for either CFG branch; several are
        summed as ``FluxMultiControlNetModel`` sums them."""
        blocks = singles = None
        first = True
        for control, image in zip(req.request.controls, positions.controls, strict=True):
            name = self.controlnet_for(control)
            net = self.controlnets[name]
            inputs = self._model_inputs(
                net, latents, timestep, req.control_condition, positions, req, attention_kwargs
            )
            sizes = attention_kwargs["sequence_sizes"] if attention_kwargs else None
            mode = None
            if net.union:
                mode, inputs["txt_ids"], sizes = self._union_mode(control.mode, latents, inputs, sizes)
            if self.controlnet_processors[name] is not None:
                self.controlnet_processors[name].sequence_sizes = sizes
            net_blocks, net_singles = net(
                latents,
                controlnet_cond=image.to(latents.dtype),
                controlnet_mode=mode,
                conditioning_scale=control.scale,
                **inputs,
            )
            blocks, singles = _summed(blocks, net_blocks, first), _summed(singles, net_singles, first)
            first = False
        return {
            "controlnet_block_samples": blocks,
            "controlnet_single_block_samples": singles,
            "controlnet_blocks_repeat": False,
        }

    # ----- PipeFusion stage hooks (the loop: rayxdit.models.pipefusion) --------------------------------------
    def pipefusion_blocks(self) -> list[torch.nn.Module]:
        """After parallelize_flux the model holds only this stage's blocks, in order."""
        return [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]

    def pipefusion_attentions(self) -> list[torch.nn.Module]:
        return [block.attn for block in self.pipefusion_blocks()]

    def text_tokens(self, cond: FluxCondition) -> int:
        return cond.prompt_embeds.shape[1]

    @property
    def stage_width(self) -> int:
        return self.transformer.inner_dim

    def stage_forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        cond: FluxCondition,
        positions: FluxPositions,
        req: RunningRequest,
        text_index: torch.Tensor,
        image_index: torch.Tensor,
        unit: dict[str, Any],
        link: StageLink,
    ) -> torch.Tensor:
        """This stage's blocks on one unit: latent rows in (first stage) or the previous stage's
        ``[B, text + image, dim]`` activations; noise rows out (last stage) or activations."""
        model = self.transformer
        if link.is_first:
            hidden = model.x_embedder(x)
            encoder = model.context_embedder(cond.prompt_embeds.index_select(1, text_index))
        else:
            encoder, hidden = x.split_with_sizes([len(text_index), x.shape[1] - len(text_index)], dim=1)
        batch = hidden.shape[0]
        # The same casts as FluxTransformer2DModel.forward, so warm-up steps match one rank exactly.
        time = (timestep.expand(batch).to(self.transformer.dtype) / 1000).to(hidden.dtype) * 1000
        if model.config.guidance_embeds:
            guidance = torch.full([1], req.request.guidance, device=self.device, dtype=torch.float32).expand(
                batch
            )
            temb = model.time_text_embed(time, guidance.to(hidden.dtype) * 1000, cond.pooled)
        else:
            temb = model.time_text_embed(time, cond.pooled)
        ids = torch.cat(
            [cond.text_ids.index_select(0, text_index), positions.image_ids.index_select(0, image_index)]
        )
        rotary = model.pos_embed(ids)
        for block in self.pipefusion_blocks():
            encoder, hidden = block(
                hidden_states=hidden,
                encoder_hidden_states=encoder,
                temb=temb,
                image_rotary_emb=rotary,
                joint_attention_kwargs={"patch": unit},
            )
        if link.is_last:
            return model.proj_out(model.norm_out(hidden, temb))
        return torch.cat([encoder, hidden], dim=1)

    def vae_latents(self, latents: torch.Tensor, req: RunningRequest) -> torch.Tensor:
        pipe = self.pipeline
        latents = pipe._unpack_latents(latents, req.height, req.width, pipe.vae_scale_factor)
        return latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor


def _summed(total: list | None, residuals: list | None, first: bool) -> list | None:
    """ControlNet residuals added up as ``FluxMultiControlNetModel`` does (a net without some kind of block
    leaves the sum as it was)."""
    if first:
        return residuals
    if total is None or residuals is None:
        return total
    return [a + b for a, b in zip(total, residuals, strict=False)]


class FluxKontextAdapter(FluxAdapter):
    """``FluxKontextPipeline`` (FLUX.1-Kontext): an edit's reference image is encoded once (its latent mean,
    no randomness) and its tokens join the image stream after the noisy latents, with position ids in a
    second frame (first coordinate 1); the predictions of the reference tokens are dropped. Under sequence
    parallelism each rank holds a shard of both, so ring and Ulysses attention see every token once."""

    family = FLUX_KONTEXT

    def initial_latents(self, req: RunningRequest) -> tuple[torch.Tensor, FluxPositions]:
        pipe = self.pipeline
        latents, _, latent_ids, _ = pipe.prepare_latents(
            None,
            req.batch,
            self.transformer.config.in_channels // 4,
            req.height,
            req.width,
            self.transformer.dtype,
            self.device,
            self.noise_generators(req),
        )
        parts, index = self._token_split()
        if req.request.image is None:
            return latents, FluxPositions(
                shard(latent_ids, 0, parts, index), tuple(split_sizes(latents.shape[1], parts))
            )
        reference, reference_ids = self.encode_reference(req)
        return latents, FluxPositions(
            image_ids=torch.cat(
                [shard(latent_ids, 0, parts, index), shard(reference_ids, 0, parts, index)], dim=0
            ),
            image_sizes=tuple(
                a + b
                for a, b in zip(
                    split_sizes(latents.shape[1], parts), split_sizes(reference.shape[1], parts), strict=True
                )
            ),
            reference=shard(reference, 1, parts, index),
        )

    def encode_reference(self, req: RunningRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference image's packed latents ``[B, tokens, C]`` and position ids, as
        ``FluxKontextPipeline`` prepares them (resized to a Kontext resolution of the same aspect ratio
        unless the model's ``kontext_auto_resize`` is False)."""
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

        from rayxdit.models.base import decode_image

        pipe = self.pipeline
        image = decode_image(req.request.image)
        height, width = pipe.image_processor.get_default_height_width(image)
        if self.limits.kontext_auto_resize:
            _, width, height = min(
                (abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS
            )
        multiple = pipe.vae_scale_factor * 2
        height, width = height // multiple * multiple, width // multiple * multiple
        pixels = pipe.image_processor.preprocess(
            pipe.image_processor.resize(image, height, width), height, width
        )
        latents = self.encode_pixels(pixels, sample_mode="argmax").repeat(req.batch, 1, 1, 1)
        channels, rows, columns = latents.shape[1:]
        ids = pipe._prepare_latent_image_ids(req.batch, rows // 2, columns // 2, self.device, latents.dtype)
        ids[..., 0] = 1
        return pipe._pack_latents(latents, req.batch, channels, rows, columns), ids
