"""Built-in tiny models: real diffusers/transformers architectures with tiny configs and seeded random weights.

Nothing can be downloaded on a CPU box or in CI, so a preset is built in code (tokenizers included) and
saved once with ``save_pretrained`` into the cache directory; every worker then loads it through the real
``from_pretrained`` path, exactly as it would load a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

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


def build_tiny_flux(path: Path) -> None:
    """FluxPipeline: 2 double + 2 single blocks, 8 heads of 16 (ulysses up to 8), a 2x VAE, guidance
    embeddings like Flux.1-dev, and 29 text tokens (odd, so text shards are uneven too)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tokenizer, t5_tokenizer = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(clip_tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=clip_tokenizer.model_max_length,
                projection_dim=32,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        )
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tokenizer),
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                decoder_start_token_id=0,
            )
        )
        transformer = FluxTransformer2DModel(
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
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            shift_factor=0.0609,
            scaling_factor=1.5035,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096
    )
    pipeline = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    pipeline.save_pretrained(path)
    limits = dict(
        default_height=128,
        default_width=128,
        default_steps=8,
        max_side=512,
        size_multiple=4,
        max_sequence_length=29,
    )
    (path / "rayxdit.json").write_text(json.dumps(limits, indent=2))


PRESETS: dict[str, Callable[[Path], None]] = {"tiny-flux": build_tiny_flux}
PRESET_VERSION = 1


def materialize_preset(name: str, cache_dir: Path = CACHE_DIR) -> Path:
    """Build preset ``name`` into the cache once and return its directory. Safe when many workers race:
    each builds into its own temporary directory and the first atomic rename wins."""
    target = cache_dir / f"{name}-v{PRESET_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
    try:
        PRESETS[name](staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
