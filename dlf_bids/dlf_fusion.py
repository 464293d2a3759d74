"""Deep Label Fusion on files: load the model, stack the registered atlases, predict, save.

The network and its sliding-window inference live in :mod:`dlf_bids.models` (plain torch); this
module is the file-level step the Nipype interface wraps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nb
import numpy as np

from .errors import BadDataError


@dataclass
class DLFResult:
    labels: np.ndarray
    uncertainty: np.ndarray
    probabilities: np.ndarray
    channel_values: np.ndarray
    provenance: dict = field(default_factory=dict)


def save_probseg(probabilities: np.ndarray, reference, out_file) -> Path:
    """Write the foreground label probabilities as one 4D image on the reference's grid.

    Volume ``k`` is the probability of the ``k``-th foreground channel (the model's label order,
    which is the library's look-up-table order); background is left out, as in fMRIPrep's
    probseg files. Stored as uint8 with a 1/255 scale factor: 0.004 steps are finer than the
    network's calibration, and the file is 4x smaller than float32 (46 labels at 1 mm: ~0.9 GB
    raw as float32)."""
    ref = nb.load(str(reference))
    data = np.moveaxis(np.asarray(probabilities[1:], dtype=np.float32), 0, -1)
    hdr = ref.header.copy()
    hdr.set_data_dtype(np.uint8)
    hdr.set_slope_inter(1.0 / 255.0, 0.0)
    hdr.set_xyzt_units("mm")
    stored = np.clip(np.rint(data * 255.0), 0, 255).astype(np.uint8)
    img = nb.Nifti1Image(stored, ref.affine, hdr)
    img.header.set_slope_inter(1.0 / 255.0, 0.0)
    nb.save(img, str(out_file))
    return Path(out_file)


def _load(path) -> np.ndarray:
    return np.asanyarray(nb.load(str(path)).dataobj).astype(np.float32)


def deep_label_fusion(target_t1w, atlas_t1w, atlas_dseg, model_file, target_t2w=None,
                      atlas_t2w=None, device: str = "cpu", atlas_batch: int | None = 4,
                      force: bool = False, seed: int = 0, library_labels=None) -> DLFResult:
    """Fuse atlases already warped onto the subject (T1w grid) with a trained DLF model.

    A modality the model wants is used when the subject *and* every atlas have it; otherwise the
    channel becomes unit white noise (allowed for ModAug-trained models, or with ``force``).
    """
    import torch

    from .models.inference import predict
    from .models.model_file import check_model_fits, load_model

    torch.manual_seed(seed)
    model, info = load_model(model_file, device="cpu")
    have = {"T1w": True, "T2w": target_t2w is not None and bool(atlas_t2w)
            and len(atlas_t2w) == len(atlas_t1w)}
    atlas_labels = np.stack([np.asanyarray(nb.load(str(f)).dataobj).astype(np.int32)
                             for f in atlas_dseg])
    present = library_labels if library_labels is not None else np.unique(atlas_labels)
    plan = check_model_fits(info, present, [m for m, ok in have.items() if ok], force=force)

    shape = nb.load(str(target_t1w)).shape[:3]
    target, atlases = [], []
    for modality, source in zip(info.modalities, plan):
        if source != modality:  # noise: predict() fills all-NaN channels with seeded white noise
            target.append(np.full(shape, np.nan, np.float32))
            atlases.append([np.full(shape, np.nan, np.float32) for _ in atlas_t1w])
        elif modality == "T1w":
            target.append(_load(target_t1w))
            atlases.append([_load(f) for f in atlas_t1w])
        elif modality == "T2w":
            target.append(_load(target_t2w))
            atlases.append([_load(f) for f in atlas_t2w])
        else:
            raise BadDataError(f"model modality {modality!r} is not one dlf-bids can provide")
    target_arr = np.stack(target)
    atlas_arr = np.stack([np.stack([mod[j] for mod in atlases]) for j in range(len(atlas_t1w))])
    pred = predict(model, info, target_arr, atlas_arr, atlas_labels, device=device,
                   atlas_batch=atlas_batch, noise_seed=seed)
    provenance = {
        "Modalities": {m: ("image" if src == m else "unit white noise (" + (
            "model trained with ModAug" if info.modaug else "forced") + ")")
            for m, src in zip(info.modalities, plan)},
        "ModelFile": Path(model_file).name,
        "ModelSHA256": info.sha256,
        "ModelTrainedWithModAug": bool(info.modaug),
        "Warnings": list(getattr(plan, "warnings", [])),
    }
    return DLFResult(pred.labels, pred.uncertainty, pred.probabilities, pred.channel_values,
                     provenance)
