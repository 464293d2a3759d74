"""The demo data generator: layout, determinism, geometry, plausible anatomy, valid BIDS."""

import json
import shutil
import subprocess

import nibabel as nb
import numpy as np
import pytest

from dlf_bids.utils.atlas_library import load_atlas_library
from dlf_bids.utils.demo_data import (
    DEMO_LABELS, LEFT_CSF, LEFT_GM, LEFT_WM, RIGHT_CSF, RIGHT_GM, RIGHT_WM, REORIENTED_AXCODES,
    DemoData, demo_label_table, make_demo_data,
)

SUBJECTS = ("01", "02", "03")
ATLASES = ("a01", "a02", "a03", "a04")
GM, WM, CSF = (LEFT_GM, RIGHT_GM), (LEFT_WM, RIGHT_WM), (LEFT_CSF, RIGHT_CSF)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> DemoData:
    """The default demo (3 subjects, 4 atlases, seed 0, 2 mm), made once for the module."""
    return make_demo_data(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def small_same_seed(tmp_path_factory) -> DemoData:
    """Fewer subjects and atlases, same seed: its sub-01 and a01/a02 must equal the default's."""
    return make_demo_data(tmp_path_factory.mktemp("same"), n_subjects=1, n_atlases=2)


@pytest.fixture(scope="module")
def other_seed(tmp_path_factory) -> DemoData:
    """Another seed, with an explicit T2w pattern (only sub-02)."""
    return make_demo_data(tmp_path_factory.mktemp("other"), n_subjects=2, n_atlases=2, seed=1,
                          t2w_subjects=[1])


def _data(path):
    return np.asanyarray(nb.load(path).dataobj)


def _anat(demo, sub, suffix):
    return demo.bids_dir / f"sub-{sub}" / "anat" / f"sub-{sub}_{suffix}.nii.gz"


def _truth(demo, sub):
    return demo.truth_dir / f"sub-{sub}_dseg.nii.gz"


def _atlas(demo, atlas_id, suffix):
    return demo.atlas_dir / f"sub-{atlas_id}" / "anat" / f"sub-{atlas_id}_{suffix}.nii.gz"


def _volumes_ml(path) -> dict[int, float]:
    img = nb.load(path)
    counts = np.bincount(np.asanyarray(img.dataobj).ravel().astype(int), minlength=7)
    voxel_ml = abs(np.linalg.det(img.affine[:3, :3])) / 1000.0
    return {index: counts[index] * voxel_ml for index in DEMO_LABELS.indices}


# --- arguments ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"n_atlases": 1}, {"n_subjects": 0}, {"voxel_size": 0}, {"t2w_subjects": [3]},
])
def test_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_demo_data(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())  # checked before anything is written


# --- layout -------------------------------------------------------------------------------------

def test_layout(demo):
    assert demo.bids_dir.name == "bids" and demo.atlas_dir.name == "atlases"
    assert demo.truth_dir.name == "truth"
    for name in ("dataset_description.json", "README", "participants.tsv", "participants.json"):
        assert (demo.bids_dir / name).is_file()
    desc = json.loads((demo.bids_dir / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] == "1.10.0" and desc["DatasetType"] == "raw"
    assert desc["Name"] and desc["License"] and desc["Authors"]
    readme = (demo.bids_dir / "README").read_text()
    assert "ICBM152" in readme and "2009a" in readme and "nilearn" in readme
    participants = (demo.bids_dir / "participants.tsv").read_text().split()
    assert participants == ["participant_id"] + [f"sub-{s}" for s in SUBJECTS]
    for sub in SUBJECTS:
        assert _anat(demo, sub, "T1w").is_file()
        assert _anat(demo, sub, "T1w").with_suffix("").with_suffix(".json").is_file()
        assert _truth(demo, sub).is_file()
    truth_files = sorted(p.name for p in demo.truth_dir.iterdir())
    assert truth_files == [f"sub-{s}_dseg.nii.gz" for s in SUBJECTS]
    assert not list(demo.bids_dir.rglob("*dseg*"))  # the truth stays out of the BIDS dataset


def test_images_have_valid_headers(demo):
    paths = [_anat(demo, s, "T1w") for s in SUBJECTS] + [_truth(demo, s) for s in SUBJECTS]
    for path in paths:
        img = nb.load(path)
        assert img.ndim == 3
        assert img.get_data_dtype() in (np.int16, np.float32)
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        assert img.header.get_xyzt_units()[0] == "mm"
        assert np.allclose(np.abs(img.header.get_zooms()), 2.0)


def test_t2w_pattern_default(demo):
    assert [_anat(demo, s, "T2w").is_file() for s in SUBJECTS] == [True, False, True]
    for sub in ("01", "03"):
        t1w, t2w = nb.load(_anat(demo, sub, "T1w")), nb.load(_anat(demo, sub, "T2w"))
        assert t2w.shape == t1w.shape and np.allclose(t2w.affine, t1w.affine)
    assert all(_atlas(demo, a, "T2w").is_file() for a in ATLASES)


def test_t2w_pattern_explicit(other_seed):
    assert not _anat(other_seed, "01", "T2w").exists()
    assert _anat(other_seed, "02", "T2w").is_file()


def test_atlas_library_loads(demo):
    library = load_atlas_library(demo.atlas_dir)  # runs check_atlas on every atlas
    assert tuple(a.atlas_id for a in library.atlases) == ATLASES
    assert library.has_t2w
    assert library.labels.indices == demo_label_table().indices == (1, 2, 3, 4, 5, 6)
    assert [lab.name for lab in library.labels.labels] == [lab.name for lab in DEMO_LABELS.labels]


# --- determinism --------------------------------------------------------------------------------

def test_same_seed_gives_identical_images(demo, small_same_seed):
    # Subjects and atlases are keyed by index, so a smaller demo repeats the first ones exactly.
    pairs = [(_anat(demo, "01", s), _anat(small_same_seed, "01", s)) for s in ("T1w", "T2w")]
    pairs.append((_truth(demo, "01"), _truth(small_same_seed, "01")))
    pairs += [(_atlas(demo, a, s), _atlas(small_same_seed, a, s))
              for a in ("a01", "a02") for s in ("T1w", "T2w", "dseg")]
    for ours, theirs in pairs:
        a, b = _data(ours), _data(theirs)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), ours.name
        assert np.array_equal(nb.load(ours).affine, nb.load(theirs).affine)


def test_different_seed_gives_different_images(demo, other_seed):
    for path_of in (lambda d: _anat(d, "01", "T1w"), lambda d: _truth(d, "01"),
                    lambda d: _atlas(d, "a01", "T1w"), lambda d: _atlas(d, "a01", "dseg")):
        assert not np.array_equal(_data(path_of(demo)), _data(path_of(other_seed)))


def test_subjects_and_atlases_differ(demo):
    images = [_data(_truth(demo, s)) for s in ("01", "03")]
    images += [_data(_atlas(demo, a, "dseg")) for a in ATLASES]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert not np.array_equal(images[i], images[j])


# --- geometry and anatomy -----------------------------------------------------------------------

def test_reoriented_subject(demo):
    codes = {s: nb.aff2axcodes(nb.load(_anat(demo, s, "T1w")).affine) for s in SUBJECTS}
    assert codes["01"] == codes["03"] == ("R", "A", "S")
    assert codes["02"] == REORIENTED_AXCODES
    for sub in SUBJECTS:  # the truth lies on the T1w grid, in the same voxel order
        t1w, truth = nb.load(_anat(demo, sub, "T1w")), nb.load(_truth(demo, sub))
        assert truth.shape == t1w.shape and np.allclose(truth.affine, t1w.affine)


def test_hemispheres_are_on_their_side_in_world_space(demo):
    # Holds for the re-oriented subject only if its affine and voxel order agree.
    for path in [_truth(demo, s) for s in SUBJECTS] + [_atlas(demo, a, "dseg") for a in ATLASES]:
        img = nb.load(path)
        data = np.asanyarray(img.dataobj)
        for left, right in (GM, WM, CSF):
            x_left = nb.affines.apply_affine(img.affine, np.argwhere(data == left))[:, 0]
            x_right = nb.affines.apply_affine(img.affine, np.argwhere(data == right))[:, 0]
            assert np.median(x_left) < -10 < 10 < np.median(x_right), path.name


def test_label_volumes_consistent_and_plausible(demo):
    paths = [_truth(demo, s) for s in SUBJECTS] + [_atlas(demo, a, "dseg") for a in ATLASES]
    volumes = np.array([[v[i] for i in DEMO_LABELS.indices] for v in map(_volumes_ml, paths)])
    assert (volumes > 0).all()  # every label in every image
    mean = volumes.mean(axis=0)
    assert (np.abs(volumes - mean) <= 0.25 * mean).all()  # same anatomy, random warps
    brain = volumes.sum(axis=1)
    assert ((1000 < brain) & (brain < 2500)).all()  # ml; the MNI brain is about 1.9 l
    by_tissue = {name: volumes[:, [i - 1 for i in pair]].sum(axis=1) / brain
                 for name, pair in (("GM", GM), ("WM", WM), ("CSF", CSF))}
    assert ((0.3 < by_tissue["GM"]) & (by_tissue["GM"] < 0.75)).all()
    assert ((0.2 < by_tissue["WM"]) & (by_tissue["WM"] < 0.6)).all()
    assert ((0.02 < by_tissue["CSF"]) & (by_tissue["CSF"] < 0.3)).all()


def test_tissue_contrast(demo):
    truth = _data(_truth(demo, "01"))
    t1w, t2w = _data(_anat(demo, "01", "T1w")), _data(_anat(demo, "01", "T2w"))

    def median(image, labels):
        return np.median(image[np.isin(truth, labels)])

    assert median(t1w, WM) > median(t1w, GM) > median(t1w, CSF) > median(t1w, [0])
    assert median(t2w, CSF) > median(t2w, GM) > median(t2w, WM) > median(t2w, [0])


# --- BIDS validity ------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("bids-validator-deno") is None,
                    reason="bids-validator-deno is not installed")
def test_bids_validator_finds_no_errors(demo):
    run = subprocess.run(["bids-validator-deno", str(demo.bids_dir), "--format", "json"],
                         capture_output=True, text=True, timeout=300)
    report = json.loads(run.stdout)
    errors = [issue for issue in report["issues"]["issues"] if issue["severity"] == "error"]
    assert not errors, json.dumps(errors, indent=1)[:3000]
    assert sorted(report["summary"]["subjects"]) == list(SUBJECTS)
