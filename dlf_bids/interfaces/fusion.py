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


class _DLFInputSpec(_FusionInputSpec):
    atlas_t1w = InputMultiObject(File(exists=True), mandatory=True,
                                 desc="atlas T1w images warped onto the subject")
    atlas_t2w = InputMultiObject(File(exists=True), desc="atlas T2w images warped onto the subject")
    target_t2w = File(exists=True, desc="subject T2w on the T1w grid")
    model_file = File(exists=True, mandatory=True, desc="trained DLF model (dlf-bids-train)")
    device = traits.Str("cpu", usedefault=True, nohash=True, desc="auto, cpu or cuda")
    atlas_batch = traits.Int(4, usedefault=True, nohash=True, desc="atlases per forward pass")
    force = traits.Bool(False, usedefault=True, desc="feed noise for a missing modality even "
                                                     "if the model was not trained with ModAug")
    seed = traits.Int(0, usedefault=True, desc="seed of the noise channels")
    base_metadata = traits.Dict(desc="sidecar entries known when the graph is built")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="torch CPU threads")
    write_probseg = traits.Bool(False, usedefault=True,
                                desc="also write the per-label probabilities (4D)")
    probseg_base_metadata = traits.Dict(desc="probseg sidecar entries known at build time")


class _DLFOutputSpec(_FusionOutputSpec):
    out_uncertainty = File(exists=True, desc="normalised entropy of the fused label distribution")
    out_probseg = File(desc="4D foreground label probabilities (when write_probseg)")
    probseg_metadata = traits.Dict(desc="probseg_base_metadata plus the label of each volume")
    metadata = traits.Dict(desc="base_metadata plus what the run used (modalities, model hash)")


class DeepLabelFusion(SimpleInterface):
    """Deep Label Fusion (Xie et al., 2023) of the warped atlases with a trained model."""

    input_spec = _DLFInputSpec
    output_spec = _DLFOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nb
        import numpy as np
        import torch

        from ..dlf_fusion import deep_label_fusion, save_probseg

        torch.set_num_threads(max(1, self.inputs.num_threads))
        result = deep_label_fusion(
            self.inputs.target_t1w, list(self.inputs.atlas_t1w), list(self.inputs.atlas_dseg),
            self.inputs.model_file, target_t2w=self.inputs.target_t2w or None,
            atlas_t2w=list(self.inputs.atlas_t2w) if self.inputs.atlas_t2w else None,
            device=self.inputs.device, atlas_batch=self.inputs.atlas_batch,
            force=self.inputs.force, seed=self.inputs.seed)
        seg = os.path.join(runtime.cwd, "seg_dlf.nii.gz")
        self._results["out_dseg"] = str(save_labels(result.labels, self.inputs.target_t1w, seg))
        ref = nb.load(self.inputs.target_t1w)
        unc = nb.Nifti1Image(result.uncertainty.astype(np.float32), ref.affine)
        unc.header.set_xyzt_units("mm")
        self._results["out_uncertainty"] = os.path.join(runtime.cwd, "uncertainty_dlf.nii.gz")
        nb.save(unc, self._results["out_uncertainty"])
        if self.inputs.write_probseg:
            self._results["out_probseg"] = str(save_probseg(
                result.probabilities, self.inputs.target_t1w,
                os.path.join(runtime.cwd, "probseg_dlf.nii.gz")))
            # volume order = the model's channels (it may know labels the library lacks)
            self._results["probseg_metadata"] = {
                **(self.inputs.probseg_base_metadata or {}),
                "LabelIndices": [int(v) for v in result.channel_values[1:]]}
        self._results["metadata"] = {**(self.inputs.base_metadata or {}), **result.provenance}
        return runtime
