"""The top-level graph: one sub-workflow per T1w image, each ending in derivatives sinks."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.interfaces.header import ValidateImage

from ..config import Config
from ..interfaces.bids import DerivativesDataSink
from ..utils.atlas_library import AtlasLibrary
from ..utils.bids import AnatomicalInput, bids_uri
from .multiatlas import init_multiatlas_wf

FUSION_DESCRIPTIONS = {
    "mv": "Majority voting of atlas labels registered to the subject with ANTs (antspyx).",
    "jlf": "Joint label fusion (Wang et al., 2013; antspyx) of atlases registered with ANTs.",
}


def init_dlf_bids_wf(config: Config, anatomicals: list[AnatomicalInput], library: AtlasLibrary):
    """One sub-workflow per T1w image, all in one graph so MultiProc can run them in parallel."""
    workflow = pe.Workflow(name="dlf_bids_wf")
    workflow.base_dir = str(config.work_dir)
    for anat in anatomicals:
        workflow.add_nodes([init_single_image_wf(config, anat, library)])
    return workflow


def segmentation_metadata(config: Config, anat: AnatomicalInput, library: AtlasLibrary,
                          method: str) -> dict:
    """The sidecar of a fused segmentation: where it came from and how it was made."""
    sources = [bids_uri(anat.t1w, config.bids_dir, "raw")]
    sources += [bids_uri(a.dseg, library.root, "atlases") for a in library.atlases]
    return {
        "Description": FUSION_DESCRIPTIONS[method],
        "Sources": sources,
        "SpatialReference": sources[0],  # native T1w geometry
        "RegistrationPreset": config.registration_preset,
        "Atlases": [f"sub-{a.atlas_id}" for a in library.atlases],
    }


def init_single_image_wf(config: Config, anat: AnatomicalInput, library: AtlasLibrary):
    """Segment one T1w image and write its derivatives in the image's native geometry."""
    workflow = pe.Workflow(name=f"{anat.name}_wf")
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="inputnode")
    inputnode.inputs.t1w = str(anat.t1w)

    # Fix inconsistent qform/sform before anything else reads the header (niworkflows).
    validate = pe.Node(ValidateImage(), name="validate_t1w")
    multiatlas_wf = init_multiatlas_wf(config, library)

    workflow.connect([
        (inputnode, validate, [("t1w", "in_file")]),
        (validate, multiatlas_wf, [("out_file", "inputnode.t1w")]),
    ])
    for method in config.fusion:
        ds_seg = pe.Node(
            DerivativesDataSink(
                base_directory=str(config.output_dir), source_file=str(anat.t1w),
                segmentation=method, suffix="dseg", compress=True,
                meta_dict=segmentation_metadata(config, anat, library, method),
            ),
            name=f"ds_seg_{method}", run_without_submitting=True,
        )
        workflow.connect(multiatlas_wf, f"outputnode.seg_{method}", ds_seg, "in_file")
    return workflow
