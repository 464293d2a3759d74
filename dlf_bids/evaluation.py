"""Agreement between label maps (Dice), for the demo, the tests and the benchmarks."""

from __future__ import annotations

import numpy as np


def dice_per_label(seg: np.ndarray, truth: np.ndarray, labels) -> dict[int, float]:
    """Dice overlap per label; NaN where the label is in neither map."""
    scores = {}
    for lab in labels:
        a, b = seg == lab, truth == lab
        denom = a.sum() + b.sum()
        scores[int(lab)] = float(2.0 * np.logical_and(a, b).sum() / denom) if denom else float("nan")
    return scores


def mean_dice(seg: np.ndarray, truth: np.ndarray, labels) -> float:
    values = [v for v in dice_per_label(seg, truth, labels).values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")
