"""Nipype interface around :func:`dlf_bids.registration.register_atlas`."""

from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..registration import REGISTRATION_PRESETS, coregister_t2w, register_atlas


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
