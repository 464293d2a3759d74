"""NeuroNet's reference protocols ("teachers") as pure functions: the label maps a protocol spec
(:mod:`dlf_bids.models.protocols`) asks for, made from a raw T1w, its warped atlases and fused
labels. The Nipype interfaces in :mod:`dlf_bids.interfaces.teachers` wrap these.

Atropos (Avants et al. 2011, antspyx): intensities inside the brain mask truncated at their 99th
percentile, N4 bias correction inside the mask, then 3-class k-means initialisation and a Markov
random field prior. Atropos numbers its k-means classes by
increasing mean intensity already, but the classes are re-ranked here from the measured means so
that the protocol's map (class 1 = darkest: CSF on a T1w) never depends on that detail.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nb
import numpy as np
from scipy import ndimage

from .errors import BadDataError
from .fusion import load_label_stack, save_labels
from .registration import set_itk_threads


#: Upper quantile, within the mask, at which the T1w is truncated before N4 and Atropos. The
#: margin below also takes in bright non-brain voxels (orbital fat, vessels, dura) that k-means
#: would otherwise give a class of their own: on fs-training's sub-06 (whole head, 2 mm) 2 % of
#: the mask at intensity 135 took the brightest class and grey and white matter shared one
#: (WM Dice 0.06); truncated at 0.99: 0.78/0.80, and no change (±0.004) on sub-01 to sub-04.
#: ANTs' own pipelines truncate intensities before segmenting for the same reason.
ATROPOS_UPPER_QUANTILE = 0.99
#: How far the Atropos mask reaches beyond the warped atlas labels. FreeSurfer-style labels stop at
#: the pial surface, so their union holds almost no sulcal CSF: on fs-training's sub-01 (2 mm,
#: 4 warped atlases) k-means then split the white matter in two and called grey matter CSF
#: (GM/WM Dice 0.25/0.07 against FreeSurfer). Grown by 3 mm: 0.80/0.82; by 4 mm 0.78/0.81; by
#: 5 mm the scalp's bright fat takes a class and WM fails again (0.67/0.11).
ATROPOS_MASK_MARGIN_MM = 3.0


def brain_mask_from_labels(warped_dsegs, out_file, margin_mm: float = ATROPOS_MASK_MARGIN_MM) -> Path:
    """The union of the warped atlas labels, holes filled, grown by ``margin_mm`` (a Euclidean
    distance in mm, so the same on any grid): the brain and the CSF around it, as the atlases
    see it (see :data:`ATROPOS_MASK_MARGIN_MM` for why the margin, and why no more)."""
    stack, ref = load_label_stack(list(warped_dsegs))
    mask = ndimage.binary_fill_holes((stack > 0).any(axis=0))
    if not mask.any():
        raise BadDataError("the warped atlas labels are empty: no brain mask for Atropos")
    if margin_mm > 0:
        zooms = nb.affines.voxel_sizes(ref.affine)
        mask = ndimage.distance_transform_edt(~mask, sampling=zooms) <= margin_mm
    img = nb.Nifti1Image(mask.astype(np.uint8), ref.affine)
    img.set_qform(ref.affine, code=1)
    img.set_sform(ref.affine, code=1)
    nb.save(img, str(out_file))
    return Path(out_file)


def rank_by_intensity(classes: np.ndarray, image: np.ndarray, n_classes: int) -> np.ndarray:
    """Renumber classes ``1..n`` by increasing mean ``image`` intensity (0 stays 0); a class with
    no voxel keeps its rank after the others."""
    means = [image[classes == k].mean() if (classes == k).any() else np.inf
             for k in range(1, n_classes + 1)]
    order = np.argsort(means, kind="stable")  # order[r] = old class (0-based) of rank r
    lut = np.zeros(n_classes + 1, dtype=np.int16)
    lut[order + 1] = np.arange(1, n_classes + 1)
    return lut[classes]


def atropos_classes(t1w_file, mask_file, n_classes: int = 3, mrf: float = 0.1,
                    iterations: int = 5, n_threads: int | None = 1) -> np.ndarray:
    """Atropos classes ``1..n_classes`` (by increasing mean bias-corrected intensity; 0 outside
    the mask) on the T1w's voxel grid, as an int16 array."""
    import ants

    set_itk_threads(n_threads)
    image = ants.image_read(str(t1w_file))
    mask = ants.image_read(str(mask_file))
    inside = mask.numpy() > 0
    if not inside.any():
        raise BadDataError(f"{mask_file}: the brain mask is empty")
    mask = mask.new_image_like(inside.astype(np.float32))
    data = image.numpy()
    ceiling = np.quantile(data[inside], ATROPOS_UPPER_QUANTILE)
    image = image.new_image_like(np.minimum(data, ceiling).astype(np.float32))
    corrected = ants.n4_bias_field_correction(image, mask=mask)
    # r=0: Atropos's default (--use-random-seed 1) seeds its sampler from the clock, and two
    # runs then differ (~0.1 % of the voxels at 3 mm); 0 takes ANTs' constant seed, so the same
    # inputs give the same classes (ANTS_RANDOM_SEED is not read: there is no seed to choose)
    seg = ants.atropos(a=corrected, x=mask, i=f"kmeans[{n_classes}]",
                       m=f"[{mrf},{'x'.join(['1'] * image.dimension)}]", c=f"[{iterations},0]", r=0)
    classes = np.rint(seg["segmentation"].numpy()).astype(np.int16)
    return rank_by_intensity(classes, corrected.numpy(), n_classes)


def atropos_tissue(t1w_file, mask_file, out_file, n_classes: int = 3,
                   n_threads: int | None = 1) -> Path:
    """:func:`atropos_classes` written with the T1w's geometry (int16)."""
    classes = atropos_classes(t1w_file, mask_file, n_classes=n_classes, n_threads=n_threads)
    return save_labels(classes, t1w_file, out_file)


def protocol_labels(protocol: dict, source_file, reference, out_file) -> Path:
    """A protocol's label map from its source's label map (``protocol``: a
    :meth:`~dlf_bids.models.protocols.Protocol.to_dict`), written on the ``reference`` grid."""
    from .models.protocols import Protocol

    proto = Protocol.from_dict(protocol)
    source = nb.load(str(source_file))
    ref = nb.load(str(reference))
    if source.shape[:3] != ref.shape[:3] or not np.allclose(source.affine, ref.affine, atol=1e-4):
        raise BadDataError(f"{source_file} is not on the grid of {reference}")
    labels = proto.make_label_map(np.asanyarray(source.dataobj))
    return save_labels(labels, reference, out_file)
