"""The atlas library: loading the demo library, every refusal with its reason, look-up tables."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from dlf_bids.errors import BadDataError, MissingInputError
from dlf_bids.utils.atlas_library import (MIN_ATLASES, Atlas, check_atlas, load_atlas_library,
                                          write_atlas, write_library_description)
from dlf_bids.utils.demo_data import DEMO_LABELS
from dlf_bids.utils.labels import Label, LabelTable, read_label_table, write_label_table


@pytest.fixture
def library(tmp_path, demo_data) -> Path:
    """A private copy of the demo library (3 atlases), free to break."""
    return Path(shutil.copytree(demo_data.atlas_dir, tmp_path / "atlases"))


def _dseg(root, atlas_id="a02"):
    return root / f"sub-{atlas_id}" / "anat" / f"sub-{atlas_id}_dseg.nii.gz"


def _rewrite_dseg(root, data=None, affine=None, atlas_id="a02", dtype=None):
    path = _dseg(root, atlas_id)
    img = nb.load(path)
    data = np.asanyarray(img.dataobj) if data is None else data
    new = nb.Nifti1Image(data if dtype is None else data.astype(dtype),
                         img.affine if affine is None else affine)
    nb.save(new, path)
    return path


# --- loading ------------------------------------------------------------------------------------

def test_demo_library_loads(demo_data):
    lib = load_atlas_library(demo_data.atlas_dir)
    assert lib.root == demo_data.atlas_dir
    assert [a.atlas_id for a in lib.atlases] == ["a01", "a02", "a03"]
    for atlas in lib.atlases:
        anat = demo_data.atlas_dir / f"sub-{atlas.atlas_id}" / "anat"
        assert atlas.t1w == anat / f"sub-{atlas.atlas_id}_T1w.nii.gz"
        assert atlas.dseg == anat / f"sub-{atlas.atlas_id}_dseg.nii.gz"
        assert atlas.t2w == anat / f"sub-{atlas.atlas_id}_T2w.nii.gz"
    assert lib.has_t2w
    assert lib.labels == read_label_table(demo_data.atlas_dir / "dseg.tsv")
    assert lib.labels.indices == DEMO_LABELS.indices


def test_relative_root_and_optional_t2w(library, monkeypatch):
    (library / "sub-a03" / "anat" / "sub-a03_T2w.nii.gz").unlink()
    monkeypatch.chdir(library.parent)
    lib = load_atlas_library("atlases")
    assert lib.root == library and lib.root.is_absolute()
    assert lib.atlases[2].t2w is None and lib.atlases[0].t2w is not None
    assert not lib.has_t2w


def test_files_beside_atlases_are_ignored(library):
    (library / "sub-notes.txt").write_text("not an atlas")
    (library / "README").write_text("hello")
    assert len(load_atlas_library(library).atlases) == 3


def test_missing_library(tmp_path):
    with pytest.raises(MissingInputError, match="does not exist"):
        load_atlas_library(tmp_path / "nope")


def test_no_dataset_description(library):
    (library / "dataset_description.json").unlink()
    with pytest.raises(BadDataError, match="has no dataset_description.json"):
        load_atlas_library(library)


@pytest.mark.parametrize("desc", [{"Name": "x", "BIDSVersion": "1.10.0"},
                                  {"Name": "x", "DatasetType": "raw"}])
def test_dataset_type_not_derivative(library, desc):
    (library / "dataset_description.json").write_text(json.dumps(desc))
    with pytest.raises(BadDataError, match='"DatasetType": "derivative"'):
        load_atlas_library(library)


def test_dataset_description_not_json(library):
    (library / "dataset_description.json").write_text("{oops")
    with pytest.raises(BadDataError, match="not valid JSON"):
        load_atlas_library(library)


def test_missing_label_table(library):
    (library / "dseg.tsv").unlink()
    with pytest.raises(BadDataError, match="dseg.tsv does not exist"):
        load_atlas_library(library)


def test_one_atlas_only(library):
    shutil.rmtree(library / "sub-a02")
    shutil.rmtree(library / "sub-a03")
    with pytest.raises(BadDataError, match=f"1 atlas\\(es\\); at least {MIN_ATLASES}"):
        load_atlas_library(library)


def test_no_atlas(library):
    for sub in library.glob("sub-*"):
        shutil.rmtree(sub)
    with pytest.raises(BadDataError, match="0 atlas"):
        load_atlas_library(library)


def test_label_map_on_another_grid(library):
    img = nb.load(_dseg(library))
    affine = img.affine.copy()
    affine[:3, 3] += 3.0
    _rewrite_dseg(library, affine=affine)
    with pytest.raises(BadDataError, match="sub-a02: label map is not on the T1w grid"):
        load_atlas_library(library)
    # the same library loads when images are not checked (check_images=False)
    assert len(load_atlas_library(library, check_images=False).atlases) == 3


def test_label_map_with_another_shape(library):
    data = np.asanyarray(nb.load(_dseg(library)).dataobj)
    _rewrite_dseg(library, data=data[:-1])
    with pytest.raises(BadDataError, match="not on the T1w grid"):
        load_atlas_library(library)


def test_label_not_in_lut(library):
    data = np.asanyarray(nb.load(_dseg(library)).dataobj).copy()
    data[0, 0, 0] = 99
    data[0, 0, 1] = 7
    _rewrite_dseg(library, data=data)
    with pytest.raises(BadDataError, match=r"sub-a02: labels \[7, 99\] are not in"):
        load_atlas_library(library)


def test_label_dropped_from_lut(library):
    lut = library / "dseg.tsv"
    lines = lut.read_text().splitlines()
    lut.write_text("\n".join(line for line in lines if not line.startswith("3\t")) + "\n")
    with pytest.raises(BadDataError, match=r"labels \[3\]"):
        load_atlas_library(library)


def test_non_integer_labels(library):
    data = np.asanyarray(nb.load(_dseg(library)).dataobj).astype(np.float32)
    data[data == 1] = 1.5
    _rewrite_dseg(library, data=data)
    with pytest.raises(BadDataError, match="sub-a02: label map holds non-integer values"):
        load_atlas_library(library)


def test_integer_valued_float_labels_accepted(library):
    data = np.asanyarray(nb.load(_dseg(library)).dataobj).astype(np.float32)
    _rewrite_dseg(library, data=data)
    assert len(load_atlas_library(library).atlases) == 3


@pytest.mark.parametrize("missing", ["dseg", "T1w"])
def test_atlas_folder_missing_an_image(library, missing):
    (library / "sub-a03" / "anat" / f"sub-a03_{missing}.nii.gz").unlink()
    with pytest.raises(BadDataError, match="sub-a03 needs both sub-a03_T1w.nii.gz and "
                                           "sub-a03_dseg.nii.gz"):
        load_atlas_library(library)


def test_t2w_not_3d(library):
    t2w = library / "sub-a01" / "anat" / "sub-a01_T2w.nii.gz"
    nb.save(nb.Nifti1Image(np.ones((4, 4, 4, 2), np.int16), np.eye(4)), t2w)
    with pytest.raises(BadDataError, match="sub-a01: T2w is not a 3D image"):
        load_atlas_library(library)


# --- writing a library --------------------------------------------------------------------------

def test_write_library_then_load(tmp_path):
    labels = LabelTable((Label(3, "three"), Label(10, "ten")))
    root = tmp_path / "lib"
    write_library_description(root, "test library", labels, source="https://example.org")
    desc = json.loads((root / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["SourceDatasets"] == [{"URL": "https://example.org"}]
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    t1w = nb.Nifti1Image(np.random.default_rng(0).random((6, 6, 6)).astype(np.float32), affine)
    seg = np.zeros((6, 6, 6), np.float64)
    seg[:3] = 3
    seg[3:] = 10
    for atlas_id in ("x", "y"):
        atlas = write_atlas(root, atlas_id, t1w, nb.Nifti1Image(seg, affine))
        assert isinstance(atlas, Atlas) and atlas.t2w is None
        assert nb.load(atlas.dseg).get_data_dtype() == np.int16
        check_atlas(atlas, labels)
    lib = load_atlas_library(root)
    assert [a.atlas_id for a in lib.atlases] == ["x", "y"] and lib.labels.indices == (3, 10)
    with pytest.raises(BadDataError, match=r"labels \[10\]"):
        check_atlas(lib.atlases[0], labels.subset([3]))


# --- look-up tables -----------------------------------------------------------------------------

def test_label_table_round_trip(tmp_path):
    table = LabelTable((
        Label(2, "Left-Cerebral-White-Matter", "L-WM", "#f5f5f5"),
        Label(17, "Left-Hippocampus", "L-Hip", "#dcd814"),
        Label(2035, "ctx-rh-insula", "R-Ins", "#ffc020"),
    ))
    path = write_label_table(table, tmp_path / "sub" / "dseg.tsv")
    assert path == tmp_path / "sub" / "dseg.tsv"
    assert path.read_text().splitlines()[0] == "index\tname\tabbreviation\tcolor"
    assert read_label_table(path) == table


def test_label_table_fills_abbreviation_and_colour(tmp_path):
    path = write_label_table(LabelTable((Label(1, "GM"), Label(2, "WM"))), tmp_path / "dseg.tsv")
    back = read_label_table(path)
    assert [lab.abbreviation for lab in back.labels] == ["GM", "WM"]
    colors = [lab.color for lab in back.labels]
    assert all(c.startswith("#") and len(c) == 7 for c in colors) and colors[0] != colors[1]


def test_read_minimal_label_table(tmp_path):
    path = tmp_path / "dseg.tsv"
    path.write_text("index\tname\n0\tBackground\n5\t CSF \n1\tGM\n")
    table = read_label_table(path)
    assert table.indices == (5, 1)  # order kept, background implicit
    assert table.name_of(5) == "CSF" and table.labels[0].abbreviation == ""
    with pytest.raises(KeyError):
        table.name_of(0)
    assert table.subset([1, 7]).indices == (1,)


def test_duplicate_index_refused(tmp_path):
    path = tmp_path / "dseg.tsv"
    path.write_text("index\tname\n1\tGM\n2\tWM\n1\tGM again\n")
    with pytest.raises(BadDataError, match="lists an index twice"):
        read_label_table(path)


@pytest.mark.parametrize("bad", ["one", "1.5", ""])
def test_bad_index_refused(tmp_path, bad):
    path = tmp_path / "dseg.tsv"
    path.write_text(f"index\tname\n1\tGM\n{bad}\tWM\n")
    with pytest.raises(BadDataError, match=r"dseg.tsv:3: index .* is not an integer"):
        read_label_table(path)


@pytest.mark.parametrize("text, match", [
    ("index,name\n1,GM\n", "tab-separated 'index' and 'name'"),
    ("id\tname\n1\tGM\n", "tab-separated 'index' and 'name'"),
    ("", "tab-separated"),
    ("index\tname\n0\tBackground\n", "has no labels"),
])
def test_malformed_label_tables(tmp_path, text, match):
    path = tmp_path / "dseg.tsv"
    path.write_text(text)
    with pytest.raises(BadDataError, match=match):
        read_label_table(path)
