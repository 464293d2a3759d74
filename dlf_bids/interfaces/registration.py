"""Nipype interfaces around the registration functions of :mod:`dlf_bids.registration`."""

from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..registration import (REGISTRATION_PRESETS, coregister_t2w, register_atlas,
                            register_to_template, warp_labels)


class _RegisterAtlasInputSpec(BaseInterfaceInputSpec):
    target_t1w = File(exists=True, mandatory=True, desc="subject T1w (fixed image)")
    atlas_t1w = File(exists=True, mandatory=True, desc="atlas T1w (moving image)")
    atlas_dseg = File(exists=True, mandatory=True, desc="atlas label map on the atlas T1w grid")
    atlas_t2w = File(exists=True, desc="atlas T2w (any grid): rigidly aligned to the atlas T1w, "
                                       "then warped with it")
    preset = traits.Enum(*REGISTRATION_PRESETS, usedefault=True, desc="registration preset")
    seed = traits.Int(0, usedefault=True, desc="random seed passed to antsRegistration")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="ITK threads")


class _RegisterAtlasOutputSpec(TraitedSpec):
    warped_t1w = File(exists=True, desc="atlas T1w on the subject grid")
    warped_dseg = File(exists=True, desc="atlas labels on the subject grid (genericLabel)")
    transforms = traits.List(File(exists=True), desc="atlas-to-subject transforms")
    warped_t2w = File(exists=True, desc="atlas T2w on the subject grid (if given)")


class RegisterAtlas(SimpleInterface):
    """Register one atlas to the subject's T1w (antspyx) and warp its labels."""

    input_spec = _RegisterAtlasInputSpec
    output_spec = _RegisterAtlasOutputSpec

    def _run_interface(self, runtime):
        warped = register_atlas(self.inputs.target_t1w, self.inputs.atlas_t1w,
                                self.inputs.atlas_dseg, runtime.cwd, preset=self.inputs.preset,
                                seed=self.inputs.seed, n_threads=self.inputs.num_threads,
                                atlas_t2w=self.inputs.atlas_t2w or None)
        self._results.update(warped_t1w=str(warped.t1w), warped_dseg=str(warped.dseg),
                             transforms=[str(t) for t in warped.transforms])
        if warped.t2w is not None:
            self._results["warped_t2w"] = str(warped.t2w)
        return runtime


class _CoregisterT2wInputSpec(BaseInterfaceInputSpec):
    t1w = File(exists=True, mandatory=True, desc="T1w: the reference grid")
    t2w = File(exists=True, mandatory=True, desc="T2w of the same session")
    seed = traits.Int(0, usedefault=True, desc="random seed")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="ITK threads")


class _CoregisterT2wOutputSpec(TraitedSpec):
    t2w_on_t1w = File(exists=True, desc="the T2w rigidly aligned and resampled onto the T1w grid")


class CoregisterT2w(SimpleInterface):
    """Rigid T2w-to-T1w registration and resampling onto the T1w grid (antspyx)."""

    input_spec = _CoregisterT2wInputSpec
    output_spec = _CoregisterT2wOutputSpec

    def _run_interface(self, runtime):
        out = coregister_t2w(self.inputs.t1w, self.inputs.t2w, f"{runtime.cwd}/T2w_on_T1w.nii.gz",
                             seed=self.inputs.seed, n_threads=self.inputs.num_threads)
        self._results["t2w_on_t1w"] = str(out)
        return runtime


class _RegisterToTemplateInputSpec(BaseInterfaceInputSpec):
    t1w = File(exists=True, mandatory=True, desc="subject T1w (moving image)")
    template_t1w = File(exists=True, mandatory=True, desc="template T1w (fixed image)")
    template_mask = File(exists=True, desc="template brain mask (focuses the metric)")
    preset = traits.Enum(*REGISTRATION_PRESETS, usedefault=True, desc="registration preset")
    seed = traits.Int(0, usedefault=True, desc="random seed passed to antsRegistration")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="ITK threads")


class _RegisterToTemplateOutputSpec(TraitedSpec):
    forward_transform = File(exists=True, desc="T1w -> template composite transform (.h5)")
    inverse_transform = File(exists=True, desc="template -> T1w composite transform (.h5)")
    t1w_in_template = File(exists=True, desc="the T1w resampled onto the template grid")


class RegisterToTemplate(SimpleInterface):
    """Register the subject's T1w to a template (antspyx), keeping both transforms."""

    input_spec = _RegisterToTemplateInputSpec
    output_spec = _RegisterToTemplateOutputSpec

    def _run_interface(self, runtime):
        out = register_to_template(self.inputs.t1w, self.inputs.template_t1w, runtime.cwd,
                                   preset=self.inputs.preset, seed=self.inputs.seed,
                                   n_threads=self.inputs.num_threads,
                                   template_mask=self.inputs.template_mask or None)
        self._results.update(forward_transform=str(out.forward),
                             inverse_transform=str(out.inverse),
                             t1w_in_template=str(out.t1w_in_template))
        return runtime


class _WarpLabelsInputSpec(BaseInterfaceInputSpec):
    labels = File(exists=True, mandatory=True, desc="label map on the subject's T1w grid")
    reference = File(exists=True, mandatory=True, desc="image whose grid the labels go onto")
    transform = File(exists=True, mandatory=True, desc="T1w -> reference transform")


class _WarpLabelsOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="labels on the reference grid (genericLabel)")


class WarpLabels(SimpleInterface):
    """Warp a label map onto another grid with ANTs' ``genericLabel`` interpolation."""

    input_spec = _WarpLabelsInputSpec
    output_spec = _WarpLabelsOutputSpec

    def _run_interface(self, runtime):
        out = warp_labels(self.inputs.labels, self.inputs.reference, self.inputs.transform,
                          f"{runtime.cwd}/labels_in_reference.nii.gz")
        self._results["out_file"] = str(out)
        return runtime
