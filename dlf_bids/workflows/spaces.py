"""Standard spaces: the segmentations of one T1w also written on TemplateFlow templates' grids.

Per template, the T1w is registered once (the subject moves; antspyx, the run's preset and seed)
and both transforms are written as ``_xfm.h5``; each fused segmentation is then warped with
``genericLabel`` onto every resolution asked of that template.
"""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..config import Config
from ..interfaces.bids import DerivativesDataSink, derivative_path
from ..interfaces.registration import RegisterToTemplate, WarpLabels
from ..resources import n_voxels, registration_gb
from ..templates import OutputSpace, registration_targets
from ..utils.bids import AnatomicalInput, bids_uri

FUSION_NAMES = {"dlf": "Deep Label Fusion", "jlf": "joint label fusion", "mv": "majority voting"}


def _entities(anat: AnatomicalInput, **more) -> dict:
    return {"subject": anat.subject, **anat.entities, **more}


def xfm_path(config: Config, anat: AnatomicalInput, source: str, target: str) -> Path:
    """Where the transform from ``source`` to ``target`` space is written (``_xfm.h5``)."""
    return derivative_path(config.output_dir, _entities(
        anat, **{"from": source, "to": target, "mode": "image", "suffix": "xfm",
                 "extension": ".h5"}))


def space_seg_path(config: Config, anat: AnatomicalInput, space: OutputSpace, method: str) -> Path:
    return derivative_path(config.output_dir, _entities(
        anat, segmentation=method, suffix="dseg", **space.entities))


def expected_space_outputs(config: Config, anat: AnatomicalInput) -> dict[str, Path]:
    """Every file the standard-space part of the graph writes for this T1w, by a readable key."""
    outputs = {}
    for template in registration_targets(config.output_spaces):
        outputs[f"T1w-to-{template} xfm"] = xfm_path(config, anat, "T1w", template)
        outputs[f"{template}-to-T1w xfm"] = xfm_path(config, anat, template, "T1w")
    for space in config.output_spaces:
        for method in config.fusion:
            outputs[f"{method} in {space}"] = space_seg_path(config, anat, space, method)
    return outputs


def describe_resolution(space: OutputSpace) -> str:
    """The sidecar's ``Resolution``: what ``res-N`` means for this template (BIDS asks for it)."""
    import nibabel as nb

    img = nb.load(str(space.t1w))
    zooms = "x".join(f"{z:g}" for z in img.header.get_zooms()[:3])
    shape = "x".join(str(s) for s in img.shape[:3])
    return (f"TemplateFlow {space.template} resolution {space.resolution}: {zooms} mm voxels, "
            f"{shape} grid")


def space_seg_metadata(config: Config, anat: AnatomicalInput, space: OutputSpace,
                       method: str) -> dict:
    """Sidecar of a segmentation in template space: BIDS URIs to its sources and its grid."""
    native = derivative_path(config.output_dir, _entities(anat, segmentation=method,
                                                          suffix="dseg"))
    meta = {
        "Description": f"The {FUSION_NAMES[method]} segmentation of the T1w, resampled onto "
                       f"the {space.template} template grid through the T1w-to-template "
                       "transform (ANTs genericLabel interpolation).",
        "Sources": [bids_uri(native, config.output_dir, ""),
                    bids_uri(xfm_path(config, anat, "T1w", space.template), config.output_dir, "")],
        "SpatialReference": bids_uri(space.t1w, config.templateflow_home, "templateflow"),
        "RegistrationPreset": config.registration_preset,
    }
    if space.resolution is not None:
        meta["Resolution"] = describe_resolution(space)
    return meta


def init_output_spaces_wf(config: Config, anat: AnatomicalInput, name: str = "output_spaces_wf"):
    """Register one T1w to each template of ``config.output_spaces`` and write it all there.

    Inputs
    ------
    t1w
        the subject's T1w (header-validated): the moving image
    seg_<method>
        each fused segmentation on the T1w grid
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w"] + [f"seg_{m}" for m in config.fusion]),
                        name="inputnode")
    for template, target in registration_targets(config.output_spaces).items():
        register = _register_node(config, anat, target)
        workflow.connect(inputnode, "t1w", register, "t1w")
        for output, (source, dest) in (("forward_transform", ("T1w", template)),
                                       ("inverse_transform", (template, "T1w"))):
            sink = pe.Node(DerivativesDataSink(
                base_directory=str(config.output_dir), source_file=str(anat.t1w), suffix="xfm",
                **{"from": source, "to": dest, "mode": "image"}),
                name=f"ds_xfm_{source}_to_{dest}", run_without_submitting=True)
            workflow.connect(register, output, sink, "in_file")
        for space in (s for s in config.output_spaces if s.template == template):
            for method in config.fusion:
                warp, sink = _warp_and_sink(config, anat, space, method)
                workflow.connect([
                    (inputnode, warp, [(f"seg_{method}", "labels")]),
                    (register, warp, [("forward_transform", "transform")]),
                    (warp, sink, [("out_file", "in_file")]),
                ])
    return workflow


def _register_node(config: Config, anat: AnatomicalInput, target: OutputSpace) -> pe.Node:
    threads = config.registration_threads
    register = pe.Node(
        RegisterToTemplate(template_t1w=str(target.t1w), preset=config.registration_preset,
                           seed=config.seed, num_threads=threads),
        name=f"register_{target.template}", n_procs=threads,
        mem_gb=registration_gb(n_voxels(target.t1w), n_voxels(anat.t1w)))  # subject moves
    if target.mask is not None:
        register.inputs.template_mask = str(target.mask)
    return register


def _warp_and_sink(config: Config, anat: AnatomicalInput, space: OutputSpace, method: str):
    tag = f"{method}_{space.template}" + (f"_res{space.resolution}" if space.resolution else "")
    warp = pe.Node(WarpLabels(reference=str(space.t1w)), name=f"warp_{tag}")
    sink = pe.Node(DerivativesDataSink(
        base_directory=str(config.output_dir), source_file=str(anat.t1w), segmentation=method,
        suffix="dseg", compress=True, meta_dict=space_seg_metadata(config, anat, space, method),
        **space.entities), name=f"ds_seg_{tag}", run_without_submitting=True)
    return warp, sink
