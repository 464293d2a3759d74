"""NeuroNet's teacher functions and protocol checks on small synthetic images (fast; the real
teacher workflows run in test_neuronet_app.py)."""

from __future__ import annotations

import nibabel as nb
import numpy as np
import pytest

from dlf_bids.errors import BadDataError, MissingInputError
from dlf_bids.models.protocols import (Protocol, builtin_protocol, check_source_values,
                                       is_bids_tissue, resolve_protocol)
from dlf_bids.teachers import atropos_tissue, brain_mask_from_labels, protocol_labels, rank_by_intensity
from dlf_bids.utils.labels import Label, LabelTable

LIBRARY = LabelTable((Label(1, "A"), Label(2, "B"), Label(5, "C")))


def _save(data, path, affine=None):
    nb.save(nb.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), path)
    return path


def test_rank_by_intensity_renumbers_darkest_first():
    classes = np.array([0, 1, 1, 2, 2, 3, 3])
    image = np.array([0, 50, 52, 10, 12, 90, 80], dtype=np.float32)
    # class 2 is darkest, then 1, then 3
    assert rank_by_intensity(classes, image, 3).tolist() == [0, 2, 2, 1, 1, 3, 3]
    # an empty class ranks last
    assert rank_by_intensity(np.array([0, 2, 2]), np.array([0, 5, 5.0]), 3).tolist() == [0, 1, 1]


def test_brain_mask_is_the_filled_union_of_the_warped_labels_grown_by_a_margin_in_mm(tmp_path):
    a = np.zeros((15, 15, 15), np.int16)
    a[5:10, 5:10, 5:10] = 3
    a[7, 7, 7] = 0  # a hole inside: filled
    b = np.zeros_like(a)
    b[4, 7, 7] = 7  # another atlas reaches further: in the union
    atlases = [_save(a, tmp_path / "a.nii.gz"), _save(b, tmp_path / "b.nii.gz")]
    mask = np.asanyarray(nb.load(brain_mask_from_labels(atlases, tmp_path / "m.nii.gz",
                                                        margin_mm=0)).dataobj)
    assert mask[7, 7, 7] == 1 and mask[4, 7, 7] == 1 and mask[0, 0, 0] == 0
    assert mask.sum() == 5**3 + 1
    # 2 mm voxels, a 4 mm margin: two voxels out along an axis, not three; the corner neighbour
    # (2*sqrt(3) = 3.5 mm) is in, two voxels out on each axis (6.9 mm) is not
    grown = np.asanyarray(nb.load(brain_mask_from_labels(atlases, tmp_path / "g.nii.gz",
                                                         margin_mm=4.0)).dataobj)
    assert grown[7, 7, 11] == 1 and grown[7, 7, 12] == 0 and grown[2, 7, 7] == 1
    assert grown[10, 10, 10] == 1 and grown[11, 11, 11] == 0
    assert np.all(grown[mask > 0] == 1)
    with pytest.raises(BadDataError, match="empty"):
        brain_mask_from_labels([_save(np.zeros_like(a), tmp_path / "z.nii.gz")], tmp_path / "m2.nii.gz")


def test_atropos_finds_three_intensity_classes(tmp_path):
    """Three flat tissues (dark, middle, bright) plus noise: Atropos gives them back as 1 (darkest),
    2, 3; the protocol map then makes them CSF, GM, WM."""
    rng = np.random.default_rng(0)
    truth = np.zeros((24, 24, 24), np.int16)
    truth[4:20, 4:20, 4:20] = 2
    truth[8:16, 8:16, 8:16] = 3
    truth[4:20, 4:8, 4:20] = 1
    image = np.choose(truth, [0.0, 30.0, 60.0, 100.0]) + rng.normal(0, 3, truth.shape)
    t1w = _save(image.astype(np.float32), tmp_path / "t1w.nii.gz")
    mask = _save((truth > 0).astype(np.uint8), tmp_path / "mask.nii.gz")
    classes = np.asanyarray(nb.load(atropos_tissue(t1w, mask, tmp_path / "c.nii.gz")).dataobj)
    assert np.mean(classes[truth > 0] == truth[truth > 0]) > 0.95 and not classes[truth == 0].any()
    tissue = builtin_protocol("atropos").make_label_map(classes)
    assert set(np.unique(tissue[truth == 1])) == {3} and set(np.unique(tissue[truth == 3])) == {2}


def test_a_few_very_bright_voxels_in_the_mask_do_not_take_a_class(tmp_path):
    """Fat or vessels the mask's margin takes in (0.8 % of it here, far brighter than white
    matter) would be a k-means class of their own, and CSF and GM would share one: the
    truncation at the mask's 99th percentile keeps the three tissues apart."""
    rng = np.random.default_rng(1)
    truth = np.zeros((30, 30, 30), np.int16)
    truth[3:27, 3:27, 3:27] = 3  # WM
    truth[3:27, 3:27, 3:10] = 2  # GM
    truth[3:27, 3:27, 3:5] = 1  # CSF, scarce
    bright = np.zeros_like(truth, bool)
    bright[3:27, 3:7, 26] = True  # 96 voxels, 0.7 % of the mask
    image = np.choose(truth, [0.0, 30.0, 60.0, 100.0]) + rng.normal(0, 3, truth.shape)
    image[bright] = 600.0
    t1w = _save(image.astype(np.float32), tmp_path / "t1w.nii.gz")
    mask = _save((truth > 0).astype(np.uint8), tmp_path / "mask.nii.gz")
    classes = np.asanyarray(nb.load(atropos_tissue(t1w, mask, tmp_path / "c.nii.gz")).dataobj)
    tissue = ~bright & (truth > 0)
    assert np.mean(classes[tissue] == truth[tissue]) > 0.95
    with pytest.raises(BadDataError, match="empty"):
        atropos_tissue(t1w, _save(np.zeros((30, 30, 30), np.uint8), tmp_path / "e.nii.gz"),
                       tmp_path / "e_out.nii.gz")


def test_protocol_labels_keep_the_grid_and_refuse_another(tmp_path):
    labels = np.zeros((4, 4, 4), np.int16)
    labels[1:3, 1:3, 1:3] = 5
    source = _save(labels, tmp_path / "src.nii.gz")
    protocol = resolve_protocol("structures", LIBRARY).to_dict()
    out = protocol_labels(protocol, source, source, tmp_path / "out.nii.gz")
    assert np.array_equal(np.asanyarray(nb.load(out).dataobj), labels)
    other = _save(labels, tmp_path / "other.nii.gz", np.diag([3.0, 3.0, 3.0, 1.0]))
    with pytest.raises(BadDataError, match="not on the grid"):
        protocol_labels(protocol, source, other, tmp_path / "bad.nii.gz")


def test_protocols_are_checked_against_what_their_source_gives(tmp_path):
    for name in ("structures", "library", "atropos"):
        check_source_values(resolve_protocol(name, LIBRARY), LIBRARY.indices)
    with pytest.raises(BadDataError, match=r"tissue does not map multiatlas label.s. 1$"):
        check_source_values(builtin_protocol("tissue"), LIBRARY.indices)
    spec = tmp_path / "ab.yaml"
    spec.write_text("name: ab\nclasses: [{index: 1, name: AB}]\n"
                    "labels: {kind: collapse, source: reference, map: {'1': [1, 2]}}\n")
    with pytest.raises(BadDataError, match="ab does not map reference label.s. 5"):
        check_source_values(resolve_protocol(str(spec)), LIBRARY.indices)
    # an Atropos protocol says how many classes it wants by mapping them all; a gap is refused
    four = resolve_protocol("atropos").to_dict()
    four["labels"]["map"] = {"3": [1], "1": [2, 3], "2": [4]}
    assert Protocol.from_dict(four).recipe.atropos_classes == 4
    check_source_values(Protocol.from_dict(four), LIBRARY.indices)
    four["labels"]["map"] = {"3": [1], "1": [2], "2": [4]}
    with pytest.raises(BadDataError, match="atropos does not map atropos label.s. 3$"):
        check_source_values(Protocol.from_dict(four), LIBRARY.indices)
    with pytest.raises(MissingInputError):
        resolve_protocol(str(tmp_path / "absent.json"))
    with pytest.raises(BadDataError, match="takes its classes from an atlas library"):
        resolve_protocol("structures")
    assert is_bids_tissue(builtin_protocol("atropos")) and is_bids_tissue(builtin_protocol("tissue"))
    assert not is_bids_tissue(resolve_protocol("library", LIBRARY))


def test_teacher_graph_follows_the_protocol_specs(tmp_path):
    """Which nodes a case gets is decided by the specs alone (built, not run)."""
    from dlf_bids.utils.atlas_library import Atlas
    from dlf_bids.workflows.teachers import TeacherCase, init_teachers_wf

    files = {n: _save(np.ones((4, 4, 4), np.int16), tmp_path / f"{n}.nii.gz")
             for n in ("t1w", "a_t1w", "a_dseg", "own", "t2w")}
    four = resolve_protocol("atropos").to_dict()
    four.update(name="atropos4", labels={"kind": "atropos", "map": {"3": [1], "1": [2, 3], "2": [4]}})
    protocols = [resolve_protocol("atropos"), Protocol.from_dict(four),
                 resolve_protocol("structures", LIBRARY), resolve_protocol("library", LIBRARY)]
    case = TeacherCase("x", files["t1w"], (Atlas("a", files["a_t1w"], files["a_dseg"]),),
                       files["own"], files["t2w"])
    wf = init_teachers_wf(case, protocols, preset="fast", fusion="jlf")
    edges = {(u.name, v.name) for u, v in wf._graph.edges()}
    assert {("atropos_k3", "labels_atropos"), ("atropos_k4", "labels_atropos4"),
            ("fuse_jlf", "labels_structures"), ("inputnode", "coregister_t2w")} <= edges
    assert wf.get_node("labels_library").inputs.source == str(files["own"])
    only_own = init_teachers_wf(TeacherCase("y", files["t1w"], (), files["own"]),
                                [resolve_protocol("library", LIBRARY)])
    assert sorted(only_own.list_node_names()) == ["inputnode", "labels_library", "outputnode"]
