"""Full-size architectures with random weights, built straight on the GPU, for benchmarks.

No checkpoint can be downloaded on the benchmark machines, and speed does not depend on weight values, so
the benchmarks build the real Flux.1-dev architecture with seeded random bf16 weights. Anything that takes a
model name takes ``benchmarks.models:FLUX_DEV`` (the repository root must be importable, as it is when a
script runs from it): ``rayxdit generate --model benchmarks.models:FLUX_DEV``, a pool's ``model`` field.
"""

from __future__ import annotations

from rayxdit.models.presets import FluxSizes

FLUX_DEV = FluxSizes(
    # black-forest-labs/FLUX.1-dev: 11.9B transformer, T5-XXL encoder (4.8B), CLIP-L, the 16-channel VAE.
    transformer=dict(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
    t5=dict(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu",
    ),
    clip=dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        projection_dim=768,
    ),
    vae=dict(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=32,
        sample_size=1024,
        shift_factor=0.1159,
        scaling_factor=0.3611,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
    limits=dict(
        default_height=1024,
        default_width=1024,
        default_steps=28,
        max_side=2048,
        size_multiple=16,
        max_sequence_length=512,
    ),
)

FLUX_DEV_RANDOM = "benchmarks.models:FLUX_DEV"
"""The model name of the random full-size Flux.1-dev, as configs and command lines take it."""

WAN_14B = dict(
    # Wan-AI/Wan2.1-T2V-14B-Diffusers' transformer (WanTransformer3DModel), as served by wan-8gpu.yaml.
    patch_size=(1, 2, 2),
    num_attention_heads=40,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=13824,
    num_layers=40,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)

SD35_LARGE = dict(
    # stabilityai/stable-diffusion-3.5-large's transformer (SD3Transformer2DModel): 38 MMDiT blocks of 38 heads
    # of 64, RMS QK-norm, no dual-attention blocks (those are 3.5 Medium's).
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=38,
    attention_head_dim=64,
    num_attention_heads=38,
    joint_attention_dim=4096,
    caption_projection_dim=2432,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
    qk_norm="rms_norm",
)
