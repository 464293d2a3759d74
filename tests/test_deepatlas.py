"""Tests of DeepAtlas (dlf_bids.models.deepatlas*): warping, integration and Jacobians, the
untrained identity, joint training on blob phantoms, one-shot, seeding, model files. Tiny
networks and 16³-24³ volumes only."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import blob_phantom
from dlf_bids.errors import BadDataError, UsageError
from dlf_bids.models.deepatlas import (
    DeepAtlas,
    DeepAtlasConfig,
    RegistrationNet,
    jacobian_determinant,
    warp_image,
    warp_labels,
    warp_probabilities,
)
from dlf_bids.models.deepatlas_file import DEEPATLAS_FORMAT_VERSION, load_deepatlas, save_deepatlas
from dlf_bids.models.deepatlas_inference import register, segment
from dlf_bids.models.deepatlas_training import DeepAtlasTrainSettings, train_deepatlas
from dlf_bids.models.dlf import DeepLabelFusion, DLFConfig
from dlf_bids.models.model_file import save_model
from dlf_bids.utils.labels import Label, LabelTable

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp")

LABELS = (0, 2, 41)


def tiny_config(**kw) -> DeepAtlasConfig:
    base = dict(n_labels=3, in_channels=1, reg_channels=(4, 8, 16), seg_channels=(4, 8, 16),
                integration_steps=5, lncc_kernel=5, lambda_r=2.0, labels=LABELS)
    base.update(kw)
    return DeepAtlasConfig(**base)


def phantoms(seeds, S=24):
    """T1w channel and labels of blob phantoms whose blobs move by up to 2 voxels per axis."""
    out = [blob_phantom(s, S, jitter=2, radius_jitter=1.0) for s in seeds]
    return [(img[0], lab) for img, lab in out]


def mean_dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([2 * np.sum((a == v) & (b == v)) / (np.sum(a == v) + np.sum(b == v))
                          for v in LABELS[1:]]))


def fast_settings(**kw) -> DeepAtlasTrainSettings:
    base = dict(steps=8, phase_steps=2, lr_registration=2e-2, lr_segmentation=3e-2, seed=0)
    base.update(kw)
    return DeepAtlasTrainSettings(**base)


# ------------------------------------------------------------------------------ warping
def test_constant_displacement_moves_the_image_by_that_many_voxels():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 2, 16, 16, 16, generator=g)
    labels = torch.randint(0, 5, (1, 1, 16, 16, 16), generator=g)
    shift = (2, -1, 3)
    ddf = torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1, 1).expand(1, 3, 16, 16, 16)
    # output voxel x samples the moving image at x + shift: compare where x + shift is inside
    out_region = (slice(None), slice(None), slice(0, 14), slice(1, 16), slice(0, 13))
    src_region = (slice(None), slice(None), slice(2, 16), slice(0, 15), slice(3, 16))
    warped = warp_image(image, ddf)
    assert torch.allclose(warped[out_region], image[src_region], atol=1e-4)
    assert not torch.allclose(warped, image, atol=0.1)
    assert torch.equal(warp_labels(labels, ddf)[out_region], labels[src_region])


def test_identity_field_leaves_images_and_labels_unchanged():
    g = torch.Generator().manual_seed(1)
    image = 100 * torch.rand(1, 1, 16, 18, 20, generator=g)
    labels = torch.randint(0, 3, (1, 1, 16, 18, 20), generator=g)
    zero = torch.zeros(1, 3, 16, 18, 20)
    assert torch.equal(warp_labels(labels, zero), labels)  # nearest: exact
    # trilinear: MONAI's Warp maps voxel indices to [-1, 1] and back for grid_sample, which
    # costs a float32 rounding (~1e-7 relative), far below a one-voxel shift's change
    assert torch.allclose(warp_image(image, zero), image, rtol=1e-6, atol=1e-4)
    onehot = F.one_hot(labels[:, 0], 3).movedim(-1, 1).float()
    assert torch.allclose(warp_probabilities(onehot, zero), onehot, atol=1e-5)
    one_voxel = zero.clone()
    one_voxel[:, 0] = 1.0
    assert (warp_image(image, one_voxel) - image).abs().max() > 10


def test_integrated_smooth_velocities_do_not_fold_where_the_raw_field_does():
    integrate = RegistrationNet(tiny_config(integration_steps=7)).integrate  # MONAI DVF2DDF
    raw_min, integrated_min = [], []
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        coarse = torch.randn(1, 3, 4, 4, 4, generator=g)
        velocity = 1.5 * F.interpolate(coarse, size=(24, 24, 24), mode="trilinear", align_corners=True)
        raw_min.append(float(jacobian_determinant(velocity).min()))
        integrated_min.append(float(jacobian_determinant(integrate(velocity)).min()))
    assert all(j > 0 for j in integrated_min), integrated_min
    assert any(j < 0 for j in raw_min), raw_min  # the same field used as a displacement folds


def test_jacobian_known_answers_and_folding():
    grid = torch.stack(torch.meshgrid(*[torch.arange(12.0)] * 3, indexing="ij"))[None]
    # linear displacement u = A x: finite differences are exact, det = det(I + A) everywhere
    a = torch.tensor([[0.5, 0.1, 0.0], [0.0, -0.2, 0.3], [0.1, 0.0, 0.2]])
    ddf = torch.einsum("ij,bjxyz->bixyz", a, grid)
    assert torch.allclose(jacobian_determinant(ddf), torch.linalg.det(torch.eye(3) + a).expand(1, 12, 12, 12),
                          atol=1e-5)
    folding = torch.zeros_like(grid)
    folding[:, 0] = -2.0 * grid[:, 0]  # x -> -x: a mirror, the mapping folds
    assert torch.allclose(jacobian_determinant(folding), torch.full((1, 12, 12, 12), -1.0))
    assert torch.equal(jacobian_determinant(torch.zeros_like(grid)), torch.ones(1, 12, 12, 12))


# ------------------------------------------------------------------------------ networks
def test_untrained_registration_is_the_identity():
    torch.manual_seed(0)
    model = DeepAtlas(tiny_config()).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        ddf = model.registration(torch.randn(1, 1, 16, 16, 16, generator=g), torch.randn(1, 1, 16, 16, 16, generator=g))
    assert ddf.shape == (1, 3, 16, 16, 16) and torch.equal(ddf, torch.zeros_like(ddf))
    # numpy helpers on a grid that is no multiple of the network's divisor (padded, cropped back)
    (m, m_lab), (t, _) = phantoms([0, 1], S=(18, 21, 20))
    res = register(model, m, t, moving_labels=m_lab)
    assert res.ddf.shape == (3, 18, 21, 20) and not res.ddf.any()
    assert np.array_equal(res.labels, m_lab) and res.labels.dtype == m_lab.dtype
    assert np.allclose(res.warped[0], m, rtol=1e-6, atol=1e-3) and res.min_jacobian == 1.0
    assert res.folded_fraction == 0.0
    seg = segment(model, t)
    assert seg.shape == t.shape and set(np.unique(seg)) <= set(LABELS)


class _FixedWarp(torch.nn.Module):
    """Stands in for the registration network: always the same displacement field."""

    def __init__(self, ddf):
        super().__init__()
        self.ddf = ddf

    def forward(self, moving, target):
        return self.ddf


def test_registration_reports_how_much_of_the_grid_folds():
    model = DeepAtlas(tiny_config()).eval()
    grid = torch.stack(torch.meshgrid(*[torch.arange(16.0)] * 3, indexing="ij"))[None]
    ddf = torch.zeros_like(grid)
    ddf[:, 0, :, :, :6] = -2.0 * grid[:, 0, :, :, :6]  # mirrored in x on the first 6 z-slices
    model.registration = _FixedWarp(ddf)
    (m, _), (t, _) = phantoms([0, 1], S=(16, 16, 16))
    res = register(model, m, t)
    expected = float((jacobian_determinant(ddf) <= 0).double().mean())
    assert res.min_jacobian < 0 and 0.3 < res.folded_fraction == expected < 0.5


def test_config_round_trip_and_validation():
    cfg = tiny_config(in_channels=2, modalities=("T1w", "T2w"))
    assert DeepAtlasConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.size_divisor == 4 and DeepAtlasConfig(n_labels=3).size_divisor == 16
    assert DeepAtlasConfig(n_labels=3).lambda_a == 2.0 and DeepAtlasConfig(n_labels=3).lambda_sp == 3.0
    for bad in (dict(n_labels=1), dict(lncc_kernel=4), dict(labels=(2, 41, 0)), dict(reg_channels=(4, 8)),
                dict(lambda_r=-1.0), dict(modalities=("T1w", "T2w"))):
        with pytest.raises(ValueError):
            tiny_config(**bad)
    with pytest.raises(ValueError, match="unknown"):
        DeepAtlasConfig.from_dict({**cfg.to_dict(), "extra": 1})


# ------------------------------------------------------------------------------ training
def test_joint_training_lowers_both_losses_and_beats_the_identity():
    data = phantoms(range(8))
    labelled, unlabelled = data[:3], [img for img, _ in data[3:6]]
    settings = fast_settings(steps=120, phase_steps=10)
    res = train_deepatlas(labelled, unlabelled, tiny_config(), settings, progress=False)
    h = res.history
    assert len(h) == 120 and [e["phase"] for e in h[8:12]] == ["registration"] * 2 + ["segmentation"] * 2
    assert all(e["moving"] < 3 and e["target"] != e["moving"] for e in h)  # a labelled atlas moves
    for phase in ("registration", "segmentation"):
        losses = [e["loss"] for e in h if e["phase"] == phase]
        assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.1, (phase, losses[:10], losses[-10:])
    # warped atlas labels, labelled pairs seen in training and unseen phantoms 6, 7
    identity, warped = [], []
    for mi, ti in ((0, 1), (1, 2), (0, 6), (2, 7), (6, 7)):
        (m, m_lab), (t, t_lab) = data[mi], data[ti]
        out = register(res.model, m, t, moving_labels=m_lab)
        assert out.min_jacobian > 0
        identity.append(mean_dice(m_lab, t_lab))
        warped.append(mean_dice(out.labels, t_lab))
    assert np.mean(warped) > np.mean(identity) + 0.05, (identity, warped)
    assert mean_dice(segment(res.model, data[7][0]), data[7][1]) > 0.7


def test_one_shot_training_runs():
    data = phantoms(range(4))
    res = train_deepatlas(data[:1], [img for img, _ in data[1:]], tiny_config(), fast_settings(), progress=False)
    assert all(e["moving"] == 0 for e in res.history)  # the single atlas
    assert {e["phase"] for e in res.history} == {"registration", "segmentation"}
    assert all(np.isfinite(e["loss"]) for e in res.history)
    seg = [e for e in res.history if e["phase"] == "segmentation"]
    assert all(e["supervised"] is not None for e in seg)  # the atlas side is always labelled
    assert set(np.unique(segment(res.model, data[2][0]))) <= set(LABELS)


def test_same_seed_gives_identical_weights():
    data = phantoms(range(3), S=16)
    labelled, unlabelled = data[:2], [data[2][0]]
    states = [train_deepatlas(labelled, unlabelled, tiny_config(), fast_settings(steps=4, seed=seed),
                              progress=False).model.state_dict() for seed in (5, 5, 6)]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def two_channel_phantoms(seeds, S=20, without_t2w=()):
    """T1w + T2w blob phantoms; the images at positions ``without_t2w`` have a T2w of zeros (none)."""
    out = []
    for k, s in enumerate(seeds):
        img, lab = blob_phantom(s, S, jitter=2, radius_jitter=1.0)
        if k in without_t2w:
            img[1] = 0
        out.append((img, lab))
    return out


def test_t1w_t2w_training_with_modaug_and_a_missing_t2w():
    data = two_channel_phantoms(range(5), without_t2w=(1, 4))
    labelled, unlabelled = data[:3], [img for img, _ in data[3:]]
    cfg = tiny_config(in_channels=2, modalities=("T1w", "T2w"))
    settings = fast_settings(steps=60, phase_steps=10, modaug_prob=0.5)
    runs = [train_deepatlas(labelled, unlabelled, cfg, settings, progress=False) for _ in range(2)]
    a, b = (r.model.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)  # ModAug and the noise channels are seeded
    h = runs[0].history
    for phase in ("registration", "segmentation"):
        losses = [e["loss"] for e in h if e["phase"] == phase]
        assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < np.mean(losses[:5]), phase
    # the trained model registers with and without the T2w (noise in its place)
    (m, m_lab), (t, t_lab) = data[0], data[2]
    no_t2w = [np.stack([x[0], np.random.default_rng(9).standard_normal(x[0].shape, dtype=np.float32)])
              for x in (m, t)]
    for moving, target in ((m, t), no_t2w):
        out = register(runs[0].model, moving, target, moving_labels=m_lab)
        assert out.min_jacobian > 0 and out.labels.shape == t_lab.shape
    with pytest.raises(UsageError, match="modaug_prob"):
        fast_settings(modaug_prob=2.0)


def test_similarity_compares_only_the_channels_both_images_have():
    """The registration loss on ``channels=[0]`` is the one-channel loss of the T1w alone, whatever
    the networks saw (``inputs``) and whatever is in the T2w channel."""
    from dlf_bids.models.deepatlas_training import DeepAtlasLosses

    (m, _), (t, _) = two_channel_phantoms([0, 1], S=16)
    cfg2, cfg1 = tiny_config(in_channels=2), tiny_config(in_channels=1)
    model2 = DeepAtlas(cfg2)
    model1 = DeepAtlas(cfg1)
    x_m, x_t = (torch.from_numpy(v)[None] for v in (m, t))
    with torch.no_grad():
        _, terms2 = DeepAtlasLosses(cfg2).registration(model2, x_m, x_t, channels=[0])
        garbage = x_m.clone()
        garbage[:, 1] = torch.randn_like(garbage[:, 1]) * 100
        _, terms_garbage = DeepAtlasLosses(cfg2).registration(model2, garbage, x_t, channels=[0],
                                                              inputs=(x_m, x_t))
        _, terms1 = DeepAtlasLosses(cfg1).registration(model1, x_m[:, :1], x_t[:, :1])
    # an untrained registration net is the identity (test above): same warp for both models
    assert terms2["similarity"] == pytest.approx(terms1["similarity"], abs=1e-6)
    assert terms_garbage["similarity"] == pytest.approx(terms1["similarity"], abs=1e-6)


def test_training_refuses_bad_inputs():
    (img, lab), (img2, _) = phantoms([0, 1], S=16)
    cfg, s = tiny_config(), fast_settings(steps=1)
    with pytest.raises(UsageError, match="labelled"):
        train_deepatlas([], [img, img2], cfg, s, progress=False)
    with pytest.raises(UsageError, match="two images"):
        train_deepatlas([(img, lab)], [], cfg, s, progress=False)
    with pytest.raises(BadDataError, match="grid"):
        train_deepatlas([(img, lab)], [img2[:-1]], cfg, s, progress=False)
    with pytest.raises(BadDataError, match="17"):
        train_deepatlas([(img, np.where(lab == 2, 17, lab))], [img2], cfg, s, progress=False)
    with pytest.raises(BadDataError, match="unlabelled image 0: its first .T1w. channel is empty"):
        train_deepatlas([(img, lab)], [np.zeros_like(img2)], cfg, s, progress=False)
    with pytest.raises(UsageError):
        DeepAtlasTrainSettings(phase_steps=0)


def test_networks_import_no_pipeline_code():
    code = ("import sys, dlf_bids.models.deepatlas_training, dlf_bids.models.deepatlas_file, "
            "dlf_bids.models.deepatlas_refine; "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'nipype' or "
            "m.startswith(('dlf_bids.interfaces', 'dlf_bids.workflows'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------ model files
TABLE = LabelTable((Label(2, "Left-Blob", "LB", "#ff0000"), Label(41, "Right-Blob", "RB", "#00ff00")))


def _trained(steps=2) -> DeepAtlas:
    data = phantoms(range(2), S=16)
    return train_deepatlas(data[:1], [data[1][0]], tiny_config(), fast_settings(steps=steps), progress=False).model


def test_model_file_round_trip(tmp_path):
    model = _trained()
    path = save_deepatlas(tmp_path / "sub" / "deepatlas.pt", model,
                          {"labels": TABLE, "volume_shape": (16, 16, 16), "voxel_size": 2.0,
                           "train_settings": {"steps": 2, "phase_steps": (1, 2)}})
    assert [p.name for p in path.parent.iterdir()] == ["deepatlas.pt"]  # no temporary file left
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == DEEPATLAS_FORMAT_VERSION and raw["model_type"] == "deepatlas"
    loaded, info = load_deepatlas(path)
    assert not loaded.training and info.config == model.config
    assert info.labels[1]["name"] == "Right-Blob" and info.modalities == ["T1w"]
    assert info.volume_shape == (16, 16, 16) and info.voxel_size == 2.0 and len(info.sha256) == 64
    assert info.train_settings["phase_steps"] == [1, 2]
    (m, m_lab), (t, _) = phantoms([3, 4], S=16)
    a, b = register(model, m, t, m_lab), register(loaded, m, t, m_lab)
    assert a.ddf.any() and np.array_equal(a.ddf, b.ddf) and np.array_equal(a.labels, b.labels)
    assert np.array_equal(segment(model, t), segment(loaded, t))
    with pytest.raises(ValueError, match="do not match"):
        save_deepatlas(tmp_path / "bad.pt", model, {"labels": [Label(3, "x")] * 1 + [Label(41, "y")]})


class _RunsCode:
    """Unpickling this calls ``exec``: the way a crafted model file runs code on load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def test_model_file_refusals(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_deepatlas(tmp_path / "nope.pt")
    marker = tmp_path / "code-ran"
    torch.save({"format_version": 1, "model_type": "deepatlas", "state_dict": _RunsCode(marker)},
               tmp_path / "crafted.pt")
    with pytest.raises(BadDataError, match="refused"):
        load_deepatlas(tmp_path / "crafted.pt")
    assert not marker.exists()
    path = save_deepatlas(tmp_path / "m.pt", _trained(steps=1))
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "format_version": DEEPATLAS_FORMAT_VERSION + 1}, tmp_path / "newer.pt")
    with pytest.raises(BadDataError, match="format version"):
        load_deepatlas(tmp_path / "newer.pt")
    torch.save({**payload, "state_dict": dict(list(payload["state_dict"].items())[1:])}, tmp_path / "broken.pt")
    with pytest.raises(BadDataError, match="weights"):
        load_deepatlas(tmp_path / "broken.pt")
    dlf = DeepLabelFusion(DLFConfig(n_labels=3, n_modalities=1, wv_channels=(4, 8, 16),
                                     ft_channels=(4, 8, 16, 32)))
    save_model(tmp_path / "dlf.pt", dlf, {"labels": TABLE, "modalities": ["T1w"], "patch_size": (16, 16, 16)})
    with pytest.raises(BadDataError, match="not a DeepAtlas model"):
        load_deepatlas(tmp_path / "dlf.pt")


def test_registration_net_accepts_two_modalities():
    net = RegistrationNet(dataclasses.replace(tiny_config(), in_channels=2))
    ddf = net(torch.randn(2, 2, 16, 16, 16), torch.randn(2, 2, 16, 16, 16))
    assert ddf.shape == (2, 3, 16, 16, 16)
    with pytest.raises(ValueError, match="differ"):
        net(torch.randn(1, 2, 16, 16, 16), torch.randn(1, 2, 8, 16, 16))
