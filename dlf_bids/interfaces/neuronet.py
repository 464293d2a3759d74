"""Nipype interface around NeuroNet's participant-level function
(:func:`dlf_bids.neuronet_segmentation.neuronet_segment`)."""

from nipype.interfaces.base import (BaseInterfaceInputSpec, File, OutputMultiObject,
                                    SimpleInterface, TraitedSpec, traits)


class _NeuroNetInputSpec(BaseInterfaceInputSpec):
    t1w = File(exists=True, mandatory=True, desc="raw T1w (header-validated); the output grid")
    model_file = File(exists=True, mandatory=True, desc="NeuroNet model (dlf-bids-train-neuronet)")
    t2w = File(exists=True, desc="T2w on the T1w grid (T1w + T2w models)")
    tissue_protocol = traits.Str(desc="protocol written as the BIDS tissue dseg + probsegs")
    other_protocols = traits.List(traits.Str, desc="protocols written as seg-<protocol> dsegs")
    device = traits.Str("cpu", usedefault=True, nohash=True, desc="auto, cpu or cuda")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="torch CPU threads")
    base_metadata = traits.Dict(desc="sidecar entries known when the graph is built")


class _NeuroNetOutputSpec(TraitedSpec):
    out_tissue = File(desc="tissue dseg (1 GM, 2 WM, 3 CSF)")
    out_probseg = OutputMultiObject(File(exists=True), desc="GM, WM, CSF probabilities (float32)")
    out_dsegs = OutputMultiObject(File(exists=True), desc="dsegs of other_protocols, in order")
    metadata = traits.Dict(desc="base_metadata plus the model's name, hash and protocols")


class NeuroNetSegment(SimpleInterface):
    """Every protocol of a NeuroNet model from one forward pass over the raw T1w."""

    input_spec = _NeuroNetInputSpec
    output_spec = _NeuroNetOutputSpec

    def _run_interface(self, runtime):
        import torch

        from ..neuronet_segmentation import TISSUE_LABELS, neuronet_segment

        torch.set_num_threads(max(1, self.inputs.num_threads))
        result = neuronet_segment(self.inputs.t1w, self.inputs.model_file, runtime.cwd,
                                  device=self.inputs.device, t2w_file=self.inputs.t2w or None)
        if self.inputs.tissue_protocol:
            self._results["out_tissue"] = str(result.dsegs[self.inputs.tissue_protocol])
            self._results["out_probseg"] = [str(result.probsegs[k]) for k in TISSUE_LABELS]
        self._results["out_dsegs"] = [str(result.dsegs[p]) for p in self.inputs.other_protocols]
        self._results["metadata"] = {**(self.inputs.base_metadata or {}), **result.provenance}
        return runtime
