"""Nipype interfaces around the label fusion functions of :mod:`dlf_bids.fusion`."""

import os

from nipype.interfaces.base import (BaseInterfaceInputSpec, File, InputMultiObject,
                                    SimpleInterface, TraitedSpec, traits)

from ..fusion import joint_label_fusion, load_label_stack, majority_vote, save_labels


class _FusionInputSpec(BaseInterfaceInputSpec):
    target_t1w = File(exists=True, mandatory=True, desc="subject T1w; defines the output grid")
    atlas_dseg = InputMultiObject(File(exists=True), mandatory=True,
                                  desc="atlas label maps warped onto the subject")


class _FusionOutputSpec(TraitedSpec):
    out_dseg = File(exists=True, desc="fused label map on the subject's grid")


class MajorityVote(SimpleInterface):
    """The most frequent atlas label at each voxel."""

    input_spec = _FusionInputSpec
    output_spec = _FusionOutputSpec

    def _run_interface(self, runtime):
        stack, _ = load_label_stack(list(self.inputs.atlas_dseg))
        out = os.path.join(runtime.cwd, "seg_mv.nii.gz")
        self._results["out_dseg"] = str(save_labels(majority_vote(stack), self.inputs.target_t1w, out))
        return runtime


class _JLFInputSpec(_FusionInputSpec):
    atlas_t1w = InputMultiObject(File(exists=True), mandatory=True,
                                 desc="atlas images warped onto the subject (same order as labels)")
    beta = traits.Float(2.0, usedefault=True, desc="JLF weight exponent")
    patch_radius_mm = traits.Float(2.0, usedefault=True, desc="patch radius (mm)")
    search_radius_mm = traits.Float(3.0, usedefault=True, desc="search radius (mm)")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="ITK threads")


class JointLabelFusion(SimpleInterface):
    """Joint label fusion (Wang et al., 2013) via antspyx, masked by the dilated atlas union."""

    input_spec = _JLFInputSpec
    output_spec = _FusionOutputSpec

    def _run_interface(self, runtime):
        seg = joint_label_fusion(self.inputs.target_t1w, list(self.inputs.atlas_t1w),
                                 list(self.inputs.atlas_dseg), beta=self.inputs.beta,
                                 patch_radius_mm=self.inputs.patch_radius_mm,
                                 search_radius_mm=self.inputs.search_radius_mm,
                                 n_threads=self.inputs.num_threads)
        out = os.path.join(runtime.cwd, "seg_jlf.nii.gz")
        self._results["out_dseg"] = str(save_labels(seg, self.inputs.target_t1w, out))
        return runtime
