"""Nipype interface around :mod:`dlf_bids.volumes`: the label volumes table of one segmentation."""

import os

from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..utils.files import write_text_atomic
from ..utils.labels import read_label_table
from ..volumes import measure_volumes, volumes_dictionary, volumes_tsv


class _LabelVolumesInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="label map")
    label_table = File(exists=True, mandatory=True, desc="its look-up table (BIDS dseg.tsv)")
    method = traits.Str(mandatory=True, desc="segmentation method, named in the data dictionary")


class _LabelVolumesOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="volumes table (index, name, volume_mm3, voxels)")
    data_dictionary = traits.Dict(desc="the table's JSON data dictionary")


class LabelVolumes(SimpleInterface):
    """Volume of every label, plus the totals the look-up table allows, as a TSV."""

    input_spec = _LabelVolumesInputSpec
    output_spec = _LabelVolumesOutputSpec

    def _run_interface(self, runtime):
        labels = read_label_table(self.inputs.label_table)
        out = os.path.join(runtime.cwd, "volumes.tsv")
        write_text_atomic(out, volumes_tsv(measure_volumes(self.inputs.in_file, labels)))
        self._results["out_file"] = out
        self._results["data_dictionary"] = volumes_dictionary(labels, self.inputs.method)
        return runtime
