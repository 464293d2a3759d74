"""Dice per label (dlf_bids.evaluation) on hand-made maps with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dlf_bids.evaluation import dice_per_label, mean_dice


def test_dice_known_answers():
    truth = np.array([0, 1, 1, 1, 2, 2, 0, 0])
    seg = np.array([0, 1, 1, 2, 2, 0, 0, 3])
    scores = dice_per_label(seg, truth, [1, 2, 3, 7])
    assert scores[1] == pytest.approx(2 * 2 / (2 + 3))
    assert scores[2] == pytest.approx(2 * 1 / (2 + 2))
    assert scores[3] == 0.0  # only in the segmentation
    assert math.isnan(scores[7])  # in neither: not scored
    assert mean_dice(seg, truth, [1, 2, 3, 7]) == pytest.approx((0.8 + 0.5 + 0.0) / 3)


def test_dice_matches_the_direct_definition():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 50, (12, 10, 8))
    seg = np.where(rng.uniform(size=truth.shape) < 0.7, truth, rng.integers(0, 50, truth.shape))
    for lab, value in dice_per_label(seg, truth, range(1, 50)).items():
        a, b = seg == lab, truth == lab
        assert value == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_dice_refuses_mismatched_or_negative_maps():
    with pytest.raises(ValueError, match="differ in size"):
        dice_per_label(np.zeros(3, int), np.zeros(4, int), [1])
    with pytest.raises(ValueError, match="negative"):
        dice_per_label(np.array([-1, 0]), np.array([0, 0]), [1])
