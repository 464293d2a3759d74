"""Nipype interfaces around :mod:`dlf_bids.deepatlas_registration` (DeepAtlas as a registration
engine, and its segmentation network's own output)."""

import os

from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..deepatlas_registration import (ALIGNMENT, REFINE_STEPS, AlignedImage, align_to_reference,
                                      make_reference_grid, model_reference,
                                      register_atlas_deepatlas, segment_deepatlas)


class _AlignToReferenceInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image to align (T1w)")
    labels = File(exists=True, desc="its label map, also brought onto the reference grid")
    t2w = File(exists=True, desc="its T2w, also brought onto the reference grid (T1w + T2w models)")
    t2w_on_image_grid = traits.Bool(False, usedefault=True,
                                    desc="the T2w is already in the T1w's space (no rigid step)")
    reference = File(exists=True, desc="reference grid (else the model's)")
    transform_type = traits.Str(ALIGNMENT, usedefault=True,
                                desc="antspyx transform type (with a model: the model's)")
    model_file = File(exists=True, desc="DeepAtlas model holding the reference grid")
    seed = traits.Int(0, usedefault=True, desc="random seed passed to antsRegistration")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="ITK threads")


class _AlignToReferenceOutputSpec(TraitedSpec):
    transform = File(exists=True, desc="reference -> image affine (ANTs .mat)")
    on_reference = File(exists=True, desc="the image on the reference grid")
    labels_on_reference = File(exists=True, desc="the label map on the reference grid")
    t2w_on_reference = File(exists=True, desc="the T2w on the reference grid")
    t2w_to_t1w = File(exists=True, desc="T2w -> T1w rigid (ANTs .mat), when registered here")
    reference = File(exists=True, desc="the reference grid used")


class AlignToReference(SimpleInterface):
    """Affine pre-alignment (antspyx) of one image to the DeepAtlas reference grid."""

    input_spec = _AlignToReferenceInputSpec
    output_spec = _AlignToReferenceOutputSpec

    def _run_interface(self, runtime):
        reference, transform_type = self.inputs.reference or None, self.inputs.transform_type
        if reference is None:
            if not self.inputs.model_file:
                raise ValueError("AlignToReference needs a reference or a model_file")
            reference, transform_type = model_reference(
                self.inputs.model_file, os.path.join(runtime.cwd, "reference.nii.gz"))
            reference = str(reference)
        aligned = align_to_reference(self.inputs.in_file, reference, runtime.cwd, seed=self.inputs.seed,
                                     n_threads=self.inputs.num_threads,
                                     labels_file=self.inputs.labels or None,
                                     transform_type=transform_type, t2w_file=self.inputs.t2w or None,
                                     t2w_on_image_grid=self.inputs.t2w_on_image_grid)
        self._results.update(transform=str(aligned.transform), on_reference=str(aligned.on_reference),
                             reference=reference)
        if aligned.labels_on_reference is not None:
            self._results["labels_on_reference"] = str(aligned.labels_on_reference)
        if aligned.t2w_on_reference is not None:
            self._results["t2w_on_reference"] = str(aligned.t2w_on_reference)
        if aligned.t2w_to_t1w is not None:
            self._results["t2w_to_t1w"] = str(aligned.t2w_to_t1w)
        return runtime


class _MakeReferenceGridInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="T1w defining the grid")
    voxel_size = traits.Float(mandatory=True, desc="voxel size of the grid (mm)")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="ITK threads")


class _MakeReferenceGridOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the reference grid (resampled, cropped to the head)")


class MakeReferenceGrid(SimpleInterface):
    """The DeepAtlas reference grid of a training run. A node rather than a call in the command:
    ITK's thread count is fixed by the first ITK call of a process, and the workers MultiProc
    forks from the command must start with the one they ask for (their alignments repeat
    exactly only single-threaded)."""

    input_spec = _MakeReferenceGridInputSpec
    output_spec = _MakeReferenceGridOutputSpec

    def _run_interface(self, runtime):
        from ..registration import set_itk_threads

        set_itk_threads(self.inputs.num_threads)
        self._results["out_file"] = str(make_reference_grid(
            self.inputs.in_file, self.inputs.voxel_size, os.path.join(runtime.cwd, "reference.nii.gz")))
        return runtime


class _SubjectOnReferenceInputSpec(BaseInterfaceInputSpec):
    """What every per-subject DeepAtlas node takes: the subject, its alignment, the model."""

    target_t1w = File(exists=True, mandatory=True, desc="subject T1w: the output grid")
    target_transform = File(exists=True, mandatory=True, desc="reference -> subject affine")
    target_on_reference = File(exists=True, mandatory=True, desc="subject T1w on the reference grid")
    target_t2w_on_reference = File(exists=True, desc="subject T2w on the reference grid (else "
                                                     "noise, for a T1w + T2w model)")
    model_file = File(exists=True, mandatory=True, desc="DeepAtlas model")
    device = traits.Str("cpu", usedefault=True, nohash=True, desc="torch device")
    seed = traits.Int(0, usedefault=True, desc="random seed (rigid T2w -> T1w, noise channels)")

    def aligned_target(self):
        """The subject as :func:`~dlf_bids.deepatlas_registration.align_to_reference` gave it."""
        return AlignedImage(self.target_transform, self.target_on_reference,
                            t2w_on_reference=self.target_t2w_on_reference or None)


class _RegisterAtlasDeepAtlasInputSpec(_SubjectOnReferenceInputSpec):
    reference = File(exists=True, mandatory=True, desc="the reference grid")
    atlas_t1w = File(exists=True, mandatory=True, desc="atlas T1w")
    atlas_transform = File(exists=True, mandatory=True, desc="reference -> atlas affine")
    atlas_on_reference = File(exists=True, mandatory=True, desc="atlas T1w on the reference grid")
    atlas_t2w_on_reference = File(exists=True, desc="atlas T2w on the reference grid (else noise, "
                                                    "for a T1w + T2w model)")
    atlas_dseg = File(exists=True, mandatory=True, desc="atlas label map on the atlas T1w grid")
    atlas_t2w = File(exists=True, desc="atlas T2w (rigidly aligned to the atlas T1w, then warped)")
    atlas_t2w_to_t1w = File(exists=True, desc="atlas T2w -> T1w rigid of the run's alignment "
                                              "(else registered here)")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="ITK threads")
    refine_steps = traits.Int(REFINE_STEPS, usedefault=True,
                              desc="instance-optimisation steps on the pair (0: the network alone)")


class _RegisterAtlasDeepAtlasOutputSpec(TraitedSpec):
    warped_t1w = File(exists=True, desc="atlas T1w on the subject grid")
    warped_dseg = File(exists=True, desc="atlas labels on the subject grid (genericLabel)")
    transforms = traits.List(File(exists=True), desc="subject <- atlas transforms, ANTs order")
    warped_t2w = File(exists=True, desc="atlas T2w on the subject grid (if given)")
    composite = File(exists=True, desc="the same transforms as one ANTs composite (.h5)")
    min_jacobian = traits.Float(desc="smallest Jacobian determinant of the network's warp")
    xfm_metadata = traits.Dict(desc="sidecar of the composite transform (with min_jacobian)")


def xfm_sidecar(min_jacobian: float, folded_fraction: float, refine_steps: int) -> dict:
    """The sidecar of an atlas -> T1w composite: what it holds, and the QC numbers of its warp."""
    refined = f" (refined by {refine_steps} steps of optimisation on this pair)" if refine_steps else ""
    return {"Description": "Atlas -> T1w transform, one ANTs composite: the subject's affine to "
                           "the DeepAtlas reference grid (inverted), the network's displacement "
                           f"there{refined}, the atlas's affine to that grid",
            "MinimumJacobianDeterminant": round(float(min_jacobian), 4),
            # share of the DeepAtlas grid's voxels where the warp folds (determinant <= 0)
            "FoldedVoxelFraction": round(float(folded_fraction), 6)}


class RegisterAtlasDeepAtlas(SimpleInterface):
    """Warp one atlas onto the subject with the DeepAtlas registration network."""

    input_spec = _RegisterAtlasDeepAtlasInputSpec
    output_spec = _RegisterAtlasDeepAtlasOutputSpec

    def _run_interface(self, runtime):
        i = self.inputs
        atlas = AlignedImage(i.atlas_transform, i.atlas_on_reference,
                             t2w_on_reference=i.atlas_t2w_on_reference or None,
                             t2w_to_t1w=i.atlas_t2w_to_t1w or None)
        warped = register_atlas_deepatlas(
            i.target_t1w, i.aligned_target(), i.atlas_t1w, i.atlas_dseg, atlas, i.model_file,
            i.reference, runtime.cwd, seed=self.inputs.seed,
            n_threads=self.inputs.num_threads, atlas_t2w=self.inputs.atlas_t2w or None,
            device=self.inputs.device, refine_steps=self.inputs.refine_steps)
        self._results.update(warped_t1w=str(warped.t1w), warped_dseg=str(warped.dseg),
                             transforms=[str(t) for t in warped.transforms],
                             composite=str(warped.composite), min_jacobian=warped.min_jacobian,
                             xfm_metadata=xfm_sidecar(warped.min_jacobian, warped.folded_fraction,
                                                      i.refine_steps))
        if warped.t2w is not None:
            self._results["warped_t2w"] = str(warped.t2w)
        return runtime


class _SegmentDeepAtlasInputSpec(_SubjectOnReferenceInputSpec):
    pass


class _SegmentDeepAtlasOutputSpec(TraitedSpec):
    out_dseg = File(exists=True, desc="the segmentation network's label map on the subject grid")


class SegmentDeepAtlas(SimpleInterface):
    """The DeepAtlas segmentation network's own label map of the subject."""

    input_spec = _SegmentDeepAtlasInputSpec
    output_spec = _SegmentDeepAtlasOutputSpec

    def _run_interface(self, runtime):
        out = segment_deepatlas(self.inputs.target_t1w, self.inputs.aligned_target(),
                                self.inputs.model_file,
                                os.path.join(runtime.cwd, "deepatlas_dseg.nii.gz"),
                                device=self.inputs.device, seed=self.inputs.seed)
        self._results["out_dseg"] = str(out)
        return runtime
