"""A compact N-level 3D U-Net with one output head per decoder scale (deep supervision).

Built only from MONAI's DynUNet building blocks (``UnetBasicBlock`` / ``UnetResBlock``,
``UnetUpBlock``, ``UnetOutBlock`` from :mod:`monai.networks.blocks.dynunet_block`) and initialised
with :meth:`monai.networks.nets.DynUNet.initialize_weights`, so a level of this network is exactly
a level of MONAI's ``DynUNet`` (two 3×3×3 conv → instance norm → leaky ReLU per block, strided
convolution for downsampling, transposed convolution for upsampling).

Why not ``DynUNet(deep_supervision=True)`` itself: for a 4-level network DynUNet allows at most
``len(strides) - 2 = 2`` extra heads, it has no head on the bottleneck (the 1/8 scale that Deep
Label Fusion supervises), and it returns the heads *interpolated to full resolution and stacked*,
only in training mode. Deep Label Fusion's fine-tuning subnet needs one head at every scale
(1/8, 1/4, 1/2, 1) at the scale's own resolution, in training and evaluation alike, so the
fine-tuning subnet is this class; the weighted-voting subnet (no deep supervision) is a plain
``DynUNet``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetOutBlock, UnetResBlock, UnetUpBlock
from monai.networks.nets import DynUNet
from torch import nn

__all__ = ["DeepSupervisionUNet", "DEFAULT_NORM", "DEFAULT_ACT"]

#: MONAI norm spec used by every block: per-sample instance normalisation with affine parameters
#: (DynUNet's default). Per-sample normalisation makes a network's output for one sample
#: independent of the other samples in the batch, which the atlas chunking of Deep Label Fusion
#: relies on.
DEFAULT_NORM: tuple = ("INSTANCE", {"affine": True})
DEFAULT_ACT: tuple = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})


class DeepSupervisionUNet(nn.Module):
    """3D U-Net with ``len(channels)`` levels and a 1×1×1 output head at every level.

    Level ``i`` (0 = full resolution) has ``channels[i]`` feature maps and spatial size
    ``input_size / 2**i``; spatial sizes must therefore be divisible by ``2**(len(channels)-1)``.

    ``forward`` returns a list of ``len(channels)`` logit tensors ordered **coarse → fine**:
    the bottleneck head first (scale ``1/2**(len(channels)-1)``), the full-resolution head last.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (32, 64, 128, 256),
        kernel_size: int = 3,
        norm_name: tuple | str = DEFAULT_NORM,
        act_name: tuple | str = DEFAULT_ACT,
        dropout: float | None = None,
        res_block: bool = False,
    ):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2:
            raise ValueError(f"DeepSupervisionUNet needs at least 2 levels, got channels={channels}")
        if any(c < 1 for c in channels):
            raise ValueError(f"channel widths must be positive, got {channels}")
        self.spatial_dims = spatial_dims
        self.channels = channels
        block = UnetResBlock if res_block else UnetBasicBlock
        common = dict(norm_name=norm_name, act_name=act_name, dropout=dropout)

        self.input_block = block(spatial_dims, in_channels, channels[0], kernel_size, 1, **common)
        self.downsamples = nn.ModuleList(
            block(spatial_dims, channels[i - 1], channels[i], kernel_size, 2, **common)
            for i in range(1, len(channels))
        )
        # decoder, coarse -> fine: level i -> level i-1
        self.upsamples = nn.ModuleList(
            UnetUpBlock(spatial_dims, channels[i], channels[i - 1], kernel_size, 1, 2, **common)
            for i in range(len(channels) - 1, 0, -1)
        )
        # heads, coarse -> fine (the first one sits on the bottleneck)
        self.heads = nn.ModuleList(
            UnetOutBlock(spatial_dims, channels[i], out_channels, dropout=dropout)
            for i in range(len(channels) - 1, -1, -1)
        )
        self.apply(DynUNet.initialize_weights)

    @property
    def size_divisor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = [self.input_block(x)]
        for down in self.downsamples:
            skips.append(down(skips[-1]))
        h = skips.pop()
        outputs = [self.heads[0](h)]
        for up, head in zip(self.upsamples, self.heads[1:]):
            h = up(h, skips.pop())
            outputs.append(head(h))
        return outputs
