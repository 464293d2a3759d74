"""Bad input images and filters: one clear line naming the file, a documented exit code, nothing
written into bids_dir, and the other participants still processed."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from dlf_bids.cli.participant import check_input, select_inputs
from dlf_bids.config import Config
from dlf_bids.errors import EXIT_BAD_DATA, EXIT_USAGE, BadDataError, UsageError
from dlf_bids.utils.bids import AnatomicalInput, collect_anatomicals, load_filters, load_layout
from dlf_bids.utils.images import (MAX_VOXELS, check_anatomical, check_t2w, fov_overlap,
                                   world_box)

from conftest import listing, the_error_line, tiny_nifti


def _with_forms(img: nb.Nifti1Image, sform: np.ndarray, qform: np.ndarray | None = None):
    """``img`` with its sform and qform set (code 1) to the given affines."""
    img.set_sform(sform, code=1)
    img.set_qform(sform if qform is None else qform, code=1)
    return img


def _image(shape=(8, 8, 8), affine=None, data=None) -> nb.Nifti1Image:
    """A valid image (random content) on ``affine`` (2 mm identity grid by default)."""
    img = tiny_nifti(shape=shape)
    if data is not None:
        img = nb.Nifti1Image(data, img.affine)
    return _with_forms(img, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine)


def _save(path: Path, img) -> Path:
    nb.save(img, path)
    return path


def _reloaded_forms(path: Path):
    """(sform, qform) as stored in the file, after float32 rounding."""
    header = nb.load(path).header
    return header.get_sform(), header.get_qform()


def _truncated_gzip_stream(path: Path) -> Path:
    """A valid gzip stream holding a valid header but only half the voxels."""
    raw = gzip.decompress(_save(path, _image(shape=(20, 20, 20))).read_bytes())
    path.write_bytes(gzip.compress(raw[:len(raw) // 2]))
    return path


def _cut_gzip_file(path: Path) -> Path:
    """A .nii.gz cut in the middle of its compressed stream (an interrupted copy)."""
    whole = _save(path, _image(shape=(20, 20, 20))).read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    return path


def _header_only(path: Path, shape, dtype=np.uint8) -> Path:
    """A .nii.gz with a valid header announcing ``shape`` and no data at all."""
    header = nb.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(np.eye(4), code=1)
    header.set_qform(np.eye(4), code=1)
    header["vox_offset"] = 352
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))
    return path


def _rotation(degrees: float, axis=(0, 0, 1)) -> np.ndarray:
    """A 4x4 rotation by ``degrees`` about ``axis`` (Rodrigues' formula)."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.radians(degrees)
    out = np.eye(4)
    out[:3, :3] = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    return out


# --- files that are not usable images -------------------------------------------------------------

# name -> (file name, writes the file at a path, words the reason must contain)
UNREADABLE = {
    "empty": ("sub-01_T1w.nii.gz", lambda p: _save_bytes(p, b""), "empty file"),
    "text-as-gz": ("sub-01_T1w.nii.gz", lambda p: _save_bytes(p, b"subject 01, T1w\n" * 40),
                   "named .gz but is not gzip-compressed"),
    "png-as-gz": ("sub-01_T1w.nii.gz", lambda p: _save_bytes(p, b"\x89PNG\r\n\x1a\n" + bytes(600)),
                  "named .gz but is not gzip-compressed"),
    "gzip-of-junk": ("sub-01_T1w.nii.gz",
                     lambda p: _save_bytes(p, gzip.compress(bytes(range(256)) * 4)),
                     "no valid NIfTI header"),
    "text-as-nii": ("sub-01_T1w.nii", lambda p: _save_bytes(p, b"not an image\n" * 40),
                    "no valid NIfTI header"),
    "truncated-stream": ("sub-01_T1w.nii.gz", _truncated_gzip_stream, "truncated"),
    "cut-gzip": ("sub-01_T1w.nii.gz", _cut_gzip_file, "truncated"),
    "truncated-nii": ("sub-01_T1w.nii", lambda p: _cut_file(_save(p, _image(shape=(20, 20, 20)))),
                      "truncated"),
}


def _save_bytes(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _cut_file(path: Path) -> Path:
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    return path


@pytest.mark.parametrize("case", UNREADABLE)
def test_unreadable_files_refused_with_reason(tmp_path, case):
    name, write, words = UNREADABLE[case]
    path = write(tmp_path / name)
    with pytest.raises(BadDataError) as err:
        check_anatomical(path)
    message = str(err.value)
    assert message.startswith(path.name) and words in message
    assert "\n" not in message and "error" not in message.lower()


def test_truncated_file_says_what_the_header_announced(tmp_path):
    path = _truncated_gzip_stream(tmp_path / "sub-01_T1w.nii.gz")
    with pytest.raises(BadDataError, match=r"the header announces 20x20x20 int16 voxels\)$"):
        check_anatomical(path)


# --- shape, size, values --------------------------------------------------------------------------

@pytest.mark.parametrize("shape, words", [
    ((8, 8, 8, 3), "is not a 3D image (shape (8, 8, 8, 3))"),
    ((8, 8), "is not a 3D image (shape (8, 8))"),
    ((8, 8, 1), "has a degenerate shape (8, 8, 1)"),
])
def test_not_3d_refused(tmp_path, shape, words):
    data = np.arange(np.prod(shape), dtype=np.int16).reshape(shape)
    path = _save(tmp_path / "sub-01_T1w.nii.gz", nb.Nifti1Image(data, np.eye(4)))
    with pytest.raises(BadDataError) as err:
        check_anatomical(path)
    assert str(err.value) == f"sub-01_T1w.nii.gz {words}"


def test_one_volume_4d_accepted(tmp_path):
    data = tiny_nifti().get_fdata()[..., None].astype(np.int16)
    assert check_anatomical(_save(tmp_path / "t1.nii.gz", _image(data=data))) == []


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_refused(tmp_path, bad):
    data = tiny_nifti().get_fdata().astype(np.float32)
    data[3, 4, 5] = bad
    with pytest.raises(BadDataError, match=r"^t1\.nii\.gz contains NaN or infinite values$"):
        check_anatomical(_save(tmp_path / "t1.nii.gz", _image(data=data)))


@pytest.mark.parametrize("value, shown", [(0, "0"), (7, "7"), (312.5, "312.5")])
def test_constant_image_refused(tmp_path, value, shown):
    data = np.full((8, 8, 8), value, np.float32)
    expected = rf"^t1\.nii\.gz is constant \(every voxel is {shown}\)$"
    with pytest.raises(BadDataError, match=expected):
        check_anatomical(_save(tmp_path / "t1.nii.gz", _image(data=data)))


def test_huge_image_refused_from_its_header(tmp_path):
    """600^3 voxels: refused for its size, not for its missing data, so the data was never read."""
    path = _header_only(tmp_path / "t1.nii.gz", (600, 600, 600))
    with pytest.raises(BadDataError) as err:
        check_anatomical(path)
    message = str(err.value)
    assert message.startswith("t1.nii.gz is too large: 600x600x600 = 216,000,000 voxels")
    assert f"{MAX_VOXELS:,}" in message and "truncated" not in message


def test_image_at_the_size_limit_is_not_refused_for_size(tmp_path):
    # 512^3 exactly is allowed: what stops it here is only its missing data
    with pytest.raises(BadDataError, match="truncated"):
        check_anatomical(_header_only(tmp_path / "t1.nii.gz", (512, 512, 512)))


# --- geometry -------------------------------------------------------------------------------------

def test_singular_affine_refused(tmp_path):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 2] = affine[:3, 1]  # third axis along the second: zero determinant
    img = tiny_nifti()
    img.set_sform(affine, code=1)
    img.set_qform(None, code=0)
    with pytest.raises(BadDataError, match=r"^t1\.nii\.gz has an invalid \(singular"):
        check_anatomical(_save(tmp_path / "t1.nii.gz", img))


def test_left_right_flipped_image_accepted(tmp_path):
    """LAS (negative determinant) is a valid orientation: ANTs works in physical space."""
    flipped = np.diag([-2.0, 2.0, 2.0, 1.0])
    flipped[0, 3] = 14.0
    path = _save(tmp_path / "t1.nii.gz", _image(affine=flipped))
    assert nb.aff2axcodes(nb.load(path).affine) == ("L", "A", "S")
    assert check_anatomical(path) == []


@pytest.mark.parametrize("change, words", [
    (lambda a: a @ nb.affines.from_matvec(np.eye(3), [0, 0, 1.0]), "origins 2 mm apart"),
    (lambda a: _rotation(5) @ a, "voxel axes differ by up to 8.72%"),
    (lambda a: a @ np.diag([1.0, 1.0, 1.5, 1.0]), "voxel axes differ by up to 50.00%"),
], ids=["shifted", "rotated", "scaled"])
def test_sform_and_qform_disagreeing_refused(tmp_path, change, words):
    sform = np.diag([2.0, 2.0, 2.0, 1.0])
    path = _save(tmp_path / "t1.nii.gz", _with_forms(tiny_nifti(), sform, change(sform)))
    with pytest.raises(BadDataError) as err:
        check_anatomical(path)
    message = str(err.value)
    assert message.startswith("t1.nii.gz has an sform and a qform that disagree")
    assert words in message
    assert "fslorient -copysform2qform" in message


def test_qform_rounding_is_not_a_disagreement(tmp_path):
    """Near a 180-degree turn the stored quaternion loses ~1e-3 of precision: still accepted."""
    oblique = _rotation(180 - 0.057, axis=(0.3, 0.2, 1)) @ np.diag([1.2, 1.0, 3.0, 1.0])
    oblique[:3, 3] = [-90.0, 110.0, -70.0]
    path = _save(tmp_path / "t1.nii.gz", _image(affine=oblique))
    sform, qform = _reloaded_forms(path)
    assert not np.allclose(sform, qform, atol=1e-4)  # the rounding this test is about
    assert check_anatomical(path) == []


def test_forms_may_differ_when_only_one_is_set(tmp_path):
    img = _with_forms(tiny_nifti(), np.diag([2.0, 2.0, 2.0, 1.0]), np.diag([3.0, 3.0, 3.0, 1.0]))
    img.set_qform(img.get_qform(), code=0)  # a qform with code 0 means "not set": only sform counts
    assert check_anatomical(_save(tmp_path / "t1.nii.gz", img)) == []


def test_anisotropic_voxels_give_one_warning(tmp_path):
    path = _save(tmp_path / "sub-01_T1w.nii.gz", _image(affine=np.diag([1.0, 1.0, 6.0, 1.0])))
    warnings = check_anatomical(path)
    assert len(warnings) == 1
    assert warnings[0].startswith("sub-01_T1w.nii.gz: very anisotropic voxels (1x1x6 mm, ratio 6.0")


def test_anisotropy_up_to_the_limit_is_quiet(tmp_path):
    path = _save(tmp_path / "t1.nii.gz", _image(affine=np.diag([1.0, 1.0, 4.0, 1.0])))
    assert check_anatomical(path) == []


# --- the paired T2w -------------------------------------------------------------------------------

def _shifted_grid(dx_mm: float) -> np.ndarray:
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[0, 3] = dx_mm
    return affine


def test_world_box_and_overlap():
    # 8 voxels of 2 mm centred on 0..14: faces at -1 and 15
    low, high = world_box(_image())
    assert np.allclose(low, -1) and np.allclose(high, 15)
    assert fov_overlap(_image(), _image(affine=_shifted_grid(8.0))) == pytest.approx(0.5)
    assert fov_overlap(_image(), _image(affine=_shifted_grid(40.0))) == 0.0
    bigger = _image(shape=(16, 16, 16), affine=_shifted_grid(-8.0))
    assert fov_overlap(_image(), bigger) == pytest.approx(1.0)


@pytest.mark.parametrize("dx_mm, share", [(40.0, "0.0%"), (15.2, "5.0%")])
def test_t2w_not_covering_the_t1w_refused(tmp_path, dx_mm, share):
    t1w = _save(tmp_path / "sub-01_T1w.nii.gz", _image())
    t2w = _save(tmp_path / "sub-01_T2w.nii.gz", _image(affine=_shifted_grid(dx_mm)))
    with pytest.raises(BadDataError) as err:
        check_t2w(t2w, t1w)
    assert str(err.value) == (f"sub-01_T2w.nii.gz covers {share} of the field of view of "
                              "sub-01_T1w.nii.gz (at least 10% needed)")


def test_t2w_with_another_but_overlapping_fov_kept(tmp_path):
    t1w = _save(tmp_path / "sub-01_T1w.nii.gz", _image())
    t2w = _save(tmp_path / "sub-01_T2w.nii.gz", _image(shape=(6, 10, 8), affine=_shifted_grid(6.0)))
    assert check_t2w(t2w, t1w) == []
    anat = AnatomicalInput("01", t1w, {}, t2w)
    assert check_input(anat) == (anat, [])


@pytest.mark.parametrize("case", ["empty", "truncated-stream", "constant", "elsewhere"])
def test_bad_t2w_dropped_t1w_kept(tmp_path, case):
    t1w = _save(tmp_path / "sub-01_T1w.nii.gz", _image())
    t2w = tmp_path / "sub-01_T2w.nii.gz"
    if case == "constant":
        _save(t2w, _image(data=np.full((8, 8, 8), 5, np.int16)))
    elif case == "elsewhere":
        _save(t2w, _image(affine=_shifted_grid(100.0)))
    else:
        UNREADABLE[case][1](t2w)
    anat, warnings = check_input(AnatomicalInput("01", t1w, {"run": 1}, t2w))
    assert anat.t2w is None and anat.t1w == t1w and anat.entities == {"run": 1}
    assert len(warnings) == 1
    assert warnings[0].startswith("sub-01_T2w.nii.gz ")
    assert warnings[0].endswith("; T2w not used, sub-01_T1w.nii.gz is segmented without it")


def test_bad_t1w_refused_even_with_a_good_t2w(tmp_path):
    t1w = _save_bytes(tmp_path / "sub-01_T1w.nii.gz", b"")
    t2w = _save(tmp_path / "sub-01_T2w.nii.gz", _image())
    with pytest.raises(BadDataError, match="^sub-01_T1w.nii.gz is an empty file"):
        check_input(AnatomicalInput("01", t1w, {}, t2w))


# --- select_inputs: the others go on --------------------------------------------------------------

def _config(root: Path, tmp_path: Path) -> Config:
    return Config(bids_dir=root, output_dir=tmp_path / "out", analysis_level="participant",
                  work_dir=tmp_path / "work")


def test_broken_t1w_skipped_other_subject_selected(tmp_path, make_skeleton, capsys):
    root = make_skeleton(tmp_path / "bids", {
        "sub-01/anat/sub-01_T1w.nii.gz": b"",
        "sub-02/anat/sub-02_T1w.nii.gz": "nii",
    })
    _truncated_gzip_stream(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    before = listing(root)
    usable, skipped = select_inputs(_config(root, tmp_path))
    assert [a.subject for a in usable] == ["02"]
    assert [s for s, _ in skipped] == ["01"]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("dlf-bids: skipping sub-01: sub-01_T1w.nii.gz is truncated")
    assert listing(root) == before


def test_select_inputs_warns_and_drops_a_bad_t2w(tmp_path, make_skeleton, capsys):
    root = make_skeleton(tmp_path / "bids", {
        "sub-01/anat/sub-01_T1w.nii.gz": _image(affine=np.diag([1.0, 1.0, 6.0, 1.0])),
        "sub-01/anat/sub-01_T2w.nii.gz": b"",
        "sub-02/anat/sub-02_T1w.nii.gz": "nii",
        "sub-02/anat/sub-02_T2w.nii.gz": "nii",
    })
    usable, skipped = select_inputs(_config(root, tmp_path))
    assert skipped == []
    assert {a.subject: a.t2w and a.t2w.name for a in usable} == {"01": None,
                                                                 "02": "sub-02_T2w.nii.gz"}
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("dlf-bids: warning: sub-01_T") for line in lines)
    assert "very anisotropic" in lines[0] and "empty file (0 bytes); T2w not used" in lines[1]


# --- the command line: nothing usable -------------------------------------------------------------

CLI_CASES = {
    "empty": lambda path: path.write_bytes(b""),
    "text": lambda path: path.write_text("subject 01 T1w\n" * 40),
    "truncated": _truncated_gzip_stream,
    "constant": lambda path: _save(path, _image(data=np.full((8, 8, 8), 9, np.int16))),
    "4d": lambda path: _save(path, _image(data=np.ones((8, 8, 8, 3), np.int16))),
    "forms-disagree": lambda path: _save(path, _with_forms(tiny_nifti(), np.eye(4),
                                                           np.diag([1.0, 1.0, 1.2, 1.0]))),
    "huge": lambda path: _header_only(path, (520, 520, 520)),
}


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_nothing_usable_exit_65(cli, tmp_path, make_skeleton, demo_data, case):
    root = make_skeleton(tmp_path / "bids", {"sub-01/anat/sub-01_T1w.nii.gz": b""})
    CLI_CASES[case](root / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    before = listing(root)
    code, out, err = cli([root, tmp_path / "out", "participant", "--skip-bids-validation",
                          "--atlas-dir", demo_data.atlas_dir])
    assert code == EXIT_BAD_DATA == 65
    line = the_error_line(err)
    assert "no usable T1w image" in line and "sub-01: sub-01_T1w.nii.gz " in line
    assert listing(root) == before
    assert not (tmp_path / "out").exists()


# --- the filter file ------------------------------------------------------------------------------

def test_filter_entity_typo_refused(tmp_path):
    path = tmp_path / "filters.json"
    path.write_text(json.dumps({"t1w": {"acqusition": "mprage", "run": 1}}))
    with pytest.raises(UsageError) as err:
        load_filters(path)
    message = str(err.value)
    assert "unknown entity 'acqusition' in \"t1w\"" in message and str(path) in message
    valid = message.split("valid: ")[1].split(", ")
    assert {"acquisition", "run", "session", "datatype", "suffix", "extension"} <= set(valid)


def test_filter_entities_pybids_knows_accepted(tmp_path):
    path = tmp_path / "filters.json"
    filters = {"t1w": {"datatype": "anat", "suffix": "T1w", "extension": ".nii.gz",
                       "reconstruction": None, "ceagent": "*"}}
    path.write_text(json.dumps(filters))
    assert load_filters(path) == filters


def test_filter_on_subject_refused(tmp_path):
    path = tmp_path / "filters.json"
    path.write_text(json.dumps({"t2w": {"subject": "01"}}))
    with pytest.raises(UsageError, match="--participant-label"):
        load_filters(path)


def test_sessions_from_two_places_refused(tmp_path, make_skeleton):
    root = make_skeleton(tmp_path / "bids", {"sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz": "nii"})
    with pytest.raises(UsageError, match="both by --session-label and in the filter file"):
        collect_anatomicals(load_layout(root), None, ["1"], {"t1w": {"session": "1"}})


def test_cli_filter_entity_typo_exit_64(cli, tmp_path, make_skeleton, demo_data):
    root = make_skeleton(tmp_path / "bids", {"sub-01/anat/sub-01_T1w.nii.gz": "nii"})
    path = tmp_path / "filters.json"
    path.write_text(json.dumps({"t1w": {"acqusition": "mprage"}}))
    code, _, err = cli([root, tmp_path / "out", "participant", "--skip-bids-validation",
                        "--atlas-dir", demo_data.atlas_dir, "--bids-filter-file", path])
    assert code == EXIT_USAGE == 64
    line = the_error_line(err)
    assert "'acqusition'" in line and "acquisition" in line.split("valid: ")[1]
    assert not (tmp_path / "out").exists()
