"""Cheap checks of input images, run before any work so bad inputs fail with one clear line."""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nb
import numpy as np

from ..errors import BadDataError

# Multi-atlas fusion holds every registered atlas on the target grid, so its memory grows with
# voxels x atlases: at 256^3 (1 mm whole head) JLF already peaks at 3.1 GiB and each registration
# at 1.2 GiB (BENCHMARKS.md). 512^3 is 8 times that (~25 GiB for JLF alone), about what a large
# node has; larger images are refused from their header, before any data is read.
MAX_VOXELS = 512 ** 3
# Voxel sizes differing by more than this factor (e.g. 1x1x6 mm) still work, but registration
# and the labels are coarse along the thick axis: worth a warning, not a refusal.
MAX_ANISOTROPY = 4.0
# sform and qform must place the grid at the same spot: a thousandth of a mm for the origin ...
FORM_SHIFT_TOLERANCE_MM = 1e-3
# ... and each voxel axis within 0.3% (about 0.17 degrees). Not tighter: the qform keeps its
# rotation as a float32 quaternion, which near 180-degree turns is exact only to ~1.3e-3.
FORM_AXIS_TOLERANCE = 3e-3
# A paired T2w covering less than this share of the T1w's field of view is not the same head.
MIN_T2W_OVERLAP = 0.10
GZIP_MAGIC = b"\x1f\x8b"


def check_anatomical(path: Path | str) -> list[str]:
    """Raise :class:`BadDataError` with the reason if ``path`` is not a usable 3D anatomical image.

    Returns warnings (one line each, starting with the file name) about usable but odd images.
    Everything read from the header is checked before the data is read.
    """
    path = Path(path)
    img = _load(path)
    shape = _check_shape_and_size(img, path.name)
    _check_geometry(img, path.name)
    _check_forms_agree(img.header, path.name)
    _check_data(img, shape, path.name)
    return _anisotropy_warnings(img, path.name)


def check_t2w(t2w: Path | str, t1w: Path | str) -> list[str]:
    """Like :func:`check_anatomical`, and refuse a T2w that does not cover the T1w's head."""
    t2w, t1w = Path(t2w), Path(t1w)
    warnings = check_anatomical(t2w)
    share = fov_overlap(nb.load(str(t1w)), nb.load(str(t2w)))
    if share < MIN_T2W_OVERLAP:
        raise BadDataError(f"{t2w.name} covers {share:.1%} of the field of view of {t1w.name} "
                           f"(at least {MIN_T2W_OVERLAP:.0%} needed)")
    return warnings


def _load(path: Path) -> nb.Nifti1Image:
    if path.is_file() and path.stat().st_size == 0:
        raise BadDataError(f"{path.name} is an empty file (0 bytes)")
    try:
        return nb.load(str(path))
    except nb.filebasedimages.ImageFileError:
        reason = _not_nifti_reason(path)
        raise BadDataError(f"{path.name} cannot be read as a NIfTI image: {reason}")
    except OSError as err:  # e.g. permission denied
        raise BadDataError(f"{path.name} cannot be read ({err.strerror or 'input/output failure'})")


def _not_nifti_reason(path: Path) -> str:
    with open(path, "rb") as stream:
        start = stream.read(2)
    if path.name.endswith(".gz") and start != GZIP_MAGIC:
        return "it is named .gz but is not gzip-compressed"
    return "it has no valid NIfTI header"


def _check_shape_and_size(img, name: str) -> tuple[int, int, int]:
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise BadDataError(f"{name} is not a 3D image (shape {img.shape})")
    if min(shape) < 2:
        raise BadDataError(f"{name} has a degenerate shape {img.shape}")
    n_voxels = int(np.prod(shape, dtype=np.int64))
    if n_voxels > MAX_VOXELS:
        size = "x".join(map(str, shape))
        raise BadDataError(f"{name} is too large: {size} = {n_voxels:,} voxels, more than the "
                           f"{MAX_VOXELS:,} (512^3) dlf-bids can fuse; resample it")
    return shape


def _check_geometry(img, name: str) -> None:
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise BadDataError(f"{name} has invalid voxel sizes {tuple(zooms)}")
    # abs(): a negative determinant is a left-right flip (e.g. LAS), a valid orientation
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-6:
        raise BadDataError(f"{name} has an invalid (singular or non-finite) affine")


def _check_forms_agree(header, name: str) -> None:
    """Both forms set but different: tools disagree on which to use, so the grid is ambiguous."""
    sform, sform_code = header.get_sform(coded=True)
    qform, qform_code = header.get_qform(coded=True)
    if not (sform_code > 0 and qform_code > 0):
        return
    shift = float(np.linalg.norm(sform[:3, 3] - qform[:3, 3]))
    # how far each voxel axis points elsewhere, relative to its length (the sform is not
    # singular here: _check_geometry has refused that)
    lengths = np.linalg.norm(sform[:3, :3], axis=0)
    axes = np.linalg.norm(sform[:3, :3] - qform[:3, :3], axis=0) / lengths
    if shift > FORM_SHIFT_TOLERANCE_MM or axes.max() > FORM_AXIS_TOLERANCE:
        raise BadDataError(
            f"{name} has an sform and a qform that disagree (origins {shift:.3g} mm apart, voxel "
            f"axes differ by up to {axes.max():.2%}); tools differ in which one they use, so the "
            "labels would be on an ambiguous grid: make them agree (e.g. fslorient "
            "-copysform2qform) or set the wrong one's code to 0")


def _check_data(img, shape, name: str) -> None:
    try:
        data = np.asanyarray(img.dataobj)
    except (EOFError, OSError, ValueError, zlib.error):  # gzip, nibabel's reader, numpy reshape
        size = "x".join(map(str, shape))
        raise BadDataError(f"{name} is truncated or corrupt: its data cannot be read in full "
                           f"(the header announces {size} {img.get_data_dtype()} voxels)")
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise BadDataError(f"{name} contains NaN or infinite values")
    low, high = data.min(), data.max()
    if low == high:  # nothing to register or to tell tissues apart by
        raise BadDataError(f"{name} is constant (every voxel is {low:g})")


def _anisotropy_warnings(img, name: str) -> list[str]:
    sizes = nb.affines.voxel_sizes(img.affine)
    ratio = float(sizes.max() / sizes.min())
    if ratio <= MAX_ANISOTROPY:
        return []
    return [f"{name}: very anisotropic voxels ({'x'.join(f'{s:.3g}' for s in sizes)} mm, "
            f"ratio {ratio:.1f} > {MAX_ANISOTROPY:g}); the segmentation will be coarse along the "
            "thickest axis"]


def world_box(img) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest world (mm) corner of the box holding the whole voxel grid."""
    shape = img.shape[:3]
    # the outer faces of the edge voxels are half a voxel beyond their centres
    corners = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in shape], indexing="ij")).reshape(3, -1)
    world = nb.affines.apply_affine(img.affine, corners.T)
    return world.min(axis=0), world.max(axis=0)


def fov_overlap(reference, other) -> float:
    """Share of ``reference``'s world box that ``other``'s world box covers (0 to 1).

    Axis-aligned boxes: for oblique grids they overstate both, which errs on keeping the image.
    """
    ref_low, ref_high = world_box(reference)
    low, high = world_box(other)
    common = np.clip(np.minimum(ref_high, high) - np.maximum(ref_low, low), 0, None)
    return float(np.prod(common) / np.prod(ref_high - ref_low))


def voxel_volume_mm3(img: nb.spatialimages.SpatialImage) -> float:
    # rounded: the determinant of e.g. 1.2 mm voxels is 1.7280000000000002
    return round(float(abs(np.linalg.det(img.affine[:3, :3]))), 9)
