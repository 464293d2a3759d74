"""Cheap checks of input images, run before any work so bad inputs fail with one clear line."""

from __future__ import annotations

from pathlib import Path

import nibabel as nb
import numpy as np

from ..errors import BadDataError


def check_anatomical(path: Path | str) -> None:
    """Raise :class:`BadDataError` with the reason if ``path`` is not a usable 3D anatomical image."""
    path = Path(path)
    try:
        img = nb.load(str(path))
    except Exception as err:  # nibabel raises several types for unreadable files
        raise BadDataError(f"{path.name} cannot be read as an image ({err.__class__.__name__})")
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise BadDataError(f"{path.name} is not a 3D image (shape {img.shape})")
    if min(shape) < 2:
        raise BadDataError(f"{path.name} has a degenerate shape {img.shape}")
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise BadDataError(f"{path.name} has invalid voxel sizes {tuple(zooms)}")
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-6:
        raise BadDataError(f"{path.name} has an invalid (singular or non-finite) affine")
    data = np.asanyarray(img.dataobj)
    if not np.any(data):
        raise BadDataError(f"{path.name} is all zeros")
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise BadDataError(f"{path.name} contains NaN or infinite values")


def voxel_volume_mm3(img: nb.spatialimages.SpatialImage) -> float:
    # rounded: the determinant of e.g. 1.2 mm voxels is 1.7280000000000002
    return round(float(abs(np.linalg.det(img.affine[:3, :3]))), 9)
