"""Tests of Deep Label Fusion inference (dlf_bids.models.inference): sliding-window shapes and
padding, label values, probability / uncertainty ranges, atlas chunking, determinism, label
masking, a missing modality, devices. Tiny networks and 16³ patches only."""

from __future__ import annotations

import numpy as np
import pytest

import torch

from dlf_bids.errors import BadDataError, UsageError
from dlf_bids.models import DeepLabelFusion, DLFConfig, coordinate_maps, one_hot_labels
from dlf_bids.models.inference import (
    fill_missing_modality,
    label_distribution,
    labels_to_channels,
    normalise_patch,
    normalised_entropy,
    predict,
    resolve_device,
)
from dlf_bids.models.model_file import NOISE, ModelInfo, check_model_fits, load_model
from dlf_bids.models.training import TrainingCase, TrainSettings, train_dlf
from dlf_bids.utils.labels import Label, LabelTable
from conftest import blob_phantom  # the shared synthetic phantom

torch.set_num_threads(1)

TABLE = LabelTable((Label(2, "Left-Blob"), Label(41, "Right-Blob")))
PATCH = (16, 16, 16)


def tiny_config(n_modalities=2) -> DLFConfig:
    return DLFConfig(n_labels=3, n_modalities=n_modalities, wv_channels=(4, 8, 16), ft_channels=(4, 8, 16, 32))


def make_model(n_modalities=2, modaug=False, seed=0):
    torch.manual_seed(seed)
    model = DeepLabelFusion(tiny_config(n_modalities)).eval()
    info = ModelInfo(format_version=1, package_version="0", dlf_config=model.config,
                     labels=[{"index": 2, "name": "L"}, {"index": 41, "name": "R"}],
                     modalities=["T1w", "T2w"][:n_modalities], patch_size=PATCH, modaug=modaug)
    return model, info


def synth(seed: int, shape=(24, 24, 24)):
    """The blob phantom of conftest, with small jitter."""
    return blob_phantom(seed, shape, jitter=1, radius_jitter=0.5)


def atlases_for(shape, n=2, first_seed=10):
    data = [synth(first_seed + k, shape) for k in range(n)]
    return np.stack([d[0] for d in data]), np.stack([d[1] for d in data])


def dice(a, b, value):
    a, b = a == value, b == value
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


# --------------------------------------------------------------------------------- helpers
def test_normalised_entropy_does_not_depend_on_the_chunk_size():
    """Chunks bound memory (a 1 mm volume once peaked at 7.5 GiB); they must not change values."""
    p = torch.rand(5, 7, 6, 5, generator=torch.Generator().manual_seed(0))
    whole = normalised_entropy(p, chunk_voxels=p[0].numel())
    for chunk in (1, 13, 64):
        assert torch.equal(normalised_entropy(p, chunk_voxels=chunk), whole)


def test_normalised_entropy_range():
    onehot = torch.zeros(3, 4, 4, 4)
    onehot[1] = 1.0
    assert float(normalised_entropy(onehot).abs().max()) == 0.0
    assert torch.allclose(normalised_entropy(torch.full((3, 2, 2, 2), 0.3)), torch.ones(2, 2, 2))
    assert torch.allclose(normalised_entropy(torch.zeros(3, 2, 2, 2)), torch.ones(2, 2, 2))  # no mass: uniform
    # scale-invariant (renormalised): half the mass on one label, rest spread
    p = torch.tensor([0.5, 0.25, 0.25]).reshape(3, 1, 1, 1)
    expected = -(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25)) / np.log(3)
    assert float(normalised_entropy(p * 0.4)) == pytest.approx(expected, rel=1e-5)


def test_label_distribution_derives_background():
    p = torch.tensor([[0.99, 0.99, 0.99], [0.98, 0.3, 0.1], [0.1, 0.45, 0.0]]).reshape(3, 3, 1, 1)
    q = label_distribution(p)
    assert torch.allclose(q[0, :, 0, 0], torch.tensor([0.02, 0.55, 0.9]))
    assert q.argmax(0).flatten().tolist() == [1, 0, 0]  # foreground only where its probability >= 0.5
    assert torch.equal(q[1:], p[1:]) and torch.equal(label_distribution(p, "network"), p)
    with pytest.raises(UsageError):
        label_distribution(p, "softmax")


def test_labels_to_channels_and_normalisation():
    vals = np.array([[[0, 2], [41, 2]]])
    assert labels_to_channels(vals, [0, 2, 41]).tolist() == [[[0, 1], [2, 1]]]
    with pytest.raises(BadDataError, match="17"):
        labels_to_channels(np.array([0, 17, 2]), [0, 2, 41])
    x = torch.tensor([0.0, 0.0, 2.0, 4.0, 6.0]).reshape(1, 1, 1, 5)
    y = normalise_patch(x)
    assert torch.allclose(y[0, 0, 0, 2:], torch.tensor([-1.2247, 0.0, 1.2247]), atol=1e-4)
    assert torch.equal(normalise_patch(torch.zeros(1, 2, 2, 2)), torch.zeros(1, 2, 2, 2))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA"):
            resolve_device("cuda")


def test_fill_missing_modality():
    t1 = np.ones((4, 4, 4), np.float32)
    filled = fill_missing_modality([t1, None], np.random.default_rng(0))
    assert filled.shape == (2, 4, 4, 4) and np.array_equal(filled[0], t1)
    assert not np.isnan(filled).any() and filled[1].std() > 0.5
    atl = np.ones((3, 2, 8, 8, 8), np.float32)
    atl[:, 1] = np.nan
    out = fill_missing_modality(atl, 0)
    assert np.array_equal(out[:, 0], atl[:, 0]) and abs(out[:, 1].std() - 1) < 0.1
    assert not np.array_equal(out[0, 1], out[1, 1])  # own noise per atlas
    assert np.array_equal(out, fill_missing_modality(atl, 0))  # seeded
    assert np.isnan(atl).any()  # input untouched
    with pytest.raises(BadDataError):
        fill_missing_modality([None, None], 0)


# --------------------------------------------------------------------------------- predict
def test_predict_shapes_ranges_and_padding():
    model, info = make_model()
    shape = (20, 18, 13)  # not a multiple of the patch; one axis smaller than the patch
    target, _ = synth(0, shape)
    atl_img, atl_lab = atlases_for(shape)
    pred = predict(model, info, target, atl_img, atl_lab, overlap=0.5)
    assert pred.labels.shape == shape and pred.labels.dtype == np.int16
    assert pred.probabilities.shape == (3, *shape) and pred.probabilities.dtype == np.float32
    assert pred.uncertainty.shape == shape and pred.uncertainty.dtype == np.float32
    assert set(np.unique(pred.labels).tolist()) <= {0, 2, 41}
    assert pred.probabilities.min() >= 0.0 and pred.probabilities.max() <= 1.0
    assert pred.uncertainty.min() >= 0.0 and pred.uncertainty.max() <= 1.0
    assert pred.channel_values.tolist() == [0, 2, 41]
    assert np.array_equal(pred.labels, pred.channel_values[pred.probabilities.argmax(0)])


def test_single_window_equals_direct_forward():
    """Image == patch: one window, so the result is the network's output on the whole image
    (checks the per-window cropping, one-hot, normalisation and coordinates)."""
    model, info = make_model()
    target, _ = synth(1, PATCH)
    atl_img, atl_lab = atlases_for(PATCH, n=3)
    pred = predict(model, info, target, atl_img, atl_lab)
    with torch.no_grad():
        idx = torch.from_numpy(labels_to_channels(atl_lab, [0, 2, 41])).long().unsqueeze(0)
        out = model(normalise_patch(torch.from_numpy(target)).unsqueeze(0),
                    normalise_patch(torch.from_numpy(atl_img)).unsqueeze(0),
                    one_hot_labels(idx, 3, dim=2), coordinate_maps(PATCH).unsqueeze(0))["output"][0]
    out = out.numpy()
    assert np.allclose(pred.probabilities[1:], out[1:], atol=1e-5)
    assert np.allclose(pred.probabilities[0], 1.0 - out[1:].max(0), atol=1e-5)
    raw = predict(model, info, target, atl_img, atl_lab, background="network")
    assert np.allclose(raw.probabilities, out, atol=1e-5)
    assert np.array_equal(raw.labels, raw.channel_values[out.argmax(0)])


def test_atlas_batch_and_determinism():
    model, info = make_model(seed=1)
    shape = (24, 20, 16)
    target, _ = synth(2, shape)
    atl_img, atl_lab = atlases_for(shape, n=3)
    a = predict(model, info, target, atl_img, atl_lab)
    b = predict(model, info, target, atl_img, atl_lab, atlas_batch=1)
    c = predict(model, info, target, atl_img, atl_lab)
    assert np.allclose(a.probabilities, b.probabilities, atol=1e-5)
    assert np.array_equal(a.probabilities, c.probabilities) and np.array_equal(a.labels, c.labels)
    assert np.array_equal(a.uncertainty, c.uncertainty)


def test_label_masking_keeps_labels_no_atlas_carries_out():
    model, info = make_model(seed=2)
    shape = (24, 24, 16)
    target, _ = synth(3, shape)
    atl_img, atl_lab = atlases_for(shape, n=2)
    atl_lab = np.where(atl_lab == 41, 0, atl_lab)  # no atlas carries label 41
    pred = predict(model, info, target, atl_img, atl_lab)
    assert 41 not in np.unique(pred.labels)
    assert float(pred.probabilities[2].max()) == 0.0


def test_skipping_empty_windows_changes_nothing_but_the_work():
    """Windows where every atlas says background are not run through the network, and the
    result is the same as running them."""
    model, info = make_model(seed=4)
    shape = (48, 24, 24)
    target, _ = synth(5, shape)
    atl_img, atl_lab = atlases_for(shape, n=2)
    atl_lab[:, 24:] = 0  # the second half of the image carries no atlas label at all
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    skipped = predict(model, info, target, atl_img, atl_lab)
    n_skipped = len(calls)
    calls.clear()
    full = predict(model, info, target, atl_img, atl_lab, skip_empty_windows=False)
    assert n_skipped < len(calls)
    assert np.array_equal(skipped.labels, full.labels)
    assert np.array_equal(skipped.probabilities, full.probabilities)
    assert np.array_equal(skipped.uncertainty, full.uncertainty)


def test_predict_refuses_bad_inputs():
    model, info = make_model()
    target, _ = synth(0, PATCH)
    atl_img, atl_lab = atlases_for(PATCH)
    with pytest.raises(BadDataError, match="17"):
        predict(model, info, target, atl_img, np.where(atl_lab == 2, 17, atl_lab))
    with pytest.raises(BadDataError, match="modalities"):
        predict(model, info, target[:1], atl_img, atl_lab)
    with pytest.raises(BadDataError, match="atlas labels"):
        predict(model, info, target, atl_img, atl_lab[:1])
    bad = target.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(BadDataError, match="NaN"):
        predict(model, info, bad, atl_img, atl_lab)


def test_t1_only_with_modaug_model():
    model, info = make_model(modaug=True)
    plan = check_model_fits(info, [2, 41], ["T1w"])
    assert plan == ["T1w", NOISE]
    shape = (16, 16, 24)
    target, _ = synth(4, shape)
    atl_img, atl_lab = atlases_for(shape)
    rng = np.random.default_rng(0)
    t1_only = fill_missing_modality([target[0], None], rng)
    atlases = fill_missing_modality(atl_img, rng, missing=plan.noise_channels)
    pred = predict(model, info, t1_only, atlases, atl_lab)
    assert pred.labels.shape == shape and np.isfinite(pred.probabilities).all()
    # an all-NaN channel is filled by predict itself, reproducibly from noise_seed
    nan_t = target.copy()
    nan_t[1] = np.nan
    nan_a = atl_img.copy()
    nan_a[:, 1] = np.nan
    p1 = predict(model, info, nan_t, nan_a, atl_lab, noise_seed=7)
    p2 = predict(model, info, nan_t, nan_a, atl_lab, noise_seed=7)
    assert np.array_equal(p1.probabilities, p2.probabilities)


def near_copies(img, lab, shifts=((0, 1), (1, -1), (2, 1))):
    """'Registered' atlases: the subject itself shifted by one voxel along each axis."""
    return (np.stack([np.roll(img, s, axis=a) for a, s in shifts]),
            np.stack([np.roll(lab, s, axis=a) for a, s in shifts]))


def test_trained_model_segments_an_easy_case(tmp_path):
    """Train a tiny model for a few seconds on cases whose atlases are near-copies of the target,
    then segment an unseen case: Dice > 0.5 for both labels."""
    cases = []
    for k in range(2):
        img, lab = synth(20 + k, PATCH)
        cases.append(TrainingCase(img, lab, *near_copies(img, lab), f"sub-{k}"))
    settings = TrainSettings(patch_size=PATCH, atlases_per_sample=2, epochs=4, iterations_per_epoch=8,
                             lr=5e-3, lr_step=100, validation="none", val_fraction=0.0, affine_prob=0.0,
                             elastic_prob=0.0, histogram_shift_prob=0.0, noise_prob=0.0, modaug=False, seed=0)
    res = train_dlf(cases, TABLE, tiny_config(), settings, ["T1w", "T2w"], tmp_path / "m.pt", progress=False)
    model, info = load_model(res.out_file)
    target, truth = synth(40, PATCH)
    pred = predict(model, info, target, *near_copies(target, truth))
    assert dice(pred.labels, truth, 2) > 0.5 and dice(pred.labels, truth, 41) > 0.5
    assert pred.uncertainty[truth == 0].mean() < pred.uncertainty[truth > 0].mean()
