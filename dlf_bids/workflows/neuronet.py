"""NeuroNet at the participant level: one node, one forward pass, every protocol's derivatives.

The protocol with the BIDS common tissue labels becomes ``<image>_dseg.nii.gz`` and
``<image>_label-{GM,WM,CSF}_probseg.nii.gz`` (the names and label values sMRIPrep and fMRIPrep
read through ``--derivatives``); every other protocol of the model becomes
``<image>_seg-<protocol>_dseg.nii.gz``. The node reads only the T1w (and, for a T1w + T2w
model, the subject's T2w rigidly registered onto it) and the model: no atlas.
"""

from __future__ import annotations

from nipype.pipeline import engine as pe

from ..interfaces.bids import DerivativesDataSink
from ..interfaces.neuronet import NeuroNetSegment
from ..neuronet_segmentation import TISSUE_LABELS, model_outputs
from ..utils.bids import bids_uri

DESCRIPTION = ("NeuroNet (Rajchl et al., 2018): one forward pass of a network trained by "
               "dlf-bids-train-neuronet on the raw T1w, no skull stripping or bias correction.")


def connect_neuronet(workflow, t1w_source, config, anat, mem_gb: float, t2w_source=None) -> None:
    """Add the NeuroNet node and its sinks to ``workflow``; ``t1w_source``: (node, field) of the
    header-validated T1w; ``t2w_source``: (node, field) of the subject's T2w registered onto it
    (the image workflow's one registration, shared by every model that takes a T2w), given
    when the subject has a T2w and the model a T2w channel."""
    outputs = model_outputs(str(config.tissue_model))
    threads = config.threads_per_process
    node = pe.Node(NeuroNetSegment(model_file=str(config.tissue_model), device=config.device,
                                   num_threads=threads, other_protocols=list(outputs.other_protocols),
                                   base_metadata={"Description": DESCRIPTION, "Sources": [
                                       bids_uri(anat.t1w, config.bids_dir, "raw")]}),
                   name="neuronet", n_procs=threads, mem_gb=mem_gb)
    workflow.connect(*t1w_source, node, "t1w")
    if t2w_source is not None:
        workflow.connect(*t2w_source, node, "t2w")

    def sink(name, **entities):
        return pe.Node(DerivativesDataSink(base_directory=str(config.output_dir),
                                           source_file=str(anat.t1w), compress=True, **entities),
                       name=name, run_without_submitting=True)

    if outputs.tissue_protocol is not None:
        node.inputs.tissue_protocol = outputs.tissue_protocol
        ds_tissue = sink("ds_neuronet_dseg", suffix="dseg")
        ds_probseg = sink("ds_neuronet_probseg", suffix="probseg", label=list(TISSUE_LABELS))
        workflow.connect([(node, ds_tissue, [("out_tissue", "in_file"), ("metadata", "meta_dict")]),
                          (node, ds_probseg, [("out_probseg", "in_file")])])
    for k, protocol in enumerate(outputs.other_protocols):
        ds_seg = sink(f"ds_neuronet_seg_{protocol}", suffix="dseg", segmentation=protocol)
        workflow.connect([(node, ds_seg, [(("out_dsegs", _pick, k), "in_file"),
                                          ("metadata", "meta_dict")])])


def _pick(files, index):
    """The ``index``-th file of a node's list output (a connection function: no extra node)."""
    return files[index]


def expected_neuronet_outputs(config, anat) -> dict:
    """Every file the NeuroNet step writes for this T1w (for the run summary)."""
    from ..interfaces.bids import derivative_path

    if config.tissue_model is None:
        return {}
    outputs = model_outputs(str(config.tissue_model))
    base = {"subject": anat.subject, **anat.entities}
    files = {}
    if outputs.tissue_protocol is not None:
        files["neuronet dseg"] = derivative_path(config.output_dir, {**base, "suffix": "dseg"})
        for label in TISSUE_LABELS:
            files[f"neuronet {label}"] = derivative_path(
                config.output_dir, {**base, "label": label, "suffix": "probseg"})
    for protocol in outputs.other_protocols:
        files[f"neuronet {protocol}"] = derivative_path(
            config.output_dir, {**base, "segmentation": protocol, "suffix": "dseg"})
    return files
