"""FreeSurfer subject → atlas library conversion (``dlf-bids-fs2atlas``) on real FreeSurfer data."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from dlf_bids.cli.fs2atlas import main
from dlf_bids.errors import EXIT_BAD_DATA, EXIT_MISSING_INPUT, EXIT_USAGE, BadDataError, UsageError
from dlf_bids.utils.atlas_library import load_atlas_library, write_library_description
from dlf_bids.utils.freesurfer import (
    atlas_id_from_folder,
    convert_freesurfer_subject,
    freesurfer_label_table,
    isotropic_grid,
)
from dlf_bids.utils.labels import Label, LabelTable

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FS_TRAINING = DATA / "fs-training"
FS_SUBJECTS = ["sub-01", "sub-02", "sub-03", "sub-04", "sub-06"]
MNE = DATA / "mne-sample"
MNE_ARGS = ["--t1", str(MNE / "sample_T1.mgz"), "--aseg", str(MNE / "sample_aseg.mgz")]
# Structures smaller than this (in mm^3) may vanish when nearest-neighbour resampled to 3 mm.
TINY_MM3 = 200
# Brain stem, hippocampi, thalami: off-centre structures, so a flipped axis would show.
LANDMARKS = (16, 17, 53, 10, 49)


def _need(*paths: Path) -> None:
    missing = [p for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"test data not available: {missing[0]}")


def _labels(path: Path) -> np.ndarray:
    return np.asanyarray(nb.load(path).dataobj)


def _centroids_mm(img: nb.spatialimages.SpatialImage, labels) -> np.ndarray:
    """World positions (mm) of the centroids of ``labels``' voxels, one row per label."""
    # Read once (each read decompresses the whole file); native C order makes argwhere fast.
    data = np.ascontiguousarray(np.asanyarray(img.dataobj), dtype=np.int32)
    ijk = [np.argwhere(data == label).mean(axis=0) for label in labels]
    return nb.affines.apply_affine(img.affine, np.array(ijk))


def _assert_same_landmarks(before, after, tolerance_mm: float = 1.5) -> None:
    shift = np.linalg.norm(_centroids_mm(before, LANDMARKS) - _centroids_mm(after, LANDMARKS), axis=1)
    assert np.all(shift < tolerance_mm), dict(zip(LANDMARKS, shift.round(2)))


@pytest.fixture(scope="module")
def library_3mm(tmp_path_factory):
    """mne-sample as it is, then two fs-training subjects at 3 mm cropped to the brain."""
    _need(MNE, FS_TRAINING / "sub-01", FS_TRAINING / "sub-02")
    root = tmp_path_factory.mktemp("fs") / "library"
    assert main([*MNE_ARGS, "--library", str(root)]) == 0
    with pytest.raises(BadDataError, match="at least 2"):
        load_atlas_library(root)
    code = main([str(FS_TRAINING / "sub-01"), str(FS_TRAINING / "sub-02"), "--library", str(root),
                 "--voxel-size", "3", "--brain-only"])
    assert code == 0
    return root


# --- look-up table ------------------------------------------------------------------------------

def test_lut_is_well_formed():
    table = freesurfer_label_table()
    indices = table.indices
    assert len(set(indices)) == len(indices) and 0 not in indices
    assert len({lab.name for lab in table.labels}) == len(indices)
    assert all(re.fullmatch(r"#[0-9a-f]{6}", lab.color) for lab in table.labels)
    # Spot checks against FreeSurferColorLUT.txt, to catch shifted rows.
    assert table.name_of(2) == "Left-Cerebral-White-Matter"
    assert table.name_of(42) == "Right-Cerebral-Cortex"
    assert table.name_of(255) == "CC_Anterior"
    assert {lab.index: lab.color for lab in table.labels}[17] == "#dcd814"


def test_lut_subset_and_unknown_index():
    assert freesurfer_label_table([0, 17, 53]).indices == (17, 53)
    with pytest.raises(BadDataError, match="999"):
        freesurfer_label_table([17, 999])


def test_lut_covers_all_test_data_labels():
    asegs = [FS_TRAINING / s / "aseg.mgz" for s in FS_SUBJECTS] + [MNE / "sample_aseg.mgz"]
    _need(*asegs)
    known = set(freesurfer_label_table().indices)
    for aseg in asegs:
        present = set(np.flatnonzero(np.bincount(_labels(aseg).ravel(order="K")))) - {0}
        assert present <= known, f"{aseg}: {sorted(present - known)}"


# --- conversion ---------------------------------------------------------------------------------

def test_library_of_three_atlases_loads(library_3mm):
    library = load_atlas_library(library_3mm)
    assert [a.atlas_id for a in library.atlases] == ["01", "02", "mnesample"]
    assert library.labels == freesurfer_label_table()


@pytest.mark.parametrize("subject", ["sub-01", "sub-02"])
def test_3mm_brain_only_atlas(library_3mm, subject):
    t1w = nb.load(library_3mm / subject / "anat" / f"{subject}_T1w.nii.gz")
    dseg = nb.load(library_3mm / subject / "anat" / f"{subject}_dseg.nii.gz")
    assert t1w.shape == dseg.shape and np.allclose(t1w.affine, dseg.affine)
    assert np.allclose(dseg.header.get_zooms()[:3], 3.0)
    assert np.allclose(np.linalg.norm(dseg.affine[:3, :3], axis=0), 3.0)
    # Cropped to the brain: below 256/3 voxels, but a brain is well over 40 x 3 mm wide.
    assert all(40 < n <= 86 for n in dseg.shape), dseg.shape
    assert dseg.get_data_dtype() == np.int16
    source = _labels(FS_TRAINING / subject / "aseg.mgz")
    values, counts = np.unique(source, return_counts=True)
    kept = set(np.unique(np.asanyarray(dseg.dataobj)).tolist())
    assert kept <= set(values.tolist())
    assert {int(v) for v, c in zip(values, counts) if c >= TINY_MM3} <= kept
    assert float(np.asanyarray(t1w.dataobj).min()) >= 0


def test_3mm_full_field_of_view_shape(tmp_path):
    _need(FS_TRAINING / "sub-03")
    atlas = convert_freesurfer_subject(FS_TRAINING / "sub-03" / "T1.mgz",
                                       FS_TRAINING / "sub-03" / "aseg.mgz",
                                       tmp_path, "03", voxel_size=3)
    img = nb.load(atlas.t1w)
    assert img.shape == (86, 86, 86)  # ceil(256 / 3)
    # Same orientation and centre as the 1 mm grid.
    source = nb.load(FS_TRAINING / "sub-03" / "T1.mgz")
    centre = lambda im: nb.affines.apply_affine(im.affine, (np.array(im.shape[:3]) - 1) / 2)
    assert np.allclose(centre(img), centre(source), atol=1e-3)
    assert np.allclose(img.affine[:3, :3] / 3, source.affine[:3, :3], atol=1e-5)


def test_isotropic_grid_keeps_exact_multiples():
    shape, affine = isotropic_grid((86, 86, 86), np.diag([3.0, 3.0, 3.0, 1.0]), 3.0)
    assert shape == (86, 86, 86) and np.allclose(affine, np.diag([3.0, 3.0, 3.0, 1.0]))


@pytest.mark.parametrize("subject, brain_only", [("mne-sample", False), ("sub-01", True)])
def test_world_coordinates_are_kept(tmp_path, subject, brain_only):
    """Without resampling, each label's centroid stays at the same world position (mm)."""
    if subject == "mne-sample":
        t1, aseg = MNE / "sample_T1.mgz", MNE / "sample_aseg.mgz"
    else:
        t1, aseg = FS_TRAINING / subject / "T1.mgz", FS_TRAINING / subject / "aseg.mgz"
    _need(t1, aseg)
    atlas = convert_freesurfer_subject(t1, aseg, tmp_path, "x", brain_only=brain_only)
    before, after = nb.load(aseg), nb.load(atlas.dseg)
    if brain_only:
        assert all(a < b for a, b in zip(after.shape, before.shape))
    _assert_same_landmarks(before, after)
    assert nb.load(atlas.t1w).shape == after.shape


def test_world_coordinates_after_3mm_resampling(library_3mm):
    before = nb.load(FS_TRAINING / "sub-01" / "aseg.mgz")
    after = nb.load(library_3mm / "sub-01" / "anat" / "sub-01_dseg.nii.gz")
    _assert_same_landmarks(before, after)


# --- command line -------------------------------------------------------------------------------

def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("dlf-bids-fs2atlas: error: ")
    return err


def test_unknown_label_exits_65(tmp_path, capsys):
    _need(MNE)
    aseg = nb.load(MNE / "sample_aseg.mgz")
    data = np.asanyarray(aseg.dataobj).astype(np.int32)
    data[40:42, 40:42, 40:42] = 999
    bad = tmp_path / "bad_aseg.mgz"
    nb.save(nb.MGHImage(data, aseg.affine), bad)
    library = tmp_path / "library"
    code = main(["--t1", str(MNE / "sample_T1.mgz"), "--aseg", str(bad), "--library", str(library),
                 "--atlas-id", "bad"])
    assert code == EXIT_BAD_DATA == 65
    assert "999" in _one_error_line(capsys)
    assert not library.exists()  # checked before anything is written


def test_refuses_to_overwrite(tmp_path, capsys):
    _need(MNE)
    library = tmp_path / "library"
    args = [*MNE_ARGS, "--library", str(library), "--atlas-id", "sub-sample"]
    assert main(args) == 0
    assert "sub-sample:" in capsys.readouterr().out
    t1w = library / "sub-sample" / "anat" / "sub-sample_T1w.nii.gz"
    stamp = t1w.stat().st_mtime_ns
    assert main(args) == EXIT_USAGE
    assert "--overwrite" in _one_error_line(capsys)
    assert t1w.stat().st_mtime_ns == stamp
    assert main([*args, "--overwrite"]) == 0


def test_finds_mri_folder_first(tmp_path, capsys):
    """recon-all layout: <subject>/mri/T1.mgz wins over a T1.mgz next to mri/."""
    _need(MNE)
    subject = tmp_path / "sub-bert_2"
    (subject / "mri").mkdir(parents=True)
    (subject / "mri" / "T1.mgz").symlink_to(MNE / "sample_T1.mgz")
    (subject / "mri" / "aseg.mgz").symlink_to(MNE / "sample_aseg.mgz")
    (subject / "T1.mgz").write_bytes(b"not an image")
    assert main([str(subject), "--library", str(tmp_path / "library")]) == 0
    assert capsys.readouterr().out.startswith("sub-bert2: ")
    assert (tmp_path / "library" / "sub-bert2" / "anat" / "sub-bert2_dseg.nii.gz").is_file()


def test_foreign_library_is_refused(tmp_path, capsys):
    _need(MNE)
    library = tmp_path / "library"
    write_library_description(library, "other", LabelTable((Label(2, "Something-Else"),)))
    assert main([*MNE_ARGS, "--library", str(library)]) == EXIT_BAD_DATA
    _one_error_line(capsys)


@pytest.mark.parametrize("argv, code", [
    (["--library", "lib"], EXIT_USAGE),  # no subject
    (["--t1", "T1.mgz", "--library", "lib"], EXIT_USAGE),  # --t1 without --aseg
    (["a", "b", "--atlas-id", "x", "--library", "lib"], EXIT_USAGE),
    (["--voxel-size", "abc", "x", "--library", "lib"], EXIT_USAGE),
    (["does-not-exist", "--library", "lib"], EXIT_MISSING_INPUT),
])
def test_usage_errors(tmp_path, monkeypatch, capsys, argv, code):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == code
    _one_error_line(capsys)
    assert not (tmp_path / "lib").exists()


def test_atlas_id_from_folder(tmp_path):
    assert atlas_id_from_folder("/data/fs/sub-01") == "01"
    assert atlas_id_from_folder("/data/fs/sub-01/mri") == "01"
    assert atlas_id_from_folder("/data/mne-sample/") == "mnesample"
    with pytest.raises(UsageError):
        atlas_id_from_folder("/data/sub-_-")
