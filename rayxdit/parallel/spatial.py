"""Patch (spatial) parallelism for convolutional networks: a UNet or a VAE decoder run on bands of rows.

Every rank holds a contiguous band of the image's rows and runs the unchanged network on it. The result
equals one rank's run (up to the summation order of the normalisation statistics) because every operation
is made exact on a band:

- a ``k x k`` convolution of stride ``s`` and padding ``p`` reads ``p`` rows above its band and ``k - s - p``
  below: they come from the neighbouring ranks (a halo exchange; zeros at the image edge, as padding gives);
  bands keep row counts divisible by every stride on the way down, so strided convolutions stay aligned;
- GroupNorm's mean and variance span the whole image: every band's count, mean and squared deviations
  are gathered (one collective) and combined exactly (Chan et al.'s parallel variance);
- self-attention attends over every position: the caller's processor gathers keys and values (or runs
  sequence-parallel attention, a band being a contiguous run of row-major tokens);
- nearest-neighbour upsampling, 1x1 convolutions and everything token-wise are local.

Unlike DistriFusion, nothing is stale: the halo and statistics are exchanged in the same step (synchronous),
which is what makes the output equal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from rayxdit.parallel.mesh import AxisGroup
from rayxdit.parallel.sequence import gather_shards


class RowBands:
    """The row counts of every rank's band at the network's input resolution, set per request; layers at
    other resolutions scale them by their own band's height (all bands scale alike)."""

    def __init__(self, axis: AxisGroup):
        self.axis = axis
        self.rows: tuple[int, ...] = ()

    def at(self, local_rows: int) -> list[int]:
        """Every rank's band height at the resolution where this rank's band has ``local_rows`` rows."""
        mine = self.rows[self.axis.index]
        sizes = [rows * local_rows // mine for rows in self.rows]
        assert sizes[self.axis.index] == local_rows, (self.rows, local_rows)
        return sizes


def exchange_halos(
    x: torch.Tensor, above: int, below: int, axis: AxisGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    """``above`` rows from the band above and ``below`` rows from the band below this rank's band
    ``[B, C, h, W]`` (zeros at the image edges)."""
    assert x.shape[2] >= max(above, below), (
        f"a band of {x.shape[2]} rows cannot lend a halo of {above}/{below}"
    )
    top = x.new_zeros((*x.shape[:2], above, x.shape[3]))
    bottom = x.new_zeros((*x.shape[:2], below, x.shape[3]))
    ops = []
    if axis.index > 0:  # the band above needs my first `below` rows and lends me its last `above`
        previous = axis.ranks[axis.index - 1]
        if below:
            ops.append(dist.P2POp(dist.isend, x[:, :, :below].contiguous(), previous, axis.group))
        if above:
            ops.append(dist.P2POp(dist.irecv, top, previous, axis.group))
    if axis.index < axis.size - 1:
        following = axis.ranks[axis.index + 1]
        if above:
            ops.append(
                dist.P2POp(dist.isend, x[:, :, x.shape[2] - above :].contiguous(), following, axis.group)
            )
        if below:
            ops.append(dist.P2POp(dist.irecv, bottom, following, axis.group))
    for work in dist.batch_isend_irecv(ops) if ops else []:
        work.wait()
    return top, bottom


class HaloConv2d(nn.Module):
    """A convolution on a band of rows: borrow the halo rows, convolve without vertical padding."""

    def __init__(self, conv: nn.Conv2d, axis: AxisGroup):
        super().__init__()
        assert conv.dilation == (1, 1) and conv.padding_mode == "zeros", conv
        self.conv, self.axis = conv, axis
        self.stride = conv.stride[0]
        self.above = conv.padding[0]
        self.below = conv.kernel_size[0] - self.stride - conv.padding[0]
        assert self.below >= 0, f"{conv}: a band would need rows it skips"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[2] % self.stride == 0, (
            f"a band of {x.shape[2]} rows does not align to stride {self.stride}"
        )
        top, bottom = exchange_halos(x, self.above, self.below, self.axis)
        padded = torch.cat([top, x, bottom], dim=2)
        conv = self.conv
        return F.conv2d(padded, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]), groups=conv.groups)


class SyncGroupNorm(nn.Module):
    """GroupNorm whose statistics cover every rank's band: ``[B, C, ...]`` in and out.

    One collective per norm (a UNet has dozens per step, and each collective costs a round trip): every rank
    gathers every band's count, mean and sum of squared deviations from its own mean, and combines them with
    Chan et al.'s parallel variance formula, as accurate as a two-pass variance over the whole image (no
    sum of squares, so no cancellation)."""

    def __init__(self, norm: nn.GroupNorm, axis: AxisGroup):
        super().__init__()
        self.norm, self.axis = norm, axis

    def _statistics(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and variance ``[B, G]`` over every rank's band of ``groups`` ``[B, G, n]``."""
        count = groups.shape[-1]
        mean = groups.mean(-1)
        squares = (groups - mean.unsqueeze(-1)).square().sum(-1)
        mine = torch.stack([torch.full_like(mean, count), mean, squares])
        bands = [torch.empty_like(mine) for _ in range(self.axis.size)]
        dist.all_gather(bands, mine, group=self.axis.group)
        counts, means, band_squares = torch.stack(bands).unbind(1)  # each [ranks, B, G]
        total = counts.sum(0)
        mean = (counts * means).sum(0) / total
        squares = band_squares.sum(0) + (counts * (means - mean).square()).sum(0)
        return mean, squares / total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        batch, channels = x.shape[:2]
        groups = x.float().reshape(batch, norm.num_groups, -1)
        mean, variance = self._statistics(groups)
        centered = groups - mean.unsqueeze(-1)
        normed = (centered * torch.rsqrt(variance + norm.eps).unsqueeze(-1)).reshape(x.shape).to(x.dtype)
        if norm.affine:
            shape = (1, channels) + (1,) * (x.ndim - 2)
            normed = normed * norm.weight.reshape(shape) + norm.bias.reshape(shape)
        return normed


class GatheredAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` for a VAE's spatial self-attention ``[B, C, h, W]``, with the keys
    and values of every rank's band gathered (the queries stay local)."""

    def __init__(self, bands: RowBands):
        self.bands = bands

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        assert encoder_hidden_states is None and attention_mask is None and attn.spatial_norm is None
        assert hidden_states.ndim == 4, "VAE attention runs on [B, C, h, W]"
        residual = hidden_states
        batch, channels, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        sizes = [rows * width for rows in self.bands.at(height)]
        key = gather_shards(attn.to_k(hidden_states), 1, self.bands.axis, sizes)
        value = gather_shards(attn.to_v(hidden_states), 1, self.bands.axis, sizes)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value)
        )
        hidden_states = F.scaled_dot_product_attention(query, key, value)
        hidden_states = (
            hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def parallelize_bands(network: nn.Module, axis: AxisGroup) -> None:
    """Rewrite ``network``'s padded or strided convolutions and its GroupNorms in place so that it runs on
    bands of rows over ``axis``. Attention is the caller's: it depends on the network's layout."""
    if axis.size == 1:
        return
    for module in list(network.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Conv2d) and (
                child.padding[0] > 0 or child.kernel_size[0] > child.stride[0]
            ):
                setattr(module, name, HaloConv2d(child, axis))
            elif isinstance(child, nn.GroupNorm):
                setattr(module, name, SyncGroupNorm(child, axis))


def parallelize_vae_decoder(vae: nn.Module, axis: AxisGroup) -> RowBands | None:
    """Make an ``AutoencoderKL``'s decoder run on bands of latent rows over ``axis``. Returns the bands
    object whose ``rows`` the caller sets per decode (None when there is nothing to split)."""
    if axis.size == 1:
        return None
    bands = RowBands(axis)
    parallelize_bands(vae.decoder, axis)
    for module in vae.decoder.modules():
        if hasattr(module, "set_processor") and hasattr(module, "to_q"):
            module.set_processor(GatheredAttnProcessor(bands))
    return bands


def decode_bands(vae: nn.Module, bands: RowBands, latents: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """Decode this rank's band ``latents`` ``[B, C, rows[index], W]`` with every rank of the bands' axis;
    every rank gets the whole decoded image."""
    bands.rows = tuple(rows)
    band = vae.decode(latents, return_dict=False)[0]
    scale = band.shape[2] // rows[bands.axis.index]
    return gather_shards(band, 2, bands.axis, [r * scale for r in rows])
