"""DeepAtlas as a registration engine: antspyx affine pre-alignment + one network pass per pair,
refined by a few steps of instance optimisation (:data:`REFINE_STEPS`).

Every image is first aligned affinely (antspyx ``Affine``) to the model's *reference grid*, a T1w
chosen at training time and stored in the model file (at the model's voxel size, cropped to the
head). The networks only ever see images on that grid, in that orientation, so they learn the
deformable part alone. For an atlas ``a`` and a subject ``t`` (ANTs point mappings, fixed → moving):

* ``T_t``: reference → subject and ``T_a``: reference → atlas (the two affines);
* ``u``: the network's (refined) displacement on the reference grid (reference point ``y``
  samples the affinely aligned atlas at ``y + u(y)``);

so a subject point ``x`` reads the atlas at ``T_a(T_t⁻¹(x) + u(T_t⁻¹(x)))``: the ANTs transform
list ``[T_t (inverted), u, T_a]``. Atlas images and labels are interpolated once, on the subject's
own grid (labels with ``genericLabel``, as the ANTs engine does, so both engines differ only in
the registration). The three parts are also written as one ANTs composite transform (``.h5``),
the form of a BIDS ``_xfm.h5`` that ``antsApplyTransforms`` reads directly.

A T1w + T2w model sees each image as two channels on the reference grid: the T1w, and the T2w
brought there through the T1w's affine (after a rigid T2w → T1w registration, unless the T2w is
already on the T1w's grid, as the participant level's coregistered T2w is). An image without a
T2w gets unit white noise in that channel (:func:`network_input`), which is what ModAug trained
the networks to expect of a missing modality.

This module holds pure functions (antspyx, torch, nibabel); the Nipype interfaces wrap them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadDataError
from .registration import WarpedAtlas, _ants_seed, rigid_t2w_to_t1w, set_itk_threads

#: antspyx transform of the pre-alignment, recorded in each model (the networks learned on images
#: aligned that way). TRSAA (translation, rigid, similarity, then two affine stages) is the
#: default: a plain ``Affine`` left a whole-head 3 mm subject on a brain-only reference in a wrong
#: optimum when run single-threaded (mean Dice 0.18 vs 0.61, three atlases).
ALIGNMENT = "TRSAA"
#: what models written before the choice was recorded used
LEGACY_ALIGNMENT = "Affine"
#: steps of instance optimisation after the network's pass, per atlas pair
#: (:mod:`dlf_bids.models.deepatlas_refine`; 0: the network's warp alone). On fold 02 of the
#: leave-one-out benchmark 5 steps took the warped-label Dice from 0.644 to 0.700 for ~0.9 s
REFINE_STEPS = 5


@dataclass(frozen=True)
class AlignedImage:
    transform: Path  # reference -> image (ANTs point mapping; .mat)
    on_reference: Path  # the image resampled onto the reference grid (linear)
    labels_on_reference: Path | None = None  # its label map there (genericLabel), when given
    t2w_on_reference: Path | None = None  # its T2w there (linear), when given
    # T2w -> T1w rigid (ANTs .mat) when it was registered here: an atlas's is reused to warp its
    # T2w for DLF, so it is registered once per run, not once per subject
    t2w_to_t1w: Path | None = None


def make_reference_grid(image_file: Path | str, voxel_size: float, out_file: Path | str,
                        margin_voxels: int = 3) -> Path:
    """The model's reference grid: ``image_file`` resampled to ``voxel_size`` mm (linear) and
    cropped to its head (voxels above 5 % of the 99th intensity percentile) plus a margin, which
    keeps the networks' grid as small as the anatomy allows."""
    import ants

    img = ants.image_read(str(image_file))
    if img.dimension != 3:
        raise BadDataError(f"{image_file}: the reference must be a 3D image")
    small = ants.resample_image(img, (float(voxel_size),) * 3, use_voxels=False, interp_type=0)
    data = small.numpy()
    inside = np.argwhere(data > 0.05 * np.percentile(data, 99))
    if inside.size == 0:
        raise BadDataError(f"{image_file}: the reference image is empty")
    lower = np.maximum(inside.min(0) - margin_voxels, 0)
    upper = np.minimum(inside.max(0) + margin_voxels, np.array(data.shape) - 1)
    ref = ants.crop_indices(small, lower.tolist(), (upper + 1).tolist())
    ants.image_write(ref, str(out_file))
    return Path(out_file)


def align_to_reference(image_file: Path | str, reference_file: Path | str, out_dir: Path | str,
                       seed: int | None = 0, n_threads: int | None = None,
                       labels_file: Path | str | None = None,
                       transform_type: str = ALIGNMENT, t2w_file: Path | str | None = None,
                       t2w_on_image_grid: bool = False) -> AlignedImage:
    """Affine registration of an image (a T1w) to the reference grid, and the image (and its
    label map, for training; its T2w, for a T1w + T2w model) resampled there. The T2w is first
    registered rigidly to the T1w unless ``t2w_on_image_grid`` (it is already in the T1w's space).

    The moving image is first brought to the reference's voxel size (the metric is computed at
    that resolution anyway): a 1 mm whole head aligns in ~2 s instead of ~9 s."""
    import ants

    set_itk_threads(n_threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ref = ants.image_read(str(reference_file))
    img = ants.image_read(str(image_file))
    small = ants.resample_image(img, tuple(ref.spacing), use_voxels=False, interp_type=0)
    with _ants_seed(seed):
        reg = ants.registration(ref, small, type_of_transform=transform_type,
                                outprefix=str(out_dir / "to_reference_"))
    transform = Path(reg["fwdtransforms"][0])
    on_ref = ants.apply_transforms(ref, img, [str(transform)], interpolator="linear")
    out = out_dir / "on_reference.nii.gz"
    ants.image_write(on_ref, str(out))
    labels_out = None
    if labels_file is not None:
        labels = ants.apply_transforms(ref, ants.image_read(str(labels_file)), [str(transform)],
                                       interpolator="genericLabel")
        labels_out = out_dir / "labels_on_reference.nii.gz"
        ants.image_write(labels.astype("uint32"), str(labels_out))
    t2w_out = rigid = None
    if t2w_file is not None:
        t2w = ants.image_read(str(t2w_file))
        # reference point -> T1w point (the affine) -> T2w point (the rigid, when needed)
        to_t2w = [str(transform)]
        if not t2w_on_image_grid:
            (rigid,) = rigid_t2w_to_t1w(img, t2w, seed, outprefix=str(out_dir / "t2w_to_t1w_"))["fwdtransforms"]
            rigid = Path(rigid)
            to_t2w.append(str(rigid))
        t2w_out = out_dir / "t2w_on_reference.nii.gz"
        ants.image_write(ants.apply_transforms(ref, t2w, to_t2w, interpolator="linear"), str(t2w_out))
    return AlignedImage(transform, out, labels_out, t2w_out, rigid)


def network_input(aligned: AlignedImage, modalities, seed: int = 0) -> np.ndarray:
    """The networks' input ``(C, X, Y, Z)`` for one aligned image: its T1w on the reference grid,
    and for a T1w + T2w model its T2w there, or unit white noise (seeded) when it has none."""
    import nibabel as nb

    t1w = np.asanyarray(nb.load(str(aligned.on_reference)).dataobj, dtype=np.float32)
    channels = [t1w]
    for modality in list(modalities)[1:]:
        if modality != "T2w":
            raise BadDataError(f"DeepAtlas models take T1w and T2w, not {modality}")
        if aligned.t2w_on_reference is not None:
            channels.append(np.asanyarray(nb.load(str(aligned.t2w_on_reference)).dataobj,
                                          dtype=np.float32))
        else:
            channels.append(np.random.default_rng(seed).standard_normal(t1w.shape, dtype=np.float32))
    return np.stack(channels)


def displacement_field(ddf: np.ndarray, reference):
    """The network's DDF ``(3, X, Y, Z)`` in reference voxels as an ANTs displacement field
    (physical LPS millimetres per voxel, ``(X, Y, Z, 3)`` components) on the reference grid."""
    import ants

    to_mm = np.asarray(reference.direction) @ np.diag(reference.spacing)
    disp = np.einsum("ij,j...->...i", to_mm, ddf).astype(np.float32)
    return ants.from_numpy(disp, origin=reference.origin, spacing=reference.spacing,
                           direction=reference.direction, has_components=True)


@functools.lru_cache(maxsize=2)
def _load_model(model_file: str, mtime: float, device: str):
    from .models.deepatlas_file import load_deepatlas

    return load_deepatlas(model_file, device=device)


def load_model(model_file: Path | str, device: str = "cpu"):
    """``(model, info)``, cached per process (a MapNode runs several atlases in one process)."""
    from .models.inference import resolve_device

    path = Path(model_file)
    return _load_model(str(path), path.stat().st_mtime, str(resolve_device(device)))


@functools.lru_cache(maxsize=2)
def _model_info(model_file: str, mtime: float):
    from .models.deepatlas_file import read_deepatlas_info

    return read_deepatlas_info(model_file)


def model_info(model_file: Path | str):
    """The model's checked metadata (no network built), read once per process: the start-up
    check and every subject's graph ask for it."""
    path = Path(model_file)
    # a missing file: the reader's own one-line refusal (exceptions are not cached)
    return _model_info(str(path), path.stat().st_mtime if path.is_file() else 0.0)


def model_reference(model_file: Path | str, out_file: Path | str) -> tuple[Path, str]:
    """The model's reference grid as a NIfTI file, and the transform type its images are
    aligned with: what :func:`align_to_reference` needs to prepare an image for this model."""
    from .models.deepatlas_file import read_deepatlas_info

    info = read_deepatlas_info(model_file)
    return info.write_reference(out_file), info.alignment


@dataclass(frozen=True)
class DeepAtlasWarp(WarpedAtlas):
    composite: Path | None = None  # subject <- atlas, one ANTs composite transform (.h5)
    min_jacobian: float = float("nan")  # of the network's warp: <= 0 means folding
    folded_fraction: float = float("nan")  # of the reference grid's voxels, where it is <= 0


def register_atlas_deepatlas(target_t1w: Path | str, target: AlignedImage, atlas_t1w: Path | str,
                             atlas_dseg: Path | str, atlas: AlignedImage, model_file: Path | str,
                             reference_file: Path | str, out_dir: Path | str, seed: int | None = 0,
                             n_threads: int | None = None, atlas_t2w: Path | str | None = None,
                             device: str = "cpu", write_composite: bool = True,
                             refine_steps: int = REFINE_STEPS) -> DeepAtlasWarp:
    """Warp one atlas onto the subject with the DeepAtlas registration network (see the module
    docstring), its warp refined by ``refine_steps`` steps of instance optimisation. ``target``
    and ``atlas`` are :func:`align_to_reference` of the subject's and the
    atlas's T1w: once per subject and once per atlas, not per pair. ``atlas_t2w`` is warped too
    (for DLF), through ``atlas.t2w_to_t1w`` when the alignment registered it, else through a
    rigid registration to the atlas T1w made here."""
    import ants

    from .models.deepatlas_inference import register

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    set_itk_threads(n_threads)
    model, info = load_model(model_file, device)
    # one noise image per side (different seeds): two identical noise channels would be a
    # perfect, meaningless match for the network
    moving = network_input(atlas, info.modalities, seed=(seed or 0) + 1)
    fixed = network_input(target, info.modalities, seed=seed or 0)
    result = register(model, moving, fixed, device=device, refine_steps=refine_steps)

    reference = ants.image_read(str(reference_file))
    field_file = out_dir / "deepatlas_field.nii.gz"
    ants.image_write(displacement_field(result.ddf, reference), str(field_file))
    transforms = [str(target.transform), str(field_file), str(atlas.transform)]
    invert = [True, False, False]

    subject = ants.image_read(str(target_t1w))
    warped_t1w = ants.apply_transforms(subject, ants.image_read(str(atlas_t1w)), transforms,
                                       whichtoinvert=invert, interpolator="linear")
    warped_dseg = ants.apply_transforms(subject, ants.image_read(str(atlas_dseg)), transforms,
                                        whichtoinvert=invert, interpolator="genericLabel")
    t1w_out, dseg_out = out_dir / "atlas_T1w_warped.nii.gz", out_dir / "atlas_dseg_warped.nii.gz"
    ants.image_write(warped_t1w, str(t1w_out))
    ants.image_write(warped_dseg.astype("uint32"), str(dseg_out))
    t2w_out = None
    if atlas_t2w is not None:
        # the atlas T2w -> atlas T1w rigid transform goes last (applied first to the T2w)
        t2w = ants.image_read(str(atlas_t2w))
        t2_to_t1 = ([str(atlas.t2w_to_t1w)] if atlas.t2w_to_t1w is not None else
                    rigid_t2w_to_t1w(ants.image_read(str(atlas_t1w)), t2w, seed)["fwdtransforms"])
        warped_t2w = ants.apply_transforms(subject, t2w, transforms + list(t2_to_t1),
                                           whichtoinvert=invert + [False] * len(t2_to_t1),
                                           interpolator="linear")
        t2w_out = out_dir / "atlas_T2w_warped.nii.gz"
        ants.image_write(warped_t2w, str(t2w_out))
    composite = None
    if write_composite:
        composite = out_dir / "atlas_to_subject_xfm.h5"
        parts = [ants.read_transform(str(target.transform)).invert(),
                 ants.transform_from_displacement_field(ants.image_read(str(field_file))),
                 ants.read_transform(str(atlas.transform))]
        ants.write_transform(ants.compose_ants_transforms(parts), str(composite))
    return DeepAtlasWarp(t1w_out, dseg_out, tuple(Path(t) for t in transforms), t2w_out,
                         composite=composite, min_jacobian=result.min_jacobian,
                         folded_fraction=result.folded_fraction)


def segment_deepatlas(target_t1w: Path | str, target: AlignedImage, model_file: Path | str,
                      out_file: Path | str, device: str = "cpu", seed: int | None = 0) -> Path:
    """The segmentation network's label map of the subject, on the subject's own grid: predicted
    on the reference grid, brought back through the inverse affine with ``genericLabel``."""
    import ants

    from .models.deepatlas_inference import segment

    model, info = load_model(model_file, device)
    on_ref = ants.image_read(str(target.on_reference))
    image = network_input(target, info.modalities, seed=seed or 0)
    labels = segment(model, image, device=device).astype(np.float32)
    labels_img = ants.from_numpy(labels, origin=on_ref.origin, spacing=on_ref.spacing,
                                 direction=on_ref.direction)
    native = ants.apply_transforms(ants.image_read(str(target_t1w)), labels_img, [str(target.transform)],
                                   whichtoinvert=[True],
                                   interpolator="genericLabel")
    ants.image_write(native.astype("uint32"), str(out_file))
    return Path(out_file)
