"""Writing diffusers-format weights back into the single-file layouts fine-tunes ship in, so that the tests
can make a tiny single-file checkpoint and its diffusers-format twin from one set of weights.

The Flux writer inverts :mod:`rayxdit.models.single_file`'s tables; that those tables are Black Forest Labs'
layout is held by a test against diffusers' own converter (at Flux.1's width, which it hard-codes). The
SDXL / SD 1.5 writer is written from the LDM layout (Stability's ``sgm`` / ``ldm`` modules: ``input_blocks``,
``first_stage_model``, ``conditioner.embedders``) and read back by diffusers' ``from_single_file``.
"""

from __future__ import annotations

import re

import torch

from rayxdit.models.single_file import (
    FLUX_BLOCKS,
    FLUX_MODULES,
    FLUX_PARAMETERS,
    FLUX_SWAPPED_HALVES,
)


def flux_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``FluxTransformer2DModel`` state dict in Black Forest Labs' layout (fused projections concatenated
    in their split order, the final modulation's halves swapped back, norms' ``weight`` as ``scale``)."""
    back = {target: module for module, target in FLUX_MODULES.items()}
    blocks = {name: (kind, {v: k for k, v in table.items()}) for kind, (name, table) in FLUX_BLOCKS.items()}
    parameters = {v: k for k, v in FLUX_PARAMETERS.items()}
    fused: dict[str, list] = {}
    original: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, _, parameter = key.rpartition(".")
        block = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", module)
        if block:
            name, index, inside = block.groups()
            kind, table = blocks[name]
            prefix = f"{kind}.{index}."
            part = next((parts for parts in table if isinstance(parts, tuple) and inside in parts), None)
            if part is not None:
                fused.setdefault(f"{prefix}{table[part]}.{parameter}", [None] * len(part))[
                    part.index(inside)
                ] = tensor
                continue
            source = prefix + table[inside]
        else:
            source = back[module]
        if source.rpartition(".")[2].endswith("_norm"):
            parameter = parameters.get(parameter, parameter)
        if source in FLUX_SWAPPED_HALVES:
            scale, shift = tensor.chunk(2)
            tensor = torch.cat([shift, scale])
        original[f"{source}.{parameter}"] = tensor
    for key, parts in fused.items():
        original[key] = torch.cat(parts)
    return original


def _resnet(prefix: str, state: dict[str, torch.Tensor], source: str, out: dict, target: str) -> None:
    """One ResNet block, diffusers' names -> LDM's (UNet: ``in_layers``/``emb_layers``/``out_layers``)."""
    names = {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
        "conv_shortcut": "skip_connection",
    }
    for key, tensor in state.items():
        if key.startswith(source + "."):
            inside = key[len(source) + 1 :]
            module, _, parameter = inside.rpartition(".")
            out[f"{prefix}{target}.{names[module]}.{parameter}"] = tensor


def _moved(state: dict[str, torch.Tensor], source: str, out: dict, target: str) -> None:
    """Every key under ``source`` put under ``target``, its inside names unchanged."""
    for key, tensor in state.items():
        if key.startswith(source + "."):
            out[target + key[len(source) :]] = tensor


def unet_to_ldm(unet: torch.nn.Module, prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel``'s weights in the LDM layout (``input_blocks``, ``middle_block``,
    ``output_blocks``; each level's layers then its downsampler as the next input block)."""
    state, config, out = unet.state_dict(), unet.config, {}
    tops = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    for source, target in tops.items():
        _moved(state, source, out, prefix + target)
    layers = config.layers_per_block
    block = 1
    for level, kind in enumerate(config.down_block_types):
        for layer in range(layers):
            _resnet(prefix, state, f"down_blocks.{level}.resnets.{layer}", out, f"input_blocks.{block}.0")
            if "CrossAttn" in kind:
                _moved(
                    state, f"down_blocks.{level}.attentions.{layer}", out, f"{prefix}input_blocks.{block}.1"
                )
            block += 1
        if level < len(config.down_block_types) - 1:
            _moved(
                state, f"down_blocks.{level}.downsamplers.0.conv", out, f"{prefix}input_blocks.{block}.0.op"
            )
            block += 1
    _resnet(prefix, state, "mid_block.resnets.0", out, "middle_block.0")
    _moved(state, "mid_block.attentions.0", out, f"{prefix}middle_block.1")
    _resnet(prefix, state, "mid_block.resnets.1", out, "middle_block.2")
    block = 0
    for level, kind in enumerate(config.up_block_types):
        for layer in range(layers + 1):
            _resnet(prefix, state, f"up_blocks.{level}.resnets.{layer}", out, f"output_blocks.{block}.0")
            attention = "CrossAttn" in kind
            if attention:
                _moved(
                    state, f"up_blocks.{level}.attentions.{layer}", out, f"{prefix}output_blocks.{block}.1"
                )
            if layer == layers and level < len(config.up_block_types) - 1:
                upsampler = f"{prefix}output_blocks.{block}.{2 if attention else 1}.conv"
                _moved(state, f"up_blocks.{level}.upsamplers.0.conv", out, upsampler)
            block += 1
    assert len(out) == len(state), f"{len(state) - len(out)} of the UNet's weights have no LDM name here"
    return out


def vae_to_ldm(vae: torch.nn.Module, prefix: str = "first_stage_model.") -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL``'s weights in the LDM layout (``encoder.down.{i}.block.{j}``, the decoder's
    ``up`` levels numbered from the lowest resolution's end, attention as 1x1 convolutions)."""
    state, out = vae.state_dict(), {}
    resnet_names = {"conv_shortcut": "nin_shortcut"}
    attention_names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    levels = len(vae.config.block_out_channels)

    def put(source: str, target: str, names: dict[str, str] | None = None, conv: bool = False) -> None:
        for key, tensor in state.items():
            if not key.startswith(source + "."):
                continue
            module, _, parameter = key[len(source) + 1 :].rpartition(".")
            module = (names or {}).get(module, module)
            if conv and tensor.dim() == 2:
                tensor = tensor[:, :, None, None]
            out[f"{prefix}{target}.{module + '.' if module else ''}{parameter}"] = tensor

    for side in ("encoder", "decoder"):
        for name, target in (("conv_in", "conv_in"), ("conv_out", "conv_out"), ("conv_norm_out", "norm_out")):
            put(f"{side}.{name}", f"{side}.{target}")
        put(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", resnet_names)
        put(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", resnet_names)
        put(f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", attention_names, conv=True)
    for level in range(levels):
        for layer in range(vae.config.layers_per_block):
            put(
                f"encoder.down_blocks.{level}.resnets.{layer}",
                f"encoder.down.{level}.block.{layer}",
                resnet_names,
            )
        put(f"encoder.down_blocks.{level}.downsamplers.0.conv", f"encoder.down.{level}.downsample.conv")
        for layer in range(vae.config.layers_per_block + 1):
            put(
                f"decoder.up_blocks.{level}.resnets.{layer}",
                f"decoder.up.{levels - 1 - level}.block.{layer}",
                resnet_names,
            )
        put(f"decoder.up_blocks.{level}.upsamplers.0.conv", f"decoder.up.{levels - 1 - level}.upsample.conv")
    for name in ("quant_conv", "post_quant_conv"):
        put(name, name)
    assert len(out) == len(state), (len(out), len(state))
    return out


def clip_to_open_clip(encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModelWithProjection`` in OpenCLIP's layout (``resblocks``, fused ``in_proj``,
    ``text_projection`` transposed), as SDXL's second text encoder is saved."""
    state, out = encoder.state_dict(), {}
    renames = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    inside = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
    fused: dict[str, list] = {}
    for key, tensor in state.items():
        if key in renames:
            out[prefix + renames[key]] = tensor
            continue
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
            continue
        layer = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if layer is None:
            continue  # position_ids: a buffer, not saved by OpenCLIP
        index, module, parameter = layer.groups()
        base = f"{prefix}transformer.resblocks.{index}."
        projection = re.fullmatch(r"self_attn\.([qkv])_proj", module)
        if projection:
            fused.setdefault(f"{base}attn.in_proj_{parameter}", [None] * 3)["qkv".index(projection[1])] = (
                tensor
            )
        else:
            out[f"{base}{inside[module]}.{parameter}"] = tensor
    for key, parts in fused.items():
        out[key] = torch.cat(parts)
    return out


def sdxl_to_single_file(pipeline) -> dict[str, torch.Tensor]:
    """A whole ``StableDiffusionXLPipeline`` as an SDXL single file: UNet, VAE, the CLIP-L encoder in
    transformers' names and the second encoder in OpenCLIP's."""
    state = {
        **unet_to_ldm(pipeline.unet),
        **vae_to_ldm(pipeline.vae),
        **clip_to_open_clip(pipeline.text_encoder_2, "conditioner.embedders.1.model."),
    }
    for key, tensor in pipeline.text_encoder.state_dict().items():
        # SDXL's files name the CLIP-L encoder as transformers' CLIPTextModel did (under text_model.).
        state[f"conditioner.embedders.0.transformer.text_model.{key.removeprefix('text_model.')}"] = tensor
    return {key: tensor.contiguous() for key, tensor in state.items()}
