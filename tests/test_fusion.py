"""Label fusion functions and group volumes on hand-made images with known answers."""

from __future__ import annotations

import nibabel as nb
import numpy as np
import pytest

from dlf_bids.fusion import (fusion_mask, joint_label_fusion, load_label_stack, majority_vote,
                             save_labels)
from dlf_bids.volumes import label_volumes
from dlf_bids.utils.labels import Label, LabelTable


def save(path, data, affine=None, dtype=None):
    data = np.asarray(data)
    if dtype is not None:
        data = data.astype(dtype)
    img = nb.Nifti1Image(data, np.eye(4) if affine is None else affine)
    nb.save(img, path)
    return path


# --- majority voting ----------------------------------------------------------------------------

def test_majority_vote_known_answers():
    # 5 atlases, 6 voxels (shape (1, 6))
    stack = np.array([
        [1, 2, 3, 0, 4, 7],
        [1, 2, 3, 0, 4, 8],
        [1, 5, 2, 0, 0, 9],
        [2, 5, 2, 3, 0, 7],
        [2, 5, 6, 0, 0, 9],
    ])[:, None, :]
    expected = np.array([[1, 5, 2, 0, 0, 7]])
    # voxel 0: 1 x3 beats 2 x2; voxel 1: 5 x3; voxel 2: 3 vs 2 tie (2 each) -> lowest (2);
    # voxel 3: background x4; voxel 4: 0 x3 beats 4 x2; voxel 5: 7 vs 9 tie -> 7
    result = majority_vote(stack)
    assert result.shape == (1, 6)
    assert np.array_equal(result, expected)


def test_majority_vote_ties_lowest_label_and_background():
    stack = np.array([[0, 3, 5, 5], [4, 3, 2, 9], [4, 0, 2, 9], [0, 0, 5, 1]])[:, :, None, None]
    # voxel 0: 0 vs 4 tie -> 0 (background is the lowest); voxel 1: 3 vs 0 tie -> 0;
    # voxel 2: 5 vs 2 tie -> 2; voxel 3: 9 x2 wins over 5 and 1
    assert majority_vote(stack).ravel().tolist() == [0, 0, 2, 9]


def test_majority_vote_unanimous_and_single_atlas():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 40, size=(6, 5, 4))
    assert np.array_equal(majority_vote(np.stack([labels] * 3)), labels)
    assert np.array_equal(majority_vote(labels[None]), labels)


def test_majority_vote_large_labels_and_many_atlases():
    stack = np.full((40, 2, 2, 2), 2035, dtype=np.int32)
    stack[:19] = 17
    result = majority_vote(stack)
    assert result.dtype.kind == "i"
    assert np.all(result == 2035)  # 21 vs 19
    stack[19] = 17  # now 20 vs 20: tie -> the lower label
    assert np.all(majority_vote(stack) == 17)


def test_majority_vote_matches_brute_force():
    rng = np.random.default_rng(2)
    stack = rng.integers(0, 5, size=(7, 6, 5, 4))
    result = majority_vote(stack)
    flat = stack.reshape(7, -1)
    for i in range(flat.shape[1]):
        counts = np.bincount(flat[:, i], minlength=5)
        assert result.ravel()[i] == int(np.argmax(counts))  # argmax: first (lowest) of ties


# --- fusion mask --------------------------------------------------------------------------------

def test_fusion_mask_union_and_dilation():
    stack = np.zeros((2, 11, 11, 16), dtype=np.int32)
    stack[0, 5, 5, 5] = 3
    stack[1, 5, 5, 10] = 1  # 5 voxels apart: the dilated balls do not touch
    union = fusion_mask(stack, dilation_voxels=0)
    assert union.dtype == bool and union.sum() == 2 and union[5, 5, 5] and union[5, 5, 10]
    one = fusion_mask(stack, dilation_voxels=1)
    assert one.sum() == 2 * 7  # 6-connected cross around each voxel
    assert one[4, 5, 5] and one[5, 5, 11] and not one[4, 4, 5]
    two = fusion_mask(stack)  # default: 2 voxels
    assert two[3, 5, 5] and two[5, 5, 12] and two[4, 4, 5] and not two[2, 5, 5]
    assert not two[3, 4, 5]  # city-block distance 3
    assert two.sum() == 2 * 25  # the city-block ball of radius 2 has 1 + 6 + 18 voxels
    assert not fusion_mask(np.zeros((3, 4, 4, 4), dtype=int)).any()


def test_fusion_mask_is_the_union_of_all_atlases():
    stack = np.zeros((3, 8, 6, 6), dtype=np.int32)
    stack[0, :2] = 1
    stack[2, 6:] = 9
    mask = fusion_mask(stack, dilation_voxels=0)
    assert mask[:2].all() and mask[6:].all() and not mask[2:6].any()
    dilated = fusion_mask(stack, dilation_voxels=1)
    assert dilated[2].all() and dilated[5].all() and not dilated[3:5].any()


# --- loading and saving -------------------------------------------------------------------------

def test_load_label_stack(tmp_path):
    aff = np.diag([1.5, 1.5, 2.0, 1.0])
    a = save(tmp_path / "a.nii.gz", np.arange(24).reshape(2, 3, 4), aff, np.int16)
    b = save(tmp_path / "b.nii.gz", np.ones((2, 3, 4)), aff, np.uint8)
    stack, ref = load_label_stack([a, b])
    assert stack.shape == (2, 2, 3, 4) and stack.dtype == np.int32
    assert np.array_equal(stack[0], np.arange(24).reshape(2, 3, 4))
    assert np.array_equal(ref.affine, aff)


def test_load_label_stack_refuses_different_grids(tmp_path):
    a = save(tmp_path / "a.nii.gz", np.zeros((4, 4, 4)), dtype=np.int16)
    shape = save(tmp_path / "shape.nii.gz", np.zeros((4, 4, 5)), dtype=np.int16)
    shifted = np.eye(4)
    shifted[0, 3] = 1.0
    moved = save(tmp_path / "moved.nii.gz", np.zeros((4, 4, 4)), shifted, np.int16)
    with pytest.raises(ValueError, match="shape.nii.gz is not on the same grid"):
        load_label_stack([a, shape])
    with pytest.raises(ValueError, match="moved.nii.gz"):
        load_label_stack([a, a, moved])


def test_save_labels_keeps_reference_geometry(tmp_path):
    affine = np.array([[-1.2, 0, 0, 90], [0, 0, 1.5, -100], [0, -1.1, 0, 80], [0, 0, 0, 1.0]])
    ref_img = nb.Nifti1Image(np.random.default_rng(0).random((5, 6, 7)).astype(np.float32), affine)
    ref_img.set_qform(affine, code=1)
    ref_img.set_sform(affine, code=1)
    nb.save(ref_img, tmp_path / "ref.nii.gz")
    data = np.zeros((5, 6, 7), dtype=np.int64)
    data[1:3, 2:4, 3:6] = 2035
    data[0, 0, 0] = 17
    out = save_labels(data, tmp_path / "ref.nii.gz", tmp_path / "seg.nii.gz")
    assert out == tmp_path / "seg.nii.gz"
    img = nb.load(out)
    assert img.get_data_dtype() == np.int16
    assert np.allclose(img.affine, affine)
    assert int(img.header["sform_code"]) == 1
    assert np.allclose(img.get_qform(), affine, atol=1e-5)
    stored = np.asanyarray(img.dataobj)
    assert stored.dtype == np.int16 and np.array_equal(stored, data)
    assert img.header.get_slope_inter() in ((None, None), (1.0, 0.0))


def test_save_labels_from_scaled_reference(tmp_path):
    """A reference stored with scaling (int16 + slope) must not scale the labels."""
    ref = nb.Nifti1Image(np.ones((4, 4, 4), np.float32) * 1000.5, np.eye(4))
    ref.set_data_dtype(np.int16)
    nb.save(ref, tmp_path / "ref.nii.gz")
    data = np.full((4, 4, 4), 3)
    img = nb.load(save_labels(data, tmp_path / "ref.nii.gz", tmp_path / "seg.nii.gz"))
    assert np.array_equal(np.asanyarray(img.dataobj), data)


# --- joint label fusion (antspyx) ---------------------------------------------------------------

N = 20
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = [-20, -20, -20]
VOX = 2.0  # mm: JLF radii of one voxel


@pytest.fixture(scope="module")
def jlf_case(tmp_path_factory):
    """A 20³ target: left half bright, right half dark. Three atlases look like it and carry
    labels that agree with their intensity (bright: 17, dark: 53); a fourth one has inverted
    intensity and labels that are wrong for the target."""
    root = tmp_path_factory.mktemp("jlf")
    rng = np.random.default_rng(0)
    bright = (np.arange(N) < N // 2)[:, None, None] & np.ones((N, N, N), bool)
    truth = np.where(bright, 17, 53).astype(np.int16)
    truth[:, :, :2] = 0  # some background, absent from every atlas
    intensity = np.where(bright, 100.0, 20.0)
    intensity[:, :, :2] = 0.0  # background looks like background, as in real images

    def image(name, data):
        return save(root / name, data.astype(np.float32), AFFINE)

    target = image("target.nii.gz", intensity + rng.normal(0, 2, truth.shape))
    atlases = [image(f"a{i}_T1w.nii.gz", intensity + rng.normal(0, 2, truth.shape))
               for i in range(3)]
    labels = [save(root / f"a{i}_dseg.nii.gz", truth, AFFINE) for i in range(3)]
    inverted = np.where(intensity > 0, 120.0 - intensity, 0.0)
    wrong_t1w = image("bad_T1w.nii.gz", inverted + rng.normal(0, 2, truth.shape))
    wrong = np.where(bright, 53, 17).astype(np.int16)
    wrong[:, :, :2] = 0
    wrong_dseg = save(root / "bad_dseg.nii.gz", wrong, AFFINE)
    return {"target": target, "atlases": atlases + [wrong_t1w], "labels": labels + [wrong_dseg],
            "truth": truth}


def test_joint_label_fusion_follows_similar_atlases(jlf_case):
    seg = joint_label_fusion(jlf_case["target"], jlf_case["atlases"], jlf_case["labels"],
                             patch_radius_mm=VOX, search_radius_mm=VOX, n_threads=1)
    truth = jlf_case["truth"]
    assert seg.shape == truth.shape
    assert set(np.unique(seg).tolist()) <= {0, 17, 53}  # label values, not renumbered 1, 2
    inside = truth > 0
    assert (seg[inside] == truth[inside]).mean() > 0.99
    # the left (bright) half is 17 and the right half 53, i.e. not transposed or flipped
    assert np.all(seg[2:N // 2 - 2, :, 4:][truth[2:N // 2 - 2, :, 4:] > 0] == 17)
    assert np.all(seg[N // 2 + 2:-2, :, 4:] == 53)


def test_joint_label_fusion_saved_on_target_grid(jlf_case, tmp_path):
    seg = joint_label_fusion(jlf_case["target"], jlf_case["atlases"][:2], jlf_case["labels"][:2],
                             patch_radius_mm=VOX, search_radius_mm=VOX, n_threads=1)
    out = nb.load(save_labels(seg, jlf_case["target"], tmp_path / "seg.nii.gz"))
    assert np.allclose(out.affine, AFFINE) and out.shape == (N, N, N)
    inside = jlf_case["truth"] > 0
    assert (np.asanyarray(out.dataobj)[inside] == jlf_case["truth"][inside]).mean() > 0.99


def test_joint_label_fusion_refuses_different_grids(jlf_case, tmp_path):
    other = save(tmp_path / "other_dseg.nii.gz", np.zeros((N, N, N - 1), np.int16), AFFINE)
    with pytest.raises(ValueError, match="same grid"):
        joint_label_fusion(jlf_case["target"], jlf_case["atlases"][:2],
                           [jlf_case["labels"][0], other], patch_radius_mm=VOX)


# --- group volumes ------------------------------------------------------------------------------

def test_label_volumes_exact(tmp_path):
    affine = np.diag([0.5, 2.0, 4.0, 1.0])  # 4 mm³ voxels (exact in binary)
    affine[:3, :3] = affine[:3, :3] @ np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]])  # axes swapped
    affine[:3, 3] = [10, -20, 30]
    data = np.zeros((10, 10, 10), dtype=np.int16)
    data[:2] = 1           # 200 voxels
    data[2:3, :5] = 4      # 50 voxels
    data[9, 9, 9] = 7      # 1 voxel, not in the table
    seg = save(tmp_path / "seg.nii.gz", data, affine)
    labels = LabelTable((Label(1, "a"), Label(2, "absent"), Label(4, "d")))
    vols = label_volumes(seg, labels)
    assert vols == {1: 800.0, 2: 0.0, 4: 200.0}
    assert list(vols) == [1, 2, 4]


def test_label_volumes_anisotropic_voxels(tmp_path):
    data = np.zeros((6, 6, 6), dtype=np.uint8)
    data[:3, :2, :1] = 3  # 6 voxels of 1.2 x 1.5 x 2.5 = 4.5 mm³
    seg = save(tmp_path / "seg.nii.gz", data, np.diag([1.2, 1.5, 2.5, 1.0]))
    vols = label_volumes(seg, LabelTable((Label(3, "x"),)))
    assert vols[3] == pytest.approx(27.0, rel=1e-6)  # NIfTI stores the affine as float32


def test_label_volumes_label_beyond_data(tmp_path):
    data = np.zeros((4, 4, 4), dtype=np.int16)
    data[0] = 2
    seg = save(tmp_path / "seg.nii.gz", data, np.diag([1.0, 1.0, 1.0, 1.0]))
    vols = label_volumes(seg, LabelTable((Label(2, "x"), Label(2035, "far"))))
    assert vols == {2: 16.0, 2035: 0.0}


@pytest.mark.parametrize("radius_mm, voxel_sizes, expected", [
    (3.0, (1.0, 1.0, 1.0), 3), (3.0, (2.0, 2.0, 2.0), 2), (2.0, (3.0, 3.0, 3.0), 1),
    (0.5, (1.0, 1.0, 1.0), 1), (2.0, (1.0, 0.5, 1.0), 4),
])
def test_jlf_radius_in_voxels(radius_mm, voxel_sizes, expected):
    from dlf_bids.fusion import radius_in_voxels

    assert radius_in_voxels(radius_mm, voxel_sizes) == expected


def test_ants_seed_is_never_zero():
    """ANTs reads --random-seed 0 as 'seed from the clock': our seed 0 must not map to it."""
    from dlf_bids.registration import ants_seed

    assert ants_seed(0) != 0 and ants_seed(0) == ants_seed(0)
    assert len({ants_seed(s) for s in range(100)}) == 100
    assert all(1 <= ants_seed(s) < 2**31 for s in (0, 1, 2**31 - 2, 2**40, -5))


def test_labels_from_posteriors_keeps_background():
    """Where all label posteriors are ~0 the voxel is background, not the first label."""
    from dlf_bids.fusion import labels_from_posteriors

    p17 = np.array([[0.0, 0.7, 0.2, 0.0]], dtype=np.float32)
    p53 = np.array([[0.0, 0.2, 0.7, 0.4]], dtype=np.float32)
    mask = np.array([[True, True, True, False]])
    seg = labels_from_posteriors([p17, p53], [17, 53], mask)
    assert seg.tolist() == [[0, 17, 53, 0]]
    # background wins when it keeps the most mass (1 - 0.3 - 0.3 = 0.4 > 0.3)
    seg = labels_from_posteriors([np.array([[0.3]]), np.array([[0.3]])], [17, 53], np.array([[True]]))
    assert seg.tolist() == [[0]]


def test_labels_from_posteriors_equals_the_stacked_argmax():
    """The running reduction gives np.argmax's answer, ties included (earliest wins)."""
    from dlf_bids.fusion import labels_from_posteriors

    rng = np.random.default_rng(3)
    posteriors = [np.round(rng.uniform(0, 0.4, (6, 7, 5)), 1).astype(np.float32) for _ in range(4)]
    values = [2, 41, 3, 42]
    mask = rng.uniform(size=(6, 7, 5)) > 0.2
    probs = np.stack(posteriors)
    background = np.clip(1.0 - probs.sum(axis=0), 0.0, 1.0)
    expected = np.array([0, *values])[np.argmax(np.concatenate([background[None], probs]), axis=0)]
    expected[~mask] = 0
    assert np.array_equal(labels_from_posteriors(posteriors, values, mask), expected)


def test_joint_label_fusion_leaves_dilated_margin_background(jlf_case):
    """The fusion mask is dilated beyond the atlases' union; that margin must stay background."""
    from dlf_bids.fusion import fusion_mask, load_label_stack

    stack, _ = load_label_stack(jlf_case["labels"][:3])
    margin = fusion_mask(stack, 2) & ~(stack > 0).any(axis=0)
    assert margin.sum() > 0
    seg = joint_label_fusion(jlf_case["target"], jlf_case["atlases"][:3], jlf_case["labels"][:3],
                             patch_radius_mm=VOX, search_radius_mm=VOX, n_threads=1)
    assert np.all(seg[margin] == 0)


def test_joint_label_fusion_refuses_a_single_atlas(jlf_case):
    """antspyx would fail with an IndexError; we say why instead."""
    from dlf_bids.errors import UsageError
    from dlf_bids.fusion import joint_label_fusion

    with pytest.raises(UsageError, match="at least 2 atlases"):
        joint_label_fusion(jlf_case["target"], jlf_case["atlases"][:1], jlf_case["labels"][:1])
