"""A small synthetic demo: BIDS dataset, atlas library and ground truth, made from real anatomy.

Every image derives from the MNI ICBM152 2009a template that nilearn ships (T1w, grey- and
white-matter probability maps; no download). Each subject and each atlas is the template seen
through its own random smooth deformation, with its own intensity changes and noise, so the atlas
library and the subjects differ the way real scans do and label fusion has something to do.

Layout written under ``out_dir``::

    bids/       raw BIDS dataset: sub-01/anat/sub-01_T1w.nii.gz [, _T2w.nii.gz], ...
    atlases/    atlas library (see :mod:`dlf_bids.utils.atlas_library`), atlases a01, a02, ...
    truth/      sub-01_dseg.nii.gz, ... : each subject's true labels on its T1w grid

Outputs are byte-identical for the same arguments: each generated image draws from its own child
generator of ``numpy.random.default_rng(seed)``'s seed sequence, keyed by (role, index, part), so
adding atlases or T2w images never changes the subjects.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np
from scipy import ndimage as ndi

from .atlas_library import write_atlas, write_library_description
from .files import write_text_atomic
from .labels import Label, LabelTable

# Label indices of the reference label map (hemisphere split at world x = 0; x < 0 is left).
LEFT_GM, RIGHT_GM, LEFT_WM, RIGHT_WM, LEFT_CSF, RIGHT_CSF = 1, 2, 3, 4, 5, 6

DEMO_LABELS = LabelTable((
    Label(LEFT_GM, "Left-Grey-Matter", "L-GM", "#cd3e4e"),
    Label(RIGHT_GM, "Right-Grey-Matter", "R-GM", "#dc7884"),
    Label(LEFT_WM, "Left-White-Matter", "L-WM", "#f5f5f5"),
    Label(RIGHT_WM, "Right-White-Matter", "R-WM", "#c8c8c8"),
    Label(LEFT_CSF, "Left-CSF", "L-CSF", "#3c99c8"),
    Label(RIGHT_CSF, "Right-CSF", "R-CSF", "#78b4dc"),
))

# Which subject is stored in another voxel order (same anatomy) to exercise native geometry.
REORIENTED_SUBJECT = 1
REORIENTED_AXCODES = ("L", "I", "A")

_SUBJECT, _ATLAS = 0, 1  # roles in the seed-sequence key
_WARP, _T1W, _T2W = 0, 1, 2  # parts of one image set, each with its own generator
_TEMPLATE_URL = "https://nist.mni.mcgill.ca/icbm-152-nonlinear-atlases-2009/"
_MARGIN_MM = 10.0  # space around the brain so that warped anatomy stays inside the field of view

_README = """\
dlf-bids demo dataset
=====================

Synthetic T1w (and some T2w) images made by dlf_bids.utils.demo_data.make_demo_data for
demonstrating and testing dlf-bids. They are NOT scans of people.

Every image is derived from the MNI ICBM152 nonlinear symmetric 2009a template (T1w, grey- and
white-matter maps) as shipped with nilearn: each subject is the template under a random smooth
deformation, with a random bias field, contrast change and Rician noise. T2w images are synthesized
from the deformed tissue maps.

Template: Fonov et al., NeuroImage 54(1):313-327, 2011; Fonov et al., NeuroImage 47:S102, 2009.
Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological
Institute, McGill University. Permission to use, copy, modify, and distribute the template is
granted provided that this copyright notice appears in all copies; it is provided "as is" without
express or implied warranty.
"""


def demo_label_table() -> LabelTable:
    """The six labels of the demo (left/right grey matter, white matter, CSF)."""
    return DEMO_LABELS


@dataclass(frozen=True)
class DemoData:
    bids_dir: Path
    atlas_dir: Path
    truth_dir: Path


@dataclass(frozen=True)
class _Template:
    """The 1 mm template maps that every image is sampled from."""

    t1w: np.ndarray  # float32, 0..1
    t2w: np.ndarray  # float32, synthesized from the tissue maps
    labels: np.ndarray  # int16 reference label map
    affine: np.ndarray
    centre: np.ndarray  # world coordinates of the brain's centre (mm)
    bounds: np.ndarray  # world coordinates of the brain's bounding box (2 x 3, mm)


@dataclass(frozen=True)
class _Grid:
    shape: tuple[int, int, int]
    affine: np.ndarray


def make_demo_data(out_dir, n_subjects=3, n_atlases=4, seed=0, voxel_size=2.0,
                   t2w_subjects=None) -> DemoData:
    """Write the demo BIDS dataset, atlas library and ground truth under ``out_dir``.

    ``t2w_subjects``: 0-based indices of the subjects that get a T2w; by default every other one
    (sub-01, sub-03, ...). Every atlas gets a T2w.
    """
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be at least 1, not {n_subjects}")
    if n_atlases < 2:
        raise ValueError(f"n_atlases must be at least 2 (for label fusion), not {n_atlases}")
    if not voxel_size > 0:
        raise ValueError(f"voxel_size must be positive, not {voxel_size}")
    if t2w_subjects is None:
        t2w_subjects = range(0, n_subjects, 2)
    t2w_subjects = {int(i) for i in t2w_subjects}
    if not t2w_subjects <= set(range(n_subjects)):
        raise ValueError(f"t2w_subjects {sorted(t2w_subjects)} must lie in 0..{n_subjects - 1}")

    out = Path(out_dir).absolute()
    data = DemoData(out / "bids", out / "atlases", out / "truth")
    template = _load_template()
    grid = _output_grid(template, float(voxel_size))

    _write_bids_root(data.bids_dir, n_subjects)
    data.truth_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n_subjects):
        images = _make_image_set(template, grid, _seeds(seed, _SUBJECT, i), i in t2w_subjects)
        if i == REORIENTED_SUBJECT:
            images = {key: _reorient(img, REORIENTED_AXCODES) for key, img in images.items()}
        _write_subject(data, f"{i + 1:02d}", images)

    write_library_description(data.atlas_dir, "dlf-bids demo atlas library", DEMO_LABELS,
                              source=_TEMPLATE_URL)
    for j in range(n_atlases):
        images = _make_image_set(template, grid, _seeds(seed, _ATLAS, j), with_t2w=True)
        write_atlas(data.atlas_dir, f"a{j + 1:02d}", images["T1w"], images["dseg"], images["T2w"])
    return data


# --- the template -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _load_template() -> _Template:
    """Load the 1 mm maps (nilearn's own files, no download) and build the reference labels."""
    from nilearn import datasets  # heavy import; only needed here

    t1w_img = datasets.load_mni152_template(resolution=1)
    mask_img = datasets.load_mni152_brain_mask(resolution=1)
    # Crop to the brain (plus 5 voxels) to halve the work; all that is cut off is zero.
    box = ndi.find_objects(np.asarray(mask_img.dataobj).astype(np.int8))[0]
    box = tuple(slice(max(s.start - 5, 0), s.stop + 5) for s in box)
    affine = t1w_img.affine @ nb.affines.from_matvec(np.eye(3), [s.start for s in box])

    def load(img):
        # C order: map_coordinates reads nibabel's Fortran-ordered arrays about 4 times slower.
        return np.ascontiguousarray(img.get_fdata(dtype=np.float32)[box])

    gm = load(datasets.load_mni152_gm_template(resolution=1))
    wm = load(datasets.load_mni152_wm_template(resolution=1))
    # nilearn's mask thresholds the skull-stripped T1w; fill holes so no dark spot is "outside".
    mask = ndi.binary_fill_holes(load(mask_img) > 0)
    inside = ndi.find_objects(mask.astype(np.int8))[0]
    corners = [[s.start for s in inside], [s.stop - 1 for s in inside]]
    return _Template(
        t1w=load(t1w_img),
        t2w=_t2w_from_tissues(gm, wm, mask),
        labels=_reference_labels(gm, wm, mask, affine),
        affine=affine,
        centre=nb.affines.apply_affine(affine, ndi.center_of_mass(mask)),
        bounds=nb.affines.apply_affine(affine, corners),
    )


def _reference_labels(gm, wm, mask, affine) -> np.ndarray:
    """Label each brain voxel by its dominant tissue (CSF: the rest) and its hemisphere."""
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    tissue = np.where((gm >= wm) & (gm >= csf), 0, np.where(wm >= csf, 1, 2))  # GM, WM, CSF
    x_world = affine[0, 0] * np.arange(mask.shape[0]) + affine[0, 3]  # template axes are RAS
    right = (x_world >= 0)[:, None, None]
    labels = (1 + 2 * tissue + right).astype(np.int16)  # 1/2 GM, 3/4 WM, 5/6 CSF
    labels[~mask] = 0
    return labels


def _t2w_from_tissues(gm, wm, mask) -> np.ndarray:
    """A T2w-like contrast: CSF bright, GM intermediate, WM dark, background 0, a little blurred.

    Made once at 1 mm: warping this mix with linear interpolation equals mixing the warped tissue
    maps, so each subject's T2w is still "synthesized from its deformed tissue maps".
    """
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    signal = 1.0 * csf + 0.55 * gm + 0.3 * wm
    return ndi.gaussian_filter(signal, 1.0)  # T2w scans tend to be a little blurrier than T1w


def _output_grid(template: _Template, voxel_size: float) -> _Grid:
    """An RAS grid at ``voxel_size`` mm over the brain's bounding box plus a margin."""
    lo, hi = template.bounds[0] - _MARGIN_MM, template.bounds[1] + _MARGIN_MM
    shape = tuple(int(n) for n in np.ceil((hi - lo) / voxel_size).astype(int) + 1)
    affine = np.diag([voxel_size, voxel_size, voxel_size, 1.0])
    affine[:3, 3] = lo
    return _Grid(shape, affine)


# --- random draws -------------------------------------------------------------------------------

def _seeds(seed: int, role: int, index: int) -> dict[int, np.random.Generator]:
    """One generator per part of an image set, keyed so that draws never depend on one another.

    These are children of ``default_rng(seed)``'s seed sequence (what ``Generator.spawn`` makes),
    addressed by key instead of by spawn order.
    """
    return {part: np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(role, index, part)))
            for part in (_WARP, _T1W, _T2W)}


def _smooth_noise(rng, shape, sigma_vox) -> np.ndarray:
    """White noise smoothed by a Gaussian (``sigma_vox``), scaled to unit standard deviation.

    The noise is drawn on a grid ~sigma/2 voxels apart and interpolated: the same kind of field
    as smoothing full-resolution noise, at a fraction of the cost.
    """
    step = max(1, int(sigma_vox // 2))
    coarse = rng.standard_normal(tuple(-(-n // step) + 1 for n in shape), dtype=np.float32)
    coarse = ndi.gaussian_filter(coarse, sigma_vox / step, mode="reflect")
    field = ndi.zoom(coarse, np.divide(shape, coarse.shape), order=1)
    return field / field.std()


def _random_affine(rng) -> np.ndarray:
    """Rotations up to 5 degrees, scaling within +-5 % and a shift of up to 3 mm."""
    ax, ay, az = np.deg2rad(rng.uniform(-5, 5, size=3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    matrix = np.eye(4)
    matrix[:3, :3] = rx @ ry @ rz @ np.diag(rng.uniform(0.95, 1.05, size=3))
    matrix[:3, 3] = rng.uniform(-3, 3, size=3)
    return matrix


def _template_coords(rng, template: _Template, grid: _Grid) -> np.ndarray:
    """For each output voxel, where to read the template (its voxel coordinates), i.e. the warp.

    A random affine about the brain's centre, plus a smooth displacement (SD 1.5 mm per axis,
    smoothed over ~10 mm, so a few mm at most and still one-to-one).
    """
    voxel_size = abs(grid.affine[0, 0])
    ijk = np.indices(grid.shape, dtype=np.float32).reshape(3, -1)
    world = grid.affine[:3, :3] @ ijk + grid.affine[:3, 3:]
    centre = template.centre[:, None]
    affine = _random_affine(rng)
    world = affine[:3, :3] @ (world - centre) + centre + affine[:3, 3:]
    for axis in range(3):
        world[axis] += 1.5 * _smooth_noise(rng, grid.shape, 10.0 / voxel_size).ravel()
    to_vox = np.linalg.inv(template.affine)
    return (to_vox[:3, :3] @ world + to_vox[:3, 3:]).reshape(3, *grid.shape)


def _bias_field(rng, shape, voxel_size) -> np.ndarray:
    """A smooth multiplicative field, about +-10 % over the head."""
    return np.exp(0.05 * _smooth_noise(rng, shape, 30.0 / voxel_size))


def _rician(rng, signal, sigma) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise (as in magnitude MR images)."""
    real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.hypot(real, imag)


# --- one subject or atlas -----------------------------------------------------------------------

def _make_image_set(template: _Template, grid: _Grid, rngs, with_t2w: bool) -> dict:
    """T1w, true labels and (optionally) T2w of one warped copy of the template, as NIfTI images."""
    coords = _template_coords(rngs[_WARP], template, grid)

    def warp(volume, order):
        return ndi.map_coordinates(volume, coords, order=order, mode="constant", cval=0.0)

    t1w = _change_contrast(rngs[_T1W], warp(template.t1w, 1), grid)
    images = {
        "T1w": _to_nifti(t1w, grid.affine, np.int16),
        "dseg": _to_nifti(warp(template.labels, 0), grid.affine, np.int16),
    }
    if with_t2w:
        t2w = _change_contrast(rngs[_T2W], warp(template.t2w, 1), grid)
        images["T2w"] = _to_nifti(t2w, grid.affine, np.int16)
    return images


def _change_contrast(rng, image, grid: _Grid) -> np.ndarray:
    """Make a warped 0..1 template look like another scan: a mild gamma, a bias field, a global
    scale and Rician noise (2-4 % of the brightest tissue)."""
    scale = rng.uniform(700, 1300)
    signal = np.clip(image, 0, None) ** rng.uniform(0.8, 1.25)
    signal *= scale * _bias_field(rng, grid.shape, abs(grid.affine[0, 0]))
    return _rician(rng, signal, rng.uniform(0.02, 0.04) * scale)


# --- NIfTI and BIDS -----------------------------------------------------------------------------

def _to_nifti(data, affine, dtype) -> nb.Nifti1Image:
    """A NIfTI image with both qform and sform set (code 1, scanner) and units mm."""
    img = nb.Nifti1Image(np.rint(data).astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return img


def _reorient(img: nb.Nifti1Image, axcodes) -> nb.Nifti1Image:
    """The same image with its voxels stored in another order (``axcodes``, e.g. LIA)."""
    ornt = nb.orientations.ornt_transform(nb.io_orientation(img.affine),
                                          nb.orientations.axcodes2ornt(axcodes))
    data = nb.orientations.apply_orientation(np.asanyarray(img.dataobj), ornt)
    affine = img.affine @ nb.orientations.inv_ornt_aff(ornt, img.shape)
    return _to_nifti(data, affine, img.get_data_dtype())


def _write_json(path: Path, content) -> None:
    write_text_atomic(path, json.dumps(content, indent=2) + "\n")


def _write_bids_root(bids_dir: Path, n_subjects: int) -> None:
    """The dataset-level files of the raw BIDS dataset."""
    from .. import __version__

    bids_dir.mkdir(parents=True, exist_ok=True)
    _write_json(bids_dir / "dataset_description.json", {
        "Name": "dlf-bids demo: synthetic brains from the MNI ICBM152 2009a template",
        "BIDSVersion": "1.10.0",
        "DatasetType": "raw",
        "License": "ICBM 2009a template license (see README)",
        "Authors": ["dlf-bids developers"],
        "GeneratedBy": [{"Name": "dlf-bids", "Version": __version__,
                         "Description": "dlf_bids.utils.demo_data.make_demo_data"}],
        "ReferencesAndLinks": ["Fonov et al., NeuroImage 54(1):313-327, 2011"],
    })
    write_text_atomic(bids_dir / "README", _README)
    rows = ["participant_id"] + [f"sub-{i + 1:02d}" for i in range(n_subjects)]
    write_text_atomic(bids_dir / "participants.tsv", "\n".join(rows) + "\n")
    _write_json(bids_dir / "participants.json", {
        "participant_id": {"Description": "Synthetic subject: a random warp of the MNI template"},
    })


def _write_subject(data: DemoData, label: str, images: dict) -> None:
    """The subject's T1w (and T2w) in the BIDS dataset, its true labels in ``truth``."""
    anat = data.bids_dir / f"sub-{label}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    for suffix in ("T1w", "T2w"):
        if suffix in images:
            nb.save(images[suffix], anat / f"sub-{label}_{suffix}.nii.gz")
            _write_json(anat / f"sub-{label}_{suffix}.json", {})
    nb.save(images["dseg"], data.truth_dir / f"sub-{label}_dseg.nii.gz")
