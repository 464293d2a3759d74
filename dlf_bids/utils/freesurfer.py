"""Turn FreeSurfer subjects (``T1.mgz`` + ``aseg.mgz``) into atlases of the atlas library.

FreeSurfer stores volumes as MGH/MGZ; nibabel exposes their voxel-to-scanner-RAS matrix as
``img.affine``, so copying the voxels together with that affine into NIfTI keeps every voxel at
the same world position. Optional steps make smaller atlases: cropping to the labelled brain
(``brain_only``) and resampling to a coarser isotropic grid (``voxel_size``), the latter mainly
to build fast 3 mm test libraries from 1 mm subjects.
"""

from __future__ import annotations

import importlib.resources
import math
import os
import re
import shutil
from pathlib import Path

import nibabel as nb
import numpy as np
from nibabel.processing import resample_from_to
from scipy import ndimage

from ..errors import BadDataError, MissingInputError, UsageError
from .atlas_library import Atlas, write_atlas, write_library_description
from .labels import LabelTable, read_label_table

ASEG_TABLE = "freesurfer_aseg.tsv"
T1_NAME = "T1.mgz"
ASEG_NAME = "aseg.mgz"
LIBRARY_NAME = "FreeSurfer aseg atlases"
BRAIN_MARGIN_MM = 10.0
# NIfTI xform code "scanner anatomical": MGH affines are scanner RAS, not a template space.
SCANNER_XFORM = 1
# FWHM = 2 sqrt(2 ln 2) sigma, used to size the anti-aliasing blur before downsampling.
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


# --- look-up table ------------------------------------------------------------------------------

def freesurfer_label_table(indices=None) -> LabelTable:
    """The FreeSurfer aseg look-up table shipped with dlf-bids, optionally restricted to ``indices``.

    Index 0 (background) in ``indices`` is ignored; any other index the table lacks raises
    :class:`BadDataError`.
    """
    resource = importlib.resources.files("dlf_bids.data").joinpath(ASEG_TABLE)
    with importlib.resources.as_file(resource) as path:
        table = read_label_table(path)
    if indices is None:
        return table
    wanted = {int(i) for i in indices} - {0}
    unknown = _unknown_labels(wanted, table)
    if unknown:
        raise BadDataError(f"labels {_short_list(unknown)} are not in the FreeSurfer aseg table")
    return table.subset(wanted)


def _unknown_labels(indices, table: LabelTable) -> list[int]:
    return sorted(set(indices) - {0} - set(table.indices))


def _short_list(values: list[int], limit: int = 10) -> str:
    """``[1, 2, ...]`` with at most ``limit`` items, so error messages stay on one line."""
    shown = ", ".join(str(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


# --- finding inputs and naming atlases --------------------------------------------------------

def find_freesurfer_files(subject_dir: Path | str) -> tuple[Path, Path]:
    """``(T1.mgz, aseg.mgz)`` of a FreeSurfer subject: in ``<dir>/mri/`` (recon-all) or ``<dir>/``."""
    subject_dir = Path(subject_dir)
    if not subject_dir.is_dir():
        raise MissingInputError(f"FreeSurfer subject folder {subject_dir} does not exist")
    for folder in (subject_dir / "mri", subject_dir):
        t1 = folder / T1_NAME
        if t1.is_file():
            aseg = folder / ASEG_NAME
            if not aseg.is_file():
                raise MissingInputError(f"{folder} has {T1_NAME} but no {ASEG_NAME}")
            return t1, aseg
    raise MissingInputError(
        f"found no {T1_NAME} in {subject_dir / 'mri'} or {subject_dir}; name the files explicitly"
    )


def atlas_id_from_folder(folder: Path | str) -> str:
    """Atlas id from a subject folder's name: ``sub-`` stripped, only letters and digits kept.

    A recon-all ``mri`` folder stands for its parent, the subject.
    """
    # abspath, not resolve: a symlinked subject folder keeps the name the user gave it.
    path = Path(os.path.abspath(folder))
    if path.name == "mri":
        path = path.parent
    name = path.name[4:] if path.name.startswith("sub-") else path.name
    atlas_id = re.sub(r"[^A-Za-z0-9]", "", name)
    if not atlas_id:
        raise UsageError(f"cannot make an atlas id from the folder name {path.name!r}; give one")
    return atlas_id


def check_atlas_id(atlas_id: str) -> str:
    """Return ``atlas_id`` without a leading ``sub-``; BIDS labels must be alphanumeric."""
    atlas_id = atlas_id[4:] if atlas_id.startswith("sub-") else atlas_id
    if not re.fullmatch(r"[A-Za-z0-9]+", atlas_id):
        raise UsageError(f"atlas id {atlas_id!r} must be letters and digits only (a BIDS label)")
    return atlas_id


# --- images -------------------------------------------------------------------------------------

def _nifti(data: np.ndarray, affine: np.ndarray) -> nb.Nifti1Image:
    """A NIfTI image whose qform and sform both say scanner space, in mm."""
    img = nb.Nifti1Image(data, affine)
    img.set_qform(affine, code=SCANNER_XFORM)
    img.set_sform(affine, code=SCANNER_XFORM)
    img.header.set_xyzt_units("mm")
    return img


def load_mgz_as_nifti(path: Path | str) -> nb.Nifti1Image:
    """Read a 3D FreeSurfer volume (MGZ, or anything nibabel reads) as NIfTI with the same affine."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path} does not exist")
    try:
        img = nb.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises several types for broken or foreign files
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise BadDataError(f"cannot read {path} as an image ({reason})")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise BadDataError(f"{path} is not a 3D volume (shape {data.shape})")
    # MGH stores big-endian; native byte order avoids surprises in scipy and in NIfTI writers.
    return _nifti(data.astype(data.dtype.newbyteorder("="), copy=False), img.affine)


def present_labels(data: np.ndarray) -> list[int]:
    """Sorted distinct values of an integer label array, background (0) included if present."""
    low, high = int(data.min()), int(data.max())
    if high - low > 2**20:
        return np.unique(data).astype(np.int64).tolist()
    # A histogram is several times faster than np.unique's sort of a 256^3 volume; order="K"
    # avoids copying the Fortran-ordered arrays nibabel reads from MGH files.
    flat = data.ravel(order="K")
    if low:
        flat = flat.astype(np.int64) - low  # widened first: small dtypes would overflow
    counts = np.bincount(flat, minlength=1)
    return (np.flatnonzero(counts) + low).tolist()


def _label_array(aseg: nb.Nifti1Image, source: Path,
                 table: LabelTable) -> tuple[np.ndarray, set[int]]:
    """The aseg as int16 and its non-zero labels, after checking they are all in ``table``."""
    data = np.asanyarray(aseg.dataobj)
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.mod(data, 1) == 0):
            raise BadDataError(f"{source} holds non-integer values; is it really a label map?")
        data = data.astype(np.int64)
    present = set(present_labels(data)) - {0}
    if not present:
        raise BadDataError(f"{source} holds no labels (only background)")
    unknown = _unknown_labels(present, table)
    if unknown:
        raise BadDataError(
            f"{source} holds labels {_short_list(unknown)} that are not in the FreeSurfer aseg "
            f"table (dlf_bids/data/{ASEG_TABLE})"
        )
    # Safe: every label is now one of the table's indices, all far below the int16 limit.
    return data.astype(np.int16), present


def crop_to_labels(t1: nb.Nifti1Image, dseg: nb.Nifti1Image,
                   margin_mm: float = BRAIN_MARGIN_MM) -> tuple[nb.Nifti1Image, nb.Nifti1Image]:
    """Crop both images to the bounding box of non-zero labels plus ``margin_mm`` on each side.

    ``img.slicer`` moves the affine's origin with the crop, so world positions stay the same.
    """
    labels = np.asanyarray(dseg.dataobj) != 0
    if not labels.any():
        raise BadDataError("the label map is empty; nothing to crop to")
    zooms = np.asarray(dseg.header.get_zooms()[:3], dtype=float)
    margin = np.ceil(margin_mm / zooms).astype(int)
    box = []
    for axis in range(3):
        # Projecting onto one axis at a time is much cheaper than np.nonzero on the whole volume.
        others = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(labels.any(axis=others))
        start = max(int(hits[0]) - margin[axis], 0)
        stop = min(int(hits[-1]) + 1 + margin[axis], labels.shape[axis])
        box.append(slice(start, stop))
    box = tuple(box)
    return _rewrap(t1.slicer[box]), _rewrap(dseg.slicer[box])


def _rewrap(img: nb.spatialimages.SpatialImage) -> nb.Nifti1Image:
    """A fresh NIfTI (scanner xforms) of ``img``, dropping header fields the slicer carried over."""
    return _nifti(np.asanyarray(img.dataobj), img.affine)


def isotropic_grid(shape, affine: np.ndarray,
                   voxel_size: float) -> tuple[tuple[int, ...], np.ndarray]:
    """``(shape, affine)`` of a grid with ``voxel_size`` mm voxels covering the same field of view.

    The orientation is kept and the new grid is centred on the old one, so the field of view
    grows by less than one new voxel (256 x 1 mm becomes 86 x 3 mm).
    """
    old_shape = np.asarray(shape[:3], dtype=float)
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    extent = old_shape * zooms
    # The small tolerance keeps exact multiples (258 mm / 3 mm) from gaining a voxel by rounding.
    new_shape = np.maximum(np.ceil(extent / voxel_size - 1e-6), 1)
    step = voxel_size / zooms  # old voxels per new voxel, along each axis
    offset = (old_shape - 1) / 2 - (new_shape - 1) / 2 * step
    new_to_old = np.eye(4)
    new_to_old[:3, :3] = np.diag(step)
    new_to_old[:3, 3] = offset
    return tuple(int(n) for n in new_shape), np.asarray(affine) @ new_to_old


def resample_isotropic(t1: nb.Nifti1Image, dseg: nb.Nifti1Image,
                       voxel_size: float) -> tuple[nb.Nifti1Image, nb.Nifti1Image]:
    """Resample the T1 (linear or cubic spline) and labels (nearest) to ``voxel_size`` mm voxels.

    When downsampling, the T1 is first blurred (Gaussian, FWHM sqrt(new^2 - old^2) per axis)
    against aliasing, then interpolated linearly; when upsampling, a cubic spline is used.
    """
    grid = isotropic_grid(dseg.shape, dseg.affine, voxel_size)
    intensities = np.asarray(t1.dataobj, dtype=np.float32)
    zooms = np.asarray(t1.header.get_zooms()[:3], dtype=float)
    # Blur before downsampling so the coarse T1 looks like a coarse acquisition, not aliased.
    fwhm = np.sqrt(np.clip((voxel_size / zooms) ** 2 - 1, 0, None))
    blurred = bool(np.any(fwhm > 0))
    if blurred:
        intensities = ndimage.gaussian_filter(intensities, fwhm / FWHM_PER_SIGMA)
    # Cubic splines keep detail when upsampling; after the blur there is no detail left for
    # them to keep, and linear interpolation skips their costly prefilter of the whole volume.
    order = 1 if blurred else 3
    smooth = _nifti(intensities, t1.affine)
    t1_out = np.asarray(resample_from_to(smooth, grid, order=order).dataobj, dtype=np.float32)
    # Splines overshoot at edges; keep intensities within the input range (no negative T1).
    t1_out = np.clip(t1_out, intensities.min(), intensities.max())
    labels = resample_from_to(dseg, grid, order=0)
    return _nifti(t1_out, grid[1]), _nifti(np.asarray(labels.dataobj).astype(np.int16), grid[1])


# --- library ------------------------------------------------------------------------------------

def _prepare_library(library_dir: Path, table: LabelTable, present: set[int]) -> None:
    """Create the library's root files, or check an existing library names these labels alike."""
    if not (library_dir / "dataset_description.json").is_file():
        write_library_description(library_dir, LIBRARY_NAME, table)
        return
    existing = read_label_table(library_dir / "dseg.tsv")
    names = {lab.index: lab.name for lab in existing.labels}
    missing = sorted(present - set(names))
    if missing:
        raise BadDataError(
            f"atlas library {library_dir} does not use the FreeSurfer aseg labels "
            f"(its dseg.tsv lacks {_short_list(missing)})"
        )
    renamed = [i for i in sorted(present) if names[i] != table.name_of(i)]
    if renamed:
        i = renamed[0]
        raise BadDataError(
            f"atlas library {library_dir} calls label {i} {names[i]!r}, not {table.name_of(i)!r}; "
            "it does not use the FreeSurfer aseg labels"
        )


def convert_freesurfer_subject(t1_path: Path | str, aseg_path: Path | str, library_dir: Path | str,
                               atlas_id: str, voxel_size: float | None = None,
                               brain_only: bool = False, overwrite: bool = False) -> Atlas:
    """Write ``T1.mgz`` + ``aseg.mgz`` as atlas ``sub-<atlas_id>`` of the library at ``library_dir``.

    The label map is int16 on the T1 grid. ``brain_only`` crops both images to the labels plus
    10 mm; ``voxel_size`` (mm) then resamples them to an isotropic grid over the same field of
    view. The library's root files are created (with the full aseg table) if missing.
    Inputs are read and checked before anything is written, so a bad subject leaves the library
    untouched; an existing atlas is replaced only with ``overwrite``.
    """
    atlas_id = check_atlas_id(atlas_id)
    if voxel_size is not None and not voxel_size > 0:
        raise UsageError(f"voxel size must be positive, not {voxel_size}")
    library_dir = Path(library_dir)
    target = library_dir / f"sub-{atlas_id}"
    if target.exists() and not overwrite:
        raise UsageError(
            f"atlas sub-{atlas_id} already exists in {library_dir} (--overwrite replaces it)"
        )

    table = freesurfer_label_table()
    t1 = load_mgz_as_nifti(t1_path)
    aseg = load_mgz_as_nifti(aseg_path)
    if t1.shape != aseg.shape or not np.allclose(t1.affine, aseg.affine, atol=1e-4):
        raise BadDataError(
            f"{aseg_path} is not on the grid of {t1_path}; are they the same subject?"
        )
    labels, present = _label_array(aseg, Path(aseg_path), table)
    dseg = _nifti(labels, t1.affine)
    if brain_only:
        t1, dseg = crop_to_labels(t1, dseg, BRAIN_MARGIN_MM)
    if voxel_size is not None:
        t1, dseg = resample_isotropic(t1, dseg, float(voxel_size))

    _prepare_library(library_dir, table, present)
    if target.exists():
        # Remove the whole old atlas: a stale T2w would otherwise stay next to the new T1w.
        shutil.rmtree(target)
    return write_atlas(library_dir, atlas_id, t1, dseg)
