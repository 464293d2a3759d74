"""DeepAtlas (Xu & Niethammer, MICCAI 2019): joint registration and segmentation networks.

Written from the description in ``notes/methods.md`` (the authors' code carries no licence and
was not consulted). Two plain torch modules, both MONAI :class:`~monai.networks.nets.DynUNet`
(the U-Net the rest of ``dlf_bids.models`` uses: 3×3×3 convs, instance norm, leaky ReLU, strided
downsampling, transposed-conv upsampling):

* :class:`RegistrationNet` ``F_R``: ``concat(moving, target)`` → 3-channel *stationary velocity
  field* in voxel units, integrated by scaling and squaring (MONAI ``DVF2DDF``) into a dense
  displacement field (DDF). Its output layer starts at zero, so an untrained network is the
  identity transform and training starts from "no deformation" rather than from a random warp.
* :class:`SegmentationNet` ``F_S``: image → ``n_labels`` logits (background = channel 0).

Warping (:func:`warp_image`, :func:`warp_labels`, :func:`warp_probabilities`) is MONAI ``Warp``:
the DDF ``u`` maps output voxel ``x`` to the moving image at ``x + u(x)`` (channel ``i`` of ``u``
is the displacement along array axis ``i``); out-of-grid samples take the border value.

The losses and the alternating training are in :mod:`dlf_bids.models.deepatlas_training`.
This module must stay free of nipype and of ``dlf_bids.interfaces`` / ``dlf_bids.workflows``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from monai.networks.blocks import DVF2DDF, Warp
from monai.networks.nets import DynUNet
from torch import nn

from .config_dict import DictConfig
from .unet import DEFAULT_ACT, DEFAULT_NORM

__all__ = [
    "DeepAtlas",
    "DeepAtlasConfig",
    "RegistrationNet",
    "SegmentationNet",
    "jacobian_determinant",
    "warp_image",
    "warp_labels",
    "warp_probabilities",
]

#: Bending-energy weight for MONAI's ``BendingEnergyLoss`` of a displacement in *voxels*. The
#: public re-implementation's ``7.5 * (size / 128)**2`` reads as the weight for a displacement in
#: ``[-1, 1]`` grid units (our assumption: its code was not read); such a displacement is ours
#: times ``2 / size``, its bending energy ours times ``(2 / size)**2``, so the size cancels.
#: We use 16 times that: on the leave-one-out benchmark (3 mm grid, 1000 steps; BENCHMARKS.md,
#: "DeepAtlas") the re-implementation's weight let long-trained warps fold (smallest Jacobian
#: determinant -0.9) and scored lower than the stiffer warp on every accuracy column.
DEFAULT_LAMBDA_R = 16 * 7.5 * (2.0 / 128.0) ** 2
#: anatomy (warped-label Dice) and supervised Dice weights: the public re-implementation's
DEFAULT_LAMBDA_A = 2.0
DEFAULT_LAMBDA_SP = 3.0


@dataclass
class DeepAtlasConfig(DictConfig):
    """Hyper-parameters of both networks and of the losses (JSON-serialisable via :meth:`to_dict`).

    ``in_channels``: 1 (T1w) or 2 (T1w + T2w). ``n_labels`` counts the background. ``labels`` is
    optional metadata: the label value of each segmentation channel (``labels[0] == 0``)."""

    n_labels: int
    in_channels: int = 1
    reg_channels: tuple[int, ...] = (16, 32, 32, 64, 64)
    seg_channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    integration_steps: int = 7
    lambda_a: float = DEFAULT_LAMBDA_A
    lambda_sp: float = DEFAULT_LAMBDA_SP
    lambda_r: float = DEFAULT_LAMBDA_R
    lncc_kernel: int = 9  # local NCC window (voxels), odd
    labels: tuple[int, ...] | None = None
    modalities: tuple[str, ...] | None = None

    def __post_init__(self):
        self.reg_channels = tuple(int(c) for c in self.reg_channels)
        self.seg_channels = tuple(int(c) for c in self.seg_channels)
        if self.labels is not None:
            self.labels = tuple(int(v) for v in self.labels)
        if self.modalities is not None:
            self.modalities = tuple(str(m) for m in self.modalities)
        if int(self.n_labels) < 2:
            raise ValueError(f"n_labels must be >= 2 (background included), got {self.n_labels}")
        if int(self.in_channels) < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        for name in ("reg_channels", "seg_channels"):
            chans = getattr(self, name)
            if len(chans) < 3 or any(c < 1 for c in chans):  # DynUNet's minimum depth
                raise ValueError(f"{name} needs >= 3 positive widths, got {chans}")
        if int(self.integration_steps) < 1:
            raise ValueError(f"integration_steps must be >= 1, got {self.integration_steps}")
        if self.lncc_kernel < 1 or self.lncc_kernel % 2 == 0:
            raise ValueError(f"lncc_kernel must be odd and >= 1, got {self.lncc_kernel}")
        if min(self.lambda_a, self.lambda_sp, self.lambda_r) < 0:
            raise ValueError("loss weights must be >= 0")
        if self.labels is not None and (len(self.labels) != self.n_labels or self.labels[0] != 0):
            raise ValueError(f"labels must list {self.n_labels} values starting with 0, got {self.labels}")
        if self.modalities is not None and len(self.modalities) != self.in_channels:
            raise ValueError(f"modalities has {len(self.modalities)} names, in_channels is {self.in_channels}")

    @property
    def size_divisor(self) -> int:
        """Every volume dimension must be a multiple of this (the deeper network's downsampling)."""
        return 2 ** (max(len(self.reg_channels), len(self.seg_channels)) - 1)


def _unet(in_channels: int, out_channels: int, channels: tuple[int, ...]) -> DynUNet:
    levels = len(channels)
    return DynUNet(3, in_channels, out_channels, kernel_size=[3] * levels, strides=[1] + [2] * (levels - 1),
                   upsample_kernel_size=[2] * (levels - 1), filters=list(channels),
                   norm_name=DEFAULT_NORM, act_name=DEFAULT_ACT)


def _quiet_warp(mode: str, padding_mode: str = "border") -> Warp:
    # MONAI warns at every Warp construction that it falls back to torch's grid_sample (no
    # compiled extension here): expected, and noise for users
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Using PyTorch native grid_sample")
        return Warp(mode=mode, padding_mode=padding_mode)


class RegistrationNet(nn.Module):
    """``F_R(moving, target)`` → DDF ``(B, 3, X, Y, Z)`` in voxels (see the module docstring)."""

    def __init__(self, config: DeepAtlasConfig):
        super().__init__()
        self.unet = _unet(2 * config.in_channels, 3, config.reg_channels)
        out = self.unet.output_block.conv.conv
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Using PyTorch native grid_sample")
            self.integrate = DVF2DDF(num_steps=config.integration_steps)

    def velocity(self, moving: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if moving.shape != target.shape:
            raise ValueError(f"moving {tuple(moving.shape)} and target {tuple(target.shape)} differ in shape")
        return self.unet(torch.cat([moving, target], dim=1))

    def forward(self, moving: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.integrate(self.velocity(moving, target))


class SegmentationNet(nn.Module):
    """``F_S(image)`` → logits ``(B, n_labels, X, Y, Z)``."""

    def __init__(self, config: DeepAtlasConfig):
        super().__init__()
        self.unet = _unet(config.in_channels, config.n_labels, config.seg_channels)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.unet(image)


class DeepAtlas(nn.Module):
    """Both networks with their configuration: what is trained, saved and loaded together."""

    def __init__(self, config: DeepAtlasConfig):
        super().__init__()
        self.config = config
        self.registration = RegistrationNet(config)
        self.segmentation = SegmentationNet(config)


def _check_ddf(x: torch.Tensor, ddf: torch.Tensor) -> None:
    if ddf.ndim != 5 or ddf.shape[1] != 3 or ddf.shape[0] != x.shape[0] or ddf.shape[2:] != x.shape[2:]:
        raise ValueError(f"ddf must be (B, 3, *spatial) matching {tuple(x.shape)}, got {tuple(ddf.shape)}")


def warp_image(image: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    """Trilinear warp of ``image`` ``(B, C, X, Y, Z)`` by ``ddf``."""
    _check_ddf(image, ddf)
    return _quiet_warp("bilinear")(image.float(), ddf)


def warp_labels(labels: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour warp of an integer label map ``(B, 1, X, Y, Z)``; returns int64. Not
    differentiable: for the anatomy loss use :func:`warp_probabilities` on one-hot maps."""
    _check_ddf(labels, ddf)
    return _quiet_warp("nearest")(labels.float(), ddf).round().long()


def warp_probabilities(probabilities: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    """Trilinear warp of one-hot / probability maps ``(B, L, X, Y, Z)``: differentiable with
    respect to the DDF, and still a distribution per voxel (a convex combination of them)."""
    return warp_image(probabilities, ddf)


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """Determinant of the Jacobian of ``x -> x + ddf(x)``, ``(B, X, Y, Z)``, by finite differences
    (central inside, one-sided at the borders). ``<= 0`` marks folding: the QC of a warp."""
    if ddf.ndim != 5 or ddf.shape[1] != 3:
        raise ValueError(f"ddf must be (B, 3, X, Y, Z), got {tuple(ddf.shape)}")
    # grads[j][:, i] = d u_i / d x_j
    grads = torch.gradient(ddf, dim=(2, 3, 4))
    jac = torch.stack(grads, dim=2)  # (B, i, j, X, Y, Z)
    jac = jac + torch.eye(3, dtype=ddf.dtype, device=ddf.device)[None, :, :, None, None, None]
    return torch.linalg.det(jac.permute(0, 3, 4, 5, 1, 2))
