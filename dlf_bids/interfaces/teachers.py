"""Nipype interfaces around NeuroNet's teacher functions (:mod:`dlf_bids.teachers`)."""

import os

from nipype.interfaces.base import (BaseInterfaceInputSpec, File, InputMultiObject,
                                    SimpleInterface, TraitedSpec, traits)


class _BrainMaskInputSpec(BaseInterfaceInputSpec):
    atlas_dseg = InputMultiObject(File(exists=True), mandatory=True,
                                  desc="atlas label maps warped onto the subject")


class _BrainMaskOutputSpec(TraitedSpec):
    out_mask = File(exists=True, desc="union of the warped atlas labels, holes filled, grown by 3 mm")


class BrainMaskFromLabels(SimpleInterface):
    """The brain mask the warped atlas labels give (for Atropos)."""

    input_spec = _BrainMaskInputSpec
    output_spec = _BrainMaskOutputSpec

    def _run_interface(self, runtime):
        from ..teachers import brain_mask_from_labels

        out = os.path.join(runtime.cwd, "brain_mask.nii.gz")
        self._results["out_mask"] = str(brain_mask_from_labels(list(self.inputs.atlas_dseg), out))
        return runtime


class _AtroposInputSpec(BaseInterfaceInputSpec):
    t1w = File(exists=True, mandatory=True, desc="raw T1w")
    mask = File(exists=True, mandatory=True, desc="brain mask on the T1w grid")
    n_classes = traits.Int(3, usedefault=True, desc="Atropos classes")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="ITK threads")


class _AtroposOutputSpec(TraitedSpec):
    out_classes = File(exists=True, desc="Atropos classes 1..n by increasing mean intensity")


class AtroposTissue(SimpleInterface):
    """N4 + Atropos (k-means initialisation, MRF) inside the brain mask (antspyx)."""

    input_spec = _AtroposInputSpec
    output_spec = _AtroposOutputSpec

    def _run_interface(self, runtime):
        from ..teachers import atropos_tissue

        out = os.path.join(runtime.cwd, "atropos_classes.nii.gz")
        self._results["out_classes"] = str(atropos_tissue(
            self.inputs.t1w, self.inputs.mask, out, n_classes=self.inputs.n_classes,
            n_threads=self.inputs.num_threads))
        return runtime


class _ProtocolLabelsInputSpec(BaseInterfaceInputSpec):
    protocol = traits.Dict(mandatory=True, desc="the protocol (Protocol.to_dict())")
    source = File(exists=True, mandatory=True, desc="the label map of the protocol's source")
    reference = File(exists=True, mandatory=True, desc="the image whose grid the labels are on")


class _ProtocolLabelsOutputSpec(TraitedSpec):
    out_labels = File(exists=True, desc="the protocol's label map")


class ProtocolLabels(SimpleInterface):
    """A protocol's label map from its source (as is, or collapsed by the protocol's map)."""

    input_spec = _ProtocolLabelsInputSpec
    output_spec = _ProtocolLabelsOutputSpec

    def _run_interface(self, runtime):
        from ..teachers import protocol_labels

        name = self.inputs.protocol.get("name", "protocol")
        out = os.path.join(runtime.cwd, f"{name}_labels.nii.gz")
        self._results["out_labels"] = str(protocol_labels(
            self.inputs.protocol, self.inputs.source, self.inputs.reference, out))
        return runtime
