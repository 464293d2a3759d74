"""The per-image label volumes: a table node and its sink, hooked onto a segmentation output."""

from __future__ import annotations

from nipype.pipeline import engine as pe

from ..config import Config
from ..interfaces.bids import DerivativesDataSink
from ..interfaces.volumes import LabelVolumes
from ..resources import label_volumes_gb, n_voxels
from ..utils.atlas_library import AtlasLibrary
from ..utils.bids import AnatomicalInput


def connect_label_volumes(workflow: pe.Workflow, seg_source: tuple, config: Config,
                          anat: AnatomicalInput, library: AtlasLibrary, method: str,
                          label_table=None) -> None:
    """Add ``sub-X[_ses-…]_seg-<method>_volumes.tsv`` (+ data dictionary) for one method.

    ``seg_source`` is ``(node, output name)`` of the method's label map. The look-up table is the
    library's (the one written at the output root is a copy of it) unless ``label_table`` names
    another (the DeepAtlas segmentation network's own labels).
    """
    table = str(label_table or library.root / "dseg.tsv")
    volumes = pe.Node(LabelVolumes(label_table=table, method=method),
                      name=f"volumes_{method}", mem_gb=label_volumes_gb(n_voxels(anat.t1w)))
    ds_volumes = pe.Node(
        DerivativesDataSink(base_directory=str(config.output_dir), source_file=str(anat.t1w),
                            segmentation=method, suffix="volumes"),
        name=f"ds_volumes_{method}", run_without_submitting=True,
    )
    node, output = seg_source
    workflow.connect([
        (node, volumes, [(output, "in_file")]),
        (volumes, ds_volumes, [("out_file", "in_file"), ("data_dictionary", "meta_dict")]),
    ])
