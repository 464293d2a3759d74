"""Tests of Deep Label Fusion training (dlf_bids.models.training) and model files
(dlf_bids.models.model_file): loss decreases, seeding, augmentations, atlas sampling, label
mapping, model-file round trip, compatibility checks. Tiny networks and 16³ patches only."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import torch

from dlf_bids.errors import BadDataError, UsageError
from dlf_bids.models import DeepLabelFusion, DLFConfig, coordinate_maps, crop_patch, one_hot_labels
from dlf_bids.models.inference import normalise_patch, region_coordinates
from dlf_bids.models.model_file import (
    FORMAT_VERSION,
    NOISE,
    ModelInfo,
    check_model_fits,
    load_model,
    model_hash,
    save_model,
)
from dlf_bids.models.training import (
    TrainingCase,
    TrainSettings,
    _Augmenter,
    _prepare,
    histogram_shift,
    make_sample,
    modaug,
    select_atlases,
    split_cases,
    train_dlf,
)
from dlf_bids.utils.labels import Label, LabelTable
from conftest import blob_phantom  # the shared synthetic phantom

torch.set_num_threads(1)

TABLE = LabelTable((Label(2, "Left-Blob", "LB", "#ff0000"), Label(41, "Right-Blob", "RB", "#00ff00")))
CHANNEL_VALUES = np.array([0, 2, 41])
PATCH = (16, 16, 16)


def tiny_config(n_labels=3, n_modalities=2) -> DLFConfig:
    return DLFConfig(n_labels=n_labels, n_modalities=n_modalities, wv_channels=(4, 8, 16),
                     ft_channels=(4, 8, 16, 32))


def synth(seed: int, S=24):
    """The blob phantom of conftest, with larger jitter."""
    return blob_phantom(seed, S, jitter=2, radius_jitter=1.0)


def make_cases(n=3, S=24):
    data = [synth(s, S) for s in range(n)]
    cases = []
    for k in range(n):
        others = [j for j in range(n) if j != k]
        cases.append(TrainingCase(
            data[k][0], data[k][1],
            np.stack([np.roll(data[j][0], 1, axis=1) for j in others]),
            np.stack([np.roll(data[j][1], 1, axis=1) for j in others]),
            case_id=f"sub-{k:02d}", atlas_ids=[f"sub-{j:02d}" for j in others],
        ))
    return cases


def quick_settings(**kw) -> TrainSettings:
    base = dict(patch_size=PATCH, atlases_per_sample=2, epochs=1, iterations_per_epoch=3, lr=5e-3,
                lr_step=100, val_fraction=0.0, validation="none", seed=3)
    base.update(kw)
    return TrainSettings(**base)


# ------------------------------------------------------------------------------- training runs
def test_training_lowers_loss_and_saves_model(tmp_path):
    cases = make_cases(3)
    settings = quick_settings(epochs=5, iterations_per_epoch=5, val_fraction=0.34, validation="patches",
                              val_patches=1, affine_prob=0.2, elastic_prob=0.1, noise_prob=0.2)
    res = train_dlf(cases, TABLE, tiny_config(), settings, ["T1w", "T2w"], tmp_path / "m.pt", progress=False)
    losses = [h["loss"] for h in res.history]
    assert len(res.history) == 5
    assert losses[-1] < losses[0]
    assert all(h["val_dice"] is not None and 0.0 <= h["val_dice"] <= 1.0 for h in res.history)
    assert res.out_file.is_file()
    model, info = load_model(res.out_file)
    assert info.modaug is True and info.modalities == ["T1w", "T2w"]
    assert info.label_indices == (2, 41)
    assert info.train_settings["validation_cases"] and info.train_settings["training_cases"]
    assert len(info.train_settings["validation_cases"]) == 1
    assert info.train_settings["best_epoch"] == res.best_epoch
    assert set(info.training_atlases) <= {"sub-00", "sub-01", "sub-02"} and info.training_atlases
    assert info.dlf_config.labels == (0, 2, 41)


def test_same_seed_gives_identical_weights(tmp_path):
    cases = make_cases(2, S=16)
    settings = quick_settings(elastic_prob=0.3, affine_prob=0.3, histogram_shift_prob=0.5, flip_prob=0.3)
    states = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        res = train_dlf(cases, TABLE, tiny_config(), dataclasses.replace(settings, seed=seed),
                        ["T1w", "T2w"], tmp_path / f"{name}.pt", progress=False)
        states.append(res.model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_full_image_validation_and_best_epoch(tmp_path):
    cases = make_cases(2, S=(16, 16, 20))
    settings = quick_settings(epochs=2, iterations_per_epoch=2, val_fraction=0.5, validation="full",
                              modaug=True, modaug_prob=1.0)
    res = train_dlf(cases, TABLE, tiny_config(), settings, ["T1w", "T2w"], tmp_path / "m.pt", progress=True)
    dices = [h["val_dice"] for h in res.history]
    assert all(d is not None for d in dices)
    assert res.best_epoch == 1 + int(np.argmax(dices))
    assert [h["lr"] for h in res.history] == [5e-3, 5e-3]


def test_training_refuses_bad_inputs(tmp_path):
    cases = make_cases(2, S=16)
    cases[1].target_labels = cases[1].target_labels.copy()
    cases[1].target_labels[0, 0, 0] = 17
    with pytest.raises(BadDataError, match="17"):
        train_dlf(cases, TABLE, tiny_config(), quick_settings(), ["T1w", "T2w"], tmp_path / "m.pt", progress=False)
    cases = make_cases(2, S=16)
    cases[0].atlas_labels = cases[0].atlas_labels.copy()
    cases[0].atlas_labels[0, 1, 1, 1] = 99
    with pytest.raises(BadDataError, match="99"):
        train_dlf(cases, TABLE, tiny_config(), quick_settings(), ["T1w", "T2w"], tmp_path / "m.pt", progress=False)
    with pytest.raises(UsageError, match="label table"):
        train_dlf(make_cases(2, S=16), TABLE, tiny_config(n_labels=4), quick_settings(), ["T1w", "T2w"],
                  tmp_path / "m.pt", progress=False)
    with pytest.raises(UsageError, match="modalities"):
        train_dlf(make_cases(2, S=16), TABLE, tiny_config(), quick_settings(), ["T1w"], tmp_path / "m.pt",
                  progress=False)
    with pytest.raises(UsageError, match="multiple of 8"):
        train_dlf(make_cases(2, S=16), TABLE, tiny_config(), quick_settings(patch_size=(12, 16, 16)),
                  ["T1w", "T2w"], tmp_path / "m.pt", progress=False)
    assert not (tmp_path / "m.pt").exists()


# ------------------------------------------------------------------------------- augmentation
def test_modaug_replaces_one_modality_in_target_and_every_atlas():
    rng = np.random.default_rng(0)
    target = torch.full((2, 16, 16, 16), 5.0)
    atlases = torch.full((3, 2, 16, 16, 16), 7.0)
    t, a, c = modaug(target, atlases, rng, p=1.0)
    assert c in (0, 1)
    other = 1 - c
    assert torch.equal(t[other], target[other]) and torch.equal(a[:, other], atlases[:, other])
    assert torch.equal(target, torch.full((2, 16, 16, 16), 5.0))  # inputs untouched
    for x in [t[c], *a[:, c]]:
        assert abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1.0) < 0.1  # unit white noise
    assert not torch.equal(t[c], a[0, c]) and not torch.equal(a[0, c], a[1, c])  # own draw each
    # p=0: no-op; p=0.5: both channels and no-ops occur, roughly 25/25/50
    assert modaug(target, atlases, rng, p=0.0)[2] is None
    picks = [modaug(target[:, :2, :2, :2], atlases[:, :, :2, :2, :2], rng, p=0.5)[2] for _ in range(400)]
    assert 150 < picks.count(None) < 250 and picks.count(0) > 60 and picks.count(1) > 60
    # a single modality is never replaced
    assert modaug(target[:1], atlases[:, :1], rng, p=1.0)[2] is None


def test_histogram_shift_is_independent_per_image():
    rng = np.random.default_rng(1)
    aug = _Augmenter(quick_settings(), np.random.default_rng(2))
    base = torch.from_numpy(np.random.default_rng(3).uniform(1, 100, (2, 8, 8, 8)).astype(np.float32))
    atlases = base.unsqueeze(0).repeat(3, 1, 1, 1, 1)
    t, a = histogram_shift(base, atlases, aug.hist, rng, p=1.0)
    assert not torch.allclose(t, a[0])
    assert not torch.allclose(a[0], a[1]) and not torch.allclose(a[1], a[2])
    assert not torch.allclose(t[0], base[0])
    # intensity range kept (control points pinned at min and max)
    assert float(t.min()) == pytest.approx(float(base.min()), abs=1e-3)
    assert float(t.max()) == pytest.approx(float(base.max()), abs=1e-3)
    t0, a0 = histogram_shift(base, atlases, aug.hist, rng, p=0.0)
    assert torch.equal(t0, base) and torch.equal(a0, atlases)


def test_atlases_drawn_with_replacement():
    rng = np.random.default_rng(0)
    idx = select_atlases(2, 7, rng)
    assert len(idx) == 7 and set(idx.tolist()) == {0, 1}
    case = _prepare(make_cases(2, S=16)[0], 0, CHANNEL_VALUES, 2)
    assert case.atlas_images.shape[0] == 1
    smp = make_sample(case, quick_settings(atlases_per_sample=5), rng, None)
    assert smp["atlas_images"].shape == (5, 2, *PATCH)
    assert smp["atlas_idx"].shape == (5, *PATCH)
    assert torch.equal(smp["atlas_idx"][0], smp["atlas_idx"][4])  # the same atlas five times


def test_sample_coordinates_and_labels_follow_the_patch():
    case = _prepare(make_cases(2, S=24)[0], 0, CHANNEL_VALUES, 2)
    rng = np.random.default_rng(0)
    smp = make_sample(case, quick_settings(), rng, None, centre=(3, 20, 12), atlas_indices=[0])
    start = (0, 8, 4)  # centre - 8, moved inside the image
    assert torch.allclose(smp["coords"], crop_patch(coordinate_maps(case.shape), start, PATCH))
    assert torch.equal(smp["truth"], torch.from_numpy(crop_patch(case.truth, start, PATCH).astype(np.int64)))
    raw = torch.from_numpy(crop_patch(case.images, start, PATCH))
    assert torch.allclose(smp["target"], normalise_patch(raw))
    # region_coordinates continues the whole-image maps outside the image
    inside = region_coordinates((24, 24, 24), (2, 3, 4), (8, 8, 8))
    assert torch.allclose(inside, crop_patch(coordinate_maps((24, 24, 24)), (2, 3, 4), (8, 8, 8)))
    outside = region_coordinates((24, 24, 24), (-2, 0, 0), (4, 1, 1))
    assert torch.allclose(outside[0, :, 0, 0], torch.tensor([-2 / 12 - 1, -1 / 12 - 1, -1.0, 1 / 12 - 1]))


def test_spatial_augmentation_is_identical_for_all_channels():
    base = make_cases(2, S=24)[0]
    # atlases = copies of the target, labels = copies of the truth: after one shared
    # resampling they must still be copies of each other
    case = TrainingCase(base.target_images, base.target_labels,
                        np.stack([base.target_images] * 2), np.stack([base.target_labels] * 2), "x")
    prepared = _prepare(case, 0, CHANNEL_VALUES, 2)
    settings = quick_settings(affine_prob=0.0, elastic_prob=1.0, histogram_shift_prob=0.0, modaug=False,
                              noise_prob=0.0, flip_prob=0.5, rotate_degrees=15)
    rng = np.random.default_rng(5)
    aug = _Augmenter(settings, rng)
    smp = make_sample(prepared, settings, rng, aug, atlas_indices=[0, 1])
    plain = make_sample(prepared, settings, np.random.default_rng(5), None, atlas_indices=[0, 1])
    assert smp["target"].shape == (2, *PATCH) and smp["coords"].shape == (3, *PATCH)
    assert torch.equal(smp["atlas_idx"][0], smp["truth"]) and torch.equal(smp["atlas_idx"][1], smp["truth"])
    assert torch.allclose(smp["atlas_images"][0], smp["target"]) and torch.allclose(smp["atlas_images"][1], smp["target"])
    assert not torch.allclose(smp["coords"], plain["coords"])  # coordinates were deformed too
    assert set(torch.unique(smp["truth"]).tolist()) <= {0, 1, 2}  # nearest keeps label indices


def test_patch_larger_than_image_is_padded():
    case = _prepare(make_cases(2, S=(12, 20, 16))[0], 0, CHANNEL_VALUES, 2)
    settings = quick_settings(affine_prob=0.5, elastic_prob=0.0)
    rng = np.random.default_rng(0)
    smp = make_sample(case, settings, rng, _Augmenter(settings, rng))
    assert smp["target"].shape == (2, *PATCH) and smp["truth"].shape == PATCH


def test_split_cases_keeps_a_training_case():
    rng = np.random.default_rng(0)
    assert split_cases(1, 0.5, rng) == ([0], [])
    train, val = split_cases(2, 0.2, rng)
    assert len(train) == 1 and len(val) == 1
    train, val = split_cases(10, 0.2, rng)
    assert len(val) == 2 and sorted(train + val) == list(range(10))
    assert split_cases(3, 0.0, rng) == ([0, 1, 2], [])


# ------------------------------------------------------------------------------- model files
def _model(modaug=False, n_modalities=2, seed=0):
    torch.manual_seed(seed)
    return DeepLabelFusion(tiny_config(n_modalities=n_modalities))


META = {"labels": TABLE, "modalities": ["T1w", "T2w"], "patch_size": PATCH, "modaug": True,
        "training_atlases": ["sub-01", "sub-02"], "train_settings": {"lr": 5e-4, "patch_size": (16, 16, 16)}}


def test_model_file_round_trip(tmp_path):
    model = _model().eval()
    path = save_model(tmp_path / "sub" / "model.pt", model, META)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]  # no temporary file left
    raw = torch.load(path, weights_only=True)
    assert set(raw) >= {"format_version", "package_version", "dlf_config", "state_dict", "labels", "modalities",
                        "patch_size", "normalisation", "modaug", "training_atlases", "train_settings", "created"}
    assert raw["format_version"] == FORMAT_VERSION and raw["normalisation"] == "patch-zscore-nonzero"
    assert raw["labels"][1] == {"index": 41, "name": "Right-Blob", "abbreviation": "RB", "color": "#00ff00"}
    loaded, info = load_model(path)
    assert not loaded.training
    assert info.label_indices == (2, 41) and info.modalities == ["T1w", "T2w"] and info.modaug
    assert info.patch_size == PATCH and info.training_atlases == ["sub-01", "sub-02"]
    assert info.train_settings["patch_size"] == [16, 16, 16] and info.created
    assert info.label_table().name_of(41) == "Right-Blob"
    g = torch.Generator().manual_seed(0)
    t = torch.randn(1, 2, *PATCH, generator=g)
    a = torch.randn(1, 2, 2, *PATCH, generator=g)
    oh = one_hot_labels(torch.randint(0, 3, (1, 2, *PATCH), generator=g), 3, dim=2)
    c = coordinate_maps(PATCH).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(t, a, oh, c)["output"], loaded(t, a, oh, c)["output"])
    h = model_hash(path)
    assert h == model_hash(path) == info.sha256 and len(h) == 64
    with pytest.raises(ValueError):
        save_model(tmp_path / "bad.pt", model, {**META, "modalities": ["T1w"]})


def test_load_model_refusals(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(BadDataError, match="cannot be read"):
        load_model(junk)
    path = save_model(tmp_path / "m.pt", _model(), META)
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, tmp_path / "newer.pt")
    with pytest.raises(BadDataError, match="format version"):
        load_model(tmp_path / "newer.pt")
    payload["format_version"] = FORMAT_VERSION
    payload["state_dict"] = {k: v for k, v in list(payload["state_dict"].items())[1:]}
    torch.save(payload, tmp_path / "broken.pt")
    with pytest.raises(BadDataError, match="weights"):
        load_model(tmp_path / "broken.pt")
    del payload["labels"]
    torch.save(payload, tmp_path / "nolabels.pt")
    with pytest.raises(BadDataError, match="labels"):
        load_model(tmp_path / "nolabels.pt")


def _info(modaug: bool, modalities=("T1w", "T2w")) -> ModelInfo:
    return ModelInfo(format_version=1, package_version="0", dlf_config=tiny_config(n_modalities=len(modalities)),
                     labels=[{"index": 2, "name": "L"}, {"index": 41, "name": "R"}],
                     modalities=list(modalities), patch_size=PATCH, modaug=modaug)


def test_check_model_fits():
    # labels: the model must know every label of the library
    with pytest.raises(BadDataError, match="17"):
        check_model_fits(_info(False), [0, 2, 17, 41], ["T1w", "T2w"])
    plan = check_model_fits(_info(False), [2], ["T1w", "T2w", "FLAIR"])
    assert plan == ["T1w", "T2w"] and any("41" in w for w in plan.warnings)
    assert check_model_fits(_info(False), [2, 41], ["T1w", "T2w"]).warnings == []
    # a missing modality: refused unless ModAug or force
    with pytest.raises(BadDataError, match="T2w"):
        check_model_fits(_info(False), [2, 41], ["T1w"])
    plan = check_model_fits(_info(True), [2, 41], ["T1w"])
    assert plan == ["T1w", NOISE] and plan.noise_channels == [1] and plan.warnings == []
    plan = check_model_fits(_info(False), [2, 41], ["T1w"], force=True)
    assert plan == ["T1w", NOISE] and len(plan.warnings) == 1 and "T2w" in plan.warnings[0]
    for force in (False, True):
        with pytest.raises(BadDataError, match="none of the model"):
            check_model_fits(_info(True), [2, 41], ["FLAIR"], force=force)
    assert check_model_fits(_info(False, ("T1w",)), [2, 41], ["T1w", "T2w"]) == ["T1w"]
