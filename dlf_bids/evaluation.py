"""Agreement between label maps (Dice), for the demo, the tests and the benchmarks."""

from __future__ import annotations

import numpy as np


def dice_per_label(seg: np.ndarray, truth: np.ndarray, labels) -> dict[int, float]:
    """Dice overlap per label; NaN where the label is in neither map.

    One pass of ``np.bincount`` over each map instead of a comparison per label: ~40 FreeSurfer
    labels on a 1 mm brain would otherwise read the volumes 80 times. Label values must be
    non-negative integers (they are, in label maps)."""
    labels = [int(lab) for lab in labels]
    seg = np.asarray(seg).ravel().astype(np.int64, copy=False)
    truth = np.asarray(truth).ravel().astype(np.int64, copy=False)
    if seg.shape != truth.shape:
        raise ValueError(f"label maps differ in size: {seg.size} and {truth.size} voxels")
    if seg.size and min(seg.min(), truth.min()) < 0:
        raise ValueError("label maps must not hold negative values")
    size = max([int(seg.max(initial=0)), int(truth.max(initial=0)), *labels]) + 1
    n_seg = np.bincount(seg, minlength=size)
    n_truth = np.bincount(truth, minlength=size)
    n_both = np.bincount(truth[truth == seg], minlength=size)
    scores = {}
    for lab in labels:
        denom = n_seg[lab] + n_truth[lab]
        scores[lab] = float(2.0 * n_both[lab] / denom) if denom else float("nan")
    return scores


def mean_dice(seg: np.ndarray, truth: np.ndarray, labels) -> float:
    values = [v for v in dice_per_label(seg, truth, labels).values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")
