"""DeepAtlas on numpy volumes: input preparation (shared with training), :func:`register` and
:func:`segment`.

Input preparation, the same in training and inference (:func:`prepare_volume`): a volume
``(C, X, Y, Z)`` (or ``(X, Y, Z)`` for one channel) is zero-padded symmetrically up to the next
multiple of the networks' downsampling factor, then each channel is z-scored with the mean and
standard deviation of its voxels > 0, applied to every voxel (``"volume-zscore-nonzero"``: the
whole volume, where Deep Label Fusion normalises per patch). Padding comes first so the padded
zeros are left out of the statistics, like the image background. Moving and target must share
one voxel grid (e.g. after affine alignment): the networks see them voxel by voxel.

This module must stay free of nipype and of ``dlf_bids.interfaces`` / ``dlf_bids.workflows``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BadDataError
from .deepatlas import DeepAtlas, jacobian_determinant, warp_image, warp_labels
from .inference import normalise_patch, resolve_device

__all__ = ["NORMALISATION", "RegistrationResult", "prepare_volume", "register", "segment"]

NORMALISATION = "volume-zscore-nonzero"


def as_channels(image, in_channels: int, what: str = "image") -> np.ndarray:
    """``(C, X, Y, Z)`` float32 with ``C == in_channels`` (a 3D array is one channel)."""
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[0] != in_channels:
        raise BadDataError(f"{what} must be ({in_channels}, X, Y, Z), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise BadDataError(f"{what} contains NaN or infinite values")
    return arr


def padding(shape: Sequence[int], divisor: int) -> list[tuple[int, int]]:
    """Symmetric ``(before, after)`` per axis up to the next multiple of ``divisor`` (at least
    ``2 * divisor``: instance norm needs more than one voxel at the bottleneck)."""
    out = []
    for n in shape:
        total = max(-(-int(n) // divisor) * divisor, 2 * divisor) - int(n)
        out.append((total // 2, total - total // 2))
    return out


def pad(arr: np.ndarray, pads: list[tuple[int, int]]) -> np.ndarray:
    """Zero-pad the last 3 axes."""
    return np.pad(arr, [(0, 0)] * (arr.ndim - 3) + pads)


def crop(x, pads: list[tuple[int, int]]):
    """Undo :func:`pad` on the last 3 axes (numpy or torch)."""
    return x[(..., *(slice(b, x.shape[-3 + i] - a) for i, (b, a) in enumerate(pads)))]


def prepare_volume(image, in_channels: int, divisor: int, what: str = "image") -> torch.Tensor:
    """Padded, normalised network input ``(C, X', Y', Z')`` (see the module docstring)."""
    arr = as_channels(image, in_channels, what)
    return normalise_patch(torch.from_numpy(pad(arr, padding(arr.shape[1:], divisor))))


@dataclass
class RegistrationResult:
    """``ddf`` ``(3, X, Y, Z)`` voxels (moving sampled at ``x + ddf(x)``); ``warped`` the moving
    image on the target grid (input intensities, trilinear); ``labels`` the moving label map
    warped (nearest) when given; ``min_jacobian`` the smallest Jacobian determinant (<= 0:
    folding) and ``folded_fraction`` the fraction of the grid's voxels where it is <= 0."""

    ddf: np.ndarray
    warped: np.ndarray
    labels: np.ndarray | None
    min_jacobian: float
    folded_fraction: float


@torch.no_grad()
def register(model: DeepAtlas, moving, target, moving_labels=None, device="cpu",
             refine_steps: int = 0) -> RegistrationResult:
    """Register ``moving`` to ``target`` (same shape, ``(C, X, Y, Z)`` or 3D for one channel): one
    network pass, then ``refine_steps`` steps of instance optimisation on this pair
    (:func:`~.deepatlas_refine.refine_warp`; 0: the network's warp alone)."""
    cfg = model.config
    dev = resolve_device(device)
    mov = as_channels(moving, cfg.in_channels, "moving image")
    tgt = as_channels(target, cfg.in_channels, "target image")
    if mov.shape != tgt.shape:
        raise BadDataError(f"moving {mov.shape} and target {tgt.shape} must share one voxel grid")
    pads = padding(mov.shape[1:], cfg.size_divisor)
    net_in = [prepare_volume(a, cfg.in_channels, cfg.size_divisor)[None].to(dev) for a in (mov, tgt)]
    model.eval()
    if refine_steps:
        # imported here: deepatlas_refine imports the training losses, which import this module
        from .deepatlas_refine import refine_warp

        velocity = crop(model.registration.velocity(*net_in), pads)
        ddf = refine_warp(model, *(crop(x, pads) for x in net_in), velocity, steps=refine_steps)
    else:
        ddf = crop(model.registration(*net_in), pads)
    # warp the input intensities rather than the normalised network input
    warped = warp_image(torch.from_numpy(mov)[None].to(dev), ddf)
    labels = None
    if moving_labels is not None:
        lab = np.asarray(moving_labels)
        if lab.shape != mov.shape[1:]:
            raise BadDataError(f"moving labels {lab.shape} do not match the moving image {mov.shape[1:]}")
        lab_t = torch.from_numpy(lab.astype(np.float32))[None, None].to(dev)
        labels = warp_labels(lab_t, ddf)[0, 0].cpu().numpy().astype(lab.dtype)
    jacobian = jacobian_determinant(ddf)
    return RegistrationResult(
        ddf=ddf[0].cpu().numpy(), warped=warped[0].cpu().numpy(), labels=labels,
        min_jacobian=float(jacobian.min()), folded_fraction=float((jacobian <= 0).double().mean()),
    )


@torch.no_grad()
def segment(model: DeepAtlas, image, device="cpu") -> np.ndarray:
    """Label map ``(X, Y, Z)`` of ``image`` by ``F_S`` (argmax): label values when the model's
    config lists them (``labels``), channel indices otherwise."""
    cfg = model.config
    dev = resolve_device(device)
    arr = as_channels(image, cfg.in_channels)
    pads = padding(arr.shape[1:], cfg.size_divisor)
    model.eval()
    logits = model.segmentation(prepare_volume(arr, cfg.in_channels, cfg.size_divisor)[None].to(dev))
    idx = crop(logits.argmax(dim=1)[0], pads).cpu().numpy()
    values = np.asarray(cfg.labels if cfg.labels is not None else range(cfg.n_labels), dtype=np.int64)
    return values[idx]
