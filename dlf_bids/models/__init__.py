"""Learned segmentation models (plain PyTorch + MONAI; no nipype imports here)."""

from .dlf import (
    DeepLabelFusion,
    DLFConfig,
    check_patch_size,
    coordinate_maps,
    count_parameters,
    crop_patch,
    deep_supervision_loss,
    fuse,
    label_mask,
    one_hot_labels,
    patch_coordinates,
)
from .unet import DeepSupervisionUNet

__all__ = [
    "DLFConfig",
    "DeepLabelFusion",
    "DeepSupervisionUNet",
    "check_patch_size",
    "coordinate_maps",
    "count_parameters",
    "crop_patch",
    "deep_supervision_loss",
    "fuse",
    "label_mask",
    "one_hot_labels",
    "patch_coordinates",
]
