"""Patch-parallel convolutional networks (bands of rows) against the single-process network.

Real gloo groups of 3 ranks, so bands are uneven. Tolerance: fp32 on CPU, max |bands - reference| <= 1e-5
for activations of unit scale (observed ~1e-6: only GroupNorm's sums are reordered). A network without the
halo exchange differs by far more, so the test sees a missing or misplaced halo.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from diffusers import AutoencoderKL

from rayxdit.parallel import spatial
from rayxdit.parallel.mesh import AxisGroup
from rayxdit.parallel.sequence import gather_shards, split_sizes
from rayxdit.parallel.spatial import RowBands, decode_bands, parallelize_bands, parallelize_vae_decoder
from tests.helpers import run_on_ranks

TOLERANCE = 1e-5
WORLD_SIZE = 3


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    ).eval()


def strided_net() -> nn.Sequential:
    """The convolutions a UNet's down path has: 3x3 stride 1, 3x3 stride 2 (pad 1), 4x4 stride 2 (pad 1)."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.GroupNorm(4, 8),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.SiLU(),
        nn.Conv2d(8, 8, 4, stride=2, padding=1),
        nn.Conv2d(8, 4, 1),
    ).eval()


@contextlib.contextmanager
def _zero_halos(active: bool):
    """Sabotage: every band sees zeros beyond its edges, as if the neighbours' rows never arrived."""
    original = spatial.exchange_halos
    if active:
        spatial.exchange_halos = lambda x, above, below, axis: (
            x.new_zeros((*x.shape[:2], above, x.shape[3])),
            x.new_zeros((*x.shape[:2], below, x.shape[3])),
        )
    try:
        yield
    finally:
        spatial.exchange_halos = original


def _band_cases(worker):
    rank, world_size = worker.rank, worker.world_size
    axis = AxisGroup(dist.new_group(list(range(world_size))), tuple(range(world_size)), rank)
    errors = {}
    with torch.inference_mode():
        # The VAE decoder: rows 7 = 3 + 2 + 2 latent rows, width 5.
        vae = tiny_vae()
        latents = torch.randn(2, 4, 7, 5, generator=torch.Generator().manual_seed(2))
        reference = vae.decode(latents).sample
        bands = parallelize_vae_decoder(vae, axis)
        rows = split_sizes(7, world_size)
        start = sum(rows[:rank])
        decoded = decode_bands(vae, bands, latents[:, :, start : start + rows[rank]], rows)
        errors["vae decoder"] = (decoded - reference).abs().max().item()

        # Strided convolutions: bands of 4 rows each (aligned to the total stride 4), 12 rows.
        for name, halo in (("strided convolutions", True), ("strided convolutions without halo", False)):
            net = strided_net()
            x = torch.randn(1, 4, 12, 8, generator=torch.Generator().manual_seed(3))
            reference = net(x)
            parallelize_bands(net, axis)
            with _zero_halos(not halo):
                band = net(x[:, :, 4 * rank : 4 * rank + 4])
            out = gather_shards(band, 2, axis, [1] * world_size)
            errors[name] = (out - reference).abs().max().item()
    return errors


@pytest.mark.slow
def test_bands_equal_the_whole_network():
    errors = run_on_ranks(_band_cases, WORLD_SIZE, timeout_s=300)
    assert errors["vae decoder"] <= TOLERANCE, errors
    assert errors["strided convolutions"] <= TOLERANCE, errors
    assert errors["strided convolutions without halo"] > 100 * TOLERANCE, errors


def test_row_bands_scale_with_resolution():
    bands = RowBands(AxisGroup(None, (0, 1, 2), 1))
    bands.rows = (3, 2, 2)
    assert bands.at(2) == [3, 2, 2]
    assert bands.at(8) == [12, 8, 8]  # after two 2x upsamplings
