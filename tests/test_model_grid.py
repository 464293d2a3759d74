"""The model grid and the way back: the fast paths give what per-channel 3-D resampling gives."""

from __future__ import annotations

import nibabel as nb
import numpy as np
import pytest
from nibabel.processing import resample_from_to

from dlf_bids.model_grid import _integer_factors, _axis_coordinates, argmax_on_native, to_model_grid


def _native(spacing: float, shape=(21, 18, 16), oblique: bool = False):
    # FreeSurfer-like LIA axes, off-centre origin
    affine = np.array([[-spacing, 0, 0, 30.3], [0, 0, spacing, -12.1], [0, -spacing, 0, 17.7],
                       [0, 0, 0, 1]])
    if oblique:
        c, s = np.cos(0.2), np.sin(0.2)
        affine = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]) @ affine
    return nb.Nifti1Image(np.zeros(shape, np.float32), affine)


def _reference(probs, model_img, native):
    """Per channel, scipy's linear resampling with the background outside (channel 0 = 1)."""
    out = np.stack([np.asanyarray(resample_from_to(
        nb.Nifti1Image(channel, model_img.affine), (native.shape, native.affine), order=1,
        mode="constant", cval=1.0 if c == 0 else 0.0).dataobj) for c, channel in enumerate(probs)])
    return out


@pytest.mark.parametrize("spacing, oblique, integer", [
    (1.0, False, True),    # 1 mm under a 2 mm model: torch's trilinear interpolate, by slabs
    (1.5, False, False),   # 1.5 mm: per-axis interpolation
    (1.0, True, False),    # oblique: resampled channel by channel
])
def test_argmax_and_channels_on_native_match_3d_resampling(spacing, oblique, integer):
    native = _native(spacing, oblique=oblique)
    model_img = to_model_grid(native, (2.0, 2.0, 2.0))
    coords = _axis_coordinates(model_img, native)
    assert (coords is None) == oblique
    if coords is not None:  # which path ran
        assert (_integer_factors([c + 1 for c in coords], [n + 2 for n in model_img.shape]) is not None) == integer
    rng = np.random.default_rng(1)
    probs = rng.random((11, *model_img.shape)).astype(np.float32)  # more than one CHANNEL_CHUNK
    probs /= probs.sum(axis=0)
    labels, kept = argmax_on_native(probs, model_img, native, keep=(1, 3, 9))
    expected = _reference(probs, model_img, native)
    assert labels.shape == native.shape and labels.dtype == np.int16
    np.testing.assert_allclose(kept, expected[[1, 3, 9]], atol=1e-5)
    # the same labels except on near-ties of the two largest channels
    top2 = np.sort(expected, axis=0)[-2:]
    decided = top2[1] - top2[0] > 1e-4
    assert np.array_equal(labels[decided], np.argmax(expected, axis=0)[decided])
    # outside the model grid, background (the oblique image's corners stick out of it)
    assert kept.min() >= 0 and (np.abs(np.sum(expected, axis=0) - 1) < 1e-4).all()


def test_reoriented_grid_comes_back_exactly():
    native = _native(2.0)
    model_img = to_model_grid(native, (2.0, 2.0, 2.0))
    probs = np.random.default_rng(2).random((3, *model_img.shape)).astype(np.float32)
    labels, kept = argmax_on_native(probs, model_img, native, keep=(0, 1, 2))
    back = nb.as_closest_canonical(nb.Nifti1Image(kept[1], native.affine))
    assert np.array_equal(np.asanyarray(back.dataobj), probs[1])
    assert np.array_equal(labels, np.argmax(kept, axis=0))


def test_inference_window_is_the_whole_grid_when_it_fits():
    from dlf_bids.models.neuronet import NeuroNetConfig
    from dlf_bids.neuronet_segmentation import WHOLE_GRID_VOXELS, inference_window

    config = NeuroNetConfig({"tissue": 4}, crop_size=(64, 64, 64))  # strides 1, 2, 2, 2
    assert inference_window((129, 129, 129), config) == (136, 136, 136)
    big = round(WHOLE_GRID_VOXELS ** (1 / 3)) + 8
    assert inference_window((big, big, big), config) == (64, 64, 64)
