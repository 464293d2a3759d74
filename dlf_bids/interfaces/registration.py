"""Nipype interface around :func:`dlf_bids.registration.register_atlas`."""

from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..registration import REGISTRATION_PRESETS, register_atlas


class _RegisterAtlasInputSpec(BaseInterfaceInputSpec):
    target_t1w = File(exists=True, mandatory=True, desc="subject T1w (fixed image)")
    atlas_t1w = File(exists=True, mandatory=True, desc="atlas T1w (moving image)")
    atlas_dseg = File(exists=True, mandatory=True, desc="atlas label map on the atlas T1w grid")
    preset = traits.Enum(*REGISTRATION_PRESETS, usedefault=True, desc="registration preset")
    seed = traits.Int(0, usedefault=True, desc="random seed passed to antsRegistration")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="ITK threads")


class _RegisterAtlasOutputSpec(TraitedSpec):
    warped_t1w = File(exists=True, desc="atlas T1w on the subject grid")
    warped_dseg = File(exists=True, desc="atlas labels on the subject grid (genericLabel)")
    transforms = traits.List(File(exists=True), desc="atlas-to-subject transforms")


class RegisterAtlas(SimpleInterface):
    """Register one atlas to the subject's T1w (antspyx) and warp its labels."""

    input_spec = _RegisterAtlasInputSpec
    output_spec = _RegisterAtlasOutputSpec

    def _run_interface(self, runtime):
        warped = register_atlas(self.inputs.target_t1w, self.inputs.atlas_t1w,
                                self.inputs.atlas_dseg, runtime.cwd, preset=self.inputs.preset,
                                seed=self.inputs.seed, n_threads=self.inputs.num_threads)
        self._results.update(warped_t1w=str(warped.t1w), warped_dseg=str(warped.dseg),
                             transforms=[str(t) for t in warped.transforms])
        return runtime
