#!/usr/bin/env python
"""A trained NeuroNet model on held-out library subjects, on the model's grid: tissue Dice of its
``tissue`` decoder against the subject's FreeSurfer aseg collapsed to GM/WM/CSF
(:data:`dlf_bids.models.protocols.ASEG_TO_TISSUE`), what the decoder says where FreeSurfer says
CSF (the ventricles), and the ``library`` decoder's mean Dice over the aseg's labels.

Quicker than ``neuronet_loo.py`` (no teachers, no native-grid way back): for comparing training
recipes on models trained on the same library.

    python benchmarks/neuronet_tissue_check.py bench-out/nn/all-subjects model.pt --subjects 01 06
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nb
import numpy as np
import torch


def check(library: Path, model_file: Path, subject: str) -> dict:
    from dlf_bids.evaluation import dice_per_label, mean_dice
    from dlf_bids.model_grid import to_model_grid
    from dlf_bids.models.neuronet import predict_volume
    from dlf_bids.models.neuronet_training import load_neuronet
    from dlf_bids.models.protocols import ASEG_TO_TISSUE, collapse_labels
    from dlf_bids.neuronet_segmentation import model_voxel_size

    model, info = load_neuronet(model_file)
    size = model_voxel_size(info)
    anat = library / f"sub-{subject}" / "anat"
    image = np.asanyarray(to_model_grid(nb.load(anat / f"sub-{subject}_T1w.nii.gz"), size, order=1).dataobj,
                          dtype=np.float32)
    aseg = np.asanyarray(to_model_grid(nb.load(anat / f"sub-{subject}_dseg.nii.gz"), size, order=0).dataobj)
    truth = collapse_labels(aseg, ASEG_TO_TISSUE)
    window = tuple(-(-n // 8) * 8 for n in image.shape)  # the whole grid as one window
    preds = predict_volume(model, image, channel_values=info.channel_values, roi_size=window, overlap=0)
    tissue = preds["tissue"].labels
    csf = truth == 3
    labels = sorted(set(np.unique(aseg).tolist()) - {0})
    return {"GM/WM/CSF": [round(d, 3) for d in dice_per_label(tissue, truth, (1, 2, 3)).values()],
            "at FreeSurfer CSF (bg/GM/WM/CSF)": np.bincount(tissue[csf], minlength=4).tolist(),
            "CSF voxels (NeuroNet, FreeSurfer)": [int((tissue == 3).sum()), int(csf.sum())],
            "library mean Dice": round(mean_dice(preds["library"].labels, aseg, labels), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("library", type=Path, help="the converted subjects (neuronet_loo's all-subjects)")
    parser.add_argument("model", type=Path)
    parser.add_argument("--subjects", nargs="+", default=["01", "06"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for subject in args.subjects:
        print(f"sub-{subject}: {check(args.library, args.model, subject)}", flush=True)


if __name__ == "__main__":
    main()
