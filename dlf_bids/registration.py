"""Atlas-to-subject registration with antspyx (pure functions; the Nipype interfaces wrap these).

The antspyx wheel ships no ANTs command-line programs, so nipype's ANTs interfaces cannot run here;
we call the library directly.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Named presets -> antspyx transform types. "fast" is antspyx's "SyN" (affine + deformable SyN at
# the two coarse levels only: seconds per pair, for demos and tests). The "Repro" variants avoid
# random metric sampling. All take ``--random-seed``, so a seeded run repeats (see tests).
REGISTRATION_PRESETS = {
    "fast": "SyN",
    "quick": "antsRegistrationSyNQuickRepro[s]",
    "accurate": "antsRegistrationSyNRepro[s]",
}

#: --registration: ANTs (antspyx, the presets above) or the DeepAtlas network
#: (:mod:`dlf_bids.deepatlas_registration`)
REGISTRATION_ENGINES = ("ants", "deepatlas")


@dataclass(frozen=True)
class WarpedAtlas:
    t1w: Path
    dseg: Path
    transforms: tuple[Path, ...]  # forward transforms (atlas -> subject), in ANTs apply order
    t2w: Path | None = None  # the atlas T2w on the subject grid, when the atlas has one


def rigid_t2w_to_t1w(t1w, t2w, seed: int | None = 0, outprefix: str | None = None):
    """Rigid T2w -> T1w registration (mutual information: different contrasts).

    Returns the antspyx result; ``fwdtransforms`` maps the T2w onto the T1w (written under
    ``outprefix`` when given, to keep; else in a temporary folder). T2w scans are rarely acquired
    in the T1w's space, so every T2w goes through this before use.
    """
    import ants

    where = {} if outprefix is None else {"outprefix": str(outprefix)}
    with _ants_seed(seed):
        return ants.registration(t1w, t2w, type_of_transform="Rigid", **where)


def coregister_t2w(t1w_file: Path | str, t2w_file: Path | str, out_file: Path | str,
                   seed: int | None = 0, n_threads: int | None = None) -> Path:
    """Bring a T2w onto its T1w's voxel grid (rigid registration + linear resampling)."""
    import ants

    set_itk_threads(n_threads)
    t1w, t2w = ants.image_read(str(t1w_file)), ants.image_read(str(t2w_file))
    reg = rigid_t2w_to_t1w(t1w, t2w, seed)
    ants.image_write(reg["warpedmovout"], str(out_file))
    return Path(out_file)


def ants_seed(seed: int) -> int:
    """Our seed as an antsRegistration ``--random-seed``: ANTs takes 0 to mean "seed from the
    clock" (runs then differ), so the seed is shifted into 1..2**31-1."""
    return int(seed) % (2**31 - 1) + 1


@contextmanager
def _ants_seed(seed: int | None):
    """Temporarily set the seed antspyx passes to antsRegistration as ``--random-seed``."""
    import ants.config

    previous = ants.config._random_seed
    ants.config._random_seed = None if seed is None else ants_seed(seed)
    try:
        yield
    finally:
        ants.config._random_seed = previous


def set_itk_threads(n_threads: int | None) -> None:
    """ITK reads its thread count from the environment at each filter call."""
    if n_threads:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(n_threads))


def _prepare(preset: str, n_threads: int | None, out_dir: Path | str) -> Path:
    """Check the preset, set ITK's threads and make the output folder: before any registration."""
    if preset not in REGISTRATION_PRESETS:
        raise ValueError(f"unknown registration preset {preset!r}; choose from {sorted(REGISTRATION_PRESETS)}")
    set_itk_threads(n_threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def register_atlas(target_t1w: Path | str, atlas_t1w: Path | str, atlas_dseg: Path | str,
                   out_dir: Path | str, preset: str = "quick", seed: int | None = 0,
                   n_threads: int | None = None, atlas_t2w: Path | str | None = None) -> WarpedAtlas:
    """Register one atlas to the subject and bring its image and labels onto the subject's grid.

    Images are warped with linear interpolation, labels with ``genericLabel`` (the ANTs label
    interpolator, smoother than nearest neighbour). Outputs are on the target's voxel grid,
    i.e. in the subject's native geometry. With a seed and ``n_threads=1`` the result is
    bit-for-bit repeatable; with more ITK threads it is not (the metric's partial sums differ).
    An atlas T2w is first registered rigidly to the atlas T1w; that transform and the atlas-to-
    subject ones are applied together, so the T2w is interpolated once.
    """
    import ants

    out_dir = _prepare(preset, n_threads, out_dir)

    fixed = ants.image_read(str(target_t1w))
    moving = ants.image_read(str(atlas_t1w))
    labels = ants.image_read(str(atlas_dseg))
    with _ants_seed(seed):
        reg = ants.registration(fixed, moving, type_of_transform=REGISTRATION_PRESETS[preset],
                                outprefix=str(out_dir / "atlas2target_"))
    warped_labels = ants.apply_transforms(fixed, labels, reg["fwdtransforms"],
                                          interpolator="genericLabel")
    t1w_out = out_dir / "atlas_T1w_warped.nii.gz"
    dseg_out = out_dir / "atlas_dseg_warped.nii.gz"
    ants.image_write(reg["warpedmovout"], str(t1w_out))
    ants.image_write(warped_labels.astype("uint32"), str(dseg_out))

    # Keep the transforms next to the outputs under stable names (ANTs writes them to temp names
    # when outprefix is a temp path; here they are already in out_dir, but the suffixes differ).
    transforms = []
    for i, tfm in enumerate(reg["fwdtransforms"]):
        tfm = Path(tfm)
        if tfm.parent != out_dir:
            dest = out_dir / f"xfm{i}_{tfm.name}"
            shutil.copyfile(tfm, dest)
            tfm = dest
        transforms.append(tfm)
    t2w_out = None
    if atlas_t2w is not None:
        t2w = ants.image_read(str(atlas_t2w))
        t2_to_t1 = rigid_t2w_to_t1w(moving, t2w, seed)["fwdtransforms"]
        # ANTs applies the list last-first: T2w -> atlas T1w, then atlas -> subject
        warped_t2w = ants.apply_transforms(fixed, t2w, list(reg["fwdtransforms"]) + list(t2_to_t1),
                                           interpolator="linear")
        t2w_out = out_dir / "atlas_T2w_warped.nii.gz"
        ants.image_write(warped_t2w, str(t2w_out))
    return WarpedAtlas(t1w_out, dseg_out, tuple(transforms), t2w_out)


@dataclass(frozen=True)
class TemplateTransforms:
    forward: Path  # T1w -> template, ANTs composite (.h5): what warps T1w-space images
    inverse: Path  # template -> T1w
    t1w_in_template: Path  # the subject's T1w on the template grid, to judge the registration


def register_to_template(t1w: Path | str, template_t1w: Path | str, out_dir: Path | str,
                         preset: str = "quick", seed: int | None = 0,
                         n_threads: int | None = None,
                         template_mask: Path | str | None = None) -> TemplateTransforms:
    """Register the subject's T1w (moving) to a template T1w (fixed) and keep both directions.

    The transforms are written as ANTs composite files (``.h5``, affine and warp in one file),
    the format fMRIPrep writes for ``_xfm.h5``. ``template_mask`` (the template's brain mask)
    restricts the metric of the last stage to the brain, as antspyx's ``mask`` does.
    Seeded and single-threaded, the result repeats exactly (as :func:`register_atlas`).
    """
    import ants

    out_dir = _prepare(preset, n_threads, out_dir)
    fixed = ants.image_read(str(template_t1w))
    moving = ants.image_read(str(t1w))
    mask = ants.image_read(str(template_mask)) if template_mask else None
    with _ants_seed(seed):
        reg = ants.registration(fixed, moving, type_of_transform=REGISTRATION_PRESETS[preset],
                                mask=mask, outprefix=str(out_dir / "T1w_to_template_"),
                                write_composite_transform=True)
    warped = out_dir / "T1w_in_template.nii.gz"
    ants.image_write(reg["warpedmovout"], str(warped))
    return TemplateTransforms(Path(reg["fwdtransforms"]), Path(reg["invtransforms"]), warped)


def warp_labels(labels: Path | str, reference: Path | str, transform: Path | str,
                out_file: Path | str) -> Path:
    """Bring a label map onto ``reference``'s grid through ``transform`` (``genericLabel``).

    The output keeps the labels' data type and takes the reference's header geometry verbatim
    (affine and qform/sform codes), so it is exactly on the template's grid.
    """
    import ants
    import nibabel as nb
    import numpy as np

    ref_img = nb.load(str(reference))
    warped = ants.apply_transforms(ants.image_read(str(reference)), ants.image_read(str(labels)),
                                   [str(transform)], interpolator="genericLabel")
    data = warped.numpy()
    # antspyx arrays follow the file's voxel order, as nibabel's do; a mismatch would be a bug
    assert data.shape == ref_img.shape[:3], (data.shape, ref_img.shape)
    dtype = nb.load(str(labels)).get_data_dtype()
    header = ref_img.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    out = nb.Nifti1Image(np.rint(data).astype(dtype), ref_img.affine, header)
    out.set_qform(ref_img.affine, int(ref_img.header["qform_code"]))
    out.set_sform(ref_img.affine, int(ref_img.header["sform_code"]))
    nb.save(out, str(out_file))
    return Path(out_file)
