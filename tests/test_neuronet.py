"""Tests of NeuroNet (dlf_bids.models.neuronet, .neuronet_training) and its protocols
(dlf_bids.models.protocols): shapes, the shared encoder, training on blob phantoms, sliding-window
prediction, seeding, model files and their refusals, protocol specs, aseg → tissue collapse.
Tiny networks, 16³ crops and 32³ phantoms only."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from dlf_bids.errors import BadDataError, UsageError
from dlf_bids.models.neuronet import NeuroNet, NeuroNetConfig, predict_volume, zscore_volume
from dlf_bids.models.neuronet_training import (
    CLASS_WEIGHTS,
    FORMAT_VERSION,
    NeuroNetExample,
    NeuroNetTrainSettings,
    class_weights,
    foreground_crop,
    load_neuronet,
    prepare_example,
    save_neuronet,
    settings_dict,
    train_neuronet,
)
from dlf_bids.models.protocols import (
    ASEG_TO_TISSUE,
    LabelRecipe,
    Protocol,
    builtin_protocol,
    collapse_labels,
    load_protocol,
)
from dlf_bids.utils.labels import Label, LabelTable
from conftest import SHARED_DATA, blob_phantom

torch.set_num_threads(1)

BLOBS = Protocol("blobs", LabelTable((Label(2, "Left-Blob", "LB"), Label(41, "Right-Blob", "RB"))),
                 LabelRecipe("labels", "reference"))
BRAIN = Protocol.from_dict({"name": "brain", "classes": [{"index": 1, "name": "Blob"}],
                            "labels": {"kind": "collapse", "source": "reference", "map": {"1": [2, 41]}}})
EXTRA = Protocol.from_dict({"name": "left", "classes": [{"index": 1, "name": "Left"}],
                            "labels": {"kind": "collapse", "source": "reference", "map": {"1": [2], "0": [41]}}})
CROP = (16, 16, 16)


def tiny_config(protocols=(BLOBS, BRAIN), in_channels=1, **kw) -> NeuroNetConfig:
    return NeuroNetConfig({p.name: p.n_classes for p in protocols}, in_channels=in_channels,
                          stem_channels=kw.pop("stem_channels", 4), widths=kw.pop("widths", (4, 8, 16)),
                          strides=kw.pop("strides", (1, 2, 2)), crop_size=CROP, **kw)


def example(seed: int, channels: int = 1) -> NeuroNetExample:
    img, lab = blob_phantom(seed, 32, jitter=2, radius_jitter=1.0)
    return NeuroNetExample(img[:channels], {p.name: p.make_label_map(lab) for p in (BLOBS, BRAIN)},
                           case_id=f"sub-{seed:02d}")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


# ------------------------------------------------------------------------------------ network
@pytest.mark.parametrize("protocols", [(BLOBS,), (BLOBS, BRAIN), (BLOBS, BRAIN, EXTRA)])
@pytest.mark.parametrize("in_channels", [1, 2])
def test_forward_gives_one_output_per_protocol(protocols, in_channels):
    model = NeuroNet(tiny_config(protocols, in_channels))
    out = model(torch.randn(2, in_channels, 16, 24, 8))
    assert list(out) == [p.name for p in protocols]
    for p in protocols:
        assert out[p.name].shape == (2, p.n_classes, 16, 24, 8)
    with pytest.raises(ValueError, match="multiple of 4"):
        model(torch.randn(1, in_channels, 16, 18, 8))
    with pytest.raises(ValueError, match="input must be"):
        model(torch.randn(1, 3 - in_channels, 16, 16, 16))


def test_encoder_is_shared_and_every_decoder_trains_it():
    model = NeuroNet(tiny_config((BLOBS, BRAIN, EXTRA)))
    encoder = {id(p) for m in (model.stem, model.scales) for p in m.parameters()}
    decoders = {name: {id(p) for p in d.parameters()} for name, d in model.decoders.items()}
    # one encoder: its parameters appear once, the decoders own none of them nor each other's
    assert len(encoder) + sum(map(len, decoders.values())) == len(list(model.parameters()))
    assert all(not (encoder & ids) for ids in decoders.values())
    x = torch.randn(1, 1, *CROP)
    for name in decoders:
        model.zero_grad(set_to_none=True)
        model(x)[name].square().mean().backward()
        assert model.stem.conv.weight.grad.abs().sum() > 0  # the gradient reaches the stem
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.scales[-1].parameters())
        for other, dec in model.decoders.items():
            if other != name:
                assert all(p.grad is None for p in dec.parameters())


def test_config_round_trip_and_checks():
    cfg = tiny_config(in_channels=2)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert NeuroNetConfig.from_dict(data) == cfg and list(data["protocol_classes"]) == ["blobs", "brain"]
    paper = NeuroNetConfig({"tissue": 4})
    assert (paper.stem_channels, paper.widths, paper.strides, paper.units_per_scale, paper.crop_size) == (
        16, (16, 32, 64, 128), (1, 2, 2, 2), 2, (128, 128, 128))
    for bad in ({"in_channels": 3}, {"crop_size": (18, 16, 16)}, {"protocol_classes": {"a-b": 3}},
                {"protocol_classes": {"a": 1}}, {"norm": "layer"}, {"units_per_scale": 0}, {"widths": (4, 8)}):
        with pytest.raises(ValueError):
            NeuroNetConfig(**{**cfg.to_dict(), **bad})
    with pytest.raises(ValueError, match="unknown"):
        NeuroNetConfig.from_dict({**data, "dropout": 0.1})


def test_zscore_is_over_the_whole_volume():
    img = np.stack([np.arange(64, dtype=np.float32).reshape(4, 4, 4), np.full((4, 4, 4), 7.0, np.float32)])
    z = zscore_volume(img)
    assert abs(z[0].mean()) < 1e-6 and abs(z[0].std() - 1) < 1e-5
    assert np.array_equal(z[1], np.zeros((4, 4, 4)))  # constant channel: centred, not divided by 0


# ------------------------------------------------------------------------------- prediction
def test_sliding_window_equals_a_whole_volume_pass_when_one_window_covers_it():
    model = NeuroNet(tiny_config()).eval()
    img, _ = blob_phantom(5, (16, 24, 16))
    pred = predict_volume(model, img[:1], roi_size=(16, 24, 16))
    with torch.no_grad():
        logits = model(torch.from_numpy(zscore_volume(img[:1]))[None])
    for name, p in pred.items():
        want = torch.softmax(logits[name], dim=1)[0].numpy()
        np.testing.assert_allclose(p.probabilities, want, atol=1e-6)
        assert np.array_equal(p.labels, want.argmax(0))


def test_sliding_window_keeps_the_input_grid():
    model = NeuroNet(tiny_config((BLOBS, BRAIN), in_channels=2)).eval()
    img = np.random.default_rng(0).normal(size=(2, 20, 37, 11)).astype(np.float32)
    for overlap in (0.5, 0.25):
        pred = predict_volume(model, img, roi_size=CROP, overlap=overlap,
                              channel_values={"blobs": [0, 2, 41], "brain": [0, 1]})
        assert list(pred) == ["blobs", "brain"]
        assert pred["blobs"].probabilities.shape == (3, 20, 37, 11)
        assert pred["brain"].labels.shape == (20, 37, 11)
        np.testing.assert_allclose(pred["blobs"].probabilities.sum(0), 1.0, atol=1e-5)
        assert set(np.unique(pred["blobs"].labels)) <= {0, 2, 41}


# --------------------------------------------------------------------------------- training
def test_training_lowers_the_loss_and_beats_chance_on_held_out_phantoms():
    protocols = (BLOBS, BRAIN)
    cfg = tiny_config(protocols, stem_channels=8, widths=(8, 16), strides=(1, 2))
    settings = NeuroNetTrainSettings(iterations=120, batch_size=2, lr=1e-2, dice_weight=1.0, seed=1)
    result = train_neuronet([example(s) for s in range(4)], protocols, cfg, settings, progress=False)
    loss = [h["loss"] for h in result.history]
    assert len(loss) == 120 and set(result.history[0]["losses"]) == {"blobs", "brain"}
    assert np.mean(loss[-10:]) < 0.5 * np.mean(loss[:10])
    assert not result.model.training and not result.modaug  # one channel: nothing to drop
    values = {p.name: p.channel_values for p in protocols}
    for seed in (20, 21):  # never trained on
        img, lab = blob_phantom(seed, 32, jitter=2, radius_jitter=1.0)
        pred = predict_volume(result.model, img[:1], channel_values=values)
        for value in (2, 41):
            truth = lab == value
            # chance: labelling voxels at random with the class's frequency gives Dice ~ its
            # volume fraction (~2 % here); the trained network must find each blob
            assert dice(pred["blobs"].labels == value, truth) > max(0.6, 10 * truth.mean())
        assert dice(pred["brain"].labels == 1, lab > 0) > 0.8


def test_same_seed_gives_identical_weights_with_modaug():
    cfg = tiny_config(in_channels=2)
    examples = [example(s, channels=2) for s in range(2)]
    runs = [train_neuronet(examples, (BLOBS, BRAIN), cfg, NeuroNetTrainSettings(iterations=3, seed=s),
                           progress=False) for s in (4, 4, 5)]
    assert runs[0].modaug
    a, b, c = (r.model.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert [h["loss"] for h in runs[0].history] == [h["loss"] for h in runs[1].history]


def test_training_refuses_bad_inputs():
    cfg = tiny_config()
    ok = example(0)
    with pytest.raises(UsageError, match="do not match"):
        train_neuronet([ok], (BRAIN, BLOBS), cfg, NeuroNetTrainSettings(iterations=1), progress=False)
    missing = NeuroNetExample(ok.image, {"blobs": ok.labels["blobs"]}, case_id="sub-x")
    with pytest.raises(BadDataError, match="sub-x: no label map for protocol brain"):
        train_neuronet([missing], (BLOBS, BRAIN), cfg, NeuroNetTrainSettings(iterations=1), progress=False)
    wrong = NeuroNetExample(ok.image, {"blobs": ok.labels["blobs"] + 1, "brain": ok.labels["brain"]})
    with pytest.raises(BadDataError, match="not in the label table"):
        train_neuronet([wrong], (BLOBS, BRAIN), cfg, NeuroNetTrainSettings(iterations=1), progress=False)
    with pytest.raises(UsageError):
        NeuroNetTrainSettings(iterations=0)
    with pytest.raises(UsageError, match="foreground_ratio"):
        NeuroNetTrainSettings(foreground_ratio=1.5)


def test_foreground_crops_hold_the_labelled_voxel_and_stay_inside():
    shape, crop = (40, 30, 20), (16, 16, 16)
    rng = np.random.default_rng(0)
    for voxel in [(0, 0, 0), (39, 29, 19), (20, 3, 10), (7, 15, 18)]:
        foreground = np.array([np.ravel_multi_index(voxel, shape)])
        region = foreground_crop(shape, crop, foreground, rng)
        assert all(r.start <= v < r.stop and 0 <= r.start and r.stop <= n and r.stop - r.start == k
                   for r, v, n, k in zip(region, voxel, shape, crop))
    # an interior voxel is the crop's centre
    region = foreground_crop(shape, crop, np.array([np.ravel_multi_index((20, 15, 10), shape)]), rng)
    assert [r.start for r in region] == [12, 7, 2]


def test_inverse_sqrt_class_weights_temper_the_frequency_and_keep_the_mean_at_one():
    lab = np.zeros(8000, np.int16)  # background 90 %, blob 41 9 %, blob 2 1 % (no padding: >= CROP)
    lab[:720], lab[720:800] = 41, 2
    lab = lab.reshape(20, 20, 20)
    ex = NeuroNetExample(np.zeros((20, 20, 20), np.float32), {p.name: p.make_label_map(lab) for p in (BLOBS, BRAIN)})
    prepared = prepare_example(ex, 0, (BLOBS, BRAIN), tiny_config())
    w = class_weights([prepared.labels["blobs"]] * 2, 3).numpy()  # channels: background, 2, 41
    freq = np.array([0.9, 0.01, 0.09])
    np.testing.assert_allclose((freq * w).sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(w / w[0], np.sqrt(0.9 / freq), rtol=1e-5)
    # a class no training image holds gets the rarest present class's weight
    lab[lab == 2] = 0
    ex = NeuroNetExample(ex.image, {p.name: p.make_label_map(lab) for p in (BLOBS, BRAIN)})
    w = class_weights([prepare_example(ex, 0, (BLOBS, BRAIN), tiny_config()).labels["blobs"]], 3).numpy()
    assert w[1] == w[2] > w[0]
    with pytest.raises(UsageError, match="class_weights"):
        NeuroNetTrainSettings(class_weights="inverse")


def test_the_command_line_offers_exactly_the_class_weights_training_knows():
    # the parser stays torch-free, so it spells the choices itself; this ties them to CLASS_WEIGHTS
    from dlf_bids.cli.train_neuronet import build_parser

    action = next(a for a in build_parser()._actions if a.dest == "class_weights")
    assert sorted(action.choices) == sorted(CLASS_WEIGHTS) and action.default in CLASS_WEIGHTS


# ------------------------------------------------------------------------------ model files
def _saved(tmp_path):
    model = NeuroNet(tiny_config(in_channels=2)).eval()
    settings = NeuroNetTrainSettings(iterations=5)
    path = save_neuronet(tmp_path / "m" / "neuronet.pt", model, (BLOBS, BRAIN), ["T1w", "T2w"], modaug=True,
                         train_settings=settings_dict(settings, [{"iteration": 1, "loss": 0.5}]))
    return model, path


def test_model_file_round_trip(tmp_path):
    model, path = _saved(tmp_path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["neuronet.pt"]  # no temporary file left
    loaded, info = load_neuronet(path)
    assert not loaded.training and info.config == model.config and info.modaug
    assert info.protocols == [BLOBS, BRAIN] and info.modalities == ["T1w", "T2w"]
    assert info.protocols[0].classes.name_of(41) == "Right-Blob"
    assert set(info.versions) == {"dlf_bids", "torch", "monai"} and info.created and len(info.sha256) == 64
    assert info.train_settings["history"] == [{"iteration": 1, "loss": 0.5}]
    assert list(info.channel_values["blobs"]) == [0, 2, 41]
    x = torch.randn(1, 2, *CROP)
    with torch.no_grad():
        want, got = model(x), loaded(x)
    assert all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(ValueError, match="modalities"):
        save_neuronet(tmp_path / "bad.pt", model, (BLOBS, BRAIN), ["T1w"])
    with pytest.raises(ValueError, match="do not match"):
        save_neuronet(tmp_path / "bad.pt", model, (BLOBS,), ["T1w", "T2w"])


class _RunsCode:
    """Unpickling this calls ``exec``: the way a crafted model file runs code on load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def test_crafted_or_newer_model_files_are_refused(tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.pt"
    torch.save({"format": "dlf-bids NeuroNet", "format_version": 1, "state_dict": _RunsCode(marker)}, crafted)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's switch must not reach us
    with pytest.raises(BadDataError, match="refused: it would run or import Python code"):
        load_neuronet(crafted)
    assert not marker.exists()

    _, path = _saved(tmp_path)
    payload = torch.load(path, weights_only=True)
    for change, message in (({"format_version": FORMAT_VERSION + 1}, "format version 2"),
                            ({"format": None}, "not a dlf-bids NeuroNet"),
                            ({"normalisation": "patch-zscore-nonzero"}, "normalisation"),
                            ({"protocols": payload["protocols"][:1]}, "invalid metadata"),
                            ({"state_dict": dict(list(payload["state_dict"].items())[1:])}, "weights")):
        torch.save({**payload, **change}, tmp_path / "changed.pt")
        with pytest.raises(BadDataError, match=message):
            load_neuronet(tmp_path / "changed.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(BadDataError, match="cannot be read"):
        load_neuronet(tmp_path / "junk.pt")
    with pytest.raises(UsageError, match="does not exist"):
        load_neuronet(tmp_path / "none.pt")


# -------------------------------------------------------------------------------- protocols
def test_protocol_spec_round_trip(tmp_path):
    for protocol in (builtin_protocol("tissue"), builtin_protocol("aseg"), BLOBS, BRAIN, EXTRA):
        path = tmp_path / f"{protocol.name}.json"
        path.write_text(json.dumps(protocol.to_dict()))
        assert load_protocol(path) == protocol
    # YAML, classes from a dseg.tsv beside the file, an Atropos recipe
    (tmp_path / "tissue_dseg.tsv").write_text("index\tname\n1\tGM\n2\tWM\n3\tCSF\n")
    (tmp_path / "atropos.yaml").write_text(
        "name: atroposTissue\nclasses: tissue_dseg.tsv\n"
        "labels:\n  kind: atropos\n  map: {3: [1], 1: [2], 2: [3]}  # Atropos: dark to bright\n")
    atropos = load_protocol(tmp_path / "atropos.yaml")
    assert atropos.classes.indices == (1, 2, 3) and atropos.recipe.source == "atropos"
    assert atropos.make_label_map(np.array([0, 1, 2, 3])).tolist() == [0, 3, 1, 2]
    for bad in ({"kind": "collapse", "source": "multiatlas"}, {"kind": "labels", "map": {"1": [2]}},
                {"kind": "segment"}, {"kind": "labels", "source": "internet"},
                {"kind": "collapse", "map": {"7": [2]}}):
        with pytest.raises(BadDataError, match="invalid specification"):
            Protocol.from_dict({**BRAIN.to_dict(), "labels": bad})
    with pytest.raises(BadDataError, match="alphanumeric"):
        Protocol.from_dict({**BRAIN.to_dict(), "name": "my tissue"})


def test_builtin_protocols():
    tissue, aseg = builtin_protocol("tissue"), builtin_protocol("aseg")
    assert [(lab.index, lab.abbreviation) for lab in tissue.classes.labels] == [(1, "GM"), (2, "WM"), (3, "CSF")]
    assert tissue.recipe.kind == "collapse" and tissue.recipe.source == "multiatlas"
    # the collapse covers every label of the aseg table, each exactly once
    listed = [v for values in ASEG_TO_TISSUE.values() for v in values]
    assert sorted(listed) == sorted(aseg.classes.indices) and len(listed) == len(set(listed)) == 45
    assert aseg.recipe.kind == "labels" and aseg.n_classes == 46
    with pytest.raises(ValueError, match="built-in"):
        builtin_protocol("fast")


def test_collapse_of_real_aseg_values():
    aseg = np.array([[0, 2, 3, 4, 7, 8, 10, 16, 17, 24, 41, 42, 43, 47, 251, 255, 31, 77, 85]])
    want = [[0, 2, 1, 3, 2, 1, 1, 2, 1, 3, 2, 1, 3, 1, 2, 2, 3, 2, 2]]
    assert collapse_labels(aseg, ASEG_TO_TISSUE).tolist() == want
    assert builtin_protocol("tissue").make_label_map(aseg).tolist() == want
    assert collapse_labels(aseg, ASEG_TO_TISSUE).dtype == np.int16
    with pytest.raises(BadDataError, match="1000 are not covered"):
        collapse_labels(np.array([0, 3, 1000]), ASEG_TO_TISSUE)
    with pytest.raises(BadDataError, match="-1 are not covered"):  # the sorting path
        collapse_labels(np.array([0, 3, -1]), ASEG_TO_TISSUE)
    assert collapse_labels(np.array([[100000, 0]]), {5: [100000]}).tolist() == [[5, 0]]
    assert collapse_labels(np.array([[7, 0]]), {5: [7], 2: [-3]}).tolist() == [[5, 0]]
    with pytest.raises(BadDataError, match="value.s. 5 are not covered"):  # -3 is not index -3 of a table
        collapse_labels(np.array([7, 0, 5]), {5: [7], 2: [-3]})
    with pytest.raises(ValueError, match="both"):
        collapse_labels(np.array([3]), {1: [3], 2: [3]})
    with pytest.raises(BadDataError, match="1000 that are not in the label table"):
        builtin_protocol("aseg").make_label_map(np.array([0, 2, 1000]))


def test_collapse_of_a_real_aseg_volume():
    path = SHARED_DATA / "fs-training" / "sub-01" / "aseg.mgz"
    if not path.is_file():
        pytest.skip(f"shared test data not found at {path}")
    import nibabel as nb

    aseg = np.asarray(nb.load(path).dataobj)
    tissue = builtin_protocol("tissue").make_label_map(aseg)
    # every voxel moves to the class its aseg label is listed under: per-class counts add up
    counts = np.bincount(aseg.ravel(), minlength=256)
    tissue_counts = np.bincount(tissue.ravel(), minlength=4)
    for cls, values in ASEG_TO_TISSUE.items():
        assert tissue_counts[cls] == counts[values].sum()
    assert tissue_counts[0] == counts[0]
    gm, wm, csf = tissue_counts[1:]
    assert gm > wm > csf > 0  # an adult brain: more grey than white matter, little ventricular CSF


def test_networks_do_not_import_nipype():
    code = ("import sys; import dlf_bids.models.neuronet, dlf_bids.models.neuronet_training, "
            "dlf_bids.models.protocols, dlf_bids.teachers, dlf_bids.neuronet_segmentation; "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'nipype' or "
            "m.startswith(('dlf_bids.interfaces', 'dlf_bids.workflows'))]; print(bad); sys.exit(bool(bad))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_patch_placement_is_shared_with_dlf_and_pads_short_axes():
    from dlf_bids.models.inference import centred_patch_start, pad_amounts, random_voxel

    # inside, at an edge, and on an axis shorter than the patch (DLF's small images): the start
    # there is minus the padding inference puts before the image
    assert centred_patch_start((20, 0, 5), (16, 16, 16), (40, 30, 10)) == [12, 0, -3]
    assert pad_amounts((40, 30, 10), (16, 16, 16))[2] == (3, 3)
    rng = np.random.default_rng(1)
    voxels = {random_voxel(np.array([5, 77]), (4, 5, 6), rng) for _ in range(50)}
    assert voxels == {(0, 0, 5), (2, 2, 5)}
