"""Built-in tiny models: real diffusers/transformers architectures with tiny configs and seeded random weights.

Nothing can be downloaded on a CPU box or in CI, so a preset is built in code (tokenizers included) and
saved once with ``save_pretrained`` into the cache directory; every worker then loads it through the real
``from_pretrained`` path, exactly as it would load a checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rayxdit.limits import SETTINGS_FILE

if TYPE_CHECKING:
    import torch

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rayxdit" / "presets"

_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "with",
    "and",
    "photo",
    "painting",
    "drawing",
    "portrait",
    "landscape",
    "cat",
    "dog",
    "bird",
    "fish",
    "horse",
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "white",
    "sky",
    "sea",
    "tree",
    "forest",
    "house",
    "city",
    "street",
    "car",
    "night",
    "day",
    "sun",
    "moon",
    "star",
    "light",
    "dark",
    "big",
    "small",
    "old",
    "new",
    "mountain",
    "river",
    "flower",
    "garden",
]


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte-level alphabet: every byte mapped to a printable character."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def tiny_clip_tokenizer(max_length: int = 16):
    """A byte-level BPE tokenizer with CLIP's special tokens and no merges (one token per character)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    alphabet = list(_bytes_to_unicode().values())
    for suffix in ("", "</w>"):
        for char in alphabet:
            vocab[char + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_t5_tokenizer(max_length: int = 512):
    """A unigram tokenizer with T5's special tokens, whole words for a small vocabulary and characters
    for everything else."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, -3.0) for word in _WORDS]
    pieces += [(char, -6.0) for char in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


FLUX_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
"""FLUX.1-dev's scheduler config (the sizes built in code take it; ``base_shift``/``max_shift`` as default)."""


@dataclass(frozen=True)
class FluxSizes:
    """Every size that shapes a Flux pipeline: transformer, both text encoders, VAE, serving limits."""

    transformer: dict[str, Any]
    t5: dict[str, Any]
    clip: dict[str, Any]
    vae: dict[str, Any]
    limits: dict[str, Any]
    clip_max_length: int = 77
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(FLUX_SCHEDULER))
    """The scheduler config (``_class_name`` and options); FLUX.1-dev's by default."""


TINY_FLUX = FluxSizes(
    # 2 double + 2 single blocks, 8 heads of 16 (ulysses up to 8), guidance embeddings like Flux.1-dev.
    transformer=dict(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=8,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ),
    t5=dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8),
    clip=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32
    ),
    vae=dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ),
    # 29 text tokens: odd, so text shards are uneven too.
    limits=dict(
        default_height=128,
        default_width=128,
        default_steps=8,
        max_side=512,
        size_multiple=4,
        max_sequence_length=29,
    ),
    clip_max_length=16,
)


def _random_init_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Deterministic random weights in place: N(0, 1/fan_in) matrices, unit norm scales, zero biases. Host
    weights are drawn on the GPU when there is one, a matrix at a time (a 12B model drawn on the CPU takes
    minutes)."""
    import torch

    on_gpu = generator.device.type == "cuda"
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                fan_in = math.prod(param.shape[1:])
                if param.device.type == "cpu" and on_gpu:
                    drawn = torch.empty(param.shape, dtype=param.dtype, device=generator.device)
                    param.copy_(drawn.normal_(0.0, fan_in**-0.5, generator=generator))
                else:
                    param.normal_(0.0, fan_in**-0.5, generator=generator)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)


def _build(factory: Callable[[], torch.nn.Module], device: torch.device, dtype: torch.dtype, seed: int):
    """Build a module with random weights directly on ``device`` (no CPU copy of a 12B model) when it has
    no buffers to preserve; otherwise build it on the CPU with its own init and move it."""
    import torch

    with torch.device("meta"):
        module = factory()
    if any(True for _ in module.buffers()):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = factory()
        return module.to(device=device, dtype=dtype)
    module = module.to(dtype).to_empty(device=device)  # allocated in ``dtype`` at once, never in float32
    drawn_on = torch.device("cuda") if device.type == "cpu" and torch.cuda.is_available() else device
    _random_init_(module, torch.Generator(drawn_on).manual_seed(seed))
    return module


def _clip_config(sizes: dict[str, Any], tokenizer):
    """A CLIP text encoder config of ``sizes`` for ``tokenizer`` (its vocabulary, length and special ids)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **sizes,
    )


def _vae_2d(sizes: dict[str, Any]):
    """An RGB ``AutoencoderKL`` with one encoder and one decoder block per entry of ``block_out_channels``."""
    from diffusers import AutoencoderKL

    levels = len(sizes["block_out_channels"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        **sizes,
    )


def save_with_limits(pipeline, path: Path, limits: dict[str, Any]) -> None:
    """``save_pretrained`` plus the model's serving limits (``rayxdit.json``), which its card reads back."""
    pipeline.save_pretrained(path)
    (path / SETTINGS_FILE).write_text(json.dumps(limits, indent=2))


def build_flux_pipeline(
    sizes: FluxSizes,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    with_text_encoders: bool = True,
    with_vae: bool = True,
    default_init: bool = False,
):
    """A ``FluxPipeline`` of the given sizes with seeded random weights, built on ``device``.

    ``default_init`` keeps each module's own initialisation (seeded; used by the tiny preset, built on CPU);
    otherwise weights are drawn on ``device`` so full-size models never pass through host memory.
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    device, dtype = torch.device(device), dtype or torch.float32
    clip_tokenizer, t5_tokenizer = tiny_clip_tokenizer(sizes.clip_max_length), tiny_t5_tokenizer()
    factories = {
        "transformer": lambda: FluxTransformer2DModel(**sizes.transformer),
    }
    if with_text_encoders:
        clip_config = _clip_config(sizes.clip, clip_tokenizer)
        # Full-size presets keep T5's real vocabulary (its embedding is 0.13B parameters); tiny ones use the
        # tokenizer's.
        t5_config = T5Config(**{"vocab_size": len(t5_tokenizer), "decoder_start_token_id": 0, **sizes.t5})
        factories["text_encoder"] = lambda: CLIPTextModel(clip_config)
        factories["text_encoder_2"] = lambda: T5EncoderModel(t5_config)
    if with_vae:
        factories["vae"] = lambda: _vae_2d(sizes.vae)
    modules = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for seed, (name, factory) in enumerate(factories.items()):
            if default_init:
                module = factory().to(device=device, dtype=dtype)
            else:
                module = _build(factory, device, dtype, seed)
            # In inference mode, as from_pretrained leaves a module: T5's dropout (0.1) would otherwise make a
            # recipe's prompt embeddings random draws of their own, different per call and per rank.
            modules[name] = module.eval()
    options = {key: value for key, value in sizes.scheduler.items() if key != "_class_name"}
    scheduler = FlowMatchEulerDiscreteScheduler(**options)
    return FluxPipeline(
        scheduler=scheduler,
        vae=modules.get("vae"),
        text_encoder=modules.get("text_encoder"),
        tokenizer=clip_tokenizer if with_text_encoders else None,
        text_encoder_2=modules.get("text_encoder_2"),
        tokenizer_2=t5_tokenizer if with_text_encoders else None,
        transformer=modules["transformer"],
    )


TINY_FLUX_SCHNELL = replace(
    TINY_FLUX,
    # FLUX.1-schnell's shape: no guidance embeddings (timestep-distilled), no dynamic shifting.
    transformer={**TINY_FLUX.transformer, "guidance_embeds": False},
    scheduler={"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0, "use_dynamic_shifting": False},
    limits={},  # no rayxdit.json: its steps, text length and guidance come from what the checkpoint is
)


def build_tiny_flux(path: Path) -> None:
    """The tiny Flux, saved with ``save_pretrained`` (plus its serving limits) into ``path``."""
    save_with_limits(build_flux_pipeline(TINY_FLUX, default_init=True), path, TINY_FLUX.limits)


def build_tiny_flux_schnell(path: Path) -> None:
    """A FLUX.1-schnell-shaped tiny Flux, saved without a ``rayxdit.json``."""
    build_flux_pipeline(TINY_FLUX_SCHNELL, default_init=True).save_pretrained(path)


def build_tiny_flux_kontext(path: Path) -> None:
    """tiny-flux's components as a ``FluxKontextPipeline`` (FLUX.1-Kontext's architecture is Flux's): edits
    whose reference image joins the sequence. Its references keep their own size (Kontext's preferred
    resolutions are about a megapixel: too many tokens for a CPU test)."""
    from diffusers import FluxKontextPipeline

    flux = build_flux_pipeline(TINY_FLUX, default_init=True)
    limits = {**TINY_FLUX.limits, "kontext_auto_resize": False}
    save_with_limits(FluxKontextPipeline(**flux.components), path, limits)


def build_tiny_flux_controlnet(path: Path) -> None:
    """A ``FluxControlNetModel`` (InstantX layout: the control image's latents added to the input) for
    tiny-flux: one double and one single block of its size. diffusers zero-initializes the ControlNet's
    output and input projections; here they are random (:func:`_randomize_zero_init`)."""
    import torch
    from diffusers import FluxControlNetModel

    torch.manual_seed(5)
    config = {**TINY_FLUX.transformer, "num_layers": 1, "num_single_layers": 1}
    controlnet = FluxControlNetModel(**config)
    _randomize_zero_init(
        controlnet, ("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")
    )
    controlnet.save_pretrained(path)


def build_tiny_flux_ip_adapter(path: Path) -> None:
    """An IP-Adapter for tiny-flux in XLabs' layout (``ip_adapter.safetensors``: the image projection and each
    double block's image-prompt key/value projections) with a tiny CLIP image encoder in ``image_encoder/``;
    random, seeded weights large enough that the image prompt visibly matters."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(6)
    sizes = TINY_FLUX.transformer
    inner = sizes["num_attention_heads"] * sizes["attention_head_dim"]
    weights = _tiny_image_projection(path, sizes["joint_attention_dim"])
    cross = sizes["joint_attention_dim"]
    for block in range(sizes["num_layers"]):
        for name in ("to_k_ip", "to_v_ip"):
            weights[f"ip_adapter.{block}.{name}.weight"] = torch.randn(inner, cross) * 0.2
            weights[f"ip_adapter.{block}.{name}.bias"] = torch.randn(inner) * 0.2
    save_file(weights, str(path / "ip_adapter.safetensors"))


def _tiny_image_projection(path: Path, cross_attention_dim: int) -> dict[str, torch.Tensor]:
    """A tiny CLIP image encoder saved in ``path/image_encoder`` and the weights of an IP-Adapter's image
    projection onto 4 tokens of ``cross_attention_dim`` (random, large enough to matter)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        )
    )
    encoder.save_pretrained(path / "image_encoder")
    tokens = 4
    return {
        "image_proj.proj.weight": torch.randn(tokens * cross_attention_dim, encoder.config.projection_dim)
        * 0.2,
        "image_proj.proj.bias": torch.randn(tokens * cross_attention_dim) * 0.2,
        "image_proj.norm.weight": torch.ones(cross_attention_dim),
        "image_proj.norm.bias": torch.zeros(cross_attention_dim),
    }


def build_tiny_flux_controlnet_union(path: Path) -> None:
    """tiny-flux-controlnet as a union ControlNet (InstantX's Union layout: 4 control modes, the mode's
    embedding a text token of its own)."""
    import torch
    from diffusers import FluxControlNetModel

    torch.manual_seed(8)
    controlnet = FluxControlNetModel(
        **{**TINY_FLUX.transformer, "num_layers": 1, "num_single_layers": 1, "num_mode": 4}
    )
    _randomize_zero_init(
        controlnet, ("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")
    )
    controlnet.save_pretrained(path)


def _randomize_zero_init(net: torch.nn.Module, prefixes: tuple[str, ...], std: float = 0.05) -> None:
    """diffusers zero-initializes a ControlNet's output (and input) projections so that training starts from
    "no effect"; a tiny preset's are random, seeded, so that a control image visibly matters and a test can
    tell whether it was used."""
    import torch

    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if name.startswith(prefixes):
                parameter.normal_(0.0, std)


def build_tiny_sdxl_controlnet(path: Path) -> None:
    """A ``ControlNetModel`` for tiny-sdxl, made as diffusers makes one from a UNet (``from_unet``: its
    encoder half, weights copied), with a conditioning embedding that downsamples the control image by the
    tiny VAE's factor 2."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(9)
    unet = UNet2DConditionModel.from_pretrained(materialize_preset("tiny-sdxl") / "unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    _randomize_zero_init(
        controlnet, ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
    )
    controlnet.save_pretrained(path)


def build_tiny_sdxl_ip_adapter(path: Path) -> None:
    """An IP-Adapter for tiny-sdxl in h94/IP-Adapter's layout (``ip-adapter_sdxl.safetensors``: the image
    projection, and image-prompt key/value projections for every cross-attention, numbered as diffusers'
    loader reads them) with a tiny CLIP image encoder in ``image_encoder/``."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    torch.manual_seed(10)
    unet = UNet2DConditionModel.from_pretrained(materialize_preset("tiny-sdxl") / "unet")
    cross = unet.config.cross_attention_dim
    weights = _tiny_image_projection(path, cross)
    key_id = 1  # diffusers' numbering: odd ids, in the order of the UNet's processors, cross-attention only
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        channels = unet.config.block_out_channels
        level = int(name.split(".")[1]) if not name.startswith("mid_block") else -1
        hidden = list(reversed(channels))[level] if name.startswith("up_blocks") else channels[level]
        for projection in ("to_k_ip", "to_v_ip"):
            weights[f"ip_adapter.{key_id}.{projection}.weight"] = torch.randn(hidden, cross) * 0.2
        key_id += 2
    save_file(weights, str(path / "ip-adapter_sdxl.safetensors"))


TINY_SD3_TRANSFORMER = dict(
    sample_size=32,
    patch_size=2,
    in_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=8,
    joint_attention_dim=64,
    caption_projection_dim=64,
    pooled_projection_dim=64,
    out_channels=16,
    pos_embed_max_size=64,
    dual_attention_layers=(0,),
    qk_norm="rms_norm",
)
"""tiny-sd3's transformer (``SD3Transformer2DModel`` keywords; the benchmarks' CPU smoke runs time it too)."""


def build_tiny_sd3(path: Path) -> None:
    """StableDiffusion3Pipeline: 2 MMDiT blocks (the first with SD3.5's dual attention, RMS QK-norm), 8 heads
    of 8, three text encoders (two CLIP, one T5), 16 CLIP + 13 T5 = 29 text tokens, and SD3's 16 latent
    channels (diffusers' SD3 inpainting takes 16-channel transformers only)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_tokenizer, t5_tokenizer = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    clip = _clip_config(TINY_FLUX.clip, clip_tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = CLIPTextModelWithProjection(clip)
        text_encoder_2 = CLIPTextModelWithProjection(clip)
        text_encoder_3 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tokenizer),
                d_model=64,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                decoder_start_token_id=0,
            )
        )
        transformer = SD3Transformer2DModel(**TINY_SD3_TRANSFORMER)
        vae = _vae_2d({**TINY_FLUX.vae, "latent_channels": 16})  # as SD3's: 16 latent channels
    pipeline = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer,
        transformer=transformer,
    )
    limits = dict(
        default_height=64,
        default_width=64,
        default_steps=8,
        max_side=256,
        size_multiple=4,
        max_sequence_length=13,
    )
    save_with_limits(pipeline, path, limits)


def build_tiny_sdxl(path: Path) -> None:
    """StableDiffusionXLPipeline: SDXL's UNet layout in miniature (three levels, the first without attention,
    two downsamplings, text-time added conditioning), 4 and 8 heads of 8, two CLIP encoders, the second wider
    as SDXL's OpenCLIP bigG is than its CLIP-L (32 + 48 = 80 cross-attention channels; single-file loading
    tells the two apart by width), a VAE of factor 2."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer()
    clip = _clip_config(TINY_FLUX.clip, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(clip)
        wide = {**TINY_FLUX.clip, "hidden_size": 48, "intermediate_size": 96, "projection_dim": 48}
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(wide, tokenizer))
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32, 64),
            layers_per_block=1,
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 8),
            cross_attention_dim=32 + 48,
            norm_num_groups=8,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 48,
        )
        vae = _vae_2d({**TINY_FLUX.vae, "shift_factor": None, "scaling_factor": 0.13025})
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            timestep_spacing="leading",
            steps_offset=1,
        ),
    )
    limits = dict(default_height=64, default_width=64, default_steps=8, max_side=256, size_multiple=8)
    save_with_limits(pipeline, path, limits)


def build_tiny_sd15(path: Path) -> None:
    """StableDiffusionPipeline (SD 1.5's layout in miniature): a UNet of three levels, attention in the first
    two and plain convolutions at the bottom as SD 1.5 has them, 4 heads, 1x1-convolution projections around
    its transformer blocks, one CLIP encoder, a VAE of factor 2 and SD 1.5's own PNDM (PLMS) scheduler."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(_clip_config(TINY_FLUX.clip, tokenizer))
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            attention_head_dim=4,  # diffusers' name for SD 1.5's head count
            cross_attention_dim=32,
            norm_num_groups=8,
        )
        vae = _vae_2d({**TINY_FLUX.vae, "shift_factor": None, "scaling_factor": 0.18215})
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            skip_prk_steps=True,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    limits = dict(default_height=64, default_width=64, default_steps=8, max_side=256, size_multiple=8)
    save_with_limits(pipeline, path, limits)


TINY_WAN_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=8,
    attention_head_dim=8,
    in_channels=8,
    out_channels=8,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)
"""tiny-wan's transformer (``WanTransformer3DModel`` keywords; the benchmarks' CPU smoke runs time it too)."""


def build_tiny_wan(path: Path) -> None:
    """WanPipeline (Wan 2.1 text-to-video layout): 2 blocks of 8 heads of 8 with RMS QK-norm across heads and
    3D rotary embeddings, a UMT5 text encoder, a causal 3D VAE (8x spatial, 4x temporal) and UniPC flow
    sampling, as Wan ships it."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                decoder_start_token_id=0,
            )
        )
        transformer = WanTransformer3DModel(**TINY_WAN_TRANSFORMER)
        vae = AutoencoderKLWan(
            base_dim=8,
            z_dim=8,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.1 * i - 0.35 for i in range(8)],
            latents_std=[1.0 + 0.2 * i for i in range(8)],
        )
    pipeline = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
        ),
        transformer=transformer,
    )
    limits = dict(
        default_height=48,
        default_width=80,
        default_frames=9,
        max_frames=33,
        default_steps=8,
        max_side=256,
        size_multiple=16,
        max_sequence_length=16,
    )
    save_with_limits(pipeline, path, limits)


PRESETS: dict[str, Callable[[Path], None]] = {
    "tiny-flux": build_tiny_flux,
    "tiny-flux-schnell": build_tiny_flux_schnell,
    "tiny-flux-kontext": build_tiny_flux_kontext,
    "tiny-sd3": build_tiny_sd3,
    "tiny-sdxl": build_tiny_sdxl,
    "tiny-sd15": build_tiny_sd15,
    "tiny-wan": build_tiny_wan,
}
"""Presets saved to the cache once and loaded with ``from_pretrained``."""
CONTROLNET_PRESETS: dict[str, Callable[[Path], None]] = {
    "tiny-flux-controlnet": build_tiny_flux_controlnet,
    "tiny-flux-controlnet-union": build_tiny_flux_controlnet_union,
    "tiny-sdxl-controlnet": build_tiny_sdxl_controlnet,
}
"""ControlNet presets (a model directory each, not a pipeline)."""
IP_ADAPTER_PRESETS: dict[str, Callable[[Path], None]] = {
    "tiny-flux-ip-adapter": build_tiny_flux_ip_adapter,
    "tiny-sdxl-ip-adapter": build_tiny_sdxl_ip_adapter,
}
"""IP-Adapter presets (weights plus their image encoder)."""
PRESET_VERSION = 4


def materialize_preset(name: str, cache_dir: Path = CACHE_DIR) -> Path:
    """Build preset ``name`` into the cache once and return its directory. Safe when many workers race:
    each builds into its own temporary directory and the first atomic rename wins."""
    target = cache_dir / f"{name}-v{PRESET_VERSION}"
    marker = {
        **dict.fromkeys(CONTROLNET_PRESETS, "config.json"),
        "tiny-flux-ip-adapter": "ip_adapter.safetensors",
        "tiny-sdxl-ip-adapter": "ip-adapter_sdxl.safetensors",
    }.get(name, "model_index.json")
    if (target / marker).is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
    try:
        {**PRESETS, **CONTROLNET_PRESETS, **IP_ADAPTER_PRESETS}[name](staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
