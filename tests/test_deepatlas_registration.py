"""DeepAtlas as a registration engine: the pure functions of dlf_bids.deepatlas_registration.

The network's displacement (voxels of the reference grid) must mean the same thing once turned
into an ANTs displacement field and composed with the two affines: these tests pin that with
known fields on grids whose axes are permuted and flipped (FreeSurfer's LIA), where a sign or an
axis mix-up would show.
"""

from __future__ import annotations

import nibabel as nb
import numpy as np
import pytest
import torch

from dlf_bids.deepatlas_registration import (AlignedImage, align_to_reference, displacement_field,
                                             make_reference_grid, network_input)
from dlf_bids.models.deepatlas import warp_labels

from conftest import blob_phantom

LIA = np.array([[-2.0, 0, 0, 60], [0, 0, 2.0, -50], [0, -2.0, 0, 70], [0, 0, 0, 1]])


def _save(path, data, affine=LIA):
    img = nb.Nifti1Image(np.asarray(data), affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    nb.save(img, str(path))
    return path


def _identity_affine(path):
    import ants

    ants.write_transform(ants.create_ants_transform(transform_type="AffineTransform", dimension=3),
                         str(path))
    return path


@pytest.mark.parametrize("axis,shift", [(0, 2.0), (1, -3.0), (2, 1.0)])
def test_displacement_field_matches_the_network_warp(tmp_path, axis, shift):
    """ANTs, given our field, samples where MONAI's Warp samples: same labels on the grid."""
    import ants

    images, labels = blob_phantom(0, shape=(20, 22, 18))
    image = images[0]
    ref = _save(tmp_path / "ref.nii.gz", image.astype(np.float32))
    lab = _save(tmp_path / "lab.nii.gz", labels.astype(np.int16))
    ddf = np.zeros((3, *labels.shape), np.float32)
    ddf[axis] = shift
    expected = warp_labels(torch.from_numpy(labels.astype(np.float32))[None, None],
                           torch.from_numpy(ddf)[None])[0, 0].numpy()

    reference = ants.image_read(str(ref))
    field = tmp_path / "field.nii.gz"
    ants.image_write(displacement_field(ddf, reference), str(field))
    ident = str(_identity_affine(tmp_path / "identity.mat"))
    warped = ants.apply_transforms(reference, ants.image_read(str(lab)), [ident, str(field), ident],
                                   whichtoinvert=[True, False, False],
                                   interpolator="nearestNeighbor").numpy()
    # MONAI pads with the border value where ANTs pads with 0: compare inside the shifted grid
    inside = [slice(None)] * 3
    n = int(abs(shift))
    inside[axis] = slice(0, labels.shape[axis] - n) if shift > 0 else slice(n, None)
    np.testing.assert_array_equal(warped[tuple(inside)], expected[tuple(inside)])
    assert (labels != np.roll(labels, -int(shift), axis)).any()  # the shift matters


def test_align_to_reference_undoes_a_translation(tmp_path):
    """A subject moved by 8 mm comes back onto the reference grid, its labels with it."""
    import ants

    images, labels = blob_phantom(1, shape=(28, 28, 28))
    image = images[0]
    ref = _save(tmp_path / "ref.nii.gz", image.astype(np.float32))
    moved = LIA.copy()
    moved[:3, 3] += [8.0, -6.0, 4.0]
    img = _save(tmp_path / "moved.nii.gz", image.astype(np.float32), moved)
    lab = _save(tmp_path / "moved_dseg.nii.gz", labels.astype(np.int16), moved)
    aligned = align_to_reference(img, ref, tmp_path / "align", seed=0, n_threads=1, labels_file=lab)
    back = nb.load(str(aligned.labels_on_reference)).get_fdata()
    overlap = np.mean(back[labels > 0] == labels[labels > 0])
    # the moved labels read at the same world positions, without the alignment
    ident = str(_identity_affine(tmp_path / "identity.mat"))
    unaligned = ants.apply_transforms(ants.image_read(str(ref)), ants.image_read(str(lab)), [ident],
                                      interpolator="nearestNeighbor").numpy()
    before = np.mean(unaligned[labels > 0] == labels[labels > 0])
    assert overlap > 0.9 and before < 0.7, (overlap, before)
    assert isinstance(aligned, AlignedImage) and aligned.transform.is_file()


def test_a_t2w_follows_its_t1w_onto_the_reference_grid(tmp_path):
    """The T2w goes through the T1w's affine: one already in the T1w's space (the participant
    level's coregistered T2w) lands where the T1w lands; a T2w moved away from its T1w is brought
    back by the rigid step first."""
    images, labels = blob_phantom(1, shape=(28, 28, 28))
    t1w, t2w = images
    ref = _save(tmp_path / "ref.nii.gz", t1w.astype(np.float32))
    moved = LIA.copy()
    moved[:3, 3] += [8.0, -6.0, 4.0]
    img = _save(tmp_path / "moved_T1w.nii.gz", t1w.astype(np.float32), moved)
    same_space = _save(tmp_path / "same_T2w.nii.gz", t1w.astype(np.float32), moved)
    aligned = align_to_reference(img, ref, tmp_path / "a", seed=0, n_threads=1, t2w_file=same_space,
                                 t2w_on_image_grid=True)
    on_ref = nb.load(str(aligned.on_reference))
    t2w_on_ref = nb.load(str(aligned.t2w_on_reference))
    assert t2w_on_ref.shape == on_ref.shape and np.allclose(t2w_on_ref.affine, on_ref.affine)
    np.testing.assert_allclose(t2w_on_ref.get_fdata(), on_ref.get_fdata(), atol=1e-3)

    elsewhere = moved.copy()
    elsewhere[:3, 3] += [-4.0, 6.0, 2.0]  # the T2w scanned 7.5 mm away from its T1w
    t2w_file = _save(tmp_path / "moved_T2w.nii.gz", t2w.astype(np.float32), elsewhere)
    aligned = align_to_reference(img, ref, tmp_path / "b", seed=0, n_threads=1, t2w_file=t2w_file)
    back = nb.load(str(aligned.t2w_on_reference)).get_fdata()
    inside = labels == 41  # the T2w-dark blob comes back where it is on the reference
    assert back[inside].mean() < 0.6 * back[labels == 0][t1w[labels == 0] > 0].mean()

    two = network_input(aligned, ["T1w", "T2w"])
    assert two.shape == (2, *on_ref.shape)
    np.testing.assert_array_equal(two[1], back.astype(np.float32))
    bare = AlignedImage(aligned.transform, aligned.on_reference)
    noise = network_input(bare, ["T1w", "T2w"], seed=3)
    assert abs(noise[1].std() - 1) < 0.05 and np.array_equal(noise, network_input(bare, ["T1w", "T2w"], seed=3))
    assert network_input(bare, ["T1w"]).shape == (1, *on_ref.shape)


def test_reference_grid_is_cropped_to_the_head(tmp_path):
    data = np.zeros((40, 40, 40), np.float32)
    data[10:30, 12:28, 5:35] = 100.0
    src = _save(tmp_path / "t1w.nii.gz", data, np.diag([1.0, 1.0, 1.0, 1.0]))
    ref = nb.load(str(make_reference_grid(src, 2.0, tmp_path / "ref.nii.gz", margin_voxels=1)))
    assert np.allclose(ref.header.get_zooms()[:3], 2.0)
    # 20 x 16 x 30 mm of head at 2 mm, plus one voxel of margin on each side (and resampling edges)
    assert ref.shape[0] <= 10 + 4 and ref.shape[1] <= 8 + 4 and ref.shape[2] <= 15 + 4
    assert ref.shape[0] >= 10 and ref.shape[1] >= 8 and ref.shape[2] >= 15


def test_an_atlas_t2w_is_warped_through_the_rigid_of_its_alignment(tmp_path):
    """The run's atlas alignment keeps its T2w -> T1w rigid; warping that atlas's T2w for DLF
    goes through it (no second registration per subject), and only a T2w already on its T1w
    grid has none."""
    import ants

    from dlf_bids.deepatlas_registration import register_atlas_deepatlas
    from dlf_bids.models.deepatlas import DeepAtlas, DeepAtlasConfig
    from dlf_bids.models.deepatlas_file import save_deepatlas

    images, labels = blob_phantom(1, shape=(24, 24, 24))
    t1w, t2w = (im.astype(np.float32) for im in images)
    ref = _save(tmp_path / "ref.nii.gz", t1w)
    elsewhere = LIA.copy()
    elsewhere[:3, 3] += [-4.0, 6.0, 2.0]
    atlas_t1w, atlas_dseg = _save(tmp_path / "a_T1w.nii.gz", t1w), _save(tmp_path / "a_dseg.nii.gz", labels.astype(np.int16))
    atlas_t2w = _save(tmp_path / "a_T2w.nii.gz", t2w, elsewhere)
    atlas = align_to_reference(atlas_t1w, ref, tmp_path / "atlas", seed=0, n_threads=1, t2w_file=atlas_t2w)
    assert atlas.t2w_to_t1w is not None and atlas.t2w_to_t1w.parent == tmp_path / "atlas"
    same_grid = align_to_reference(atlas_t1w, ref, tmp_path / "s", seed=0, n_threads=1,
                                   t2w_file=atlas_t1w, t2w_on_image_grid=True)
    assert same_grid.t2w_to_t1w is None
    target = align_to_reference(atlas_t1w, ref, tmp_path / "target", seed=0, n_threads=1)

    lab_values = (0, *np.unique(labels[labels > 0]).tolist())
    model = DeepAtlas(DeepAtlasConfig(n_labels=len(lab_values), labels=lab_values,
                                      reg_channels=(4, 4, 4), seg_channels=(4, 4, 4)))
    model_file = save_deepatlas(tmp_path / "m.pt", model, {"reference": (t1w, LIA), "voxel_size": 2.0})

    def warp(aligned, name):
        out = register_atlas_deepatlas(atlas_t1w, target, atlas_t1w, atlas_dseg, aligned, model_file, ref,
                                       tmp_path / name, seed=0, n_threads=1, atlas_t2w=atlas_t2w)
        return nb.load(str(out.t2w)).get_fdata()

    reused = warp(atlas, "reused")
    # a deliberately wrong rigid (10 mm off) shows which transform was applied
    wrong = ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                       translation=(10.0, 0.0, 0.0))
    ants.write_transform(wrong, str(tmp_path / "wrong.mat"))
    moved = warp(AlignedImage(atlas.transform, atlas.on_reference, t2w_to_t1w=tmp_path / "wrong.mat"), "wrong")
    fresh = warp(AlignedImage(atlas.transform, atlas.on_reference), "fresh")  # registered here
    assert np.abs(reused - moved).mean() > 0.1 * np.abs(reused).mean()
    dark = labels == 41  # the T2w-dark blob lands where the atlas labels put it, both ways
    for warped in (reused, fresh):
        assert warped[dark].mean() < 0.6 * warped[(labels == 0) & (t1w > 0)].mean()
