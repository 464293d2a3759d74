"""The top-level graph: one sub-workflow per T1w image, each ending in derivatives sinks."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.interfaces.header import ValidateImage

from ..config import Config
from ..interfaces.bids import DerivativesDataSink
from ..utils.atlas_library import AtlasLibrary
from ..utils.bids import AnatomicalInput, bids_uri
from ..interfaces.registration import CoregisterT2w
from ..interfaces.reports import PublishFigure, RegistrationCheck
from ..reports.layout import REGISTRATION_FIGURE, figure_path
from ..resources import plan_for_run
from .multiatlas import (deepatlas_uses_t2w, dlf_uses_t2w, init_align_atlases_node,
                         init_multiatlas_wf)
from .neuronet import connect_neuronet
from .spaces import init_output_spaces_wf
from .volumes import connect_label_volumes

FUSION_DESCRIPTIONS = {  # completed by the registration engine's phrase
    "dlf": "Deep Label Fusion (Xie et al., 2023) of atlases registered to the subject {engine}.",
    "mv": "Majority voting of atlas labels registered to the subject {engine}.",
    "jlf": "Joint label fusion (Wang et al., 2013; antspyx) of atlases registered to the subject {engine}.",
}
ENGINE_PHRASES = {"ants": "with ANTs (antspyx)",
                  "deepatlas": "by a DeepAtlas network after an antspyx affine alignment"}


def t2w_users(config: Config, library: AtlasLibrary) -> tuple[str, ...]:
    """The methods of this run that read a subject's T2w (registered onto its T1w once; names as
    in :data:`~dlf_bids.run_status.T2W_METHODS`): DLF with a T2w channel and a library with T2w,
    a T1w + T2w DeepAtlas or NeuroNet model."""
    from ..neuronet_segmentation import model_outputs

    users = []
    if "dlf" in config.fusion and dlf_uses_t2w(config, library):
        users.append("dlf")
    if deepatlas_uses_t2w(config):
        users.append("deepatlas")
    if config.tissue_model is not None and "T2w" in model_outputs(str(config.tissue_model)).modalities:
        users.append("neuronet")
    return tuple(users)


#: T2w outputs of ``align_atlases_to_reference`` -> the ``register_atlases`` input each feeds
#: (same name on the image workflow's inputnode), where that node maps over it
ALIGNED_ATLAS_T2W = (("t2w_on_reference", "atlas_t2w_on_reference"), ("t2w_to_t1w", "atlas_t2w_to_t1w"))


def init_dlf_bids_wf(config: Config, anatomicals: list[AnatomicalInput], library: AtlasLibrary):
    """One sub-workflow per T1w image, all in one graph so MultiProc can run them in parallel."""
    workflow = pe.Workflow(name="dlf_bids_wf")
    workflow.base_dir = str(config.work_dir)
    # DeepAtlas aligns each atlas to its reference grid once per run, for every image
    align_atlases = init_align_atlases_node(config, library) if config.registration == "deepatlas" else None
    for anat in anatomicals:
        image_wf = init_single_image_wf(config, anat, library)
        if align_atlases is None:
            workflow.add_nodes([image_wf])
            continue
        workflow.connect(align_atlases, "transform", image_wf, "multiatlas_wf.inputnode.atlas_transforms")
        workflow.connect(align_atlases, "on_reference", image_wf,
                         "multiatlas_wf.inputnode.atlas_on_reference")
        # the image's register node says which atlas T2w inputs it maps over (decided once, in
        # multiatlas.py): the T2w on the reference grid for a T1w + T2w model, and the rigid
        # T2w -> T1w when DLF also warps the atlas T2w (the same rigid, once per run)
        register = image_wf.get_node("multiatlas_wf.register_atlases")
        for output, field in ALIGNED_ATLAS_T2W:
            if field in register.iterfield:
                workflow.connect(align_atlases, output, image_wf, f"multiatlas_wf.inputnode.{field}")
    return workflow


def segmentation_metadata(config: Config, anat: AnatomicalInput, library: AtlasLibrary,
                          method: str) -> dict:
    """The sidecar of a fused segmentation: where it came from and how it was made."""
    sources = [bids_uri(anat.t1w, config.bids_dir, "raw")]
    sources += [bids_uri(a.dseg, library.root, "atlases") for a in library.atlases]
    registration = {"RegistrationPreset": config.registration_preset}
    if config.registration == "deepatlas":
        registration = {"Registration": "DeepAtlas network after an antspyx affine alignment",
                        "DeepAtlasModel": config.deepatlas_model.name,
                        "DeepAtlasRefineSteps": config.deepatlas_refine_steps}
    return {
        "Description": FUSION_DESCRIPTIONS[method].format(engine=ENGINE_PHRASES[config.registration]),
        "Sources": sources,
        "SpatialReference": sources[0],  # native T1w geometry
        **registration,
        "Atlases": [f"sub-{a.atlas_id}" for a in library.atlases],
    }


def init_single_image_wf(config: Config, anat: AnatomicalInput, library: AtlasLibrary):
    """Segment one T1w image and write its derivatives in the image's native geometry."""
    workflow = pe.Workflow(name=f"{anat.name}_wf")
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="inputnode")
    inputnode.inputs.t1w = str(anat.t1w)

    # Fix inconsistent qform/sform before anything else reads the header (niworkflows).
    validate = pe.Node(ValidateImage(), name="validate_t1w")
    # the subject's T2w, registered onto its T1w once, for whichever models take a T2w channel
    users = t2w_users(config, library) if anat.t2w is not None else ()
    memory = plan_for_run(config, anat.t1w, library)
    multiatlas_wf = init_multiatlas_wf(config, library, memory=memory,
                                       subject_has_t2w=bool({"dlf", "deepatlas"} & set(users)))

    workflow.connect([
        (inputnode, validate, [("t1w", "in_file")]),
        (validate, multiatlas_wf, [("out_file", "inputnode.t1w")]),
    ])
    # the registered atlases exist only in the work dir: the report's check is drawn now (it
    # holds the same images as a registration, hence the same memory)
    atlas = library.atlases[0]
    check = pe.Node(RegistrationCheck(atlas_t1w=str(atlas.t1w), atlas_name=f"sub-{atlas.atlas_id}"),
                    name="registration_check", mem_gb=memory.registration)
    ds_check = pe.Node(PublishFigure(out_path=str(figure_path(
        config.output_dir, anat.subject, anat.prefix, REGISTRATION_FIGURE))),
        name="ds_registration_check", run_without_submitting=True)
    workflow.connect([
        (validate, check, [("out_file", "subject_t1w")]),
        (multiatlas_wf, check, [("outputnode.warped_t1w", "warped_atlas_t1w")]),
        (check, ds_check, [("out_report", "in_file")]),
    ])
    if users:
        # T2w scans are rarely in the T1w's space: rigid registration, then the T1w grid
        coregister = pe.Node(CoregisterT2w(t2w=str(anat.t2w), seed=config.seed),
                             name="coregister_t2w")
        workflow.connect(validate, "out_file", coregister, "t1w")
        if {"dlf", "deepatlas"} & set(users):
            workflow.connect(coregister, "t2w_on_t1w", multiatlas_wf, "inputnode.t2w")
    if config.registration == "deepatlas":
        connect_deepatlas_outputs(workflow, multiatlas_wf, config, anat, library)
    if config.output_spaces:
        spaces_wf = init_output_spaces_wf(config, anat)
        workflow.connect(validate, "out_file", spaces_wf, "inputnode.t1w")
        for method in config.fusion:
            workflow.connect(multiatlas_wf, f"outputnode.seg_{method}",
                             spaces_wf, f"inputnode.seg_{method}")
    for method in config.fusion:
        metadata = segmentation_metadata(config, anat, library, method)
        ds_seg = pe.Node(
            DerivativesDataSink(
                base_directory=str(config.output_dir), source_file=str(anat.t1w),
                segmentation=method, suffix="dseg", compress=True,
                **({} if method == "dlf" else {"meta_dict": metadata}),
            ),
            name=f"ds_seg_{method}", run_without_submitting=True,
        )
        workflow.connect(multiatlas_wf, f"outputnode.seg_{method}", ds_seg, "in_file")
        connect_label_volumes(workflow, (multiatlas_wf, f"outputnode.seg_{method}"), config, anat,
                              library, method)
        if method == "dlf":
            # the sidecar also says what the run used (modalities, model hash): known at run time
            multiatlas_wf.get_node("fuse_dlf").inputs.base_metadata = metadata
            workflow.connect(multiatlas_wf, "outputnode.metadata_dlf", ds_seg, "meta_dict")
            ds_unc = pe.Node(
                DerivativesDataSink(
                    base_directory=str(config.output_dir), source_file=str(anat.t1w),
                    segmentation="dlf", suffix="uncertainty", compress=True,
                    meta_dict={"Description": "Normalised entropy (0-1) of the DLF label "
                                              "distribution at each voxel",
                               "Sources": [bids_uri(anat.t1w, config.bids_dir, "raw")]},
                ),
                name="ds_uncertainty_dlf", run_without_submitting=True,
            )
            workflow.connect(multiatlas_wf, "outputnode.uncertainty_dlf", ds_unc, "in_file")
            if config.dlf_probseg:
                ds_prob = pe.Node(
                    DerivativesDataSink(
                        base_directory=str(config.output_dir), source_file=str(anat.t1w),
                        segmentation="dlf", suffix="probseg", compress=True),
                    name="ds_probseg_dlf", run_without_submitting=True,
                )
                multiatlas_wf.get_node("fuse_dlf").inputs.probseg_base_metadata = {
                    "Description": "DLF probability of each label; 4D, volume k is the label "
                                   "LabelIndices[k] of seg-dlf_dseg.tsv (background excluded)",
                    "Sources": [bids_uri(anat.t1w, config.bids_dir, "raw")]}
                workflow.connect([(multiatlas_wf, ds_prob, [
                    ("outputnode.probseg_dlf", "in_file"),
                    ("outputnode.probseg_metadata_dlf", "meta_dict")])])
    if config.tissue_model is not None:  # NeuroNet: the raw T1w alone, no atlas
        connect_neuronet(workflow, (validate, "out_file"), config, anat, memory.neuronet,
                         t2w_source=(coregister, "t2w_on_t1w") if "neuronet" in users else None)
    return workflow


def atlas_space_label(atlas_id: str) -> str:
    """The ``from-`` label of an atlas's transform: ``atlas`` + its id, alphanumeric as BIDS wants."""
    return "atlas" + "".join(ch for ch in atlas_id if ch.isalnum())


def connect_deepatlas_outputs(workflow, multiatlas_wf, config: Config, anat: AnatomicalInput,
                              library: AtlasLibrary) -> None:
    """``--registration deepatlas``: the segmentation network's ``seg-deepatlas`` (+ volumes) and
    one ``from-atlas<id>_to-T1w_mode-image_xfm.h5`` per atlas (subject <- atlas, what
    ``antsApplyTransforms`` takes to bring anything drawn on that atlas onto the T1w)."""
    from ..utils.derivatives import lut_path

    raw = bids_uri(anat.t1w, config.bids_dir, "raw")
    sources, modalities = [raw], ["T1w"]
    if deepatlas_uses_t2w(config):  # as NeuroNet's sidecar: what the second channel really was
        modalities.append("T2w" if anat.t2w is not None else "noise")
        if anat.t2w is not None:
            sources.append(bids_uri(anat.t2w, config.bids_dir, "raw"))
    ds_seg = pe.Node(DerivativesDataSink(
        base_directory=str(config.output_dir), source_file=str(anat.t1w), segmentation="deepatlas",
        suffix="dseg", compress=True,
        meta_dict={"Description": "Label map of the DeepAtlas segmentation network (Xu & "
                                  "Niethammer, 2019), trained jointly with the registration "
                                  "network; predicted on the model's reference grid and brought "
                                  "back to the T1w grid (genericLabel)",
                   "Sources": sources, "SpatialReference": raw, "Modalities": modalities,
                   "DeepAtlasModel": config.deepatlas_model.name}),
        name="ds_seg_deepatlas", run_without_submitting=True)
    workflow.connect(multiatlas_wf, "outputnode.seg_deepatlas", ds_seg, "in_file")
    connect_label_volumes(workflow, (multiatlas_wf, "outputnode.seg_deepatlas"), config, anat,
                          library, "deepatlas", label_table=lut_path(config.output_dir, "deepatlas"))
    for k, atlas in enumerate(library.atlases):
        label = atlas_space_label(atlas.atlas_id)
        pick = pe.Node(niu.Select(index=k), name=f"pick_xfm_{label}", run_without_submitting=True)
        pick_meta = pe.Node(niu.Select(index=k), name=f"pick_xfm_metadata_{label}",
                            run_without_submitting=True)
        ds_xfm = pe.Node(DerivativesDataSink(
            base_directory=str(config.output_dir), source_file=str(anat.t1w), suffix="xfm",
            **{"from": label, "to": "T1w", "mode": "image"}),
            name=f"ds_xfm_{label}_to_T1w", run_without_submitting=True)
        workflow.connect([(multiatlas_wf, pick, [("outputnode.atlas_xfms", "inlist")]),
                          (multiatlas_wf, pick_meta, [("outputnode.atlas_xfm_metadata", "inlist")]),
                          (pick, ds_xfm, [("out", "in_file")]),
                          (pick_meta, ds_xfm, [("out", "meta_dict")])])
